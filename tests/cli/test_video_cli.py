"""The command line's --video: argument checks (each message names the option), the video workflow's graph
overrides, and a clip edited end to end against a real ComfyUI on the tiny Wan 2.1 fixture.

The end-to-end run uses --server: Wan's text encoder (umt5-xxl) is built by ComfyUI at full size, so the server is
one this test starts with the Wan fixture in its models tree and the test node AGGTestTextEmbedding in a custom
node folder of its own, and the workflow is the shipped wan_video_edit twin with only the text encoding swapped
(agg_testing.workflow_models.runnable), passed as --workflow FILE. Everything else is the CLI as users run it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from agg_testing import workflow_models as W
from agg_testing.comfy_env import COMFYUI_DIR
from PIL import Image

from agg_cli import graph as G
from agg_cli.main import Plan, build_parser, image_tasks, plan_from
from agg_cli.main import main as cli_main

PACK_ROOT = Path(__file__).resolve().parents[2]
TESTS = PACK_ROOT / "tests"
NOWHERE = "http://127.0.0.1:9"  # a --server that plan_from records but never contacts


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """17 frames of 32 x 32 px at 16 fps (H.264 MP4)."""
    return W.write_source_video(tmp_path_factory.mktemp("video") / "waves.mp4", frames=17, size=32, fps=16)


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    rc = cli_main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def plan(*argv: str) -> Plan:
    return plan_from(build_parser().parse_args(list(argv)))


# --- argument checks (nothing starts) ------------------------------------------------------------------


def test_help_describes_the_video_option(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    out = capsys.readouterr().out
    assert "--video FILE" in out and "wan_video_edit" in out and "NAME_agg.mp4" in out


def test_missing_directory_and_unreadable_videos_are_named(capsys, tmp_path):
    rc, out = run_cli(capsys, "--video", "/definitely/missing.mp4")
    assert rc == 2 and "--video /definitely/missing.mp4: no such file" in out
    rc, out = run_cli(capsys, "--video", str(tmp_path))
    assert rc == 2 and f"--video {tmp_path}: not a file" in out
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"this is no video at all" * 10)
    rc, out = run_cli(capsys, "--video", str(broken), "--output-dir", str(tmp_path / "o"))
    assert rc == 2 and f"--video {broken}: not a video PyAV can read" in out
    assert not (tmp_path / "o").exists()  # nothing made before the checks pass


@pytest.mark.parametrize(("extra", "expected"), [
    (["--image", "{photo}"], "--video: not with --image / --images-dir"),
    (["--workflow", "text_guided"], "--video: the workflow text_guided has no Load Video node"),
    (["--target", "a watercolor"], "--source is required with --video: describe what your video shows"),
    (["--source", "a video"], "--target is required with --video"),
])
def test_video_combinations_are_refused(capsys, clip, tmp_path, extra, expected):
    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), (10, 200, 30)).save(photo)
    rc, out = run_cli(capsys, "--video", str(clip), "--server", NOWHERE,
                      *[a.format(photo=photo) for a in extra])
    assert rc == 2, out
    assert expected in out, out


def test_the_video_workflow_wants_a_video(capsys, tmp_path):
    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), (10, 200, 30)).save(photo)
    rc, out = run_cli(capsys, "--workflow", "wan_video_edit", "--image", str(photo), "--server", NOWHERE)
    assert rc == 2 and "--image: the workflow wan_video_edit edits a video; give the clip with --video FILE" in out
    rc, out = run_cli(capsys, "--workflow", "wan_video_edit", "--server", NOWHERE, "--output-dir", str(tmp_path / "o"))
    assert rc == 2 and "--video is required: the workflow wan_video_edit edits a video" in out


def test_video_plan_runs_the_wan_workflow_at_a_size_wan_takes(clip, tmp_path):
    p = plan("--video", str(clip), "--source", "waves", "--target", "watercolor waves", "--server", NOWHERE,
             "--size", "64", "--output-dir", str(tmp_path / "o"))
    assert p.workflow_name == "wan_video_edit" and p.video and p.images == [clip]
    assert p.sizes[clip] == (32, 32)
    [task] = image_tasks(p)
    assert task.video and task.size == (64, 64)
    assert G.fit_size(100, 60, 64, 16) == (64, 32)  # Wan's frames: multiples of 16 (8x VAE, 2 x 2 patches)
    default = plan("--video", str(clip), "--source", "waves", "--target", "watercolor waves", "--server", NOWHERE,
                   "--output-dir", str(tmp_path / "o2"))
    assert default.size == 832  # the workflow's own 832 x 480


def test_a_video_that_cannot_be_decoded_fails_when_its_turn_comes(clip, tmp_path):
    """load() reads each video in full before it is uploaded: a file damaged since the up-front check fails alone,
    named as a video."""
    from agg_cli.main import load
    from agg_cli.work import ImageTask

    good = load(ImageTask(0, "waves", str(clip), b"", None, video=True))
    assert good.data == clip.read_bytes()
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(b"\x00" * 64 + clip.read_bytes()[64:])  # the container's header overwritten
    with pytest.raises(ValueError, match=f"unreadable video {damaged}"):
        load(ImageTask(1, "damaged", str(damaged), b"", None, video=True))


def test_customise_fills_in_the_video_its_size_texts_and_prefix():
    _, api = G.load_workflow("wan_video_edit")
    assert G.is_video_workflow(api) and G.workflow_size(api) == 832
    s = G.Settings(source="a video of a cat", target="a watercolor of a cat", seed=3, steps=4, cfg=5.0,
                   clip_weight=0.3, structure_weight=0.2)
    G.check_applicable(api, s, "wan_video_edit", style_image=False, size=True)
    p = G.customise(api, s, "agg_cli/run_0000_cat.mp4", (64, 48), "agg_cli/run/cat_agg")
    by_type = {n["class_type"]: n["inputs"] for n in p.values()}
    assert by_type["LoadVideo"]["file"] == "agg_cli/run_0000_cat.mp4"
    assert (by_type["ImageScale"]["width"], by_type["ImageScale"]["height"]) == (64, 48)
    assert by_type["SaveVideo"]["filename_prefix"] == "agg_cli/run/cat_agg"
    assert by_type["BasicScheduler"]["steps"] == 4 and by_type["AGGGuider"]["cfg"] == 5.0
    assert by_type["AGGCLIPDirectionLoss"]["weight"] == 0.3 and by_type["AGGStructureLoss"]["weight"] == 0.2
    texts = {G.title(n): n["inputs"]["value"] for n in p.values() if n["class_type"] == "PrimitiveStringMultiline"}
    assert texts == {"Source text": "a video of a cat", "Target text": "a watercolor of a cat"}
    plain = G.without_agg(p)
    assert "AGGGuider" not in {n["class_type"] for n in plain.values()}
    assert {n["class_type"] for n in plain.values()} >= {"CFGGuider", "LoadVideo", "SaveVideo"}
    # the uploaded file is not among the server's listed inputs until its turn: not a problem up front
    info = {ct: {"input": {"required": {}}} for ct in {n["class_type"] for n in p.values()}}
    info["LoadVideo"] = {"input": {"required": {"file": [["other.mp4"], {}]}}}
    assert G.check_against_server(p, info, "http://x", {}) == []


# --- end to end on the tiny Wan fixture ------------------------------------------------------------------


SHIM = """\
# Test-only nodes for the CLI's video test: prompts at Wan's context width without umt5-xxl.
import sys

sys.path.append({tests!r})
from agg_testing import families  # noqa: E402

NODE_CLASS_MAPPINGS = {{"AGGTestTextEmbedding": families.AGGTestTextEmbedding}}
"""


@pytest.fixture(scope="module")
def wan_server(agg_models, tmp_path_factory):
    """A ComfyUI server with the Wan fixture, the open_clip fixture and lighttaew2_1 in its models tree and
    AGGTestTextEmbedding in a custom node folder of this test's own."""
    from agg_testing import wan
    from agg_testing.fixtures import write_extra_model_paths
    from agg_testing.server import ComfyServer

    wan.link_wan(agg_models.root)
    work = tmp_path_factory.mktemp("wan_server")
    shim = work / "custom_nodes" / "agg_test_nodes"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(SHIM.format(tests=str(TESTS)))
    yaml = write_extra_model_paths(work / "extra_model_paths.yaml", agg_models, custom_nodes=work / "custom_nodes")
    server = ComfyServer(COMFYUI_DIR, None, work / "server", extra_model_paths=yaml)
    server.start()
    yield server
    server.stop()


@pytest.mark.server
@pytest.mark.slow
def test_video_is_edited_end_to_end_with_the_report(capsys, agg_models, wan_server, clip, tmp_path):
    """--video on a 17-frame clip: both runs save a video of the clip's 17 frames at its 16 fps, the report lists
    every guided step with both losses, the side-by-side shows the middle frames, AGG changes the video, and the
    output folder holds only the run's files."""
    runnable = W.runnable(json.loads((PACK_ROOT / "workflows" / "api" / "agg_wan_video_edit.json").read_text()),
                          W.fixture_names(agg_models))
    workflow = tmp_path / "wan_video_edit_test_models.json"
    workflow.write_text(json.dumps(runnable))
    before = clip.read_bytes()
    out = tmp_path / "out"
    rc, text = run_cli(capsys, "--video", str(clip), "--workflow", str(workflow), "--server", wan_server.url,
                       "--source", "colour bands with a white disc", "--target", "a watercolor painting of waves",
                       "--steps", "2", "--size", "64", "--seed", "5", "--test-models", "--output-dir", str(out))
    assert rc == 0, text + wan_server.log_tail(40)
    assert "done: 1 of 1 videos" in text
    stem = clip.stem
    names = {p.name for p in out.iterdir()}
    assert names == {f"{stem}_agg.mp4", f"{stem}_unguided.mp4", f"{stem}_side_by_side.png", f"{stem}_terms.json",
                     f"{stem}_terms.png", "summary.json"}, names
    agg, fps = W.video_frames(out / f"{stem}_agg.mp4")
    unguided, fps_u = W.video_frames(out / f"{stem}_unguided.mp4")
    assert agg.shape == unguided.shape == (17, 64, 64, 3) and fps == fps_u == 16
    # AGG changed the clip: measured 8.8 of 255 on average, well above the codec's rounding
    assert np.abs(agg.astype(float) - unguided.astype(float)).mean() > 1.0
    report = json.loads((out / f"{stem}_terms.json").read_text())
    steps = report["events"]
    assert steps and all({"structure", "clip_direction"} <= set(e["terms"]) and not e["skipped"] for e in steps), steps
    assert report["settings"]["steps"] == 2 and report["size"] == [64, 64]
    # the run's steadiness: the AGG video's mean frame-to-frame change over the unguided video's, from the files
    want = float(np.abs(np.diff(agg.astype(float) / 255, axis=0)).mean() /
                 np.abs(np.diff(unguided.astype(float) / 255, axis=0)).mean())
    print(f"steadiness of the edited clip: x{report['steadiness']['ratio']:.3f} (frame-to-frame change "
          f"{report['steadiness']['agg_change']:.4f} against {report['steadiness']['unguided_change']:.4f})")
    assert report["steadiness"]["ratio"] == pytest.approx(want, rel=1e-4)
    with Image.open(out / f"{stem}_side_by_side.png") as im:
        assert im.width > 3 * im.height * 0.9  # source | unguided | AGG
    summary = json.loads((out / "summary.json").read_text())
    assert [i["status"] for i in summary["images"]] == ["done"]
    assert clip.read_bytes() == before  # the source is only read
    # the server kept the uploaded clip in its input folder and the results in its output folder only
    assert list((wan_server.input_dir / "agg_cli").glob("*.mp4"))
    assert len(list(wan_server.output_dir.rglob("*.mp4"))) == 2


def test_parser_defaults_leave_the_workflow_to_the_plan():
    args = build_parser().parse_args([])
    assert isinstance(args, argparse.Namespace) and args.workflow is None and args.video == []
