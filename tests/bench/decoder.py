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
import copy
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import BENCH_HOME, setup_paths, spawn  # noqa: E402

VARIANTS = ("forward", "plain", "checkpointed", "taesd")


def decoder_of(variant: str):
    """The first_stage_model copy a guided step decodes through: as the pack makes it, or without checkpointing."""
    import comfy.sd
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


class ConvOnly(torch.nn.Module):
    """An upsampling layer of ComfyUI's KL decoder without its interpolation: only its convolution."""

    def __init__(self, up: torch.nn.Module) -> None:
        super().__init__()
        self.conv = getattr(up, "conv", None)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x if self.conv is None else self.conv(x)


def upsamplings_in_order(net: torch.nn.Module, latent_channels: int = 4) -> list[tuple[torch.nn.Module, str]]:
    """(parent, name) of each upsampling layer of a VAE decoder (TAESD's nn.Upsample, the KL decoder's Upsample),
    in the order a decode runs them (found by decoding a small latent)."""
    found = {id(child): (parent, name) for parent in net.modules() for name, child in parent.named_children()
             if isinstance(child, torch.nn.Upsample) or type(child).__name__ == "Upsample"}
    order: list[tuple[torch.nn.Module, str]] = []
    hooks = [m.register_forward_hook(lambda mod, *_: order.append(found[id(mod)])) for m in net.modules()
             if id(m) in found]
    try:
        with torch.inference_mode(False), torch.no_grad():
            net.decode(torch.zeros(1, latent_channels, 4, 4))
    finally:
        for h in hooks:
            h.remove()
    return order


def without_last_upsamplings(net: torch.nn.Module, n: int) -> torch.nn.Module:
    """A copy of a VAE's decoding model whose last n upsampling layers keep the resolution: its last stages run
    at 1 / 2^n of the image's side, everything before them as in the whole decode."""
    net = copy.deepcopy(net)
    for parent, name in upsamplings_in_order(net)[-n:] if n else []:
        up = getattr(parent, name)
        setattr(parent, name, torch.nn.Identity() if isinstance(up, torch.nn.Upsample) else ConvOnly(up))
    return net


def conv_macs(net: torch.nn.Module, z: torch.Tensor) -> int:
    """Multiply-adds of the convolutions of one decode of z."""
    total = [0]

    def count(mod, _inp, out):
        total[0] += out.numel() * mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1] // mod.groups

    hooks = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.inference_mode(False), torch.no_grad():
            net.decode(z)
    finally:
        for h in hooks:
            h.remove()
    return total[0]


def one_step(net, size: int, variant: str, seed: int) -> None:
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
    ap.add_argument("--macs", action="store_true",
                    help="print the convolutions' multiply-adds of one decode with its last 0, 1, 2 upsamplings left out"
                         " (the KL VAE decoder and TAESD), and exit")
    ap.add_argument("--worker", choices=("timing", "memory"), help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        setup_paths("cpu")
        out = worker_timing(args.size, args.repeats, args.variants.split(",")) if args.worker == "timing" \
            else worker_memory(args.variant, args.size)
        print("AGG_BENCH_RESULT " + json.dumps(out), flush=True)
        return 0

    if args.macs:
        setup_paths("cpu")
        z = torch.randn(1, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))
        for variant, label in (("plain", "KL VAE decoder"), ("taesd", "TAESD")):
            net = decoder_of(variant)
            whole = conv_macs(net, z)
            for n in (0, 1, 2):
                macs = conv_macs(without_last_upsamplings(net, n), z)
                print(f"{label}, {args.size} px, last {n} upsampling(s) left out ({args.size >> n} px decoded): "
                      f"{macs / 1e9:.1f} G conv multiply-adds, {whole / macs:.2f}x fewer")
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
