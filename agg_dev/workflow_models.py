"""The model files the example workflows (workflows/*.json) name, as ComfyUI's model folders hold them.

scripts/build_workflows.py writes them into the graphs (with their download addresses); the tests map them to
the fixtures that stand in for them (tests/agg_testing/workflow_models.py).
"""

from __future__ import annotations

SD15 = "v1-5-pruned-emaonly-fp16.safetensors"
SDXL = "sd_xl_base_1.0.safetensors"
OPEN_CLIP = "open_clip_model.safetensors"
CANNY = "control_v11p_sd15_canny_fp16.safetensors"
SD3 = "sd3_medium_incl_clips_t5xxlfp8.safetensors"
FLUX = "flux1-dev.safetensors"
FLUX_CLIP_L = "clip_l.safetensors"
FLUX_T5 = "t5xxl_fp8_e4m3fn.safetensors"
FLUX_VAE = "ae.safetensors"
CLIP_VISION = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
FLUX2 = "flux2_dev_fp8mixed.safetensors"
FLUX2_TE = "mistral_3_small_flux2_fp8.safetensors"
FLUX2_VAE = "flux2-vae.safetensors"
QWEN = "qwen_image_fp8_e4m3fn.safetensors"
QWEN_TE = "qwen_2.5_vl_7b_fp8_scaled.safetensors"
QWEN_VAE = "qwen_image_vae.safetensors"
WAN = "wan2.1_t2v_1.3B_fp16.safetensors"
WAN_TE = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
WAN_VAE = "wan_2.1_vae.safetensors"
SOURCE_VIDEO = "agg_source_video.mp4"  # the video workflow's example clip (web/assets/; a user picks their own)
