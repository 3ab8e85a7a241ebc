"""The pack's workflows in the real ComfyUI frontend (headless Chromium via chromedriver): listed as
templates, load without missing-node or error dialogs, convert to exactly the API twins, and the
text-guided one runs from the page and shows its output image."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from agg_testing import workflow_models as W
from agg_testing.browser import JS_VISIBLE_PROBLEMS, Browser, browser_available, open_comfy

pytestmark = pytest.mark.browser

PACK = Path(__file__).resolve().parents[2]
WORKFLOWS = PACK / "workflows"
NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))


def substitute(obj, names: dict[str, str]):
    if isinstance(obj, dict):
        return {k: substitute(v, names) for k, v in obj.items()}
    if isinstance(obj, list):
        return [substitute(v, names) for v in obj]
    return names.get(obj, obj) if isinstance(obj, str) else obj


@pytest.fixture(scope="module")
def names(agg_models) -> dict[str, str]:
    """The workflows' model file names -> the test fixtures standing in for them (agg_testing.workflow_models)."""
    W.link_workflow_models(agg_models)
    return W.fixture_names(agg_models)


@pytest.fixture(scope="module")
def page(comfy_server, names):
    # After `names`: the frontend lists each loader's model files once, when the page opens, and flags a
    # loader whose file is not in that list.
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
for (const b of document.querySelectorAll('.p-toast-close-button, .p-toast-icon-close')) try { b.click(); } catch (e) {}
await new Promise(r => setTimeout(r, 300));
await app.extensionManager.command.execute('Comfy.Canvas.FitView');
app.graph.setDirtyCanvas(true, true);
await new Promise(r => setTimeout(r, 800));
"""


# Open a workflow as a user does and measure what is on screen: from a file (the workflow browser, drag and
# drop: the saved view is restored) or from Templates (the frontend fits the view to the nodes). The part of
# the canvas not under the side toolbar and the workflow tabs is the view; every node's and group's box
# (title bar included) must lie inside it.
JS_OPEN_FRAMED = """
const [ui, name, mode] = __args;
for (const b of document.querySelectorAll('.p-dialog-close-button, .p-dialog-header-close')) b.click();
await app.loadGraphData(ui, true, true, name, mode === 'template' ? {openSource: 'template'} : {});
for (let i = 0; i < 3; i++) await new Promise(r => requestAnimationFrame(r));
await new Promise(r => setTimeout(r, 300));
const c = app.canvas;
const rect = c.canvas.getBoundingClientRect();
const view = [rect.left, rect.top, rect.right, rect.bottom];
for (const sel of ['.side-toolbar-container', '.workflow-tabs-container']) for (const el of document.querySelectorAll(sel)) {
  const r = el.getBoundingClientRect();
  if (!r.width || !r.height) continue;
  if (r.height > r.width) view[0] = Math.max(view[0], r.right);  // the side toolbar, left
  else view[1] = Math.max(view[1], r.bottom);  // the tabs, top
}
const onPage = ([x, y, w, h]) => {
  const a = c.ds.convertOffsetToCanvas([x, y]);
  const b = c.ds.convertOffsetToCanvas([x + w, y + h]);
  return [rect.left + a[0], rect.top + a[1], rect.left + b[0], rect.top + b[1]].map(v => Math.round(v * 10) / 10);
};
const title = window.LiteGraph.NODE_TITLE_HEIGHT;
const boxes = app.graph._nodes.map(n => [n.title, onPage([n.pos[0], n.pos[1] - title, n.size[0], n.size[1] + title])]);
const groups = (app.graph._groups || app.graph.groups || []).map(g => [g.title, onPage(Array.from(g.boundingRect ?? g._bounding))]);
return {scale: c.ds.scale, offset: Array.from(c.ds.offset), view, boxes, groups, page: [innerWidth, innerHeight]};
"""


@pytest.mark.parametrize("how", ["file", "template"])
@pytest.mark.parametrize("name", NAMES)
def test_workflow_opens_framed(name, how, page, names, comfy_server, template_dir, tmp_path):
    """In a 1600 x 1000 browser window, opened from a file or from Templates: the whole graph on screen, at
    scale 0.5 or more."""
    if how == "template":  # the file the templates browser fetches
        ui = comfy_server.get(f"/api/workflow_templates/{urllib.parse.quote(template_dir)}/{name}.json")
    else:
        ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    res = page.execute_async(JS_OPEN_FRAMED, substitute(ui, names), f"{name}.json", how)
    page.screenshot(tmp_path / f"{name}_{how}.png")
    left, top, right, bottom = res["view"]
    assert res["page"][0] == 1600 and 800 <= res["page"][1] <= 1000, res["page"]  # the window's page
    assert left > 0 and top > 0, res["view"]  # the toolbars were found
    assert res["scale"] >= 0.5, f"{name} ({how}): opens at scale {res['scale']:.3f}"
    outside = [(t, box) for t, box in res["boxes"] + res["groups"]
               if box[0] < left or box[1] < top or box[2] > right or box[3] > bottom]
    assert not outside, f"{name} ({how}): off screen in the view {res['view']}: {outside}"
    assert len(res["boxes"]) == len(ui["nodes"]) and len(res["groups"]) == len(ui["groups"]) >= 4
    if how == "file":  # the saved view is the one shown
        assert res["scale"] == ui["extra"]["ds"]["scale"] and res["offset"] == ui["extra"]["ds"]["offset"]


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
    # Load Video's preview widget ("video-preview") is the page's own: the twin leaves it out (ComfyUI ignores it)
    strip = lambda p: {k: {"class_type": v["class_type"],  # noqa: E731
                           "inputs": {i: x for i, x in v["inputs"].items() if i != "video-preview"}}
                       for k, v in p.items()}
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
    page.execute_async(JS_HOOK_EVENTS)
    log0 = guided_log_lines(comfy_server, "AGG Guider")
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
    # The guidance chart on AGG Guider: one point per guided step of this run.
    page.wait_for("return window.__aggRuns.success > 0;", timeout=60, what="execution_success")
    chart = page.execute_async(JS_CHART, "AGGGuider")
    assert chart["events"] and all(e[0] == "AGG Guider" for e in chart["events"])
    assert chart["points"] == [e[1:] for e in chart["events"]]
    assert len(chart["points"]) == guided_log_lines(comfy_server, "AGG Guider") - log0


# ---------------------------------------------------------------------------------------------------
# The pack's frontend extension (web/): served through WEB_DIRECTORY, the guidance chart, the shipped
# example images.

WEB = PACK / "web"


def extension_scripts(comfy_server) -> list[str]:
    return [p for p in comfy_server.get("/extensions") if p.endswith(("/js/agg_chart.js", "/js/agg_assets.js"))]


def test_web_directory_is_served(comfy_server):
    scripts = extension_scripts(comfy_server)
    assert sorted(p.rsplit("/", 1)[1] for p in scripts) == ["agg_assets.js", "agg_chart.js"], scripts
    base = scripts[0].rsplit("/js/", 1)[0]
    for p in scripts:
        with urllib.request.urlopen(comfy_server.url + p, timeout=30) as r:
            assert r.read().decode() == (WEB / "js" / p.rsplit("/", 1)[1]).read_text()
    for asset in sorted((WEB / "assets").glob("*")) if (WEB / "assets").is_dir() else []:
        with urllib.request.urlopen(f"{comfy_server.url}{base}/assets/{asset.name}", timeout=30) as r:
            assert r.read() == asset.read_bytes()


def test_shipped_list_names_exactly_the_assets():
    """agg_assets.js supplies only the files it names; every file in web/assets/ is named there."""
    text = (WEB / "js" / "agg_assets.js").read_text()
    listed = json.loads(re.search(r"export const SHIPPED = (\[.*?\]);", text).group(1))
    shipped = sorted(p.name for p in (WEB / "assets").glob("*")) if (WEB / "assets").is_dir() else []
    assert sorted(listed) == shipped


JS_HOOK_EVENTS = """
const api = window.comfyAPI.api.api;
window.__aggSeen = [];
window.__aggRuns = {started: 0, success: 0, errors: [], pointsAtStart: []};
if (!window.__aggEventsHooked) {
  window.__aggEventsHooked = true;
  // Registered after the pack's extension, so these run after its own handlers.
  api.addEventListener('agg.terms', e => window.__aggSeen.push(e.detail));
  api.addEventListener('execution_start', () => {
    window.__aggSeen = [];
    window.__aggRuns.started += 1;
    window.__aggRuns.pointsAtStart.push(app.graph._nodes.filter(n => n.aggChart).map(n => n.aggChart.points.length));
  });
  api.addEventListener('execution_success', () => { window.__aggRuns.success += 1; });
  api.addEventListener('execution_error', e => { window.__aggRuns.errors.push(JSON.stringify(e.detail).slice(0, 2000)); });
}
return true;
"""

JS_SMALL = """
const [steps, seed] = __args;
for (const n of app.graph._nodes) for (const w of (n.widgets || [])) {
  if (n.type === 'ImageScale' && (w.name === 'width' || w.name === 'height')) w.value = 64;
  if (w.name === 'steps') w.value = steps;
  if (w.name === 'cutouts') w.value = 2;
  if (w.name === 'seed') w.value = seed;
  if (w.name === 'filename_prefix') w.value = 'agg/browser_chart';
}
return true;
"""

JS_QUEUE = "await app.queuePrompt(0, 1); return true;"

JS_CHART = """
const node = app.graph._nodes.find(n => n.type === __args[0]);
const chart = node && node.aggChart;
return {
  points: chart ? chart.points.map(p => [p.step, p.sigma, Object.keys(p.terms).sort(), p.delta_rms]) : null,
  events: window.__aggSeen.map(e => [e.node, e.step, e.sigma, Object.keys(e.terms).sort(), e.delta_rms]),
  runs: window.__aggRuns,
  widget: node ? (node.widgets || []).filter(w => w.name === 'agg_chart').length : -1,
  size: node ? [node.size[0], node.size[1]] : null,
};
"""

# The guiding node centred and enlarged; its rectangle on the page, in screenshot pixels.
JS_NODE_RECT = """
for (const b of document.querySelectorAll('.p-toast-close-button, .p-toast-icon-close')) try { b.click(); } catch (e) {}
const node = app.graph._nodes.find(n => n.type === __args[0]);
const c = app.canvas;
c.ds.scale = 1.5;
c.centerOnNode(node);
c.setDirty(true, true);
c.draw(true, true);
await new Promise(r => setTimeout(r, 500));
const rect = c.canvas.getBoundingClientRect();
const title = window.LiteGraph.NODE_TITLE_HEIGHT;
const a = c.ds.convertOffsetToCanvas([node.pos[0] - 8, node.pos[1] - title - 8]);
const b = c.ds.convertOffsetToCanvas([node.pos[0] + node.size[0] + 8, node.pos[1] + node.size[1] + 8]);
const k = window.devicePixelRatio || 1;
return [rect.left + a[0], rect.top + a[1], rect.left + b[0], rect.top + b[1]].map(v => Math.round(v * k));
"""


def guided_log_lines(comfy_server, node_name: str) -> int:
    return len(re.findall(rf"{re.escape(node_name)} step \d+ sigma ", comfy_server.log_text()))


def run_from_page(page, comfy_server, steps: int, seed: int, runs_before: int) -> None:
    page.execute_async(JS_SMALL, steps, seed)
    page.execute_async(JS_QUEUE)
    page.wait_for(f"const r = window.__aggRuns; return r.success > {runs_before} || r.errors.length > 0;",
                  timeout=300, what="the run's execution_success")
    errors = page.execute("return window.__aggRuns.errors;")
    assert not errors, f"run failed: {errors}; server log: {comfy_server.log_tail(40)}"


def test_guidance_chart_one_point_per_guided_step(page, names, comfy_server, tmp_path):
    """A real guided run queued from the page: the chart on Apply AGG gets exactly one point per
    agg.terms event (and per guided-step line in the server's log), in order, and is cleared when
    the next run starts; it is neither saved in the workflow nor sent with the prompt."""
    name = "agg_img2img_ksampler"
    ui = substitute(json.loads((WORKFLOWS / f"{name}.json").read_text()), names)
    load(page, ui, name)
    before = page.execute_async("return app.graph._nodes.find(n => n.type === 'AGGApply').serialize();")
    page.execute_async(JS_HOOK_EVENTS)

    log0 = guided_log_lines(comfy_server, "Apply AGG")
    run_from_page(page, comfy_server, steps=8, seed=9101, runs_before=0)
    first = page.execute_async(JS_CHART, "AGGApply")
    logged = guided_log_lines(comfy_server, "Apply AGG") - log0
    events = first["events"]
    assert len(events) >= 2, f"expected several guided steps at 8 steps: {events}"
    assert all(e[0] == "Apply AGG" for e in events)
    assert len(first["points"]) == len(events) == logged
    assert first["points"] == [e[1:] for e in events]  # the same steps, sigmas, terms and sizes, in order
    assert [p[0] for p in first["points"]] == sorted(p[0] for p in first["points"])
    assert all(p[2] == ["clip_direction", "structure"] for p in first["points"])
    assert first["widget"] == 1

    # The widgets carry the labels of locales/en/nodeDefs.json (what the input does), not the input ids.
    labels = page.execute_async(
        "return app.graph._nodes.find(n => n.type === 'AGGApply').widgets.map(w => [w.name, w.label || w.name]);")
    labels = dict(labels)
    assert labels["end_percent"] == "guidance end" and labels["manifold"] == "covariance step (expert)", labels

    # The chart is drawn on the canvas only: the node saves and queues as before.
    after = page.execute_async("return app.graph._nodes.find(n => n.type === 'AGGApply').serialize();")
    assert after["widgets_values"] == before["widgets_values"]
    prompt = page.execute_async("const p = await app.graphToPrompt(); return p.output;")
    apply_id = next(k for k, v in prompt.items() if v["class_type"] == "AGGApply")
    assert "agg_chart" not in prompt[apply_id]["inputs"]

    # A screenshot of the node with its chart; the chart's colours are on it.
    box = page.execute_async(JS_NODE_RECT, "AGGApply")
    shot = tmp_path / "agg_chart_page.png"
    page.screenshot(shot)
    from PIL import Image

    with Image.open(shot) as im:
        crop = im.convert("RGB").crop(tuple(box))
    out = tmp_path / "agg_chart.png"
    crop.save(out)
    print(f"\n[agg] screenshot of the guidance chart: {out}")
    if os.environ.get("AGG_DOCS_SCREENSHOT"):  # for the README
        crop.save(PACK / "docs" / "agg_chart.png", optimize=True)
    colours = crop.getcolors(maxcolors=1 << 20)
    near = lambda rgb: sum(c for c, px in colours if sum(abs(a - b) for a, b in zip(px, rgb, strict=True)) < 40)  # noqa: E731
    assert near((0x4F, 0xC3, 0xF7)) > 30 and near((0xFF, 0xB7, 0x4D)) > 30, "chart lines not on the node"

    # The next run (fewer steps, another seed) starts from an empty chart.
    log1 = guided_log_lines(comfy_server, "Apply AGG")
    run_from_page(page, comfy_server, steps=4, seed=9102, runs_before=1)
    second = page.execute_async(JS_CHART, "AGGApply")
    assert second["runs"]["pointsAtStart"][-1] == [0]
    assert len(second["points"]) == len(second["events"]) == guided_log_lines(comfy_server, "Apply AGG") - log1
    assert 0 < len(second["points"]) < len(first["points"])
    assert second["widget"] == 1


def shipped_names() -> list[str]:
    text = (WEB / "js" / "agg_assets.js").read_text()
    return json.loads(re.search(r"export const SHIPPED = (\[.*?\]);", text).group(1))


def load_image_ui(*names: str) -> dict:
    """A graph of one loader per name: Load Video for a clip, LoadImage for a picture."""
    def outputs(video: bool) -> list[dict]:
        if video:
            return [{"name": "VIDEO", "type": "VIDEO", "links": None}]
        return [{"name": "IMAGE", "type": "IMAGE", "links": None}, {"name": "MASK", "type": "MASK", "links": None}]

    nodes = [{"id": i, "type": "LoadVideo" if name.endswith(".mp4") else "LoadImage",
              "pos": [100 + 340 * (i - 1), 100], "size": [320, 330], "flags": {}, "order": i - 1, "mode": 0,
              "properties": {"Node name for S&R": "LoadVideo" if name.endswith(".mp4") else "LoadImage"},
              "outputs": outputs(name.endswith(".mp4")), "widgets_values": [name, "image"]}
             for i, name in enumerate(names, 1)]
    return {"last_node_id": len(nodes), "last_link_id": 0, "nodes": nodes, "links": [], "groups": [], "config": {},
            "extra": {}, "version": 0.4}


JS_IMAGE_WIDGETS = """
return app.graph._nodes.map(n => n.widgets.find(w => w.name === (n.type === 'LoadVideo' ? 'file' : 'image')))
  .map(w => ({value: w.value, listed: w.options.values.includes(w.value)}));
"""


def test_shipped_example_images_are_uploaded_and_never_overwrite(page, comfy_server):
    """A workflow naming shipped example images that ComfyUI's input folder lacks gets them through
    /upload/image; a user's own file of such a name is left as it is (no upload, no renamed copy); an
    image the pack does not ship is never supplied."""
    names = shipped_names()
    assert names, "agg_assets.js ships no example image"
    assets = {n: (WEB / "assets" / n).read_bytes() for n in names}
    for n in names:
        if (comfy_server.input_dir / n).exists():  # an earlier test loaded a workflow that names it
            (comfy_server.input_dir / n).unlink()

    load(page, load_image_ui(*names), "agg_shipped")
    page.wait_for("return app.graph._nodes.every(n => n.widgets[0].options.values.includes(n.widgets[0].value));",
                  timeout=30, what="the shipped images listed")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(
            (comfy_server.input_dir / n).exists() and (comfy_server.input_dir / n).read_bytes() == b
            for n, b in assets.items()):
        time.sleep(0.2)
    for n, b in assets.items():
        assert (comfy_server.input_dir / n).read_bytes() == b, n
    assert page.execute(JS_IMAGE_WIDGETS) == [{"value": n, "listed": True} for n in names]
    assert not page.execute(JS_VISIBLE_PROBLEMS)

    # The user's own file of that name: kept, and not shadowed by a renamed copy.
    name = names[0]
    target = comfy_server.input_dir / name
    own = (comfy_server.input_dir / "example.png").read_bytes()
    assert own != assets[name]
    target.write_bytes(own)
    load(page, load_image_ui(name), "agg_shipped_again")
    time.sleep(1.5)
    assert target.read_bytes() == own
    assert page.execute(JS_IMAGE_WIDGETS) == [{"value": name, "listed": True}]

    # A name the pack does not ship: nothing is uploaded.
    before = sorted(p.name for p in comfy_server.input_dir.iterdir())
    load(page, load_image_ui("agg_not_shipped.png"), "agg_not_shipped")
    time.sleep(1.5)
    after = sorted(p.name for p in comfy_server.input_dir.iterdir())
    assert after == before and not [f for f in after if " (" in f]
    target.write_bytes(assets[name])  # the shipped image again, for the tests that follow
