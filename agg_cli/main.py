"""Translate photos with an AGG workflow in ComfyUI, from the command line.

  python -m agg_cli --image photo.jpg --source "a photo of a cat" --target "a watercolor painting of a cat" \\
      --checkpoint ~/models/v1-5-pruned-emaonly.safetensors --clip ~/models/open_clip_model.safetensors

Without --server it starts a headless ComfyUI of its own (the one scripts/setup.sh built, or
--comfyui DIR) with the given model files, on the GPU when torch sees one. With --server URL it uses
a ComfyUI that is already running with its own models (then --checkpoint / --clip / --controlnet
are model names as that server lists them); --server given several times spreads a folder over
those servers, one image at a time each, and moves the images of a server that is lost to the others.

For each photo it runs the workflow with AGG and once more without it (same graph and seed), and
writes into --output-dir: NAME_agg.png, NAME_unguided.png, NAME_side_by_side.png (source | unguided
| AGG), NAME_terms.json (every per-step AGG report) and NAME_terms.png (loss terms and step sizes),
plus summary.json. Every path and option is checked before anything starts; the model names and
sampler settings are checked against each server's node list before any image is queued.
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
from dataclasses import asdict
from pathlib import Path

from . import graph as G
from .comfy import Client, JobFailed, LocalServer, ServerLost, normalise_url
from .jobs import Job, Scheduler, ServerStats
from .report import Display, plot_terms, side_by_side, terms_summary

PACK = G.PACK
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
CHECKPOINT_EXT = {".safetensors", ".ckpt", ".pt", ".pth"}
TEST_MODEL_DEFAULTS = {"steps": 20, "size": 128}


class UsageError(ValueError):
    """A bad argument; the message names it."""


def agg_home() -> Path:
    return Path(os.environ.get("AGG_HOME", Path.home() / ".cache" / "agg-comfyui"))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="agg_cli", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io_ = ap.add_argument_group("images and texts")
    io_.add_argument("--image", type=Path, action="append", default=[], metavar="FILE",
                     help="a photo to translate (may be given several times)")
    io_.add_argument("--images-dir", type=Path, metavar="DIR", help="translate every image in this folder")
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
    wf.add_argument("--workflow", default="text_guided", metavar="NAME|FILE",
                    help=f"an example ({', '.join(G.EXAMPLES)}; default text_guided) or an API-format JSON file "
                         "with AGG nodes")
    wf.add_argument("--seed", type=int)
    wf.add_argument("--steps", type=int, help="sampling steps")
    wf.add_argument("--size", type=int, help="longer side of the working size in pixels (the aspect ratio is "
                                             "kept, both sides rounded to a multiple of 8)")
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
                         "$AGG_HOME/ComfyUI as scripts/setup.sh builds it)")
    md.add_argument("--python", metavar="EXE", help="Python to run that ComfyUI with (default: this one)")
    md.add_argument("--cpu", action="store_true", help="run the started ComfyUI on the CPU even if a GPU is there")
    md.add_argument("--timeout", type=float, default=3600.0, help="seconds one image may take (default 3600)")
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
    return Path(os.environ.get("AGG_COMFYUI", agg_home() / "ComfyUI"))


def pack_in_custom_nodes(comfyui: Path) -> bool:
    nodes = comfyui / "custom_nodes"
    try:
        return any(e.is_dir() and e.resolve() == PACK.resolve() for e in nodes.iterdir())
    except OSError:
        return False


class Plan:
    """Everything checked, ready to run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workflow_name, self.api = G.load_workflow(args.workflow)
        check_numbers(args)
        self.images = collect_images(args)
        self.own_images = bool(self.images)
        self.style = None
        if args.style_image is not None:
            check_image(args.style_image, "--style-image")
            self.style = args.style_image
        self.mask = None
        if args.mask is not None:
            check_image(args.mask, "--mask")
            if not G.mask_image_nodes(self.api):
                raise UsageError(f"--mask: the workflow {self.workflow_name} has no LoadImage titled 'Edit mask'")
            self.mask = args.mask
        self.servers = []
        for url in args.server:
            try:
                self.servers.append(normalise_url(url))
            except ValueError as e:
                raise UsageError(f"--server {e}") from None
        if len(set(self.servers)) != len(self.servers):
            raise UsageError("--server: the same URL is given twice")
        self.local = not self.servers
        if args.test_models:
            args.steps = args.steps or TEST_MODEL_DEFAULTS["steps"]
            args.size = args.size or TEST_MODEL_DEFAULTS["size"]
            # one set of test models serves every workflow: what this one has no place for is left out
            if args.clip is not None and not G.nodes_of(self.api, G.MODEL_INPUTS["clip"][0]):
                args.clip = None
            if self.style is not None and not G.style_image_nodes(self.api):
                self.style = None

        # Texts: the workflow's own describe ComfyUI's example picture, not the user's photo.
        if self.own_images:
            for role, example in (("source", "a photo of a cat"), ("target", "a watercolor painting of a cat")):
                if getattr(args, role) is None and G.uses_text(self.api, role):
                    own = G.workflow_text(self.api, role)
                    raise UsageError(
                        f"--{role} is required with --image / --images-dir: describe "
                        + ("what your photo shows" if role == "source" else "the result you want")
                        + f", e.g. --{role} \"{example}\" (the workflow's own text, {own!r}, describes its example picture)")
            if G.mask_image_nodes(self.api) and self.mask is None:
                raise UsageError(f"--mask is required with --image / --images-dir for the workflow {self.workflow_name}: "
                                 "the workflow's own mask marks a region of its example picture")

        self.local_files: dict[str, Path] = {}
        for key in G.MODEL_INPUTS:
            value = getattr(args, key)
            if value is None:
                continue
            suffixes = {".safetensors"} if key == "clip" else CHECKPOINT_EXT
            if self.local:
                self.local_files[key] = check_model_file(value, f"--{key}", suffixes)
            elif Path(value).expanduser().is_file():
                # a local copy of a file the server holds: use the name
                setattr(args, key, Path(value).name)
        if args.vae_approx is not None:
            if not self.local:
                raise UsageError("--vae-approx: only for the ComfyUI started here; a --server uses its own models/vae_approx")
            if not args.vae_approx.is_dir():
                raise UsageError(f"--vae-approx {args.vae_approx}: no such folder")
        if args.decoder == "taesd" and self.local and args.vae_approx is None and not args.test_models:
            comfy_va = default_comfyui(args) / "models" / "vae_approx"
            if not any(comfy_va.glob("taesd*_decoder.*")):
                raise UsageError("--decoder taesd needs the TAESD decoder files: pass --vae-approx DIR (a folder "
                                 "with taesd_decoder.safetensors / taesdxl_decoder.safetensors) or put them in "
                                 f"{comfy_va}")

        self.settings = G.Settings(
            source=args.source, target=args.target, negative=args.negative, seed=args.seed, steps=args.steps,
            denoise=args.denoise, cfg=args.cfg, sampler=args.sampler, scheduler=args.scheduler, decoder=args.decoder,
            structure_weight=args.structure_weight, clip_weight=args.clip_weight, style_weight=args.style_weight,
            color_weight=args.color_weight,
            checkpoint=(self.local_files["checkpoint"].name if "checkpoint" in self.local_files else args.checkpoint),
            clip=(self.local_files["clip"].name if "clip" in self.local_files else args.clip),
            controlnet=(self.local_files["controlnet"].name if "controlnet" in self.local_files else args.controlnet),
        )
        G.check_applicable(self.api, self.settings, self.workflow_name, style_image=self.style is not None,
                           size=args.size is not None)
        if args.size is None and G.workflow_size(self.api) is None:
            self.size = None
        else:
            self.size = args.size or G.workflow_size(self.api)

        if self.local:
            self.comfyui = default_comfyui(args)
            if not (self.comfyui / "main.py").is_file():
                raise UsageError(f"--comfyui {self.comfyui}: no ComfyUI there (main.py missing); run "
                                 "scripts/setup.sh, or pass --comfyui DIR, or use --server URL")
            self.python = args.python or sys.executable
            if shutil.which(self.python) is None and not Path(self.python).is_file():
                raise UsageError(f"--python {self.python}: not found")
            for key, (ct, inp, folder) in G.MODEL_INPUTS.items():
                if key in self.local_files or not G.nodes_of(self.api, ct):
                    continue
                default = self.api[G.nodes_of(self.api, ct)[0]]["inputs"].get(inp)
                if isinstance(default, str) and not (self.comfyui / "models" / folder / default).exists() \
                        and not (self.comfyui / "extra_model_paths.yaml").exists():
                    raise UsageError(f"--{key} is required: the workflow needs {default!r} and "
                                     f"{self.comfyui / 'models' / folder} has no such file")
        if not self.images:
            example = (self.comfyui / "input" / "example.png") if self.local else None
            if example is None or not example.is_file():
                raise UsageError("--image or --images-dir is required" + ("" if self.local else " with --server"))
            self.images = [example]

        out = args.output_dir or Path.cwd() / "agg-output" / time.strftime("%Y%m%d-%H%M%S")
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
        self.out = out.resolve()
        self.sizes = {p: check_image(p, "--image") for p in self.images}


# ---------------------------------------------------------------------------------------------------
# Running


def write_models_tree(plan: Plan, work: Path) -> Path:
    """Links to the user's files in a ComfyUI models layout, and the extra_model_paths.yaml naming it
    (plus this pack's folder when the ComfyUI does not have it in custom_nodes)."""
    lines = ["agg_cli:", f"    base_path: {json.dumps(str(work / 'models'))}"]
    for key, path in plan.local_files.items():
        folder = G.MODEL_INPUTS[key][2]
        link = work / "models" / folder / path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path.resolve())
        lines.append(f"    {folder}: {folder}/")
    if plan.args.vae_approx is not None:
        lines.append(f"    vae_approx: {json.dumps(str(plan.args.vae_approx.resolve()))}")
    if not pack_in_custom_nodes(plan.comfyui):
        nodes = work / "custom_nodes"
        nodes.mkdir(parents=True, exist_ok=True)
        (nodes / "agg-comfyui").symlink_to(PACK)
        lines.append(f"    custom_nodes: {json.dumps(str(nodes))}")
    yaml = work / "extra_model_paths.yaml"
    yaml.write_text("\n".join(lines) + "\n")
    return yaml


def check_servers(plan: Plan, urls: list[str]) -> list[str]:
    """Ask every server for its node list; returns the problems (unreachable, missing nodes/models)."""
    problems = []
    used = G.argument_sources(plan.settings)
    probe = G.customise(plan.api, plan.settings, "x.png", None, "agg")
    graphs = [probe] + ([] if plan.args.no_unguided else [G.without_agg(probe)])
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


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(path)


class Runner:
    """Runs one image on one server and writes its files."""

    def __init__(self, plan: Plan, run_id: str, display: Display) -> None:
        self.plan, self.run_id, self.display = plan, run_id, display
        self.uploaded: dict[tuple[str, str], str] = {}  # (server, local file) -> LoadImage value there

    def upload_once(self, client: Client, path: Path, role: str) -> str:
        key = (client.url, str(path))
        if key not in self.uploaded:
            self.uploaded[key] = client.upload_image(path, f"{self.run_id}_{role}_{path.name}")
        return self.uploaded[key]

    def with_shipped(self, client: Client, prompt: dict) -> dict:
        """The prompt with the pictures it names from the pack's web/assets uploaded to the server."""
        for nid, path in G.shipped_images(prompt).items():
            prompt[nid]["inputs"]["image"] = self.upload_once(client, path, "shipped")
        return prompt

    def __call__(self, client: Client, job: Job) -> None:
        plan, s = self.plan, self.plan.settings
        size = None
        if plan.size is not None:
            w, h = plan.sizes[job.path]
            size = G.fit_size(w, h, plan.size)
        name = f"{self.run_id}_{job.index:04d}_{job.stem}{job.path.suffix.lower()}"
        self.display.say(f"[{job.index + 1}/{len(plan.images)}] {job.path} on {client.url}"
                         + (f": {plan.sizes[job.path][0]}x{plan.sizes[job.path][1]} -> {size[0]}x{size[1]}" if size else ""))
        image = client.upload_image(job.path, name)
        style = None if plan.style is None else self.upload_once(client, plan.style, "style")
        mask = None if plan.mask is None else self.upload_once(client, plan.mask, "mask")
        prefix = f"agg_cli/{self.run_id}/{job.stem}"
        guided = self.with_shipped(client, G.customise(plan.api, s, image, size, prefix + "_agg", style, mask))
        runs = [("AGG", guided)]
        if not plan.args.no_unguided:
            unguided = G.customise(plan.api, s, image, size, prefix + "_unguided", style, mask)
            runs.append(("unguided", G.without_agg(self.with_shipped(client, unguided))))
        results: dict[str, list[bytes]] = {}
        terms: list[dict] = []
        for phase, prompt in runs:
            titles = {nid: n.get("_meta", {}).get("title") or n["class_type"] for nid, n in prompt.items()}

            def show(p, ph=phase, titles=titles):
                where = titles.get(str(p.node), "")
                self.display.step(client.url, job.stem, f"{ph}: {where}" if where else ph, p.value, p.total)

            entry, prog = client.run(prompt, show, timeout=plan.args.timeout)
            refs = client.images(entry)
            if not refs:
                raise JobFailed(f"the {phase} run produced no image (does the workflow end in SaveImage?)")
            results[phase] = [client.fetch(ref) for _nid, ref in refs]
            if phase == "AGG":
                terms = prog.terms
        # Everything came back: write the files (a lost server before this point leaves nothing half-written).
        out = plan.out
        files: dict[str, str] = {}
        for phase, blobs in results.items():
            tag = "agg" if phase == "AGG" else "unguided"
            for i, blob in enumerate(blobs):
                path = out / (f"{job.stem}_{tag}.png" if i == 0 else f"{job.stem}_{tag}_{i}.png")
                atomic_write(path, blob)
                files[tag if i == 0 else f"{tag}_{i}"] = str(path)
        meta = {"image": str(job.path), "server": client.url, "workflow": plan.workflow_name,
                "size": list(size) if size else None, "settings": asdict(s), "events": terms}
        atomic_write(out / f"{job.stem}_terms.json", json.dumps(meta, indent=1).encode())
        files["terms_json"] = str(out / f"{job.stem}_terms.json")
        label = " (toy test model)" if plan.args.test_models else ""
        if plot_terms(terms, out / f"{job.stem}_terms.png", f"AGG per step: {job.stem}{label}"):
            files["terms_plot"] = str(out / f"{job.stem}_terms.png")
        shown, labels = [job.path], ["source"]
        if "unguided" in files:
            shown.append(Path(files["unguided"]))
            labels.append("unguided" + label)
        shown.append(Path(files["agg"]))
        labels.append("AGG" + label)
        if len(shown) > 1:
            side_by_side(shown, labels, out / f"{job.stem}_side_by_side.png")
            files["side_by_side"] = str(out / f"{job.stem}_side_by_side.png")
        job.outputs = files
        self.display.say(f"  {job.stem}: {terms_summary(terms)}; result {files['agg']}")


def summarise(plan: Plan, jobs: list[Job], stats: list[ServerStats], seconds: float, log_path: Path | None) -> dict:
    return {
        "workflow": plan.workflow_name,
        "seconds": round(seconds, 2),
        "images": [{"image": str(j.path), "name": j.stem, "status": j.status, "server": j.server,
                    "seconds": round(j.seconds, 2), "error": j.error, "attempts": j.attempts, "outputs": j.outputs}
                   for j in jobs],
        "servers": [{"url": s.url, "done": s.done, "failed": s.failed, "busy_seconds": round(s.busy_seconds, 2),
                     "lost": s.lost, "error": s.error, "moved_to_other_servers": s.retried_elsewhere} for s in stats],
        "server_log": str(log_path) if log_path else None,
        "test_models": bool(plan.args.test_models),
    }


def run(plan: Plan) -> int:
    args = plan.args
    run_id = time.strftime("%Y%m%d%H%M%S")
    names = stems(plan.images)
    jobs = [Job(i, p, n) for i, (p, n) in enumerate(zip(plan.images, names, strict=True))]
    log_path: Path | None = None
    server: LocalServer | None = None
    work: Path | None = None
    print(f"results go to {plan.out}", flush=True)
    if plan.size is not None:
        print(f"working size: longer side {plan.size} px, aspect ratio kept, sides rounded to multiples of 8", flush=True)
    try:
        if plan.local:
            work = Path(tempfile.mkdtemp(prefix="agg-cli-"))
            yaml = write_models_tree(plan, work)
            log_path = plan.out / "comfyui-server.log"
            server = LocalServer(plan.comfyui, work / "server", log_path, yaml, python=plan.python,
                                 cpu=True if args.cpu else None)
            print(f"starting ComfyUI from {plan.comfyui} ({'CPU' if server.cpu else 'GPU'}); its log: {log_path}", flush=True)
            t0 = time.monotonic()
            try:
                server.start()
            except RuntimeError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            print(f"ComfyUI up at {server.url} in {time.monotonic() - t0:.0f} s", flush=True)
            urls = [server.url]
        else:
            urls = plan.servers
        problems = check_servers(plan, urls)
        if problems:
            print("error: cannot run on " + ("the started ComfyUI" if plan.local else "the given server(s)") + ":",
                  file=sys.stderr)
            for p in problems:
                print(f"  {p}", file=sys.stderr)
            if log_path:
                print(f"  (ComfyUI's log: {log_path})", file=sys.stderr)
            return 2
        display = Display(len(jobs))

        def lost(st: ServerStats, job: Job, err: str) -> None:
            display.say(f"server {st.url} lost while running {job.stem} ({err}); "
                        + ("its image goes to the other servers" if job.status == "queued" else "no server left for it"))

        sched = Scheduler(urls, jobs, Runner(plan, run_id, display), on_lost=lost)
        sched.run()
        display.close()
        summary = summarise(plan, jobs, sched.stats, sched.seconds, log_path)
        (plan.out / "summary.json").write_text(json.dumps(summary, indent=1))
        done = sum(j.status == "done" for j in jobs)
        print(f"done: {done} of {len(jobs)} images in {sched.seconds:.1f} s -> {plan.out}")
        for st in sched.stats:
            extra = f"; LOST: {st.error}" if st.lost else ""
            moved = f"; its {', '.join(st.retried_elsewhere)} went to other servers" if st.retried_elsewhere else ""
            print(f"  {st.url}: {st.done} done, {st.failed} failed, {st.busy_seconds:.1f} s busy{extra}{moved}")
        for j in jobs:
            if j.status != "done":
                print(f"  FAILED {j.path}: {j.error}")
        print(f"summary: {plan.out / 'summary.json'}")
        if log_path:
            print(f"server log: {log_path}")
        if args.test_models:
            print("NOTE: these images come from generated test models, not real weights: a toy model's blurry "
                  "pictures, which show what it can follow (colours, coarse layout), not what a real model does.")
        return 0 if done == len(jobs) else 1
    finally:
        if server is not None:
            server.stop()
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)  # the temporary folder made above


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        plan = Plan(args)
    except (UsageError, G.GraphError) as e:
        print(f"agg_cli: error: {e}", file=sys.stderr)
        return 2
    try:
        return run(plan)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
