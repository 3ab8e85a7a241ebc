"""Which Jacobian should carry the pull: the CFG output's or the conditional denoiser's alone?

    python tests/bench/jacobian.py [--cfg 7.5] [--size 64]

Exact Gaussian-mixture data in SD-like latents (4 x size x size, unit variance per element). The
conditional model is the mixture's posterior given the class "mode 0" (its weight raised to 0.9), the
unconditional one the marginal mixture; CFG's output is D_u + s (D_c - D_u). For noisy states drawn from
the unconditional data at each sigma, a pull toward another mode goes through guided_delta (finite
differences) with either denoiser as the probe. Reported per sigma: the share of samples whose
covariance step was not a descent direction (the pack then falls back to the prior covariance), and
the loss reduction of the step relative to the prior-covariance step. A Tweedie Jacobian is a
posterior covariance (symmetric, positive semi-definite); J_u + s (J_c - J_u) need not be.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]


def setup_paths() -> None:
    for p in (str(PACK_ROOT), str(PACK_ROOT / "tests")):
        if p not in sys.path:
            sys.path.append(p)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--modes", type=int, default=4)
    ap.add_argument("--separation", type=float, default=0.05,
                    help="RMS per element of the mode means: small enough that the posterior over modes is split at "
                    "SD's noise levels (in 16k dimensions well-separated modes make every posterior one Gaussian)")
    args = ap.parse_args(argv)
    setup_paths()
    import torch
    from agg_testing.analytic import mixture

    from agg_kernels.guidance import guided_delta
    from agg_kernels.manifold import covariance_operator
    from agg_kernels.objective import LossContext, Term

    g = torch.Generator().manual_seed(0)
    shape = (4, args.size, args.size)
    means = torch.randn(args.modes, *shape, generator=g) * args.separation
    stds = [1.0] * args.modes  # unit variance per element
    uncond = mixture(means, stds)
    cond = mixture(means, stds, [0.9] + [0.1 / (args.modes - 1)] * (args.modes - 1))
    goal = means[1]
    loss = (Term("target", lambda x0, ctx: (x0 - goal).pow(2).flatten(1).mean(1), 0.1),)
    print(f"latent 4x{args.size}x{args.size}, {args.modes} modes (separation {args.separation}), cfg {args.cfg}, "
          f"batch {args.batch}")
    print(f"{'sigma':>6} | {'non-descent: CFG J':>18} {'cond J':>7} | {'loss drop vs prior: CFG J':>25} {'cond J':>7}")
    rows = []
    for sigma in (14.0, 6.0, 3.0, 1.5, 0.8, 0.4):
        x0, _ = uncond.sample(args.batch, generator=g)
        x = uncond.noised(x0, sigma, "eps", g)
        s = torch.full((args.batch,), sigma)
        d_u, d_c = uncond.denoise(x, s), cond.denoise(x, s)

        def cfg_out(z, s=s):
            du = uncond.denoise(z, s)
            return du + args.cfg * (cond.denoise(z, s) - du)

        d = d_u + args.cfg * (d_c - d_u)
        ctx = LossContext(sigma=s, x=x, family="eps")
        base = loss(d, ctx)["target"]
        prior = guided_delta(loss, d, ctx, None, dds_steps=0, trust=1e9)
        drop_prior = base - loss(d + prior.delta, ctx)["target"]
        row = {"sigma": sigma}
        for name, den, probe_base in (("cfg", cfg_out, d), ("cond", lambda z, s=s: cond.denoise(z, s), d_c)):
            res = guided_delta(loss, d, ctx, covariance_operator("finite_difference", x, ctx.sigma, ctx.family, den, base=probe_base), dds_steps=0, trust=1e9)
            bad = 0 if res.fallback is None else int(res.fallback.split(" on ")[1].split(" of ")[0])
            drop = base - loss(d + res.delta, ctx)["target"]  # with the pack's fallback where it acted
            row[name] = (bad / args.batch, float((drop / drop_prior).median()))
        rows.append(row)
        print(f"{sigma:>6.2f} | {row['cfg'][0]:>18.0%} {row['cond'][0]:>7.0%} | {row['cfg'][1]:>25.3f} {row['cond'][1]:>7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
