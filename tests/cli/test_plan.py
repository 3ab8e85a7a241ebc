"""plan_from: the run decided from the command line without changing it (the parsed arguments stay as given, so
a caller can show or reuse them), and the decisions themselves: the default workflow, the test models' steps and
size, what a workflow has no place for left out, model files named as a server lists them, sizes, servers.

Nothing is started: a --server URL is only recorded, and a "ComfyUI" to start is a folder with main.py.
"""

from __future__ import annotations

import copy
import struct
from pathlib import Path

import pytest
from agg_testing import workflow_models as W
from PIL import Image

from agg_cli import graph as G
from agg_cli.main import TEST_MODEL_DEFAULTS, VIDEO_WORKFLOW, build_parser, plan_from

NOWHERE = "http://127.0.0.1:9"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A photo, a mask, a clip, two .safetensors files and a ComfyUI folder the checks accept."""
    d = tmp_path_factory.mktemp("plan")
    out = {"photo": d / "photo.png", "mask": d / "mask.png", "ckpt": d / "model.safetensors",
           "clip": d / "open_clip.safetensors", "comfyui": d / "ComfyUI"}
    Image.new("RGB", (120, 80), (200, 120, 40)).save(out["photo"])
    Image.new("RGB", (120, 80), (255, 255, 255)).save(out["mask"])
    for key in ("ckpt", "clip"):
        out[key].write_bytes(struct.pack("<Q", 2) + b"{}")  # an empty header: a readable .safetensors file
    comfyui = out["comfyui"]
    (comfyui / "input").mkdir(parents=True)
    (comfyui / "main.py").write_text("")
    (comfyui / "extra_model_paths.yaml").write_text("")  # its models may be anywhere: none is required
    Image.new("RGB", (64, 64)).save(comfyui / "input" / "example.png")
    out["video"] = W.write_source_video(d / "clip.mp4")
    out["images_dir"] = d / "photos"
    out["images_dir"].mkdir()
    Image.new("RGB", (40, 40)).save(out["images_dir"] / "a.png")
    return out


def planned(files: dict[str, Path], tmp_path: Path, *argv: str):
    """plan_from on the parsed command line; asserts the arguments come back unchanged."""
    args = build_parser().parse_args([a.format(**files) for a in argv] + ["--output-dir", str(tmp_path / "out")])
    before = copy.deepcopy(vars(args))
    plan = plan_from(args)
    assert vars(args) == before
    return plan, args


TEXTS = ("--source", "a photo", "--target", "a painting")


def test_default_workflow_and_its_size_on_a_started_comfyui(files, tmp_path):
    plan, args = planned(files, tmp_path, "--image", "{photo}", *TEXTS, "--comfyui", "{comfyui}")
    assert args.workflow is None and plan.workflow_name == "text_guided"
    assert plan.local and not plan.cluster and plan.servers == [] and plan.comfyui == files["comfyui"]
    assert plan.size == G.workflow_size(plan.api) == 512 and plan.settings.steps is None
    assert plan.images == [files["photo"]] and plan.sizes == {files["photo"]: (120, 80)}
    assert plan.out == (tmp_path / "out").resolve() and plan.out.is_dir()
    assert plan.settings == G.Settings(source="a photo", target="a painting")


def test_test_models_set_steps_and_size_and_leave_out_what_the_workflow_has_no_place_for(files, tmp_path):
    # color_transfer: no CLIP loader (the --clip goes), a colour reference (the style image stays)
    plan, args = planned(files, tmp_path, "--image", "{photo}", *TEXTS, "--comfyui", "{comfyui}", "--test-models",
                         "--workflow", "color_transfer", "--checkpoint", "{ckpt}", "--clip", "{clip}",
                         "--style-image", "{photo}")
    assert (args.steps, args.size, args.clip) == (None, None, str(files["clip"]))
    assert plan.settings.steps == TEST_MODEL_DEFAULTS["steps"] and plan.size == TEST_MODEL_DEFAULTS["size"]
    assert plan.settings.clip is None and plan.settings.checkpoint == "model.safetensors"
    assert plan.local_files == {"checkpoint": files["ckpt"]} and plan.style == files["photo"] and plan.test_models


def test_test_models_keep_given_steps_and_drop_a_style_image_without_a_place(files, tmp_path):
    # text_guided: a CLIP loader (the --clip stays, as a file of the started ComfyUI), no style image
    plan, args = planned(files, tmp_path, "--image", "{photo}", *TEXTS, "--comfyui", "{comfyui}", "--test-models",
                         "--clip", "{clip}", "--style-image", "{photo}", "--steps", "7")
    assert args.steps == 7 and args.style_image == files["photo"]
    assert plan.settings.steps == 7 and plan.size == TEST_MODEL_DEFAULTS["size"] and plan.style is None
    assert plan.settings.clip == "open_clip.safetensors" and plan.local_files == {"clip": files["clip"]}


def test_a_servers_model_given_as_a_local_file_is_named(files, tmp_path):
    plan, args = planned(files, tmp_path, "--image", "{photo}", *TEXTS, "--server", NOWHERE + "/",
                         "--checkpoint", "{ckpt}", "--clip", "open_clip_model.safetensors", "--size", "256")
    assert args.checkpoint == str(files["ckpt"]) and args.server == [NOWHERE + "/"]
    assert plan.settings.checkpoint == "model.safetensors" and plan.settings.clip == "open_clip_model.safetensors"
    assert plan.local_files == {} and not plan.local and plan.servers == [NOWHERE] and plan.comfyui is None
    assert plan.size == 256


def test_video_runs_the_video_workflow(files, tmp_path):
    plan, args = planned(files, tmp_path, "--video", "{video}", *TEXTS, "--server", NOWHERE, "--clip", "{clip}")
    assert args.workflow is None and plan.workflow_name == VIDEO_WORKFLOW and plan.video
    assert plan.images == [files["video"]] and plan.sizes[files["video"]] == (32, 32)
    assert plan.size == G.workflow_size(plan.api) == 832 and plan.settings.clip == "open_clip.safetensors"


def test_video_with_test_models_on_a_started_comfyui(files, tmp_path):
    plan, args = planned(files, tmp_path, "--video", "{video}", *TEXTS, "--comfyui", "{comfyui}", "--test-models")
    assert (args.steps, args.size) == (None, None)
    assert plan.settings.steps == TEST_MODEL_DEFAULTS["steps"] and plan.size == TEST_MODEL_DEFAULTS["size"]


def test_mask_for_the_local_edit_workflow(files, tmp_path):
    plan, _ = planned(files, tmp_path, "--image", "{photo}", *TEXTS, "--server", NOWHERE, "--workflow", "local_edit",
                      "--mask", "{mask}")
    assert plan.workflow_name == "local_edit" and plan.mask == files["mask"] and plan.style is None


def test_cluster_options_are_carried(files, tmp_path):
    plan, _ = planned(files, tmp_path, "--image", "{photo}", *TEXTS, "--comfyui", "{comfyui}", "--ray",
                      "--workers", "2", "--work-dir", str(tmp_path / "work"), "--cpu")
    assert plan.cluster and plan.local and plan.ray == "" and plan.workers == 2 and plan.cpu
    assert plan.work_dir == tmp_path / "work"
    plan, args = planned(files, tmp_path / "two", "--images-dir", "{images_dir}", *TEXTS, "--server", NOWHERE,
                         "--server", "127.0.0.1:10/", "--no-unguided", "--timeout", "5")
    assert args.server == [NOWHERE, "127.0.0.1:10/"]
    assert plan.cluster and plan.ray is None and plan.servers == [NOWHERE, "http://127.0.0.1:10"]
    assert plan.images == [files["images_dir"] / "a.png"] and plan.no_unguided and plan.timeout == 5


def test_without_a_photo_the_started_comfyuis_example_is_run(files, tmp_path):
    plan, args = planned(files, tmp_path, "--comfyui", "{comfyui}", "--workflow", "image_style", "--test-models",
                         "--clip", "{clip}")
    assert args.image == [] and plan.images == [files["comfyui"] / "input" / "example.png"]
    assert plan.settings.clip is None and plan.local_files == {}
