"""The example workflows in workflows/ against a real ComfyUI server with the pack loaded: node types
exist, links carry matching types, widget values are valid, and every API twin runs on the test models."""

from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path

import pytest

PACK = Path(__file__).resolve().parents[2]
WORKFLOWS = PACK / "workflows"
NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
# Model files the workflows name -> attribute of the fixture ModelsTree standing in for them.
REAL_MODELS = {
    "v1-5-pruned-emaonly.safetensors": "checkpoint",
    "sd_xl_base_1.0.safetensors": "checkpoint",
    "open_clip_model.safetensors": "open_clip",
    "control_v11p_sd15_canny.safetensors": "controlnet",
}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def test_pack_ships_the_five_workflows():
    expected = {"agg_text_guided", "agg_img2img_ksampler", "agg_image_style", "agg_controlnet", "agg_sdxl_img2img"}
    assert expected <= set(NAMES)
    for name in NAMES:
        assert (WORKFLOWS / f"{name}.jpg").stat().st_size > 1000, f"{name}: thumbnail missing"
        assert (WORKFLOWS / "api" / f"{name}.json").exists(), f"{name}: API twin missing"


def fixture_names(models) -> dict[str, str]:
    return {real: getattr(models, attr) for real, attr in REAL_MODELS.items()}


def load_ui(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def load_api(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    return comfy_server.get("/object_info")


def input_spec(info: dict, name: str):
    for section in ("required", "optional"):
        if name in info["input"].get(section, {}):
            return info["input"][section][name]
    return None


def input_order(info: dict) -> list[str]:
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    return [*order.get("required", []), *order.get("optional", [])]


def combo_options(spec) -> list | None:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, list):
        return kind
    if kind == "COMBO":
        return opts.get("options", [])
    return None


def check_value(node: str, name: str, spec, value, names: dict[str, str]) -> None:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    options = combo_options(spec)
    if options is not None:
        assert names.get(value, value) in options, f"{node}.{name}: {value!r} not among {options[:20]}"
    elif kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), f"{node}.{name}: {value!r} is not an int"
        assert opts.get("min", value) <= value <= opts.get("max", value), f"{node}.{name}: {value} out of range"
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{node}.{name}: {value!r}"
        assert opts.get("min", value) <= value <= opts.get("max", value), f"{node}.{name}: {value} out of range"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), f"{node}.{name}: {value!r} is not a boolean"
    elif kind == "STRING":
        assert isinstance(value, str), f"{node}.{name}: {value!r} is not a string"


def widget_inputs(info: dict) -> list[tuple[str, list]]:
    out = []
    for name in input_order(info):
        spec = input_spec(info, name)
        if spec is not None and (isinstance(spec[0], list) or spec[0] in WIDGET_TYPES):
            out.append((name, spec))
    return out


def has_control(name: str, spec) -> bool:
    opts = spec[1] if len(spec) > 1 else {}
    return spec[0] == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed"))


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_nodes_links_and_widgets_are_valid(name, object_info, agg_models):
    ui = load_ui(name)
    names = fixture_names(agg_models)
    nodes = {n["id"]: n for n in ui["nodes"]}
    missing = {n["type"] for n in ui["nodes"] if n["type"] not in object_info and n["type"] not in FRONTEND_ONLY}
    assert not missing, f"{name}: node types unknown to ComfyUI: {missing}"
    assert any(n["type"] == "Note" and "models/" in n["widgets_values"][0] for n in ui["nodes"]), "no model Note"
    assert any(n["type"].startswith("AGG") for n in ui["nodes"])

    for link_id, src, src_slot, dst, dst_slot, ltype in ui["links"]:
        s, d = nodes[src], nodes[dst]
        out_type = object_info[s["type"]]["output"][src_slot]
        in_name = d["inputs"][dst_slot]["name"]
        in_type = input_spec(object_info[d["type"]], in_name)[0]
        assert out_type == ltype == in_type, f"{name}: link {link_id} {s['type']}->{d['type']}.{in_name}: " \
                                             f"{out_type} / {ltype} / {in_type}"

    for n in ui["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            continue
        info = object_info[n["type"]]
        values = list(n.get("widgets_values") or [])
        for wname, spec in widget_inputs(info):
            assert values, f"{name}: {n['type']} has no value for {wname}"
            check_value(n["type"], wname, spec, values.pop(0), names)
            if has_control(wname, spec):
                assert values.pop(0) in CONTROL_VALUES
            if len(spec) > 1 and spec[1].get("image_upload"):
                assert values.pop(0) == "image"
        assert not values, f"{name}: {n['type']} has extra widget values {values}"


@pytest.mark.parametrize("name", NAMES)
def test_api_twin_matches_object_info(name, object_info, agg_models):
    api = load_api(name)
    names = fixture_names(agg_models)
    for nid, node in api.items():
        info = object_info[node["class_type"]]
        for iname, value in node["inputs"].items():
            spec = input_spec(info, iname)
            assert spec is not None, f"{name}: {node['class_type']} has no input {iname}"
            if isinstance(value, list):
                assert object_info[api[value[0]]["class_type"]]["output"][value[1]] == spec[0]
            else:
                check_value(node["class_type"], iname, spec, value, names)
        required = set(info["input"].get("required", {}))
        assert required <= set(node["inputs"]), f"{name}: node {nid} lacks {required - set(node['inputs'])}"


def small_prompt(api: dict, names: dict[str, str], seed: int = 1) -> dict:
    """The API twin made cheap: test model files, 64 px images, 2 steps, 2 CLIP cut-outs."""
    p = copy.deepcopy(api)
    for node in list(p.values()):
        inputs = node["inputs"]
        for k, v in inputs.items():
            if isinstance(v, str) and v in names:
                inputs[k] = names[v]
        ct = node["class_type"]
        if ct == "ImageScale":
            inputs.update(width=64, height=64)
        if ct in ("KSampler", "BasicScheduler") and "steps" in inputs:
            inputs["steps"] = 2
        if ct == "KSampler":
            inputs["seed"] = seed
        if "cutouts" in inputs:
            inputs["cutouts"] = 2
        if ct == "AGGImageStyleLoss":  # the style image is full size: scale it too
            style = inputs["style_image"]
            p.setdefault("9001", {"class_type": "ImageScale", "inputs": {
                "image": style, "upscale_method": "bilinear", "width": 64, "height": 64, "crop": "center"}})
            inputs["style_image"] = ["9001", 0]
    return p


# The pack's log line per guided step (nodes/runtime.py AGGPatch.report): node, step, sigma, terms, step size.
STEP_LINE = re.compile(r"(Apply AGG|AGG Guider) step (\d+) sigma [^:]+: (.*); step rms ([^,\s]+)(.*)$", re.M)


def guided_steps_logged(server, since: int, timeout: float = 10.0) -> list[re.Match]:
    """The guided-step lines the server logged after character `since` of its log."""
    deadline = time.perf_counter() + timeout
    while True:
        found = list(STEP_LINE.finditer(server.log_text()[since:]))
        if found or time.perf_counter() > deadline:
            return found
        time.sleep(0.2)


@pytest.mark.parametrize("name", NAMES)
def test_api_twin_runs_on_test_models(name, comfy_server, agg_models):
    from PIL import Image

    since = len(comfy_server.log_text())
    # a seed per workflow: twins that map to the same test models (sdxl_img2img, img2img_ksampler) would
    # otherwise be served from the server's cache without running
    prompt = small_prompt(load_api(name), fixture_names(agg_models), seed=1 + NAMES.index(name))
    entry = comfy_server.run(prompt, timeout=300)
    assert not comfy_server.errors(entry), comfy_server.errors(entry)
    images = comfy_server.images(entry)
    assert images, f"{name}: no image saved"
    with Image.open(images[0]) as im:
        assert im.size == (64, 64)
    # guidance acted: at least one guided step, none skipped, each a step of non-zero size
    steps = guided_steps_logged(comfy_server, since)
    assert steps, f"{name}: no guided step in the server log:\n{comfy_server.log_tail(40)}"
    for m in steps:
        assert "skipped" not in m.group(5), m.group(0)
        assert float(m.group(4)) > 0, m.group(0)
    agg_nodes = {n["class_type"] for n in load_api(name).values()} & {"AGGApply", "AGGGuider"}
    assert {m.group(1) for m in steps} == {{"AGGApply": "Apply AGG", "AGGGuider": "AGG Guider"}[n] for n in agg_nodes}
