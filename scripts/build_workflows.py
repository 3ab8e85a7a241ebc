"""Regenerate workflows/*.json (UI format), workflows/api/*.json (API twins) and workflows/*.jpg.

The graphs are written below as API prompts. A real ComfyUI server with the pack is started on the
random-weight test models, the frontend is opened in headless Chromium, each prompt is loaded with
``app.loadApiJson``, a Note naming the model files is added, and the page's own serialisation gives
the UI file (``app.graph.serialize()``) and the API twin (``app.graphToPrompt().output``) with the real
model file names put back. The thumbnail is a screenshot of the loaded graph.

Usage: ~/.cache/agg-comfyui/venv/bin/python scripts/build_workflows.py   (needs scripts/setup_browser.sh)
"""

from __future__ import annotations

import copy
import io
import json
import os
import sys
import tempfile
from pathlib import Path

PACK = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PACK))
from agg_kernels.guidance import DEFAULT_DDS_LR as DDS_LR  # noqa: E402
from agg_kernels.guidance import DEFAULT_DDS_STEPS as DDS_STEPS  # noqa: E402
from agg_kernels.schedule import REFERENCE_END_PERCENT  # noqa: E402
from agg_kernels.strength import DEFAULT_CLIP_WEIGHT as CLIP_WEIGHT  # noqa: E402
from agg_kernels.strength import DEFAULT_STRUCTURE_WEIGHT as STRUCTURE_WEIGHT  # noqa: E402
from agg_kernels.strength import DEFAULT_STYLE_WEIGHT as STYLE_WEIGHT  # noqa: E402

END_PERCENT = round(REFERENCE_END_PERCENT, 4)  # the nodes' default (nodes.runtime.AGGSettings)
COMFYUI = Path(os.environ.get("AGG_COMFYUI", Path.home() / ".cache" / "agg-comfyui" / "ComfyUI"))

SD15 = "v1-5-pruned-emaonly.safetensors"
SDXL = "sd_xl_base_1.0.safetensors"
OPEN_CLIP = "open_clip_model.safetensors"
CANNY = "control_v11p_sd15_canny.safetensors"

SOURCE = "a child's drawing of a girl in a pink dress on a green hill"
TARGET = "a watercolor painting of a girl in a pink dress on a green hill"
NEGATIVE = "blurry, low quality, watermark"

NOTE_COMMON = (
    "Model files this workflow needs:\n"
    "- {ckpt} in ComfyUI/models/checkpoints\n"
    f"- {OPEN_CLIP} in ComfyUI/models/open_clip (the open_clip weights of "
    "laion/CLIP-ViT-B-32-laion2B-s34B-b79K, as one safetensors file)\n"
)


def _node(class_type: str, title: str | None = None, **inputs) -> dict:
    d = {"class_type": class_type, "inputs": inputs}
    if title:
        d["_meta"] = {"title": title}
    return d


def _base(ckpt: str, size: int) -> dict:
    return {
        "1": _node("CheckpointLoaderSimple", ckpt_name=ckpt),
        "2": _node("LoadImage", "Source image", image="example.png"),
        "3": _node("ImageScale", "Resize source", image=["2", 0], upscale_method="lanczos", width=size, height=size,
                   crop="center"),
        "4": _node("VAEEncode", pixels=["3", 0], vae=["1", 2]),
        "10": _node("AGGCLIPLoader", clip_name=OPEN_CLIP, architecture="auto"),
    }


def text_guided() -> dict:
    g = _base(SD15, 512)
    g.update({
        "5": _node("CLIPTextEncode", "Source prompt", text=SOURCE, clip=["1", 1]),
        "6": _node("CLIPTextEncode", "Target prompt", text=TARGET, clip=["1", 1]),
        "7": _node("CLIPTextEncode", "Negative prompt", text=NEGATIVE, clip=["1", 1]),
        "8": _node("BasicScheduler", model=["1", 0], scheduler="normal", steps=50, denoise=0.6),
        "9": _node("AGGInvert", model=["1", 0], latent=["4", 0], positive=["5", 0], sigmas=["8", 0]),
        "11": _node("AGGStructureLoss", weight=STRUCTURE_WEIGHT, trajectory=["9", 1]),
        "12": _node("AGGCLIPDirectionLoss", clip=["10", 0], vae=["1", 2], source_text=SOURCE, target_text=TARGET,
                    weight=CLIP_WEIGHT, source_image=["3", 0], loss=["11", 0], decoder="vae", cutouts=8, range_weight=0.0,
                    seed=0),
        "13": _node("AGGGuider", model=["1", 0], positive=["6", 0], negative=["7", 0], cfg=7.5, loss=["12", 0],
                    start_percent=0.0, end_percent=END_PERCENT, manifold="finite_difference", dds_steps=DDS_STEPS, dds_lr=DDS_LR,
                    asymmetric=True),
        "14": _node("DisableNoise"),
        "15": _node("AGGSampler", eta_edit=0.0, eta=0.0, eta_boost=1.0, edit_end=0.32, boost_start=0.67, s_noise=1.0),
        "16": _node("SamplerCustomAdvanced", noise=["14", 0], guider=["13", 0], sampler=["15", 0], sigmas=["8", 0],
                    latent_image=["9", 0]),
        "17": _node("VAEDecode", samples=["16", 0], vae=["1", 2]),
        "18": _node("SaveImage", filename_prefix="agg/text_guided", images=["17", 0]),
    })
    return g


def _ksampler_tail(g: dict, model: list, positive: list, negative: list, prefix: str, steps: int = 30,
                   denoise: float = 0.6) -> None:
    g["16"] = _node("KSampler", model=model, seed=42, steps=steps, cfg=7.5, sampler_name="euler", scheduler="normal",
                    positive=positive, negative=negative, latent_image=["4", 0], denoise=denoise)
    g["17"] = _node("VAEDecode", samples=["16", 0], vae=["1", 2])
    g["18"] = _node("SaveImage", filename_prefix=prefix, images=["17", 0])


def _apply(loss: list) -> dict:
    return _node("AGGApply", model=["1", 0], loss=loss, start_percent=0.0, end_percent=END_PERCENT,
                 manifold="finite_difference", dds_steps=DDS_STEPS, dds_lr=DDS_LR, asymmetric=True)


def img2img_ksampler(ckpt: str = SD15, size: int = 512, prefix: str = "agg/img2img") -> dict:
    g = _base(ckpt, size)
    g.update({
        "6": _node("CLIPTextEncode", "Target prompt", text=TARGET, clip=["1", 1]),
        "7": _node("CLIPTextEncode", "Negative prompt", text=NEGATIVE, clip=["1", 1]),
        "11": _node("AGGStructureLoss", weight=STRUCTURE_WEIGHT, source=["4", 0]),
        "12": _node("AGGCLIPDirectionLoss", clip=["10", 0], vae=["1", 2], source_text=SOURCE, target_text=TARGET,
                    weight=CLIP_WEIGHT, source_image=["3", 0], loss=["11", 0], decoder="vae", cutouts=8, range_weight=0.0,
                    seed=0),
        "13": _apply(["12", 0]),
    })
    _ksampler_tail(g, ["13", 0], ["6", 0], ["7", 0], prefix)
    return g


def image_style() -> dict:
    g = _base(SD15, 512)
    g.update({
        "6": _node("CLIPTextEncode", "Prompt", text="a painting of a girl in a pink dress on a green hill",
                   clip=["1", 1]),
        "7": _node("CLIPTextEncode", "Negative prompt", text=NEGATIVE, clip=["1", 1]),
        "20": _node("LoadImage", "Style image", image="example.png"),
        "11": _node("AGGStructureLoss", weight=STRUCTURE_WEIGHT, source=["4", 0]),
        "12": _node("AGGImageStyleLoss", clip=["10", 0], vae=["1", 2], style_image=["20", 0], weight=STYLE_WEIGHT,
                    loss=["11", 0], decoder="vae", cutouts=8, seed=0),
        "13": _apply(["12", 0]),
    })
    _ksampler_tail(g, ["13", 0], ["6", 0], ["7", 0], "agg/image_style")
    return g


def controlnet() -> dict:
    g = _base(SD15, 512)
    g.update({
        "6": _node("CLIPTextEncode", "Target prompt", text=TARGET, clip=["1", 1]),
        "7": _node("CLIPTextEncode", "Negative prompt", text=NEGATIVE, clip=["1", 1]),
        "21": _node("Canny", image=["3", 0], low_threshold=0.4, high_threshold=0.8),
        "22": _node("ControlNetLoader", control_net_name=CANNY),
        "23": _node("ControlNetApplyAdvanced", positive=["6", 0], negative=["7", 0], control_net=["22", 0],
                    image=["21", 0], strength=0.8, start_percent=0.0, end_percent=1.0, vae=["1", 2]),
        "11": _node("AGGStructureLoss", weight=STRUCTURE_WEIGHT, source=["4", 0]),
        "12": _node("AGGCLIPDirectionLoss", clip=["10", 0], vae=["1", 2], source_text=SOURCE, target_text=TARGET,
                    weight=CLIP_WEIGHT, source_image=["3", 0], loss=["11", 0], decoder="vae", cutouts=8, range_weight=0.0,
                    seed=0),
        "13": _apply(["12", 0]),
    })
    _ksampler_tail(g, ["13", 0], ["23", 0], ["23", 1], "agg/controlnet", denoise=0.75)
    return g


WORKFLOWS = {
    "agg_text_guided": (text_guided, NOTE_COMMON.format(ckpt=SD15)
                        + "\nPaper-faithful AGG: DDIM inversion of the source (AGG Invert) to denoise 0.6, then the "
                          "AGG Sampler with noise disabled. Structure Loss follows the inversion trajectory; CLIP "
                          "Direction Loss moves the image from the source text toward the target text."),
    "agg_img2img_ksampler": (img2img_ksampler, NOTE_COMMON.format(ckpt=SD15)
                             + "\nDrop-in AGG: a normal img2img KSampler (denoise 0.6) with Apply AGG on the model. "
                               "Structure Loss keeps the source latent's layout; CLIP Direction Loss edits toward "
                               "the target text."),
    "agg_image_style": (image_style, NOTE_COMMON.format(ckpt=SD15)
                        + "\nImage-guided AGG: pick your style picture in the 'Style image' LoadImage node. Image "
                          "Style Loss pulls the result's CLIP image embedding toward it."),
    "agg_controlnet": (controlnet, NOTE_COMMON.format(ckpt=SD15)
                       + f"- {CANNY} in ComfyUI/models/controlnet\n"
                         "\nAGG with ControlNet: the core Canny node makes the edge map; AGG's extra model passes "
                         "go through ControlNet as the sampler's do."),
    "agg_sdxl_img2img": (lambda: img2img_ksampler(SDXL, 1024, "agg/sdxl_img2img"), NOTE_COMMON.format(ckpt=SDXL)
                         + "\nSDXL version of the drop-in img2img workflow (1024 px)."),
}

# Real model file name -> the test-model name used while building (the server only lists those).
def fixture_names(models) -> dict[str, str]:
    return {SD15: models.checkpoint, SDXL: models.checkpoint, OPEN_CLIP: models.open_clip, CANNY: models.controlnet}


def substitute(obj, names: dict[str, str]):
    """Deep copy of a JSON value with every string equal to a key of `names` replaced."""
    if isinstance(obj, dict):
        return {k: substitute(v, names) for k, v in obj.items()}
    if isinstance(obj, list):
        return [substitute(v, names) for v in obj]
    if isinstance(obj, str):
        return names.get(obj, obj)
    return obj


# JS: load an API prompt, fix seeds, add the Note, lay out; returns {ui, api}.
JS_BUILD = """
const [api, note, name] = __args;
app.graph.clear();
await app.loadApiJson(JSON.parse(JSON.stringify(api)), name + '.json');
for (const n of app.graph._nodes)
  for (const w of (n.widgets || [])) if (w.name === 'control_after_generate') w.value = 'fixed';
const LG = window.LiteGraph || (window.comfyAPI && window.comfyAPI.litegraph && window.comfyAPI.litegraph.LiteGraph);
const nn = LG.createNode('Note');
nn.title = 'Models needed';
nn.widgets[0].value = note;
nn.size = [420, 260];
app.graph.add(nn);
nn.pos = [20, -300];
app.graph.setDirtyCanvas(true, true);
await new Promise(r => setTimeout(r, 300));
const ui = JSON.parse(JSON.stringify(app.graph.serialize()));
const p = await app.graphToPrompt();
return {ui, api: p.output};
"""

JS_LOAD_UI = """
const [ui, name] = __args;
await app.loadGraphData(JSON.parse(JSON.stringify(ui)), true, true, name + '.json');
await new Promise(r => setTimeout(r, 300));
for (const k of ['low_quality_zoom_threshold', 'low_quality_threshold']) if (k in app.canvas) app.canvas[k] = 0.05;
if (window.LiteGraph) LiteGraph.low_quality_zoom_threshold = 0.05;
try { await app.extensionManager.command.execute('Comfy.Canvas.FitView'); } catch (e) { app.canvas.ds.scale = 0.5; }
for (const b of document.querySelectorAll('button[aria-label="Close"], .p-toast-icon-close')) try { b.click(); } catch (e) {}
app.graph.setDirtyCanvas(true, true);
await new Promise(r => setTimeout(r, 500));
const p = await app.graphToPrompt();
return {api: p.output, nodes: app.graph._nodes.length};
"""


def arrange_js() -> str:
    return "app.graph.arrange && app.graph.arrange(60); app.graph.setDirtyCanvas(true, true); return true;"


def thumbnail(png: bytes, out: Path, width: int = 768) -> None:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        im = im.convert("RGB")
        h = round(im.height * width / im.width)
        im.resize((width, h), Image.LANCZOS).save(out, "JPEG", quality=82, optimize=True)


def main() -> int:
    sys.path.insert(0, str(COMFYUI))
    sys.path.append(str(PACK / "tests"))
    from agg_testing.browser import Browser, ComfyServer, open_comfy
    from agg_testing.fixtures import models_dir, write_extra_model_paths

    work = Path(tempfile.mkdtemp(prefix="agg-build-"))
    models = models_dir(work / "models", kl=False)
    names = fixture_names(models)
    back = {v: k for k, v in names.items() if k != SDXL}
    yaml = write_extra_model_paths(work / "extra_model_paths.yaml", models)
    (PACK / "workflows" / "api").mkdir(parents=True, exist_ok=True)
    with ComfyServer(COMFYUI, work / "server", yaml) as server, Browser() as browser:
        open_comfy(browser, server)
        browser.set_window_size(1920, 1080)
        for name, (build, note) in WORKFLOWS.items():
            api = build()
            res = browser.execute_async(JS_BUILD, substitute(api, names), note, name)
            browser.execute(arrange_js())
            ui = browser.execute("return JSON.parse(JSON.stringify(app.graph.serialize()));")
            real = dict(back)
            if name == "agg_sdxl_img2img":
                real[models.checkpoint] = SDXL
            ui = substitute(ui, real)
            api_out = substitute(res["api"], real)
            for nid, node in api.items():  # keep the titles written above
                if "_meta" in node and nid in api_out:
                    api_out[nid]["_meta"] = node["_meta"]
            (PACK / "workflows" / f"{name}.json").write_text(json.dumps(ui, indent=2) + "\n")
            (PACK / "workflows" / "api" / f"{name}.json").write_text(json.dumps(api_out, indent=2) + "\n")
            browser.execute_async(JS_LOAD_UI, substitute(ui, names), name)
            thumbnail(browser.screenshot(), PACK / "workflows" / f"{name}.jpg")
            print("wrote", name, len(api_out), "nodes")
    return 0


def api_prompts() -> dict[str, dict]:
    """The API prompts as written here (model names real), for tests that want the source graphs."""
    return {name: copy.deepcopy(build()) for name, (build, _note) in WORKFLOWS.items()}


if __name__ == "__main__":
    raise SystemExit(main())
