"""One model pass at batch 2 (a CFG pass: cond and uncond together) and at batch 1 (the finite-difference probe's
conditional pass), timed outside any sampler on the benchmark's tiny SD1.5 UNet.

    python tests/bench/passes.py --size 256            # 5 interleaved repeats
    python tests/bench/passes.py --size 1024 --repeats 1

The probe's share of a guided run is f x (batch-1 time / batch-2 time): what run.py's "probe/CFG" column
measures inside sampling runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import BENCH_HOME, setup_paths  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256, help="image size in pixels (default 256)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats after one warm-up (default 5)")
    args = ap.parse_args(argv)
    setup_paths("cpu")
    import comfy.sd
    import torch
    from agg_testing.fixtures import models_dir

    models = models_dir(BENCH_HOME / "models", kl=True)
    patcher, _, _, _ = comfy.sd.load_checkpoint_guess_config(str(models.path("checkpoints", models.checkpoint_kl)),
                                                             output_vae=False, output_clip=False)
    model = patcher.model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, args.size // 8, args.size // 8, generator=g)
    context = torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([500.0, 500.0])

    def one(batch: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            model.apply_model(x[:batch], t[:batch], c_crossattn=context[:batch])
        return time.perf_counter() - t0

    one(2), one(1)
    seconds: dict[int, list[float]] = {2: [], 1: []}
    for _ in range(args.repeats):
        for batch in seconds:
            seconds[batch].append(one(batch))
    two, single = statistics.median(seconds[2]), statistics.median(seconds[1])
    print(f"tiny SD1.5 UNet, {args.size} px, CPU, {torch.get_num_threads()} threads, {args.repeats} repeats: "
          f"batch 2 {two:.3f} s, batch 1 {single:.3f} s, batch 1 / batch 2 {single / two:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
