"""The command-line tool without a server: argument checks (each message names the argument), the
photo's working size, the graph overrides, the unguided twin, server-side checks against a node
list, the per-step report reader and the progress display."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
from PIL import Image

from agg_cli import graph as G
from agg_cli.comfy import normalise_url
from agg_cli.main import main as cli_main
from agg_cli.report import plot_terms, series, terms_summary

PACK_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def photo(tmp_path) -> Path:
    p = tmp_path / "photo.png"
    Image.new("RGB", (120, 80), (200, 120, 40)).save(p)
    return p


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    rc = cli_main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


# --- sizes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("w", "h", "size", "want"), [
    (4032, 3024, 512, (512, 384)),   # 4:3 landscape
    (3024, 4032, 512, (384, 512)),   # portrait
    (1920, 1080, 512, (512, 288)),   # 16:9
    (120, 80, 64, (64, 40)),         # 64 * 80/120 = 42.7 -> 40
    (512, 512, 768, (768, 768)),     # upscaled square
    (5000, 100, 512, (512, 8)),      # a very thin strip keeps at least one multiple
])
def test_fit_size_keeps_aspect_and_multiples_of_8(w, h, size, want):
    got = G.fit_size(w, h, size)
    assert got == want
    assert got[0] % 8 == 0 and got[1] % 8 == 0 and max(got) == size
    if min(want) > 8:  # aspect within one rounding step of 8 px on the shorter side
        assert abs(got[0] / got[1] - w / h) <= (w / h) * 8 / min(got)


# --- argument checks (nothing starts) ------------------------------------------------------------------


def test_missing_source_is_refused_and_names_the_workflow_text(capsys, photo, tmp_path):
    rc, out = run_cli(capsys, "--image", str(photo), "--target", "a watercolor", "--output-dir", str(tmp_path / "o"))
    assert rc == 2
    assert "--source is required with --image" in out
    assert "a child's drawing" in out  # says whose text it would otherwise have used
    assert not (tmp_path / "o").exists()  # nothing made before the checks pass


def test_missing_target_is_refused(capsys, photo):
    rc, out = run_cli(capsys, "--image", str(photo), "--source", "a photo")
    assert rc == 2 and "--target is required" in out


@pytest.mark.parametrize(("args", "expected"), [
    (["--images-dir", "/definitely/missing"], "--images-dir /definitely/missing: no such folder"),
    (["--image", "/definitely/missing.png"], "--image /definitely/missing.png: no such file"),
    (["--checkpoint", "/definitely/missing.safetensors"], "--checkpoint /definitely/missing.safetensors: no such file"),
    (["--sampler", "euler"], "--sampler: the workflow text_guided has no"),
    (["--workflow", "img2img_ksampler", "--controlnet", "x.safetensors"], "--controlnet x.safetensors: no such file"),
    (["--workflow", "nonsense"], "--workflow nonsense: neither an example"),
    (["--size", "20"], "--size 20: must be between 64 and 8192"),
    (["--denoise", "0"], "--denoise 0.0: must be in (0, 1]"),
    (["--steps", "0"], "--steps 0: must be at least 1"),
    (["--clip-weight", "-2"], "--clip-weight -2.0: must be 0 or more"),
    (["--server", "ftp://host"], "--server 'ftp://host' is not an http(s)"),
    (["--server", "http://a:1", "--server", "http://a:1"], "--server: the same URL is given twice"),
    (["--vae-approx", "/definitely/missing"], "--vae-approx /definitely/missing: no such folder"),
    (["--style-image", "/definitely/missing.png"], "--style-image /definitely/missing.png: no such file"),
])
def test_bad_arguments_are_named(capsys, args, expected):
    rc, out = run_cli(capsys, *args)
    assert rc == 2, out
    assert expected in out, out


def test_wrong_file_kinds_are_refused(capsys, tmp_path, photo):
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(b"not a safetensors file at all")
    rc, out = run_cli(capsys, "--checkpoint", str(fake))
    assert rc == 2 and f"--checkpoint {fake}: not a readable .safetensors file" in out
    rc, out = run_cli(capsys, "--clip", str(photo))
    assert rc == 2 and "expected a .safetensors file" in out
    notimg = tmp_path / "d"
    notimg.mkdir()
    (notimg / "broken.png").write_text("not an image")
    rc, out = run_cli(capsys, "--images-dir", str(notimg))
    assert rc == 2 and "broken.png: not an image Pillow can read" in out


def test_ui_format_workflow_file_is_explained(capsys):
    rc, out = run_cli(capsys, "--workflow", str(PACK_ROOT / "workflows" / "agg_text_guided.json"))
    assert rc == 2 and "UI-format workflow" in out and "Export (API)" in out


def test_graph_without_agg_nodes_is_refused(capsys, tmp_path):
    wf = tmp_path / "plain.json"
    wf.write_text(json.dumps({"1": {"class_type": "KSampler", "inputs": {}}}))
    rc, out = run_cli(capsys, "--workflow", str(wf))
    assert rc == 2 and "has no AGG node" in out


def test_earlier_run_in_output_dir_is_not_overwritten(capsys, tmp_path, photo):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "summary.json").write_text("{}")
    rc, out = run_cli(capsys, "--image", str(photo), "--source", "a", "--target", "b", "--output-dir", str(out_dir),
                      "--server", "http://127.0.0.1:9")  # never contacted: the check comes first
    assert rc == 2 and "already holds a run" in out


def test_missing_comfyui_is_named(capsys, tmp_path, photo):
    rc, out = run_cli(capsys, "--image", str(photo), "--source", "a", "--target", "b",
                      "--comfyui", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o"))
    assert rc == 2 and f"--comfyui {tmp_path / 'nope'}: no ComfyUI there" in out


def test_normalise_url():
    assert normalise_url("127.0.0.1:8188") == "http://127.0.0.1:8188"
    assert normalise_url("https://h:1/") == "https://h:1"
    with pytest.raises(ValueError):
        normalise_url("http://h:notaport")


# --- graphs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(G.EXAMPLES))
def test_text_roles_of_every_example(name):
    _, api = G.load_workflow(name)
    roles = G.text_roles(api)
    assert "target" in roles.values() and "negative" in roles.values()
    # only AGG Invert takes a source prompt
    assert ("source" in roles.values()) == any(n["class_type"] == "AGGInvert" for n in api.values())
    for nid, role in roles.items():  # the graph's use agrees with the node titles
        t = G.title(api[nid])
        assert {"source": "Source", "target": ("Target", "Prompt"), "negative": "Negative"}[role][0] in t or t == "Prompt"


def test_customise_sets_everything_and_without_agg_takes_agg_out():
    _, api = G.load_workflow("img2img_ksampler")
    s = G.Settings(source="a photo of a cat", target="a watercolor of a cat", negative="ugly", seed=5, steps=9,
                   denoise=0.4, cfg=3.5, sampler="ddim", scheduler="karras", decoder="taesd", structure_weight=0.2,
                   clip_weight=0.7, checkpoint="real.safetensors", clip="clip.safetensors")
    G.check_applicable(api, s, "img2img_ksampler", style_image=False, size=True)
    p = G.customise(api, s, "agg_cli/x.png", (512, 384), "agg_cli/run/x_agg")
    ks = p[G.nodes_of(p, "KSampler")[0]]["inputs"]
    assert (ks["seed"], ks["steps"], ks["denoise"], ks["cfg"], ks["sampler_name"], ks["scheduler"]) == \
        (5, 9, 0.4, 3.5, "ddim", "karras")
    clip = p[G.nodes_of(p, "AGGCLIPDirectionLoss")[0]]["inputs"]
    assert (G.text_value(p, clip["source_text"]), G.text_value(p, clip["target_text"]), clip["weight"],
            clip["decoder"]) == \
        ("a photo of a cat", "a watercolor of a cat", 0.7, "taesd")
    assert p[G.nodes_of(p, "AGGStructureLoss")[0]]["inputs"]["weight"] == 0.2
    scale = p[G.nodes_of(p, "ImageScale")[0]]["inputs"]
    assert (scale["width"], scale["height"], scale["crop"]) == (512, 384, "disabled")  # no square crop
    texts = {G.title(p[n]): G.text_value(p, p[n]["inputs"]["text"]) for n in G.nodes_of(p, "CLIPTextEncode")}
    assert texts == {"Target prompt": "a watercolor of a cat", "Negative prompt": "ugly"}
    assert p[G.nodes_of(p, "CheckpointLoaderSimple")[0]]["inputs"]["ckpt_name"] == "real.safetensors"
    assert p[G.nodes_of(p, "LoadImage")[0]]["inputs"]["image"] == "agg_cli/x.png"
    assert api[G.nodes_of(api, "KSampler")[0]]["inputs"]["steps"] != 9  # the original is untouched
    plain = G.without_agg(p)
    assert not G.nodes_of(plain, "AGGApply")
    ks_plain = plain[G.nodes_of(plain, "KSampler")[0]]["inputs"]
    assert ks_plain["model"] == [G.nodes_of(p, "CheckpointLoaderSimple")[0], 0]  # straight from the loader
    assert ks_plain["seed"] == 5


def test_without_agg_replaces_the_guider_and_keeps_the_controlnet_text_roles():
    _, api = G.load_workflow("text_guided")
    plain = G.without_agg(api)
    guider = plain[G.nodes_of(api, "AGGGuider")[0]]
    assert guider["class_type"] == "CFGGuider" and set(guider["inputs"]) == {"model", "positive", "negative", "cfg"}
    _, cn = G.load_workflow("controlnet")  # KSampler's positive goes through ControlNetApplyAdvanced
    assert "target" in G.text_roles(cn).values()


def test_user_graph_with_two_unnamed_load_images_is_refused(tmp_path):
    _, api = G.load_workflow("img2img_ksampler")
    extra = dict(api)
    extra["99"] = {"class_type": "LoadImage", "inputs": {"image": "other.png"}, "_meta": {"title": "Mask"}}
    for nid in G.nodes_of(extra, "LoadImage"):
        extra[nid] = {**extra[nid], "_meta": {"title": "Load Image"}}
    with pytest.raises(G.GraphError, match="title the one for the photo 'Source image'"):
        G.source_image_nodes(extra)


def test_check_against_server_names_missing_nodes_and_models():
    _, api = G.load_workflow("img2img_ksampler")
    s = G.Settings(checkpoint="mine.safetensors", sampler="nope")
    p = G.customise(api, s, "x.png", None, "p")
    info = {ct: {"input": {"required": {}}} for ct in {n["class_type"] for n in p.values()} if not ct.startswith("AGG")}
    info["CheckpointLoaderSimple"] = {"input": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"], {}]}}}
    info["KSampler"] = {"input": {"required": {"sampler_name": ["COMBO", {"options": ["euler", "ddim"]}]}}}
    problems = G.check_against_server(p, info, "http://s:1", G.argument_sources(s))
    text = "\n".join(problems)
    assert "--checkpoint 'mine.safetensors': not offered by http://s:1; it offers: a.safetensors, b.safetensors" in text
    assert "--sampler 'nope': not offered" in text and "euler, ddim" in text
    assert "has no node type AGGApply" in text and "is the AGG pack installed" in text


# --- per-step reports -------------------------------------------------------------------------------------


def test_series_reads_old_and_new_events_defensively(tmp_path):
    events = [
        {"node": "Apply AGG", "step": 0, "sigma": 14.6, "terms": {"structure": 0.5, "clip_direction": 0.9}, "skipped": None},
        {"node": "Apply AGG", "step": 1, "sigma": 9.0, "terms": {"structure": 0.4, "clip_direction": 0.7},
         "grad_rms": {"structure": 0.01}, "step_rms": {"structure": 0.1, "clip_direction": 0.2}, "delta_rms": 0.3,
         "trust_region": True, "fallback": None, "skipped": None},
        {"node": "Apply AGG", "step": 2, "sigma": 5.0, "terms": {"structure": "n/a"}, "skipped": "nan loss"},
    ]
    s = series(events)
    assert s["loss/structure"][:2] == [0.5, 0.4] and math.isnan(s["loss/structure"][2])
    assert math.isnan(s["grad_rms/structure"][0]) and s["grad_rms/structure"][1] == 0.01
    assert s["delta_rms"][1] == 0.3 and all(len(v) == 3 for v in s.values())
    assert plot_terms(events, tmp_path / "t.png", "t") and (tmp_path / "t.png").stat().st_size > 1000
    assert plot_terms(events[:1], tmp_path / "old.png", "old")  # the older payload alone plots too
    assert "3 guided steps (1 skipped)" in terms_summary(events)
    assert not plot_terms([], tmp_path / "none.png", "none")


# --- plots and progress ------------------------------------------------------------------------------


def test_plots_from_several_server_threads_at_once(tmp_path):
    # Each server's worker thread plots its images; pyplot's text parser is global state.
    events = [{"node": "Apply AGG", "step": i, "sigma": 10.0 / (i + 1), "terms": {"structure": 1.0 / (i + 1)},
               "grad_rms": {"structure": 10.0 ** -i}, "step_rms": {"structure": 0.1}, "delta_rms": 0.01 * (i + 1)}
              for i in range(6)]
    errors: list[BaseException] = []

    def plot(k: int) -> None:
        try:
            for j in range(3):
                assert plot_terms(events, tmp_path / f"t{k}_{j}.png", f"thread {k}")
        except BaseException as e:  # noqa: BLE001 - collected for the assertion below
            errors.append(e)

    threads = [threading.Thread(target=plot, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(list(tmp_path.glob("t*.png"))) == 12


# --- pictures the workflows ship with -----------------------------------------------------------------


def test_shipped_pictures_are_found_and_a_given_style_or_mask_replaces_them():
    _, style_api = G.load_workflow("image_style")
    shipped = G.shipped_images(style_api)
    assert {p.name for p in shipped.values()} == {"agg_style.png"} and all(p.is_file() for p in shipped.values())
    s = G.Settings()
    kept = G.customise(style_api, s, "agg_cli/x.png", None, "p")
    assert {p.name for p in G.shipped_images(kept).values()} == {"agg_style.png"}  # the workflow's own style
    given = G.customise(style_api, s, "agg_cli/x.png", None, "p", style="agg_cli/mine.png")
    assert not G.shipped_images(given)
    assert [given[n]["inputs"]["image"] for n in G.style_image_nodes(given)] == ["agg_cli/mine.png"]
    _, edit_api = G.load_workflow("local_edit")
    assert {p.name for p in G.shipped_images(edit_api).values()} == {"agg_edit_mask.png"}
    masked = G.customise(edit_api, s, "agg_cli/x.png", None, "p", mask="agg_cli/m.png")
    assert [masked[n]["inputs"]["image"] for n in G.mask_image_nodes(masked)] == ["agg_cli/m.png"]


def test_local_edit_with_an_own_photo_needs_a_mask(capsys, photo, tmp_path):
    rc, out = run_cli(capsys, "--workflow", "local_edit", "--image", str(photo), "--source", "a photo",
                      "--target", "a red dress", "--output-dir", str(tmp_path / "o"))
    assert rc == 2 and "--mask is required" in out and "local_edit" in out
    rc, out = run_cli(capsys, "--workflow", "img2img_ksampler", "--mask", str(photo), "--output-dir", str(tmp_path / "p"))
    assert rc == 2 and "no LoadImage titled 'Edit mask'" in out


def test_translator_uploads_each_shipped_picture_once_per_server():
    from agg_cli.work import RunSpec, Translator

    class Uploads:
        url = "http://a"

        def __init__(self) -> None:
            self.names: list[str] = []

        def upload_image(self, data, name):
            assert isinstance(data, bytes) and data[:8] == b"\x89PNG\r\n\x1a\n"
            self.names.append(name)
            return f"agg_cli/{name}"

    _, api = G.load_workflow("color_transfer")
    client = Uploads()
    translator = Translator(client, RunSpec(api=api, settings=G.Settings(), run_id="r1"))
    first = translator.with_shipped(G.customise(api, G.Settings(), "agg_cli/x.png", None, "p"))
    second = translator.with_shipped(G.customise(api, G.Settings(), "agg_cli/y.png", None, "q"))
    assert client.names == ["r1_shipped_agg_style.png"]  # once, then reused
    for p in (first, second):
        assert [p[n]["inputs"]["image"] for n in G.style_image_nodes(p)] == ["agg_cli/r1_shipped_agg_style.png"]


def test_display_bars_on_a_terminal_and_plain_lines_elsewhere():
    import io

    from agg_cli.report import Display, loss_text

    events = [{"terms": {"structure": 0.5, "clip": 0.25}}, {"terms": {"structure": 0.125, "clip": 0.0625}}]
    assert loss_text(events) == "structure=0.125 clip=0.0625" and loss_text([]) == ""
    plain = io.StringIO()
    d = Display(2, plain, tty=False)
    for v in range(1, 5):
        d.step("http://127.0.0.1:1", "cat", "AGG: KSampler", v, 4, "structure=0.1")
    d.finished("cat", True)
    d.close()
    lines = plain.getvalue().splitlines()
    assert lines[0] == "  cat [AGG: KSampler] [#####---------------] step 1/4 loss structure=0.1 (127.0.0.1:1)"
    assert len([x for x in lines if "step" in x]) == 4 and lines[-1].startswith("[##########----------] 1/2 images")
    assert "\r" not in plain.getvalue()  # no redrawing where nothing is a terminal

    term = io.StringIO()
    d = Display(2, term, tty=True)
    d.step("http://127.0.0.1:1", "cat", "AGG: KSampler", 3, 4, "structure=0.1")
    d.step("http://127.0.0.1:2", "dog", "unguided", 1, 4, "")
    shown = term.getvalue()
    d.finished("cat", True)
    d.finished("dog", False)
    d.close()
    # tqdm redraws in place: both images' bars with step, phase and loss, and the folder's bar
    assert "\r" in shown and "cat" in shown and "dog" in shown and "3/4" in shown and "1/4" in shown
    assert "AGG: KSampler structure=0.1" in shown and "images" in shown
    assert "2/2" in term.getvalue() and "1 failed" in term.getvalue()


def test_cluster_options_are_checked(capsys, photo, tmp_path):
    rc, out = run_cli(capsys, "--image", str(photo), "--source", "a", "--target", "b", "--workers", "2")
    assert rc == 2 and "--workers: only with --ray" in out
    rc, out = run_cli(capsys, "--image", str(photo), "--source", "a", "--target", "b", "--ray", "--workers", "0")
    assert rc == 2 and "--workers 0: must be at least 1" in out
    rc, out = run_cli(capsys, "--image", str(photo), "--source", "a", "--target", "b", "--work-dir", str(tmp_path))
    assert rc == 2 and "--work-dir: only with --ray" in out
    rc, out = run_cli(capsys, "--image", str(photo), "--source", "a", "--target", "b", "--ray", "auto",
                      "--server", "http://127.0.0.1:9", "--workers", "2")
    assert rc == 2 and "not with --server" in out
