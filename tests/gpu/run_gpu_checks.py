"""Runs the guided example workflows' API twins (workflows/api/*.json) on the generated test models through a
real ComfyUI server, once with ComfyUI's default model management (Dynamic VRAM on an NVIDIA GPU, ComfyUI 0.33)
and once with --disable-dynamic-vram, and prints one line per workflow and mode: pass/fail and seconds.

Besides the twins as shipped, two variants put the gradient paths under each mode: the img2img twin with the
autograd covariance step and the VAE decoder (`+autograd+vae`), and the style twin's CLIP-vision encoder with
the VAE decoder (`+vae`). A run passes when the prompt ran without error, saved its image, logged at least one
guided step with none skipped, and the pack logged no fallback (autograd to finite differences) and no
missing TAESD.

Writes only under a temporary folder (removed at the end unless --keep) and, when $OUT (or --out) names a
folder, the summary and the two server logs there. Run through tests/gpu/run_gpu_checks.sh, which finds or
sets up the Python and the ComfyUI 0.33 tree; `--cpu` is the dry run on the CPU (smaller images, fewer steps).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

PACK = Path(__file__).resolve().parents[2]
WORKFLOWS = PACK / "workflows" / "api"
MODES = {"dynamic-vram": [], "no-dynamic-vram": ["--disable-dynamic-vram"]}
FALLBACK = "autograd through the model failed"
NO_TAESD = "decoder 'taesd' is not available"


def link_fixture_cache(real: Path, home: Path) -> None:
    """A fixture cache in `home` whose entries link to those already built in `real` (the fixtures' file locks are
    then taken in the temporary folder; missing fixtures are generated there)."""
    cache = home / "fixtures"
    cache.mkdir(parents=True, exist_ok=True)
    if not real.is_dir():
        return
    for f in real.iterdir():
        if not f.name.endswith(".lock") and not (cache / f.name).exists():
            (cache / f.name).symlink_to(f.resolve())


def pack_installed(comfy: Path) -> bool:
    cn = comfy / "custom_nodes"
    return cn.is_dir() and any(p.resolve() == PACK for p in cn.iterdir() if p.is_dir())


def variants(names: list[str]) -> list[tuple[str, str, dict]]:
    """(label, twin name, {node class: {input: value}} overrides)."""
    out = [(n, n, {}) for n in names]
    if "agg_img2img_ksampler" in names:
        out.append(("agg_img2img_ksampler+autograd+vae", "agg_img2img_ksampler",
                    {"AGGApply": {"manifold": "autograd"}, "*Loss": {"decoder": "vae"}}))
    if "agg_image_style" in names:
        out.append(("agg_image_style+vae", "agg_image_style", {"*Loss": {"decoder": "vae"}}))
    return out


def prompt_for(api: dict, names: dict[str, str], overrides: dict, seed: int, size: int, steps: int, cpu: bool) -> dict:
    """The twin on the fixtures at `size` px and at most `steps` steps, with the overrides applied."""
    from agg_testing import workflow_models as W

    p = W.runnable(copy.deepcopy(api), names)
    for node in list(p.values()):
        inputs, ct = node["inputs"], node["class_type"]
        if ct == "ImageScale":
            inputs.update(width=size, height=size)
        if ct in ("KSampler", "BasicScheduler") and isinstance(inputs.get("steps"), int):
            inputs["steps"] = min(inputs["steps"], steps)
        if ct == "KSampler":
            inputs["seed"] = seed
        if cpu and "cutouts" in inputs:
            inputs["cutouts"] = 1 if ct == "AGGImageStyleLoss" else 2
        for key in ("style_image", "image"):  # the losses' reference pictures: to the run's size
            if ct in ("AGGImageStyleLoss", "AGGColorLoss") and isinstance(inputs.get(key), list):
                small = str(9000 + len(p))
                p[small] = {"class_type": "ImageScale", "inputs": {
                    "image": inputs[key], "upscale_method": "bilinear", "width": size, "height": size, "crop": "center"}}
                inputs[key] = [small, 0]
        for pattern, values in overrides.items():
            if ct == pattern or (pattern.startswith("*") and ct.endswith(pattern[1:])):
                inputs.update({k: v for k, v in values.items() if k in inputs or pattern == ct})
    return p


def check(server, entry: dict, since: int, label: str) -> str | None:
    """None when the run passed, else why not."""
    import re

    errors = server.errors(entry)
    if errors:
        return json.dumps(errors)[:600]
    if not server.images(entry):
        return "no image saved"
    log = server.log_text()[since:]
    steps = re.findall(r"(?:Apply AGG|AGG Guider) step \d+ sigma [^:]+: .*; step rms ([^,\s]+)(.*)$", log, re.M)
    if not steps:
        return "no guided step logged"
    if any("skipped" in rest for _, rest in steps):
        return "a guided step was skipped"
    if any(float(rms) <= 0 for rms, _ in steps):
        return "a guided step of size 0"
    if FALLBACK in log:
        return "autograd fell back to finite differences"
    if NO_TAESD in log:
        return "TAESD not found"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="dry run on the CPU (64 px, 2 steps)")
    ap.add_argument("--only", default="", help="comma-separated labels or twin names to run (default: all)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--out", default=os.environ.get("OUT", ""), help="folder for the summary and server logs")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per prompt")
    args = ap.parse_args()

    real_home = Path(os.environ.get("AGG_HOME", Path.home() / ".cache" / "agg-comfyui"))
    comfy = Path(os.environ.get("AGG_COMFYUI", real_home / "ComfyUI-0.33.0")).resolve()
    work = Path(tempfile.mkdtemp(prefix="agg-gpu-checks-"))
    os.environ.update(AGG_COMFYUI=str(comfy), AGG_HOME=str(work / "home"), PYTHONDONTWRITEBYTECODE="1")
    link_fixture_cache(real_home / "fixtures", work / "home")
    sys.path[:0] = [str(PACK / "tests"), str(PACK)]
    from agg_testing.comfy_env import configure_comfy

    configure_comfy(cpu=args.cpu)
    import torch
    from agg_testing import fixtures as F
    from agg_testing import workflow_models as W
    from agg_testing.server import ComfyServer

    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA GPU visible to torch: run with --cpu for the dry run", file=sys.stderr)
        return 2
    size, steps = (64, 2) if args.cpu else (256, 8)
    t0 = time.perf_counter()
    models = F.models_dir(work / "models")
    W.link_workflow_models(models)
    names = W.fixture_names(models)
    print(f"fixtures ready in {time.perf_counter() - t0:.0f} s (ComfyUI {comfy.name}, torch {torch.__version__}, "
          f"{'CPU' if args.cpu else torch.cuda.get_device_name(0)})", flush=True)

    twins = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    only = {s for s in args.only.split(",") if s}
    runs = [v for v in variants(twins) if not only or v[0] in only or v[1] in only]
    lines: list[str] = []
    failed = 0
    out = Path(args.out) if args.out else None
    for mode in [m for m in args.modes.split(",") if m]:
        extra = MODES[mode]
        kwargs = {"cpu": True if args.cpu else False, "extra_args": extra}
        if pack_installed(comfy):
            server = ComfyServer(comfy, models, work / mode, **kwargs)
        else:  # the pack through a custom_nodes folder of the temporary tree: ComfyUI's own stays as it is
            (work / "custom_nodes").mkdir(exist_ok=True)
            if not (work / "custom_nodes" / "agg-comfyui").exists():
                (work / "custom_nodes" / "agg-comfyui").symlink_to(PACK)
            yaml = F.write_extra_model_paths(work / mode / "extra_model_paths.yaml", models, work / "custom_nodes")
            server = ComfyServer(comfy, None, work / mode, extra_model_paths=yaml, **kwargs)
        ts = time.perf_counter()
        try:
            server.start()
        except RuntimeError as e:
            print(f"FAIL  {'(server start)':44s} {mode:16s} {time.perf_counter() - ts:6.1f} s  {e}", flush=True)
            failed += 1
            continue
        W.copy_shipped_images(server.input_dir)
        try:
            for i, (label, twin, overrides) in enumerate(runs):
                api = json.loads((WORKFLOWS / f"{twin}.json").read_text())
                prompt = prompt_for(api, names, overrides, seed=1 + i, size=size, steps=steps, cpu=args.cpu)
                since = len(server.log_text())
                tr = time.perf_counter()
                try:
                    entry = server.run(prompt, timeout=args.timeout)
                    why = check(server, entry, since, label)
                except Exception as e:  # a timeout or a lost server: this run fails, the next ones still run
                    why = f"{type(e).__name__}: {e}"[:600]
                seconds = time.perf_counter() - tr
                line = f"{'PASS' if why is None else 'FAIL'}  {label:44s} {mode:16s} {seconds:6.1f} s" + \
                       ("" if why is None else f"  {why}")
                failed += why is not None
                lines.append(line)
                print(line, flush=True)
        finally:
            server.stop()
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(server.log_path, out / f"server-{mode}.log")
    total = time.perf_counter() - t0
    summary = f"{len(lines) - failed} passed, {failed} failed in {total:.0f} s"
    print(summary, flush=True)
    if out is not None:
        (out / "gpu_checks.txt").write_text("\n".join([*lines, summary]) + "\n")
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
