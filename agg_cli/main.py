"""Translate photos with an AGG workflow in ComfyUI, from the command line.

  python -m agg_cli --image photo.jpg --source "a photo of a cat" --target "a watercolor painting of a cat" \\
      --checkpoint ~/models/v1-5-pruned-emaonly.safetensors --clip ~/models/open_clip_model.safetensors

Without --server it starts a headless ComfyUI of its own (the one scripts/setup.sh built, or
--comfyui DIR) with the given model files, on the GPU when torch sees one, and runs the images in
order. With --server URL it uses a ComfyUI that is already running with its own models (then
--checkpoint / --clip / --controlnet are model names as that server lists them).

On a Ray cluster (pip install '.[cluster]'): --ray [ADDRESS] runs the images on Ray workers, each
owning a ComfyUI it starts on its node (one per GPU, --workers N) or one --server URL; --server given
several times runs on a local Ray, one worker per server. A worker whose ComfyUI dies is restarted
by Ray and its image run again; results come back here and are written as on one machine.

For each photo it runs the workflow with AGG and once more without it (same graph and seed), and
writes into --output-dir: NAME_agg.png, NAME_unguided.png, NAME_side_by_side.png (source | unguided
| AGG), NAME_terms.json (every per-step AGG report) and NAME_terms.png (loss terms and step sizes),
plus summary.json. Every path and option is checked before anything starts; the model names and
sampler settings are checked against each server's node list before any image is queued.

Videos: --video FILE edits a clip with the Wan 2.1 text-to-video workflow (wan_video_edit; its models
in the ComfyUI's models folders, or on the --server):

  python -m agg_cli --video clip.mp4 --source "a video of waves on a beach" \\
      --target "a watercolor painting of waves on a beach" --clip ~/models/open_clip_model.safetensors

The clip's frames go in (its first 2 s, scaled to 832 px on the longer side, or --size), and
NAME_agg.mp4 / NAME_unguided.mp4 come out at the clip's frame rate, with the same report as for
photos (NAME_side_by_side.png shows each video's middle frame).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import graph as G
from .cluster import INSTALL_HINT
from .comfy import Client, JobFailed, LocalServer, ServerLost, normalise_url
from .report import Display, terms_summary
from .work import ImageTask, Outcome, RunSpec, Translator, settings_meta, write_outputs

PACK = G.PACK
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
VIDEO_WORKFLOW = "wan_video_edit"  # what --video runs unless --workflow names another video workflow
VIDEO_MULTIPLE = 16  # Wan's frames: 8x VAE compression and 2 x 2 patches
CHECKPOINT_EXT = {".safetensors", ".ckpt", ".pt", ".pth"}
TEST_MODEL_DEFAULTS = {"steps": 20, "size": 128}


class UsageError(ValueError):
    """A bad argument; the message names it."""


# The ComfyUI scripts/setup.sh builds under $AGG_HOME (its MAIN_VERSION; tests/test_packaging.py checks).
SETUP_COMFYUI = "ComfyUI-0.33.0"


def agg_home() -> Path:
    return Path(os.environ.get("AGG_HOME", Path.home() / ".cache" / "agg-comfyui"))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="agg_cli", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io_ = ap.add_argument_group("images and texts")
    io_.add_argument("--image", type=Path, action="append", default=[], metavar="FILE",
                     help="a photo to translate (may be given several times)")
    io_.add_argument("--images-dir", type=Path, metavar="DIR", help="translate every image in this folder")
    io_.add_argument("--video", type=Path, action="append", default=[], metavar="FILE",
                     help=f"a video to edit (may be given several times): runs the video workflow ({VIDEO_WORKFLOW}, "
                          "Wan 2.1 text-to-video, unless --workflow names another with a Load Video node) on its "
                          "frames and writes NAME_agg.mp4 (and NAME_unguided.mp4) at the clip's frame rate, with the "
                          "per-step report; --source / --target describe the clip and the result")
    io_.add_argument("--source", help="what the photo shows, e.g. 'a photo of a cat' (required with --image / "
                                      "--images-dir: it drives the inversion and the CLIP direction)")
    io_.add_argument("--target", help="what the result should show, e.g. 'a watercolor painting of a cat' "
                                      "(required with --image / --images-dir)")
    io_.add_argument("--negative", help="negative prompt (default: the workflow's)")
    io_.add_argument("--style-image", type=Path, metavar="FILE",
                     help="style image (image_style workflow) or colour reference (Color Loss workflows); default: "
                          "the workflow's own (shipped with the pack)")
    io_.add_argument("--mask", type=Path, metavar="FILE",
                     help="edit mask for the local_edit workflow, white = the region to change (required there "
                          "with --image / --images-dir)")
    io_.add_argument("--output-dir", type=Path, metavar="DIR",
                     help="where results go (default: ./agg-output/DATE-TIME); must not hold an earlier run")
    wf = ap.add_argument_group("workflow and settings (default: the workflow's own values)")
    wf.add_argument("--workflow", metavar="NAME|FILE",
                    help=f"an example ({', '.join(G.EXAMPLES)}; default text_guided, {VIDEO_WORKFLOW} with --video) "
                         "or an API-format JSON file with AGG nodes")
    wf.add_argument("--seed", type=int)
    wf.add_argument("--steps", type=int, help="sampling steps")
    wf.add_argument("--size", type=int, help="longer side of the working size in pixels (the aspect ratio is "
                                             "kept, both sides rounded to a multiple of 8; of 16 for a video)")
    wf.add_argument("--denoise", type=float, help="how far from the photo to start (0..1]")
    wf.add_argument("--cfg", type=float, help="classifier-free guidance scale")
    wf.add_argument("--sampler", help="sampler name for KSampler workflows (e.g. euler, ddim, dpmpp_2m)")
    wf.add_argument("--scheduler", help="scheduler name (e.g. normal, karras)")
    wf.add_argument("--decoder", help="decoder of the image losses (CLIP, style, colour): vae, taesd or linear")
    wf.add_argument("--structure-weight", type=float, help="weight of Structure Loss")
    wf.add_argument("--clip-weight", type=float, help="weight of CLIP Direction Loss")
    wf.add_argument("--style-weight", type=float, help="weight of Image Style Loss")
    wf.add_argument("--color-weight", type=float, help="weight of Color Loss")
    wf.add_argument("--no-unguided", action="store_true", help="skip the run without AGG (no side-by-side)")
    md = ap.add_argument_group("models and servers")
    md.add_argument("--checkpoint", help="Stable Diffusion checkpoint: a file (own server) or a name the --server lists")
    md.add_argument("--clip", help="open_clip weights (.safetensors): a file, or a name the --server lists")
    md.add_argument("--controlnet", help="ControlNet model for the controlnet workflow: a file, or a name")
    md.add_argument("--vae-approx", type=Path, metavar="DIR",
                    help="folder with TAESD decoders (taesd_decoder.safetensors ...) for --decoder taesd (own server)")
    md.add_argument("--test-models", action="store_true",
                    help="the models are generated test models: label the outputs so, default to "
                         f"{TEST_MODEL_DEFAULTS['steps']} steps at {TEST_MODEL_DEFAULTS['size']} px, and leave out "
                         "--clip / --style-image where the workflow has no place for them")
    md.add_argument("--server", action="append", default=[], metavar="URL",
                    help="a running ComfyUI with the pack (e.g. http://127.0.0.1:8188); give it several times "
                         "to spread the images over several servers")
    md.add_argument("--comfyui", type=Path, metavar="DIR",
                    help="ComfyUI folder to start when no --server is given (default: $AGG_COMFYUI, else "
                         f"$AGG_HOME/{SETUP_COMFYUI} as scripts/setup.sh builds it)")
    md.add_argument("--python", metavar="EXE", help="Python to run that ComfyUI with (default: this one)")
    md.add_argument("--cpu", action="store_true", help="run the started ComfyUI on the CPU even if a GPU is there")
    md.add_argument("--timeout", type=float, default=3600.0, help="seconds one image may take (default 3600)")
    cl = ap.add_argument_group("cluster (Ray: pip install '.[cluster]')")
    cl.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                    help="run on Ray: 'auto' (the cluster this machine belongs to), ray://HOST:10001, HOST:6379, "
                         "or nothing for a local Ray of its own (token authentication, no dashboard). Each worker "
                         "owns one ComfyUI: started on its node (one per GPU) or one --server URL")
    cl.add_argument("--workers", type=int, metavar="N",
                    help="with --ray and no --server: how many ComfyUIs to start (default: one per GPU in the "
                         "cluster, else one per node)")
    cl.add_argument("--work-dir", type=Path, metavar="DIR",
                    help="with --ray: where each started ComfyUI keeps its folders and log, a folder per worker "
                         "(a path on every node; default: a temporary folder, removed at the end)")
    return ap


# ---------------------------------------------------------------------------------------------------
# Checks (nothing is started before all of them pass)


def check_image(path: Path, arg: str) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise UsageError(f"{arg} {path}: no such file")
    if not path.is_file():
        raise UsageError(f"{arg} {path}: not a file")
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"{arg} {path}: not an image Pillow can read ({e})") from None


def check_video(path: Path, arg: str) -> tuple[int, int]:
    """The video's (width, height); raises UsageError, naming `arg`, for a file that is missing or that PyAV
    (ComfyUI's video reader) cannot open and decode a frame of."""
    if not path.exists():
        raise UsageError(f"{arg} {path}: no such file")
    if not path.is_file():
        raise UsageError(f"{arg} {path}: not a file")
    try:
        import av

        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError("it has no video stream")
            frame = next(container.decode(video=0), None)
            if frame is None:
                raise ValueError("no frame could be decoded")
            return frame.width, frame.height
    except ImportError:
        raise UsageError(f"{arg}: reading videos needs PyAV (pip install av; ComfyUI's requirements have it)") from None
    except (OSError, ValueError, av.error.FFmpegError) as e:  # PyAV's errors, most also OSError / ValueError
        raise UsageError(f"{arg} {path}: not a video PyAV can read ({e})") from None


def check_safetensors(path: Path, arg: str) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n < 100_000_000:
                raise ValueError("bad header length")
            json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise UsageError(f"{arg} {path}: not a readable .safetensors file ({e})") from None


def check_model_file(value: str, arg: str, suffixes: set[str]) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        raise UsageError(f"{arg} {value}: no such file")
    if not path.is_file():
        raise UsageError(f"{arg} {value}: not a file")
    if path.suffix.lower() not in suffixes:
        raise UsageError(f"{arg} {value}: expected a {' / '.join(sorted(suffixes))} file")
    if path.suffix.lower() == ".safetensors":
        check_safetensors(path, arg)
    return path


def collect_images(args: argparse.Namespace) -> list[Path]:
    images = []
    for p in args.image:
        check_image(p, "--image")
        images.append(p)
    if args.images_dir is not None:
        d = args.images_dir
        if not d.exists():
            raise UsageError(f"--images-dir {d}: no such folder")
        if not d.is_dir():
            raise UsageError(f"--images-dir {d}: not a folder")
        found = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXT)
        if not found:
            raise UsageError(f"--images-dir {d}: no images ({', '.join(sorted(IMAGE_EXT))}) in it")
        for p in found:
            check_image(p, "--images-dir")
        images += found
    return images


def stems(paths: list[Path]) -> list[str]:
    """Output names: the file stem, made unique (a.png and a.jpg -> a_png, a_jpg)."""
    base = [re.sub(r"[^A-Za-z0-9._-]+", "_", p.stem) or "image" for p in paths]
    out = []
    for p, b in zip(paths, base, strict=True):
        name = b if base.count(b) == 1 else f"{b}_{p.suffix.lstrip('.').lower()}"
        while name in out:
            name += "_"
        out.append(name)
    return out


def check_numbers(args: argparse.Namespace) -> None:
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps {args.steps}: must be at least 1")
    if args.size is not None and not 64 <= args.size <= 8192:
        raise UsageError(f"--size {args.size}: must be between 64 and 8192 pixels")
    if args.denoise is not None and not 0 < args.denoise <= 1:
        raise UsageError(f"--denoise {args.denoise}: must be in (0, 1]")
    if args.cfg is not None and not 0 < args.cfg <= 100:
        raise UsageError(f"--cfg {args.cfg}: must be in (0, 100]")
    for name in ("structure_weight", "clip_weight", "style_weight", "color_weight"):
        v = getattr(args, name)
        if v is not None and not 0 <= v < 1e6:
            raise UsageError(f"{G.flag(name)} {v}: must be 0 or more")
    if args.timeout <= 0:
        raise UsageError(f"--timeout {args.timeout}: must be positive")
    if args.seed is not None and not 0 <= args.seed < 2**64:
        raise UsageError(f"--seed {args.seed}: must be in 0 .. 2**64-1")


def default_comfyui(args: argparse.Namespace) -> Path:
    if args.comfyui is not None:
        return args.comfyui.expanduser()
    return Path(os.environ.get("AGG_COMFYUI", agg_home() / SETUP_COMFYUI))


def pack_in_custom_nodes(comfyui: Path) -> bool:
    nodes = comfyui / "custom_nodes"
    try:
        return any(e.is_dir() and e.resolve() == PACK.resolve() for e in nodes.iterdir())
    except OSError:
        return False


@dataclass(frozen=True)
class Plan:
    """Everything checked, ready to run: the values decided from the command line (plan_from)."""

    workflow_name: str
    api: dict
    video: bool  # the workflow edits a video (it has a Load Video node)
    images: list[Path]  # the photos or videos to run, in order (ComfyUI's example picture when none is given)
    sizes: dict[Path, tuple[int, int]]  # each one's (width, height)
    style: Path | None  # --style-image, unless the workflow has no place for it (--test-models)
    mask: Path | None
    servers: list[str]  # normalised --server URLs
    local: bool  # a ComfyUI is started here (no --server)
    cluster: bool  # on Ray (--ray, or several --server)
    local_files: dict[str, Path]  # the model files given for the ComfyUI started here, by MODEL_INPUTS key
    settings: G.Settings
    size: int | None  # longer side of the working size (None: the workflow's own sizes)
    out: Path
    comfyui: Path | None = None  # the ComfyUI started here, and its Python (local only)
    python: str | None = None
    # the command line's run options, as given
    no_unguided: bool = False
    test_models: bool = False
    timeout: float = 3600.0
    ray: str | None = None
    workers: int | None = None
    work_dir: Path | None = None
    vae_approx: Path | None = None
    cpu: bool = False


def plan_from(args: argparse.Namespace) -> Plan:
    """Check the command line and decide the run: the workflow and its settings, the inputs, the servers, the
    output folder (made here, and checked writable). Raises UsageError (or GraphError) naming the argument;
    `args` is left as parsed."""
    workflow = args.workflow
    if workflow is None:
        workflow = VIDEO_WORKFLOW if args.video else "text_guided"
    workflow_name, api = G.load_workflow(workflow)
    check_numbers(args)
    video = G.is_video_workflow(api)
    images = _inputs(args, workflow_name, video)
    style = None
    if args.style_image is not None:
        check_image(args.style_image, "--style-image")
        style = args.style_image
    mask = None
    if args.mask is not None:
        check_image(args.mask, "--mask")
        if not G.mask_image_nodes(api):
            raise UsageError(f"--mask: the workflow {workflow_name} has no LoadImage titled 'Edit mask'")
        mask = args.mask
    servers = _servers(args)
    local = not servers
    cluster = args.ray is not None or len(servers) > 1
    steps, size, models = args.steps, args.size, {key: getattr(args, key) for key in G.MODEL_INPUTS}
    if args.test_models:
        steps = steps or TEST_MODEL_DEFAULTS["steps"]
        size = size or TEST_MODEL_DEFAULTS["size"]
        # one set of test models serves every workflow: what this one has no place for is left out
        if models["clip"] is not None and not G.nodes_of(api, G.MODEL_INPUTS["clip"][0]):
            models["clip"] = None
        if style is not None and not G.style_image_nodes(api):
            style = None
    if images:
        _require_texts(args, api, workflow_name, video, mask)

    models, local_files = _model_names(models, local)
    _check_vae_approx(args, local)

    settings = G.Settings(
        source=args.source, target=args.target, negative=args.negative, seed=args.seed, steps=steps,
        denoise=args.denoise, cfg=args.cfg, sampler=args.sampler, scheduler=args.scheduler, decoder=args.decoder,
        structure_weight=args.structure_weight, clip_weight=args.clip_weight, style_weight=args.style_weight,
        color_weight=args.color_weight, **models)
    G.check_applicable(api, settings, workflow_name, style_image=style is not None, size=size is not None)
    size = size or G.workflow_size(api)

    comfyui = python = None
    if local:
        comfyui, python = _local_comfyui(args, api, local_files)
    if not images and video:
        raise UsageError(f"--video is required: the workflow {workflow_name} edits a video (e.g. --video clip.mp4)")
    if not images:
        example = (comfyui / "input" / "example.png") if comfyui is not None else None
        if example is None or not example.is_file():
            raise UsageError("--image or --images-dir is required" + ("" if local else " with --server"))
        images = [example]
    out = _output_dir(args.output_dir)
    sizes = {p: check_video(p, "--video") if video else check_image(p, "--image") for p in images}
    return Plan(workflow_name=workflow_name, api=api, video=video, images=images, sizes=sizes, style=style, mask=mask,
                servers=servers, local=local, cluster=cluster, local_files=local_files, settings=settings, size=size,
                out=out, comfyui=comfyui, python=python, no_unguided=bool(args.no_unguided),
                test_models=bool(args.test_models), timeout=args.timeout, ray=args.ray, workers=args.workers,
                work_dir=args.work_dir, vae_approx=args.vae_approx, cpu=bool(args.cpu))


def _inputs(args: argparse.Namespace, workflow_name: str, video: bool) -> list[Path]:
    """The photos (--image, --images-dir) or videos (--video) given, checked against the workflow's kind."""
    if args.video and (args.image or args.images_dir is not None):
        raise UsageError("--video: not with --image / --images-dir (one run edits either photos or videos)")
    if args.video:
        videos = [p for p in args.video if check_video(p, "--video")]
        if not video:
            raise UsageError(f"--video: the workflow {workflow_name} has no Load Video node; leave --workflow "
                             f"out (--video runs {VIDEO_WORKFLOW}) or give a workflow that loads a video")
        return videos
    images = collect_images(args)
    if images and video:
        raise UsageError(f"{'--image' if args.image else '--images-dir'}: the workflow {workflow_name} "
                         "edits a video; give the clip with --video FILE")
    return images


def _servers(args: argparse.Namespace) -> list[str]:
    """The --server URLs, normalised, with the cluster options checked against them."""
    servers = []
    for url in args.server:
        try:
            servers.append(normalise_url(url))
        except ValueError as e:
            raise UsageError(f"--server {e}") from None
    if len(set(servers)) != len(servers):
        raise UsageError("--server: the same URL is given twice")
    if args.workers is not None:
        if args.ray is None:
            raise UsageError("--workers: only with --ray")
        if servers:
            raise UsageError("--workers: not with --server (there is one worker per server)")
        if args.workers < 1:
            raise UsageError(f"--workers {args.workers}: must be at least 1")
    if args.work_dir is not None and (args.ray is None or servers):
        raise UsageError("--work-dir: only with --ray and no --server (for the ComfyUIs the workers start)")
    if args.ray is not None or len(servers) > 1:
        try:
            import importlib.util

            found = importlib.util.find_spec("ray") is not None
        except ValueError:
            found = True
        if not found:
            raise UsageError(("--ray" if args.ray is not None else "several --server") + ": " + INSTALL_HINT)
    return servers


def _require_texts(args: argparse.Namespace, api: dict, workflow_name: str, video: bool, mask: Path | None) -> None:
    """With the user's own photos or videos: the texts (and the mask) the workflow's own describe its example."""
    given = "--video" if video else "--image / --images-dir"
    thing = "video" if video else "photo"
    for role, example in (("source", f"a {thing} of a cat"), ("target", "a watercolor painting of a cat")):
        if getattr(args, role) is None and G.uses_text(api, role):
            own = G.workflow_text(api, role)
            raise UsageError(
                f"--{role} is required with {given}: describe "
                + (f"what your {thing} shows" if role == "source" else "the result you want")
                + f", e.g. --{role} \"{example}\" (the workflow's own text, {own!r}, "
                + ("is an example)" if video else "describes its example picture)"))
    if G.mask_image_nodes(api) and mask is None:
        raise UsageError(f"--mask is required with --image / --images-dir for the workflow {workflow_name}: "
                         "the workflow's own mask marks a region of its example picture")


def _model_names(given: dict[str, str | None], local: bool) -> tuple[dict[str, str | None], dict[str, Path]]:
    """The model options as the ComfyUI lists them, and the files checked for the one started here (`local`)."""
    names: dict[str, str | None] = {}
    local_files: dict[str, Path] = {}
    for key, value in given.items():
        names[key] = value
        if value is None:
            continue
        if local:
            local_files[key] = check_model_file(value, f"--{key}", CHECKPOINT_EXT if key != "clip" else {".safetensors"})
            names[key] = local_files[key].name
        elif Path(value).expanduser().is_file():
            names[key] = Path(value).name  # a local copy of a file the server holds: use the name
    return names, local_files


def _check_vae_approx(args: argparse.Namespace, local: bool) -> None:
    if args.vae_approx is not None:
        if not local:
            raise UsageError("--vae-approx: only for the ComfyUI started here; a --server uses its own models/vae_approx")
        if not args.vae_approx.is_dir():
            raise UsageError(f"--vae-approx {args.vae_approx}: no such folder")
    if args.decoder == "taesd" and local and args.vae_approx is None and not args.test_models:
        comfy_va = default_comfyui(args) / "models" / "vae_approx"
        if not any(comfy_va.glob("taesd*_decoder.*")):
            raise UsageError("--decoder taesd needs the TAESD decoder files: pass --vae-approx DIR (a folder "
                             "with taesd_decoder.safetensors / taesdxl_decoder.safetensors) or put them in "
                             f"{comfy_va}")


def _local_comfyui(args: argparse.Namespace, api: dict, local_files: dict[str, Path]) -> tuple[Path, str]:
    """The ComfyUI to start here and its Python, with the model files the workflow needs and no option gives."""
    comfyui = default_comfyui(args)
    if not (comfyui / "main.py").is_file():
        raise UsageError(f"--comfyui {comfyui}: no ComfyUI there (main.py missing); run "
                         "scripts/setup.sh, or pass --comfyui DIR, or use --server URL")
    python = args.python or sys.executable
    if shutil.which(python) is None and not Path(python).is_file():
        raise UsageError(f"--python {python}: not found")
    for key, (ct, inp, folder) in G.MODEL_INPUTS.items():
        if key in local_files or not G.nodes_of(api, ct):
            continue
        default = api[G.nodes_of(api, ct)[0]]["inputs"].get(inp)
        if isinstance(default, str) and not (comfyui / "models" / folder / default).exists() \
                and not (comfyui / "extra_model_paths.yaml").exists():
            raise UsageError(f"--{key} is required: the workflow needs {default!r} and "
                             f"{comfyui / 'models' / folder} has no such file")
    return comfyui, python


def _output_dir(given: Path | None) -> Path:
    """--output-dir (default ./agg-output/DATE-TIME), made and checked writable; it must not hold a run."""
    out = given or Path.cwd() / "agg-output" / time.strftime("%Y%m%d-%H%M%S")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out}: exists and is not a folder")
    if (out / "summary.json").exists():
        raise UsageError(f"--output-dir {out}: already holds a run (summary.json); choose another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".agg-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--output-dir {out}: cannot write there ({e})") from None
    return out.resolve()


# ---------------------------------------------------------------------------------------------------
# Running


def write_models_tree(local_files: dict[str, Path], vae_approx: Path | None, comfyui: Path, work: Path) -> Path:
    """Links to the user's files in a ComfyUI models layout, and the extra_model_paths.yaml naming it
    (plus this pack's folder when the ComfyUI does not have it in custom_nodes)."""
    lines = ["agg_cli:", f"    base_path: {json.dumps(str(work / 'models'))}"]
    for key, path in local_files.items():
        folder = G.MODEL_INPUTS[key][2]
        link = work / "models" / folder / path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path.resolve())
        lines.append(f"    {folder}: {folder}/")
    if vae_approx is not None:
        lines.append(f"    vae_approx: {json.dumps(str(vae_approx.resolve()))}")
    if not pack_in_custom_nodes(comfyui):
        nodes = work / "custom_nodes"
        nodes.mkdir(parents=True, exist_ok=True)
        (nodes / "agg-comfyui").symlink_to(PACK)
        lines.append(f"    custom_nodes: {json.dumps(str(nodes))}")
    yaml = work / "extra_model_paths.yaml"
    yaml.write_text("\n".join(lines) + "\n")
    return yaml


def probe_graphs(plan: Plan) -> tuple[list[dict], dict]:
    """The graphs every image runs (with a stand-in photo), and where each setting came from."""
    probe = G.customise(plan.api, plan.settings, "x.png", None, "agg")
    return [probe] + ([] if plan.no_unguided else [G.without_agg(probe)]), G.argument_sources(plan.settings)


def check_servers(plan: Plan, urls: list[str]) -> list[str]:
    """Ask every server for its node list; returns the problems (unreachable, missing nodes/models)."""
    problems = []
    graphs, used = probe_graphs(plan)
    for url in urls:
        try:
            info = Client(url, timeout=20).object_info()
        except (ServerLost, JobFailed) as e:
            problems.append(f"--server {url}: not reachable ({e})")
            continue
        seen = set()
        for g in graphs:
            for p in G.check_against_server(g, info, url, used):
                if p not in seen:
                    seen.add(p)
                    problems.append(p)
    return problems


def run_spec(plan: Plan, run_id: str) -> RunSpec:
    graphs, _ = probe_graphs(plan)
    shipped = {path.name: path.read_bytes() for g in graphs for path in G.shipped_images(g).values()}
    return RunSpec(api=plan.api, settings=plan.settings, run_id=run_id, no_unguided=bool(plan.no_unguided),
                   timeout=plan.timeout,
                   style=None if plan.style is None else (plan.style.name, plan.style.read_bytes()),
                   mask=None if plan.mask is None else (plan.mask.name, plan.mask.read_bytes()), shipped=shipped)


def image_tasks(plan: Plan) -> list[ImageTask]:
    """One task per photo (or video); its bytes are read when the task is handed out (``load``)."""
    tasks = []
    for i, (path, stem) in enumerate(zip(plan.images, stems(plan.images), strict=True)):
        size = None
        if plan.size is not None:
            w, h = plan.sizes[path]
            size = G.fit_size(w, h, plan.size, VIDEO_MULTIPLE if plan.video else 8)
        tasks.append(ImageTask(i, stem, str(path), b"", size, video=plan.video))
    return tasks


def load(task: ImageTask) -> ImageTask:
    """The task with its photo's (or video's) bytes, decoded once here in full: a damaged file (which ComfyUI's
    LoadImage would pass on half-grey) fails as an unreadable image (or video). Raises ValueError."""
    import io
    from dataclasses import replace

    from PIL import Image

    try:
        data = Path(task.path).read_bytes()
        if task.video:
            import av

            try:
                with av.open(io.BytesIO(data)) as container:
                    if sum(1 for _ in container.decode(video=0)) == 0:
                        raise ValueError("no frames")
            except av.error.FFmpegError as e:
                raise ValueError(str(e)) from None
        else:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
    except (OSError, ValueError) as e:  # PyAV's errors are OSError / ValueError subclasses
        raise ValueError(f"unreadable {'video' if task.video else 'image'} {task.path}: {e}") from None
    return replace(task, data=data)


class Collector:
    """Takes each image's outcome where the output folder is: writes its files (once) and keeps
    what summary.json lists about it."""

    def __init__(self, plan: Plan, tasks: list[ImageTask], display: Display) -> None:
        self.plan, self.display = plan, display
        self.tasks = {t.index: t for t in tasks}
        self.records = {t.index: {"image": t.path, "name": t.stem, "status": "not run", "server": None, "seconds": 0.0,
                                  "error": None, "attempts": [], "outputs": {}} for t in tasks}

    def __call__(self, outcome: Outcome, attempts: list[dict] | None = None) -> None:
        task, rec = self.tasks[outcome.index], self.records[outcome.index]
        files: dict[str, str] = {}
        if outcome.ok:
            meta = settings_meta(self.plan.workflow_name, task.size, self.plan.settings)
            try:
                files = write_outputs(self.plan.out, outcome, Path(task.path), meta, self.plan.test_models)
            except Exception as e:  # noqa: BLE001 - this image's files could not be written: it alone fails
                outcome.ok, outcome.error = False, f"writing its results: {type(e).__name__}: {e}"
        rec.update(status="done" if outcome.ok else "failed", server=outcome.where or None,
                   seconds=round(outcome.seconds, 2), error=outcome.error, outputs=files,
                   attempts=list(attempts) if attempts is not None else
                   [{"where": outcome.where, "outcome": "done" if outcome.ok else "failed", "error": outcome.error}])
        self.display.finished(task.stem, outcome.ok)
        if outcome.ok:
            self.display.say(f"  {task.stem}: {terms_summary(outcome.terms)}; result {files['agg']}")
        else:
            self.display.say(f"  FAILED {task.path}: {outcome.error}")

    def images(self) -> list[dict]:
        return [self.records[i] for i in sorted(self.records)]


def say_start(plan: Plan, display: Display, task: ImageTask, where: str) -> None:
    w, h = plan.sizes[Path(task.path)]
    display.say(f"[{task.index + 1}/{len(plan.images)}] {task.path} on {where}"
                + (f": {w}x{h} -> {task.size[0]}x{task.size[1]}" if task.size else ""))


def run_one_machine(plan: Plan, spec: RunSpec, tasks: list[ImageTask], display: Display, collector: Collector,
                    url: str) -> dict:
    """The images in order on one ComfyUI. A lost server fails what is left."""
    client = Client(url)
    translator = Translator(client, spec)
    stats = {"url": url, "done": 0, "failed": 0, "busy_seconds": 0.0, "lost": False, "error": None}

    def on_step(stem: str, phase: str, value: int, total: int, loss: str) -> None:
        display.step(url, stem, phase, value, total, loss)

    try:
        for k, task in enumerate(tasks):
            say_start(plan, display, task, url)
            try:
                loaded = load(task)
            except ValueError as e:
                stats["failed"] += 1
                collector(Outcome(task.index, task.stem, False, str(e)))
                continue
            try:
                outcome = translator(loaded, on_step)
            except ServerLost as e:
                stats["lost"], stats["error"] = True, str(e)
                for t in tasks[k:]:
                    collector(Outcome(t.index, t.stem, False, f"server lost: {e}", url))
                break
            stats["busy_seconds"] += outcome.seconds
            stats["done" if outcome.ok else "failed"] += 1
            collector(outcome)
    finally:
        client.close()
    stats["busy_seconds"] = round(stats["busy_seconds"], 2)
    return stats


def run_on_ray(plan: Plan, spec: RunSpec, tasks: list[ImageTask], display: Display,
               collector: Collector) -> tuple[list[dict], int]:
    """The images on Ray workers (agg_cli.cluster). Returns (per-worker stats, exit code)."""
    from . import cluster as C

    n_workers = len(plan.servers) or plan.workers or 1
    started = C.connect(plan.ray or None, num_cpus=n_workers)
    ray = C.import_ray()
    workers: list = []
    try:
        if plan.servers:
            wspecs = [C.WorkerSpec(url=u) for u in plan.servers]
        else:
            n = plan.workers or C.default_workers()
            wspecs = [C.WorkerSpec(comfyui=str(plan.comfyui), python=plan.python,
                                   models={k: str(v.absolute()) for k, v in plan.local_files.items()},
                                   vae_approx=str(plan.vae_approx.resolve()) if plan.vae_approx else None,
                                   cpu=True if plan.cpu else None,
                                   work_dir=str(plan.work_dir.resolve()) if plan.work_dir else None)
                      for _ in range(n)]
        print(f"Ray: {'a local cluster started here' if started else 'connected to ' + repr(plan.ray or 'this process')}"
              f" ({ray.cluster_resources().get('CPU', 0):g} CPUs, {C.cluster_gpus()} GPUs); "
              f"{len(wspecs)} worker(s), each with " + ("one --server" if plan.servers else "its own ComfyUI"), flush=True)
        events = C.make_events()
        workers = C.start_workers(wspecs, spec, events)
        live = []
        for name, h in workers:
            try:
                d = ray.get(h.describe.remote(), timeout=600)
                print(f"  {name}: {d['where']}" + (f", up in {d['startup_seconds']:.0f} s" if d["startup_seconds"] else ""),
                      flush=True)
                live.append((name, h))
            except Exception as e:  # noqa: BLE001 - a worker that cannot start is left out
                print(f"  {name}: could not start: {C._first_line(e)}", file=sys.stderr, flush=True)
        if not live:
            print("error: no worker could start", file=sys.stderr)
            return [], 1
        graphs, used = probe_graphs(plan)
        checked = live if plan.servers else live[:1]  # started workers share one ComfyUI set-up
        problems = [p for _, h in checked for p in ray.get(h.check.remote(graphs, used), timeout=300)]
        if problems:
            print("error: cannot run on the workers' ComfyUI:", file=sys.stderr)
            for p in problems:
                print(f"  {p}", file=sys.stderr)
            return [], 2
        by_index = {t.index: t for t in tasks}

        def on_event(ev: tuple) -> None:
            if ev[0] == "start":
                say_start(plan, display, by_index[ev[1]], ev[3])
            elif ev[0] == "step":
                display.step(*ev[1:])
            elif ev[0] == "lost":
                display.say(f"{ev[2]} lost its ComfyUI while running {by_index[ev[1]].stem} ({ev[3]}); "
                            "Ray restarts it and runs the image again")
            elif ev[0] == "gone":
                display.say(f"{ev[2]} is gone ({ev[3]}); {by_index[ev[1]].stem} goes to another worker")

        stats, _ = C.run_images(live, tasks, events, on_event, collector, load=load)
        return [vars(s) | {"busy_seconds": round(s.busy_seconds, 2)} for s in stats], 0
    finally:
        if workers:
            C.stop_workers(workers)
        if started:
            ray.shutdown()


def run(plan: Plan) -> int:
    run_id = time.strftime("%Y%m%d%H%M%S")
    tasks = image_tasks(plan)
    spec = run_spec(plan, run_id)
    log_path: Path | None = None
    server: LocalServer | None = None
    work: Path | None = None
    print(f"results go to {plan.out}", flush=True)
    if plan.size is not None:
        print(f"working size: longer side {plan.size} px, aspect ratio kept, sides rounded to multiples of 8", flush=True)
    t0 = time.monotonic()
    try:
        display = Display(len(tasks))
        collector = Collector(plan, tasks, display)
        if plan.cluster:
            try:
                workers, code = run_on_ray(plan, spec, tasks, display, collector)
            except RuntimeError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            finally:
                display.close()
            if code:
                return code
            servers: list[dict] = []
        else:
            if plan.local:
                work = Path(tempfile.mkdtemp(prefix="agg-cli-"))
                yaml = write_models_tree(plan.local_files, plan.vae_approx, plan.comfyui, work)
                log_path = plan.out / "comfyui-server.log"
                server = LocalServer(plan.comfyui, work / "server", log_path, yaml, python=plan.python,
                                     cpu=True if plan.cpu else None)
                print(f"starting ComfyUI from {plan.comfyui} ({'CPU' if server.cpu else 'GPU'}); its log: {log_path}",
                      flush=True)
                try:
                    server.start()
                except RuntimeError as e:
                    print(f"error: {e}", file=sys.stderr)
                    return 1
                print(f"ComfyUI up at {server.url} in {server.startup_seconds:.0f} s", flush=True)
                url = server.url
            else:
                url = plan.servers[0]
            problems = check_servers(plan, [url])
            if problems:
                print("error: cannot run on " + ("the started ComfyUI" if plan.local else "the given server") + ":",
                      file=sys.stderr)
                for p in problems:
                    print(f"  {p}", file=sys.stderr)
                if log_path:
                    print(f"  (ComfyUI's log: {log_path})", file=sys.stderr)
                return 2
            try:
                servers = [run_one_machine(plan, spec, tasks, display, collector, url)]
            finally:
                display.close()
            workers = []
        seconds = time.monotonic() - t0
        images = collector.images()
        summary = {"workflow": plan.workflow_name, "seconds": round(seconds, 2),
                   "mode": "ray" if plan.cluster else "one machine", "images": images,
                   "servers": servers, "workers": workers, "server_log": str(log_path) if log_path else None,
                   "test_models": plan.test_models}
        (plan.out / "summary.json").write_text(json.dumps(summary, indent=1))
        done = sum(i["status"] == "done" for i in images)
        print(f"done: {done} of {len(images)} {'videos' if plan.video else 'images'} in {seconds:.1f} s -> {plan.out}")
        for st in servers:
            extra = f"; LOST: {st['error']}" if st["lost"] else ""
            print(f"  {st['url']}: {st['done']} done, {st['failed']} failed, {st['busy_seconds']:.1f} s busy{extra}")
        for w in workers:
            extra = (f"; lost its ComfyUI {w['lost']} time(s), restarted by Ray" if w["lost"] else "") + \
                    (f"; GONE: {w['error']}" if w["gone"] else "")
            print(f"  {w['name']} {w['where']}: {w['done']} done, {w['failed']} failed, "
                  f"{w['busy_seconds']:.1f} s busy{extra}")
        for i in images:
            if i["status"] != "done":
                print(f"  FAILED {i['image']}: {i['error']}")
        print(f"summary: {plan.out / 'summary.json'}")
        if log_path:
            print(f"server log: {log_path}")
        if plan.test_models:
            print("NOTE: these images come from generated test models, not real weights: a toy model's blurry "
                  "pictures, which show what it can follow (colours, coarse layout), not what a real model does.")
        return 0 if done == len(images) else 1
    finally:
        if server is not None:
            server.stop()
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)  # the temporary folder made above


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        plan = plan_from(args)
    except (UsageError, G.GraphError) as e:
        print(f"agg_cli: error: {e}", file=sys.stderr)
        return 2
    try:
        return run(plan)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
