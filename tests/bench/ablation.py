"""The paper's ablation on a toy with an exact denoiser: what each part of AGG buys.

    python tests/bench/ablation.py --out DIR      # writes DIR/ablation.json and DIR/ablation.png

Data: an isotropic Gaussian mixture in R^{1x4x4x4} (tests/agg_testing/analytic.py, exact posterior
mean, so the model Jacobian is exact under autograd). A source sample of mode A is noised to
sigma_start (img2img, the same noise for every variant) and sampled back with 20 Euler steps;
guidance runs on the first third of them. The edit asks for a target "style": the first channel
should take the value of mode B's first channel (target loss = mean squared error on channel 0);
the Structure Loss (the source latent, L1, weight lam) holds the other channels.

Variants, all with the same steps, window, weights and noise:
  agg            asymmetric update + exact manifold gradient (autograd through the denoiser) + 1 DDS step
  symmetric      the same gradient and DDS, returned as D + delta (ordinary x0 guidance)
  x0_gradient    asymmetric, manifold none (J ~ I), no DDS
  no_structure   AGG without the Structure Loss
  unguided       no guidance (reference)
Reported at the end of the run: target loss, structure drift (mean |x - source| on channels 1..3)
and the target loss along the run (of the clean estimate), averaged over the batch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]

VARIANTS = {
    "agg": {"asymmetric": True, "manifold": "autograd", "dds_steps": 1, "structure": True},
    "symmetric": {"asymmetric": False, "manifold": "autograd", "dds_steps": 1, "structure": True},
    "x0_gradient": {"asymmetric": True, "manifold": "none", "dds_steps": 0, "structure": True},
    "no_structure": {"asymmetric": True, "manifold": "autograd", "dds_steps": 1, "structure": False},
    "unguided": None,
}


def setup_paths() -> None:
    for p in (str(PACK_ROOT), str(PACK_ROOT / "tests")):
        if p not in sys.path:
            sys.path.append(p)


def toy(seed: int = 0):
    import torch
    from agg_testing.analytic import mixture

    g = torch.Generator().manual_seed(seed)
    means = torch.randn(2, 4, 4, 4, generator=g) * 0.5
    means[1, 0] = means[0, 0] + 2.0  # mode B differs most in channel 0 (the "style")
    # broad, overlapping modes: the exact Jacobian stays moderate, so the comparison is about the update
    # rule rather than about a responsibility flip between two sharp modes
    return mixture(means, [1.0, 1.0]), g


def run_variant(name: str, cfg: dict | None, mix, source, noise, sigmas, window_steps: int, weights: dict):

    from agg_kernels.guidance import guided_delta
    from agg_kernels.losses.structure import structure_loss
    from agg_kernels.manifold import covariance_operator
    from agg_kernels.objective import LossContext, Term, chained
    from agg_kernels.step import compensated_denoised

    target_value = mix.means[1, 0]

    target_loss = (Term("target", lambda x0, ctx: (x0[:, 0] - target_value).pow(2).flatten(1).mean(1), weights["target"]),)

    loss = None
    if cfg is not None:
        parts = [target_loss] + ([structure_loss(weights["structure"], source)] if cfg["structure"] else [])
        loss = chained(*parts)
    den = mix.denoiser("eps")
    x = source + sigmas[0] * noise
    curve = []
    for i in range(len(sigmas) - 1):
        s, sn = sigmas[i], sigmas[i + 1]
        sig = s.expand(x.shape[0])
        d = den(x, sig)
        curve.append(float((d[:, 0] - target_value).pow(2).mean()))
        r = d
        if cfg is not None and i < window_steps:
            ctx = LossContext(sigma=sig, x=x, family="eps", step=i)
            res = guided_delta(loss, d, ctx, covariance_operator(cfg["manifold"], x, ctx.sigma, ctx.family, lambda xp, sig=sig: den(xp, sig), base=d),
                               cfg["dds_steps"], weights["dds_lr"])
            if res.delta is not None:
                if cfg["asymmetric"]:
                    r = compensated_denoised(d, res.delta, sig, float(sn), "eps")
                else:
                    r = d + res.delta
        x = r + (sn / s) * (x - r)  # Euler (k-diffusion sample_euler, s_churn 0)
    final_target = float((x[:, 0] - target_value).pow(2).mean())
    drift = float((x[:, 1:] - source[:, 1:]).abs().mean())
    curve.append(final_target)
    return {"target_loss": final_target, "structure_drift": drift, "curve": curve}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="AGG ablation on a Gaussian-mixture toy with an exact denoiser")
    ap.add_argument("--out", type=Path, default=None, help="folder for ablation.json / ablation.png")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--sigma-start", type=float, default=3.0)
    ap.add_argument("--target-weight", type=float, default=0.3, help="latent distance per guided step")
    ap.add_argument("--structure-weight", type=float, default=0.1, help="latent distance per guided step")
    ap.add_argument("--dds-lr", type=float, default=0.5)
    args = ap.parse_args(argv)
    setup_paths()
    import torch

    torch.manual_seed(0)
    mix, g = toy()
    source_all, labels = mix.sample(4 * args.batch, generator=g)
    source = source_all[labels == 0][: args.batch]
    noise = torch.randn(source.shape, generator=g)
    smin, rho = 0.03, 7.0
    ramp = torch.linspace(0, 1, args.steps)
    sig = (args.sigma_start ** (1 / rho) + ramp * (smin ** (1 / rho) - args.sigma_start ** (1 / rho))) ** rho
    sigmas = torch.cat([sig, sig.new_zeros(1)])
    window = max(1, round(args.steps / 3))
    weights = {"target": args.target_weight, "structure": args.structure_weight, "dds_lr": args.dds_lr}
    results = {name: run_variant(name, cfg, mix, source, noise, sigmas, window, weights) for name, cfg in VARIANTS.items()}

    print(f"{args.steps} Euler steps from sigma {args.sigma_start}, guided steps 1..{window}, batch {source.shape[0]}")
    print(f"{'variant':<14}{'target loss':>13}{'structure drift':>17}")
    for name, r in results.items():
        print(f"{name:<14}{r['target_loss']:>13.4f}{r['structure_drift']:>17.4f}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"steps": args.steps, "guided_steps": window, "sigma_start": args.sigma_start, "batch": int(source.shape[0]),
                "weights": weights, "variants": {k: v for k, v in VARIANTS.items()}}
        (args.out / "ablation.json").write_text(json.dumps({"settings": meta, "results": results}, indent=2))
        plot(results, window, args.out / "ablation.png")
        print(f"wrote {args.out / 'ablation.json'} and {args.out / 'ablation.png'}")
    return 0


def plot(results: dict, window: int, path: Path) -> None:
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, r in results.items():
        a.plot(range(len(r["curve"])), r["curve"], label=name, marker=".")
        b.scatter(r["structure_drift"], r["target_loss"], s=50, label=name)
        b.annotate(name, (r["structure_drift"], r["target_loss"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    a.axvspan(0, window, color="0.9", label="guided steps")
    a.set_xlabel("step")
    a.set_ylabel("target loss of the clean estimate")
    a.set_yscale("log")
    a.legend(fontsize=8)
    b.set_xlabel("structure drift (mean |x - source|, channels 1-3)")
    b.set_ylabel("final target loss")
    b.set_yscale("log")
    fig.suptitle("AGG ablation on a Gaussian-mixture toy (exact denoiser), equal steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
