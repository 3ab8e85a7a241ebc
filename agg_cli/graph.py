"""API-format workflows: loading (an example name or a file), the command line's overrides, the
photo's (or video's) working size, and the same graph with AGG taken out (the unguided comparison)."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PACK = Path(__file__).resolve().parent.parent
EXAMPLES = {p.stem.removeprefix("agg_"): p for p in sorted((PACK / "workflows" / "api").glob("agg_*.json"))}


class GraphError(ValueError):
    """A workflow that cannot take the command line's settings; the message names the argument."""


# Which command-line setting goes into which node input. Literal inputs only: an input fed by a link
# (e.g. a seed from a primitive node) is left alone.
OVERRIDES: dict[str, list[tuple[str, str]]] = {
    "seed": [("KSampler", "seed"), ("KSamplerAdvanced", "noise_seed"), ("RandomNoise", "noise_seed"),
             ("SamplerCustom", "noise_seed"), ("AGGCLIPDirectionLoss", "seed"), ("AGGImageStyleLoss", "seed")],
    "steps": [("KSampler", "steps"), ("KSamplerAdvanced", "steps"), ("BasicScheduler", "steps")],
    "denoise": [("KSampler", "denoise"), ("BasicScheduler", "denoise")],
    "cfg": [("KSampler", "cfg"), ("KSamplerAdvanced", "cfg"), ("CFGGuider", "cfg"), ("AGGGuider", "cfg"),
            ("SamplerCustom", "cfg")],
    "sampler": [("KSampler", "sampler_name"), ("KSamplerAdvanced", "sampler_name"), ("KSamplerSelect", "sampler_name")],
    "scheduler": [("KSampler", "scheduler"), ("KSamplerAdvanced", "scheduler"), ("BasicScheduler", "scheduler")],
    "decoder": [("AGGCLIPDirectionLoss", "decoder"), ("AGGImageStyleLoss", "decoder"), ("AGGColorLoss", "decoder")],
    "structure_weight": [("AGGStructureLoss", "weight")],
    "clip_weight": [("AGGCLIPDirectionLoss", "weight")],
    "style_weight": [("AGGImageStyleLoss", "weight")],
    "color_weight": [("AGGColorLoss", "weight")],
}
# Model loaders: command-line argument -> (class_type, input, ComfyUI models folder)
MODEL_INPUTS: dict[str, tuple[str, str, str]] = {
    "checkpoint": ("CheckpointLoaderSimple", "ckpt_name", "checkpoints"),
    "clip": ("AGGCLIPLoader", "clip_name", "open_clip"),
    "controlnet": ("ControlNetLoader", "control_net_name", "controlnet"),
}
SOURCE_TITLES, STYLE_TITLES = ("Source image",), ("Style image", "Reference image", "Color reference")
VIDEO_TITLES = ("Source video",)
# The input of each source loader that names the uploaded file
SOURCE_INPUTS = {"LoadImage": "image", "LoadVideo": "file"}
# Video nodes between Load Video and the frames' resize: the resize is still "fed by the source"
VIDEO_PASS_THROUGH = {"Video Slice": "video", "GetVideoComponents": "video"}
# Savers whose filename_prefix the command line sets
SAVERS = ("SaveImage", "SaveVideo")
MASK_TITLES = ("Edit mask",)
# Pictures the example workflows load that ship with the pack (ComfyUI's input folder may lack them).
ASSETS = PACK / "web" / "assets"


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def load_workflow(spec: str) -> tuple[str, dict]:
    """An example name (text_guided, img2img_ksampler, ...) or the path of an API-format JSON file."""
    if spec in EXAMPLES:
        return spec, json.loads(EXAMPLES[spec].read_text())
    path = Path(spec).expanduser()
    if not path.exists():
        raise GraphError(f"--workflow {spec}: neither an example ({', '.join(EXAMPLES)}) nor an existing file")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise GraphError(f"--workflow {spec}: not a JSON file ({e})") from None
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise GraphError(f"--workflow {spec}: this is a UI-format workflow; save it in API format "
                         "(ComfyUI menu: Workflow > Export (API)) and pass that file")
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):
        data = data["prompt"]  # a saved POST /prompt body
    if not isinstance(data, dict) or not data or not all(
            isinstance(n, dict) and "class_type" in n and isinstance(n.get("inputs"), dict) for n in data.values()):
        raise GraphError(f"--workflow {spec}: not an API-format graph ({{node id: {{class_type, inputs}}}})")
    if not any(str(n["class_type"]).startswith("AGG") for n in data.values()):
        raise GraphError(f"--workflow {spec}: the graph has no AGG node (Apply AGG or AGG Guider and a loss)")
    return path.name, {str(k): v for k, v in data.items()}


def title(node: dict) -> str:
    return str(node.get("_meta", {}).get("title", ""))


def is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def string_node(api: dict, value: Any) -> str | None:
    """The String primitive a linked text input comes from (the example workflows feed one shared text to
    both a prompt and a loss), else None."""
    if is_link(value) and api.get(str(value[0]), {}).get("class_type") in ("PrimitiveStringMultiline",
                                                                          "PrimitiveString"):
        return str(value[0])
    return None


def text_value(api: dict, value: Any) -> Any:
    """A text input's string: the literal, or the value of the String primitive it is linked to."""
    nid = string_node(api, value)
    return api[nid]["inputs"].get("value") if nid is not None else value


def set_text(api: dict, node: dict, key: str, value: str) -> None:
    """Set a text input, or the String primitive it is linked to; other links are left alone."""
    nid = string_node(api, node["inputs"].get(key))
    if nid is not None:
        api[nid]["inputs"]["value"] = value
    elif not is_link(node["inputs"].get(key)):
        node["inputs"][key] = value


def nodes_of(api: dict, *class_types: str) -> list[str]:
    return [nid for nid, n in api.items() if n["class_type"] in class_types]


def source_image_nodes(api: dict) -> list[str]:
    """The LoadImage nodes that take the photo: those titled 'Source image', else the only LoadImage
    that is not the style image."""
    loads = nodes_of(api, "LoadImage")
    titled = [nid for nid in loads if title(api[nid]) in SOURCE_TITLES]
    if titled:
        return titled
    others = [nid for nid in loads if title(api[nid]) not in STYLE_TITLES]
    if len(others) > 1:
        raise GraphError(f"--workflow: {len(others)} LoadImage nodes ({', '.join(others)}); title the one for the "
                         "photo 'Source image' (and a style image 'Style image')")
    return others


def video_nodes(api: dict) -> list[str]:
    """The Load Video nodes that take the source video: those titled 'Source video', else all of them."""
    loads = nodes_of(api, "LoadVideo")
    titled = [nid for nid in loads if title(api[nid]) in VIDEO_TITLES]
    return titled or loads


def is_video_workflow(api: dict) -> bool:
    return bool(video_nodes(api))


def source_nodes(api: dict) -> list[str]:
    """The loaders the photo or the video goes into: Load Video in a video workflow, else the source LoadImage."""
    return video_nodes(api) or source_image_nodes(api)


def style_image_nodes(api: dict) -> list[str]:
    return [nid for nid in nodes_of(api, "LoadImage") if title(api[nid]) in STYLE_TITLES]


def mask_image_nodes(api: dict) -> list[str]:
    return [nid for nid in nodes_of(api, "LoadImage") if title(api[nid]) in MASK_TITLES]


def shipped_images(api: dict) -> dict[str, Path]:
    """LoadImage nodes that name a picture shipped in web/assets/ -> that file (to upload before running)."""
    out = {}
    for nid in nodes_of(api, "LoadImage"):
        value = api[nid]["inputs"].get("image")
        if isinstance(value, str) and "/" not in value and (ASSETS / value).is_file():
            out[nid] = ASSETS / value
    return out


def _fed_by(api: dict, ref: Any, sources: list[str]) -> bool:
    """Whether a link comes from one of `sources`, directly or through Trim Video / Get Video Components."""
    for _ in range(8):
        if not is_link(ref):
            return False
        nid = str(ref[0])
        if nid in sources:
            return True
        node = api.get(nid, {})
        key = VIDEO_PASS_THROUGH.get(node.get("class_type"))
        if key is None:
            return False
        ref = node["inputs"].get(key)
    return False


def resize_nodes(api: dict, sources: list[str]) -> list[str]:
    """ImageScale nodes fed by a source loader (a video's frames through Get Video Components)."""
    return [nid for nid in nodes_of(api, "ImageScale") if _fed_by(api, api[nid]["inputs"].get("image"), sources)]


def _text_node_upstream(api: dict, ref: Any, key: str, depth: int = 0) -> str | None:
    """Follow a conditioning input back (through e.g. ControlNetApplyAdvanced) to its CLIPTextEncode."""
    if not is_link(ref) or depth > 12:
        return None
    nid = str(ref[0])
    node = api.get(nid)
    if node is None:
        return None
    if node["class_type"] == "CLIPTextEncode":
        return nid
    ins = node["inputs"]
    for k in (key, "conditioning", "conditioning_to"):
        if k in ins:
            return _text_node_upstream(api, ins[k], key, depth + 1)
    return None


def text_roles(api: dict) -> dict[str, str]:
    """CLIPTextEncode node id -> 'source' | 'target' | 'negative', from how the graph uses it (AGG
    Invert's positive is the source text; a sampler's or guider's positive the target), else its title."""
    roles: dict[str, str] = {}
    for node in api.values():
        for key, role in (("positive", "target"), ("negative", "negative")):
            nid = _text_node_upstream(api, node["inputs"].get(key), key)
            if nid is not None:
                if node["class_type"] == "AGGInvert":
                    role = "source"
                roles.setdefault(nid, role)
    by_title = {"Source prompt": "source", "Target prompt": "target", "Prompt": "target", "Negative prompt": "negative"}
    for nid in nodes_of(api, "CLIPTextEncode"):
        if nid not in roles and title(api[nid]) in by_title:
            roles[nid] = by_title[title(api[nid])]
    return roles


def uses_text(api: dict, role: str) -> bool:
    """Whether the graph has a `role` ('source' or 'target') text the command line should set."""
    if role in text_roles(api).values():
        return True
    key = {"source": "source_text", "target": "target_text"}[role]
    return any(key in api[nid]["inputs"] for nid in nodes_of(api, "AGGCLIPDirectionLoss"))


def workflow_text(api: dict, role: str) -> str | None:
    for nid, r in text_roles(api).items():
        if r == role and isinstance(text_value(api, api[nid]["inputs"].get("text")), str):
            return text_value(api, api[nid]["inputs"]["text"])
    key = {"source": "source_text", "target": "target_text"}.get(role)
    for nid in nodes_of(api, "AGGCLIPDirectionLoss"):
        if isinstance(text_value(api, api[nid]["inputs"].get(key)), str):
            return text_value(api, api[nid]["inputs"][key])
    return None


def workflow_size(api: dict) -> int | None:
    """The longer side of the workflow's own source resize (e.g. 512), if it has one."""
    sizes = [max(int(api[n]["inputs"].get("width", 0)), int(api[n]["inputs"].get("height", 0)))
             for n in resize_nodes(api, source_nodes(api))
             if not is_link(api[n]["inputs"].get("width")) and not is_link(api[n]["inputs"].get("height"))]
    return max(sizes) if sizes else None


def fit_size(width: int, height: int, size: int, multiple: int = 8) -> tuple[int, int]:
    """Scale (width, height) so that the longer side is `size`, keeping the aspect ratio, each side
    rounded to a multiple of `multiple` (at least one multiple)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"bad image size {width}x{height}")
    scale = size / max(width, height)

    def r(x: float) -> int:
        return max(multiple, int(round(x * scale / multiple)) * multiple)

    return r(width), r(height)


@dataclass
class Settings:
    """The command line's values that go into the graph (None: keep the workflow's)."""

    source: str | None = None
    target: str | None = None
    negative: str | None = None
    seed: int | None = None
    steps: int | None = None
    denoise: float | None = None
    cfg: float | None = None
    sampler: str | None = None
    scheduler: str | None = None
    decoder: str | None = None
    structure_weight: float | None = None
    clip_weight: float | None = None
    style_weight: float | None = None
    color_weight: float | None = None
    checkpoint: str | None = None  # model names as the server lists them
    clip: str | None = None
    controlnet: str | None = None


def check_applicable(api: dict, s: Settings, name: str, style_image: bool, size: bool) -> None:
    """Raise GraphError, naming the argument, for a setting the workflow has no place for."""
    for key, targets in OVERRIDES.items():
        if getattr(s, key) is None:
            continue
        hits = [nid for nid in api for ct, inp in targets
                if api[nid]["class_type"] == ct and inp in api[nid]["inputs"] and not is_link(api[nid]["inputs"][inp])]
        if not hits:
            kinds = sorted({ct for ct, _ in targets})
            hint = " (it samples with AGG Sampler; use --workflow img2img_ksampler to choose a sampler)" \
                if key == "sampler" and nodes_of(api, "AGGSampler") else ""
            raise GraphError(f"{flag(key)}: the workflow {name} has no {' / '.join(kinds)} input to set{hint}")
    for key, (ct, _inp, _folder) in MODEL_INPUTS.items():
        if getattr(s, key) is not None and not nodes_of(api, ct):
            raise GraphError(f"--{key}: the workflow {name} has no {ct} node")
    if style_image and not style_image_nodes(api):
        raise GraphError(f"--style-image: the workflow {name} has no LoadImage titled 'Style image'")
    if size and not resize_nodes(api, source_nodes(api)):
        raise GraphError(f"--size: the workflow {name} has no ImageScale fed by the source image or video")
    for role in ("source", "target", "negative"):
        if getattr(s, role) is not None and not (role in text_roles(api).values() or (
                role != "negative" and uses_text(api, role))):
            raise GraphError(f"--{role}: the workflow {name} has no {role} text")
    if not source_nodes(api):
        raise GraphError(f"the workflow {name} has no LoadImage for the photo (nor a Load Video for a video)")


def customise(api: dict, s: Settings, image: str, size: tuple[int, int] | None, prefix: str,
              style: str | None = None, mask: str | None = None) -> dict:
    """A copy of `api` with the settings, the uploaded image (or video) names, the working size and the
    SaveImage / SaveVideo prefix filled in (a style or mask picture not given keeps the workflow's own)."""
    p = copy.deepcopy(api)
    for key, targets in OVERRIDES.items():
        value = getattr(s, key)
        if value is None:
            continue
        for node in p.values():
            for ct, inp in targets:
                if node["class_type"] == ct and inp in node["inputs"] and not is_link(node["inputs"][inp]):
                    node["inputs"][inp] = value
    for key, (ct, inp, _folder) in MODEL_INPUTS.items():
        if getattr(s, key) is not None:
            for nid in nodes_of(p, ct):
                p[nid]["inputs"][inp] = getattr(s, key)
    for nid, role in text_roles(p).items():
        value = getattr(s, role)
        if value is not None:
            set_text(p, p[nid], "text", value)
    for nid in nodes_of(p, "AGGCLIPDirectionLoss"):
        for role, inp in (("source", "source_text"), ("target", "target_text")):
            if getattr(s, role) is not None:
                set_text(p, p[nid], inp, getattr(s, role))
    sources = source_nodes(p)
    for nid in sources:
        p[nid]["inputs"][SOURCE_INPUTS[p[nid]["class_type"]]] = image
    for nids, value in ((style_image_nodes(p), style), (mask_image_nodes(p), mask)):
        for nid in nids:
            if value is not None:
                p[nid]["inputs"]["image"] = value
    if size is not None:
        for nid in resize_nodes(p, sources):
            p[nid]["inputs"].update(width=size[0], height=size[1], crop="disabled")
    for nid in nodes_of(p, *SAVERS):
        p[nid]["inputs"]["filename_prefix"] = prefix
    return p


def without_agg(api: dict) -> dict:
    """The same graph with AGG taken out: Apply AGG bypassed, AGG Guider replaced by a CFGGuider."""
    p = copy.deepcopy(api)
    for nid, node in list(p.items()):
        if node["class_type"] == "AGGApply":
            model = node["inputs"]["model"]
            del p[nid]
            for other in p.values():
                for k, v in other["inputs"].items():
                    if is_link(v) and str(v[0]) == nid:
                        other["inputs"][k] = model
        elif node["class_type"] == "AGGGuider":
            ins = node["inputs"]
            p[nid] = {"class_type": "CFGGuider", "inputs": {k: ins[k] for k in ("model", "positive", "negative", "cfg")},
                      "_meta": {"title": "CFG Guider (AGG taken out)"}}
    # Loss nodes left without a consumer are pruned by ComfyUI (only outputs' ancestors run).
    return p


def check_against_server(api: dict, info: dict, url: str, used: dict[tuple[str, str], str]) -> list[str]:
    """Problems of running `api` on the server whose /object_info is `info`: missing node classes
    (is the pack installed?) and combo values it does not offer. `used` maps (class_type, input) to
    the command-line argument that set it, for the messages."""
    problems = []
    for nid, node in api.items():
        ct = node["class_type"]
        spec = info.get(ct)
        if spec is None:
            hint = " (is the AGG pack installed in its custom_nodes?)" if ct.startswith("AGG") else ""
            problems.append(f"{url} has no node type {ct} (node {nid}){hint}")
            continue
        declared = {**spec.get("input", {}).get("required", {}), **spec.get("input", {}).get("optional", {})}
        for inp, value in node["inputs"].items():
            if is_link(value) or inp not in declared or SOURCE_INPUTS.get(ct) == inp:
                continue  # the source file is uploaded when its turn comes
            options = _combo_options(declared[inp])
            if options is not None and value not in options:
                arg = used.get((ct, inp))
                shown = ", ".join(map(str, options[:12])) + (" ..." if len(options) > 12 else "")
                who = f"{arg} {value!r}" if arg else f"{ct}.{inp} {value!r} (node {nid})"
                problems.append(f"{who}: not offered by {url}; it offers: {shown or '(nothing)'}")
    return problems


def _combo_options(decl: Any) -> list | None:
    if not isinstance(decl, (list, tuple)) or not decl:
        return None
    if isinstance(decl[0], list):  # classic combo: [options, {...}]
        return decl[0]
    if decl[0] == "COMBO" and len(decl) > 1 and isinstance(decl[1], dict):  # V3 combo
        return list(decl[1].get("options", []))
    return None


def argument_sources(s: Settings) -> dict[tuple[str, str], str]:
    """(class_type, input) -> the command-line flag that sets it, for the settings given."""
    out = {}
    for key, targets in OVERRIDES.items():
        if getattr(s, key) is not None:
            for ct, inp in targets:
                out[(ct, inp)] = flag(key)
    for key, (ct, inp, _folder) in MODEL_INPUTS.items():
        out[(ct, inp)] = f"--{key}"
    return out
