"""The `vae` decoder's activation checkpointing: what it costs in time and what it saves in peak memory.

    python tests/bench/decoder.py                  # 256 px, 5 interleaved repeats
    python tests/bench/decoder.py --size 512
    python tests/bench/decoder.py --size 1024 --variants checkpointed,taesd --repeats 1   # SDXL's size

The pack's `vae` decoder (nodes/decoders.py) recomputes the VAE decoder's blocks in the backward pass
instead of keeping their activations. Measured on the SD1.5 KL VAE of the test fixture (the real
architecture with random weights, which do not change the cost), for one guided step's use of it: decode a
clean estimate of the given image size and take the gradient back to the latent. `taesd` is the same for
the TAESD decoder (the `taesd` choice; its real architecture, random weights).
  time         one process, variants interleaved after a warm-up; ratio = median checkpointed / median plain
  peak memory  each variant in a fresh process; peak RSS (getrusage ru_maxrss) over a forward-only decode's
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import BENCH_HOME, setup_paths, spawn  # noqa: E402

VARIANTS = ("forward", "plain", "checkpointed", "taesd")


def decoder_of(variant: str):
    """The first_stage_model copy a guided step decodes through: as the pack makes it, or without checkpointing."""
    import comfy.sd
    import torch
    from agg_testing.fixtures import models_dir
    from agg_testing.probes import pack_module

    decoders, weights = pack_module("nodes.decoders"), pack_module("nodes.weights")
    models = models_dir(BENCH_HOME / "models", kl=True)
    if variant == "taesd":
        import comfy.utils
        from comfy.taesd.taesd import TAESD

        with pack_module("agg_kernels.autograd").ordinary_tensors():
            net = TAESD(latent_channels=4)  # ComfyUI's layers start uninitialised: the fixture's weights fill them
            net.taesd_decoder.load_state_dict(comfy.utils.load_torch_file(str(models.path("vae_approx", "taesd_decoder.safetensors")),
                                                                          safe_load=True))
            net.taesd_encoder = None
            return net.float().eval().requires_grad_(False)
    path = models.path("checkpoints", models.checkpoint_kl)
    _, _, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=False)
    source = vae.first_stage_model
    if variant == "checkpointed":
        return decoders.decoder_copy(source, torch.device("cpu"), torch.float32)
    return weights.gradient_copy(source, torch.device("cpu"), torch.float32, decoders.ENCODER_PARTS)


def one_step(net, size: int, variant: str, seed: int) -> None:
    import torch

    with torch.inference_mode(False):
        z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(seed))
        if variant == "forward":
            with torch.no_grad():
                net.decode(z)
            return
        z.requires_grad_(True)
        (g,) = torch.autograd.grad(net.decode(z).square().mean(), z)
        assert torch.isfinite(g).all()


def worker_memory(variant: str, size: int) -> dict:
    net = decoder_of("plain" if variant == "forward" else variant)
    one_step(net, size, variant, 0)
    return {"peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def worker_timing(size: int, repeats: int, variants: list[str]) -> dict:
    import torch

    nets = {v: decoder_of(v) for v in variants}
    seconds: dict[str, list[float]] = {v: [] for v in nets}
    for v, net in nets.items():  # warm-up
        one_step(net, size, v, 0)
    for r in range(repeats):
        for v, net in nets.items():
            t0 = time.perf_counter()
            one_step(net, size, v, r + 1)
            seconds[v].append(time.perf_counter() - t0)
    return {"seconds": seconds, "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256, help="image size in pixels (default 256)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timing repeats (default 5)")
    ap.add_argument("--variants", default="plain,checkpointed",
                    help="decoders to time and measure, of plain, checkpointed, taesd (default plain,checkpointed;"
                         " a forward-only decode is always measured as the memory baseline)")
    ap.add_argument("--worker", choices=("timing", "memory"), help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        setup_paths("cpu")
        out = worker_timing(args.size, args.repeats, args.variants.split(",")) if args.worker == "timing" \
            else worker_memory(args.variant, args.size)
        print("AGG_BENCH_RESULT " + json.dumps(out), flush=True)
        return 0

    variants = [v for v in args.variants.split(",") if v]
    if not variants or set(variants) - set(VARIANTS[1:]):
        ap.error(f"--variants: choose from {', '.join(VARIANTS[1:])}")
    size = ["--size", str(args.size)]
    timing = spawn(["--worker", "timing", "--repeats", str(args.repeats), "--variants", ",".join(variants), *size], None,
                   __file__)
    med = {v: statistics.median(s) for v, s in timing["seconds"].items()}
    memory = {v: spawn(["--worker", "memory", "--variant", v, *size], None, __file__)["peak_rss_kib"]
              for v in ["forward", *variants]}
    ref = "plain" if "plain" in med else variants[0]
    print(f"SD1.5 KL VAE / TAESD decoders, {args.size} px, CPU, {timing['torch_threads']} threads, {args.repeats} repeats")
    print(f"| variant | decode + gradient, median s | time / {ref} | peak RSS MiB | peak RSS / forward-only |")
    print("|---|---|---|---|---|")
    for v in memory:
        t = f"{med[v]:.3f} | {med[v] / med[ref]:.2f}" if v in med else "- | -"
        print(f"| {v} | {t} | {memory[v] / 1024:.0f} | {memory[v] / memory['forward']:.2f} |")
    if {"plain", "checkpointed"} <= set(med):
        print(f"checkpointing costs {med['checkpointed'] / med['plain']:.2f}x the time of a plain backward pass and "
              f"peaks at {memory['checkpointed'] / memory['plain']:.2f}x its memory")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
