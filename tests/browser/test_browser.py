"""The pack's workflows in the real ComfyUI frontend (headless Chromium via chromedriver): listed as
templates, load without missing-node or error dialogs, convert to exactly the API twins, and the
text-guided one runs from the page and shows its output image."""

from __future__ import annotations

import json
import os
import urllib.parse
from pathlib import Path

import pytest
from agg_testing.browser import JS_VISIBLE_PROBLEMS, Browser, browser_available, open_comfy

pytestmark = pytest.mark.browser

PACK = Path(__file__).resolve().parents[2]
WORKFLOWS = PACK / "workflows"
NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
REAL_MODELS = {
    "v1-5-pruned-emaonly.safetensors": "checkpoint",
    "sd_xl_base_1.0.safetensors": "checkpoint",
    "open_clip_model.safetensors": "open_clip",
    "control_v11p_sd15_canny.safetensors": "controlnet",
}


def substitute(obj, names: dict[str, str]):
    if isinstance(obj, dict):
        return {k: substitute(v, names) for k, v in obj.items()}
    if isinstance(obj, list):
        return [substitute(v, names) for v in obj]
    return names.get(obj, obj) if isinstance(obj, str) else obj


@pytest.fixture(scope="module")
def names(agg_models) -> dict[str, str]:
    return {real: getattr(agg_models, attr) for real, attr in REAL_MODELS.items()}


@pytest.fixture(scope="module")
def page(comfy_server):
    if not browser_available():
        pytest.fail("chromium/chromedriver missing: run scripts/setup_browser.sh")
    with Browser() as b:
        b.set_window_size(1600, 1000)
        open_comfy(b, comfy_server)
        yield b


@pytest.fixture(scope="module")
def template_dir(comfy_server) -> str:
    templates = comfy_server.get("/workflow_templates")
    for pack, listed in templates.items():
        if set(NAMES) <= set(listed):
            return pack
    pytest.fail(f"workflows not listed by /workflow_templates: {templates}")


def test_templates_list_the_pack_workflows(comfy_server, template_dir):
    listed = comfy_server.get("/workflow_templates")[template_dir]
    assert sorted(listed) == NAMES
    for name in NAMES:  # the files the templates browser fetches are served
        ui = comfy_server.get(f"/api/workflow_templates/{urllib.parse.quote(template_dir)}/{name}.json")
        assert ui == json.loads((WORKFLOWS / f"{name}.json").read_text())


JS_LOAD = """
const [ui, name] = __args;
window.__aggErrors = [];
await app.loadGraphData(ui, true, true, name);
await new Promise(r => setTimeout(r, 800));
const LG = window.LiteGraph;
const unknown = app.graph._nodes.filter(n => LG && !LG.registered_node_types[n.type]).map(n => n.type);
const bad = app.graph._nodes.filter(n => n.has_errors).map(n => n.type);
return {count: app.graph._nodes.length, unknown, bad};
"""


def load(page, ui: dict, name: str) -> dict:
    return page.execute_async(JS_LOAD, ui, f"{name}.json")


@pytest.mark.parametrize("name", NAMES)
def test_workflow_loads_without_errors(name, page, names, tmp_path):
    ui = substitute(json.loads((WORKFLOWS / f"{name}.json").read_text()), names)
    res = load(page, ui, name)
    assert res["count"] == len(ui["nodes"])
    assert not res["unknown"], f"missing node types in the page: {res['unknown']}"
    assert not res["bad"], f"nodes flagged with errors: {res['bad']}"
    problems = page.execute(JS_VISIBLE_PROBLEMS)
    assert not problems, f"{name}: dialogs or errors on the page: {problems}"
    shot = tmp_path / f"{name}.png"
    page.screenshot(shot)
    assert shot.stat().st_size > 10_000
    if name == "agg_text_guided" and os.environ.get("AGG_DOCS_SCREENSHOT"):
        # For the README: the whole graph, fitted to a large window.
        page.set_window_size(2400, 1350)
        page.execute_async(JS_FIT)
        page.screenshot(tmp_path / "docs.png")
        page.set_window_size(1600, 1000)
        from PIL import Image

        with Image.open(tmp_path / "docs.png") as im:
            im.convert("RGB").save(PACK / "docs" / "workflow_text_guided.jpg", "JPEG", quality=85)


JS_FIT = """
for (const b of document.querySelectorAll('button[aria-label="Close"], .p-toast-icon-close')) try { b.click(); } catch (e) {}
await new Promise(r => setTimeout(r, 300));
await app.extensionManager.command.execute('Comfy.Canvas.FitView');
app.graph.setDirtyCanvas(true, true);
await new Promise(r => setTimeout(r, 800));
"""


def test_missing_node_dialog_is_detected(page):
    """The check above can fail: a workflow with an unknown node type shows the missing-nodes dialog."""
    ui = {"last_node_id": 1, "last_link_id": 0, "nodes": [{"id": 1, "type": "AGGNoSuchNode", "pos": [0, 0],
          "size": [200, 60], "flags": {}, "order": 0, "mode": 0, "properties": {}, "widgets_values": []}],
          "links": [], "groups": [], "config": {}, "extra": {}, "version": 0.4}
    res = load(page, ui, "agg_missing")
    problems = page.execute(JS_VISIBLE_PROBLEMS)
    page.execute("for (const b of document.querySelectorAll('.p-dialog-close-button, .p-dialog-header-close'))"
                 " b.click();")
    assert res["unknown"] == ["AGGNoSuchNode"] or problems


@pytest.mark.parametrize("name", NAMES)
def test_api_twin_equals_graph_to_prompt(name, page, names):
    ui = substitute(json.loads((WORKFLOWS / f"{name}.json").read_text()), names)
    api = substitute(json.loads((WORKFLOWS / "api" / f"{name}.json").read_text()), names)
    load(page, ui, name)
    out = page.execute_async("const p = await app.graphToPrompt(); return p.output;")
    strip = lambda p: {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in p.items()}  # noqa: E731
    assert strip(out) == strip(api)


JS_SMALL_AND_QUEUE = """
for (const n of app.graph._nodes) for (const w of (n.widgets || [])) {
  if (n.type === 'ImageScale' && (w.name === 'width' || w.name === 'height')) w.value = 64;
  if (w.name === 'steps') w.value = 3;
  if (w.name === 'cutouts') w.value = 2;
  if (w.name === 'seed') w.value = 4242;  // a new run, not one served whole from the server's cache
  if (w.name === 'filename_prefix') w.value = 'agg/browser_test';
}
await app.queuePrompt(0, 1);
return true;
"""

JS_OUTPUT_SHOWN = """
for (const im of document.querySelectorAll('img'))
  if (im.src.includes('browser_test') && im.complete && im.naturalWidth > 0 && im.offsetParent !== null)
    return [im.naturalWidth, im.src];
return null;
"""


def test_queue_text_guided_from_the_page(page, names, comfy_server, tmp_path):
    ui = substitute(json.loads((WORKFLOWS / "agg_text_guided.json").read_text()), names)
    load(page, ui, "agg_text_guided")
    page.execute_async(JS_SMALL_AND_QUEUE)
    try:
        width, src = page.wait_for(JS_OUTPUT_SHOWN, timeout=300, what="output image on the SaveImage node")
    except TimeoutError:
        history = comfy_server.get("/history")
        last = list(history.values())[-1] if history else {}
        page.screenshot(tmp_path / "agg_text_guided_timeout.png")
        raise AssertionError(f"no output image shown; last run: {json.dumps(last.get('status'))[:3000]} "
                             f"{last.get('outputs')}; page: {page.execute(JS_VISIBLE_PROBLEMS)}") from None
    assert width == 64
    assert "browser_test" in urllib.parse.unquote(src)
    page.screenshot(tmp_path / "agg_text_guided_done.png")
    assert not page.execute(JS_VISIBLE_PROBLEMS)
