"""Memory that ComfyUI manages: the open_clip model of AGG CLIP Loader is a ModelPatcher that ComfyUI loads, counts
and offloads (nodes/clip_model.py); its image tower stays differentiable whatever ComfyUI did to it in a prompt."""

from __future__ import annotations

import pytest
import torch
from agg_testing.probes import pack_module


@pytest.fixture()
def clip(comfy, agg_models):
    clip_model = pack_module("nodes.clip_model")
    c = clip_model.load_open_clip(str(agg_models.path("open_clip", agg_models.open_clip)))
    yield c
    c.unload()


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def loaded_patchers() -> list:
    import comfy.model_management as mm

    return [m.model for m in mm.current_loaded_models]


def test_the_clip_model_is_a_model_patcher_on_comfyui_devices(clip):
    import comfy.model_management as mm
    import comfy.model_patcher

    assert isinstance(clip.patcher, comfy.model_patcher.ModelPatcher)
    assert clip.patcher.model is clip.model
    assert clip.patcher.load_device == mm.get_torch_device()
    assert clip.patcher.offload_device == mm.text_encoder_offload_device()
    weights = sum(t.numel() * t.element_size() for t in clip.model.state_dict().values())
    assert clip.patcher.model_size() == weights > 0  # what ComfyUI counts is the whole model
    assert clip.device == clip.patcher.offload_device


def test_loading_goes_through_model_management_and_keeps_the_models_in_use(clip):
    """to(run device), what the losses call, registers the model with ComfyUI (so it is counted and can be freed);
    the models the sampler is using stay loaded; to(offload device) hands it back, and ComfyUI forgets it."""
    import comfy.model_management as mm
    import comfy.model_patcher

    other = comfy.model_patcher.ModelPatcher(torch.nn.Linear(4, 4), mm.get_torch_device(), mm.unet_offload_device())
    mm.load_models_gpu([other])  # stands for the sampler's UNet
    assert clip.patcher not in loaded_patchers()
    clip.to(mm.get_torch_device())
    assert clip.patcher in loaded_patchers() and other in loaded_patchers()
    assert clip.device == clip.patcher.load_device
    clip.unload()
    assert clip.patcher not in loaded_patchers() and other in loaded_patchers()
    assert clip.device == clip.patcher.offload_device


def test_encoders_load_the_model_themselves(clip):
    """encode_text at node time loads the model the way ComfyUI's own text encoders are loaded."""
    clip.clear_cache()
    emb = clip.encode_text(["a photo"])
    assert clip.patcher in loaded_patchers()
    assert emb.dtype == torch.float32 and emb.shape[0] == 1


def test_the_image_tower_stays_differentiable_after_comfyui_moved_it_in_inference_mode(clip):
    """ComfyUI moves models inside a prompt (inference mode), which makes inference tensors that autograd cannot
    save; loading re-makes them as ordinary views of the same memory, so the image loss's backward works and no
    weight is copied."""
    with torch.inference_mode():  # what moves inside a prompt do to the weights: new data, or new Parameters
        slots = [(mod, n) for mod in clip.model.visual.modules() for n, t in mod._parameters.items() if t is not None]
        for i, (m, name) in enumerate(slots):
            p = m._parameters[name]
            if i % 2:
                p.data = p.data.clone()
            else:
                m._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
    assert all(p.is_inference() for p in clip.model.visual.parameters())
    before = module_bytes(clip.model)
    memory = [p.data_ptr() for p in clip.model.visual.parameters()]
    with torch.inference_mode():
        clip.to(clip.patcher.load_device)
    assert not any(p.is_inference() for p in clip.model.visual.parameters())
    assert module_bytes(clip.model) == before
    assert [p.data_ptr() for p in clip.model.visual.parameters()] == memory  # views: no weight was copied
    with torch.inference_mode(False), torch.enable_grad():
        images = torch.rand(2, 3, clip.image_size, clip.image_size, requires_grad=True)
        (g,) = torch.autograd.grad(clip.encode_image(images).square().sum(), images)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_text_tower_in_half_precision_image_tower_in_float32(comfy, agg_models):
    """On a GPU the text tower runs in ComfyUI's text-encoder dtype (fp16): half its memory, the same text
    embedding to fp16 rounding; the image tower, differentiated by the losses, stays float32."""
    clip_model = pack_module("nodes.clip_model")
    path = str(agg_models.path("open_clip", agg_models.open_clip))
    full = clip_model.load_open_clip(path)
    half = clip_model.AGGClip(clip_model.load_open_clip(path).model, "half", text_dtype=torch.float16)
    try:
        assert full.text_dtype == torch.float32  # CPU: float32 throughout
        assert {p.dtype for p in half.model.visual.parameters()} == {torch.float32}
        text = [p for n, p in half.model.named_parameters() if not n.startswith("visual.") and n != "logit_scale"]
        assert text and {p.dtype for p in text} == {torch.float16}
        text_bytes = sum(t.numel() * 2 for n, t in (*half.model.named_parameters(), *half.model.named_buffers())
                         if not n.startswith("visual.") and n != "logit_scale")  # weights and attention mask
        assert module_bytes(full.model) - module_bytes(half.model) == text_bytes
        a, b = full.encode_text(["a watercolor painting"]), half.encode_text(["a watercolor painting"])
        assert b.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(a, b).item() > 0.999
        images = torch.rand(1, 3, full.image_size, full.image_size)
        with torch.inference_mode(False):
            assert torch.equal(full.encode_image(images), half.encode_image(images))
    finally:
        full.unload()
        half.unload()
