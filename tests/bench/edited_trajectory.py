"""Structure weight over whole runs when the model that samples is not the one that inverted (an edit).

The paper's chain inverts the source with the source prompt and samples with the target prompt (and CFG): the
trajectory's clean estimates are the inverting model's, and holding the sampling model's clean estimate at
them is not what carries the run to the source. This measures it on the exact Gaussian denoiser: the source's
DDIM inversion under N(0.5 src, 0.5^2), sampling under the same data with its mean shifted by half a latent's
spread, Structure Loss on the inversion's trajectory at x0, 1, 3, 10, 30 of the default weight; L1 of the final
latent to the source, mean of 3 seeds, per family and step count (docs/PERFORMANCE.md, "Strength over whole runs").

Usage: python -m pytest tests/bench/edited_trajectory.py -s   (about a minute)
"""

from __future__ import annotations

import torch
from agg_testing.analytic import comfy_sigmas, comfy_window, gaussian, guided_run

from agg_kernels.guidance import guided_delta
from agg_kernels.inversion import ddim_invert
from agg_kernels.losses import structure_loss
from agg_kernels.objective import LossContext
from agg_kernels.schedule import REFERENCE_END_PERCENT, step_rate

MULTIPLES = (0, 1, 3, 10, 30)


def final_distance(family: str, steps: int, weight: float, seed: int, shift: float = 0.5) -> float:
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(1, 4, 8, 8, generator=g)
    moved = torch.randn(1, 4, 8, 8, generator=g)[0]
    inverting, sampling = gaussian(0.5 * src[0], 0.5), gaussian(0.5 * src[0] + shift * moved, 0.5)
    sigmas = [float(s) for s in comfy_sigmas(family, steps, 0.6)]
    window = comfy_window(family, 0.4, REFERENCE_END_PERCENT)
    up = torch.tensor([0.0, *sigmas[::-1][1:]])
    top, trajectory = ddim_invert(lambda z, s: inverting.denoise(z, s, family), src, up, family)
    loss = structure_loss(weight, trajectory)

    def step(x, d, sigma, sigma_next):
        rate = step_rate(sigma, sigma_next, window, family)
        if not weight or rate <= 0:
            return None
        ctx = LossContext(sigma=torch.tensor([sigma]), x=x, family=family)
        return guided_delta(loss, x, d, ctx, "none", rate=rate).delta

    final = guided_run(sampling, src, torch.tensor(sigmas), family, step, state=top)
    return float((final - src).abs().mean())


def test_print_structure_weight_on_an_edited_trajectory():
    for family in ("eps", "const"):
        for steps in (8, 20, 60):
            row = [sum(final_distance(family, steps, 0.1 * m, seed) for seed in range(3)) / 3 for m in MULTIPLES]
            print(f"{family} {steps} steps: L1 to the source by weight multiple {MULTIPLES}: "
                  + " ".join(f"{v:.3f}" for v in row))
            assert row[-1] < row[0]  # every weight ends closer than none
