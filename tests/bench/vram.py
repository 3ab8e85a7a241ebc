"""Peak GPU memory of each guidance mode next to plain sampling, at SD1.5 512 px and at SDXL's 1024 px shapes.

    python tests/bench/vram.py                       # on a CUDA device: the table below, ~10 min on one GPU
    python tests/bench/vram.py --out /tmp/vram.json  # and the figures as JSON
    python tests/bench/vram.py --smoke               # CPU, tiny fixture at 64 px, two modes: proves the script runs

Each (configuration, mode) runs once in a fresh process (tests/bench/run.py's memory worker: load the
checkpoint, sample 20 euler steps of the img2img graph, guidance window 0 .. 0.35), so peaks never mix; the
figure is torch.cuda.max_memory_allocated over the whole process (weights, ComfyUI's loads and offloads,
activations, the pack's copies) and the ratio is over the plain run's. Without CUDA (--smoke) the figure is
the process's peak RSS instead.

Configurations (random-weight fixtures, tests/agg_testing/fixtures.py: memory does not depend on weight values):
  sd15_512          the full-size SD1.5 checkpoint (UNet, CLIP-L, KL VAE) at 512 px (64x64 latents)
  sdxl_shapes_1024  the same checkpoint at 1024 px (128x128 latents): SDXL's latent and image sizes and SDXL's
                    VAE architecture (the `vae` decoder's copy and backward pass cost what SDXL's do); the UNet
                    is SD1.5's, smaller than SDXL's, so plain's figure is below a real SDXL run's
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (tests/bench/run.py: graphs, fresh-process workers)

CONFIGS = {
    "sd15_512": ("checkpoint_full", 512, 1),
    "sdxl_shapes_1024": ("checkpoint_full", 1024, 1),
}
SMOKE_CONFIGS = {"tiny64_smoke": ("checkpoint", 64, 1)}
SMOKE_MODES = ("clip_vae", "structure_fd")


def measure(configs: dict, modes: list[str], device: str, timeout: float | None) -> dict:
    out: dict = {}
    for name, config in configs.items():
        common = ["--config-json", json.dumps(list(config)), "--device", device]
        peaks = {m: bench.spawn(["--worker", "memory", "--mode", m, *common], timeout) for m in ["plain", *modes]}
        key = "peak_vram_bytes" if device == "cuda" else "peak_rss_kib"
        scale = 1 if device == "cuda" else 1024
        peak = {m: p[key] * scale for m, p in peaks.items()}
        out[name] = {"size_px": config[1], "checkpoint": config[0], "measure": key.removesuffix("_kib").removesuffix("_bytes"),
                     "peak_bytes": peak, "ratio": {m: peak[m] / max(1, peak["plain"]) for m in modes}}
    return out


def table(results: dict, device: str) -> str:
    what = "peak VRAM (max_memory_allocated)" if device == "cuda" else "peak RSS (CPU smoke run)"
    lines = []
    for name, r in results.items():
        lines.append(f"{name}: {r['size_px']} px, {what}")
        lines.append(f"{'mode':<20}{'MiB':>10}{'x plain':>9}")
        for m, b in r["peak_bytes"].items():
            lines.append(f"{m:<20}{b / 2**20:>10.0f}{r['ratio'].get(m, 1.0):>9.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny fixture at 64 px, modes " + ", ".join(SMOKE_MODES))
    ap.add_argument("--configs", default=",".join(CONFIGS), help="which of " + ", ".join(CONFIGS))
    ap.add_argument("--modes", default=",".join(bench.MODES))
    ap.add_argument("--timeout", type=float, default=None, help="seconds per worker process")
    ap.add_argument("--out", type=Path, help="write the JSON results here")
    args = ap.parse_args(argv)
    if args.smoke:
        device, configs, modes = "cpu", SMOKE_CONFIGS, list(SMOKE_MODES)
    else:
        import torch

        if not torch.cuda.is_available():
            ap.error("no CUDA device: run with --smoke for the CPU check, or on a machine with a GPU")
        device = "cuda"
        configs = {n: CONFIGS[n] for n in args.configs.split(",") if n}
        modes = [m for m in args.modes.split(",") if m]
        unknown = set(modes) - set(bench.MODES)
        if unknown:
            ap.error(f"unknown modes {sorted(unknown)}; choose from {', '.join(bench.MODES)}")
    results = measure(configs, modes, device, args.timeout)
    print(table(results, device), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": device, "configs": results}, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
