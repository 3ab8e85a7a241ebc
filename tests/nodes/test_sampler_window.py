"""AGG Sampler's edit zone follows the guider's window (README, AGG Sampler; docs/DESIGN.md §1.4): with
eta_edit != eta, the steps that start inside the guidance window take eta_edit's noise and the others eta's,
whatever `edit_end` says. Judged on the sampler's own states, against DDIM's closed form: a step from x at
sigma to sigma_n from the value R the sampler was given is x_n = R + sigma_down (x - R) / sigma + sigma_up z,
sigma_up = eta sigma_n sqrt(sigma^2 - sigma_n^2) / sigma, sigma_down = sqrt(sigma_n^2 - sigma_up^2)."""

from __future__ import annotations

import math

import pytest
import torch
from agg_testing import probes

STEPS = 3


@pytest.fixture(scope="module")
def session(comfy):
    probes.register()
    return comfy


def ddim_noise(call: dict, after: dict, eta: float) -> tuple[torch.Tensor, float]:
    """The part of the next state that DDIM at `eta` does not explain by its deterministic step (its added noise
    sigma_up z), and sigma_up."""
    sigma, sigma_n = call["sigma"], after["sigma"]
    up = eta * sigma_n * math.sqrt(max(sigma**2 - sigma_n**2, 0.0)) / sigma
    down = math.sqrt(max(sigma_n**2 - up**2, 0.0))
    r = call["returned"]
    return after["x"] - (r + down * (call["x"] - r) / sigma), up


def run_zones(session, *, follow: bool, end_percent: float) -> list[dict]:
    """SamplerCustomAdvanced with AGG Guider (Structure Loss, window 0 .. end_percent) and AGG Sampler
    eta_edit 1, eta 0, eta_boost 0, edit_end 0.67 (two of three steps): the hook's record of every step."""
    samplers = probes.node_test_module("test_samplers")
    g = samplers.custom_graph("SamplerCustomAdvanced", seed=351, guided=False)
    samplers.agg_sampler(g, eta_edit=1.0, eta=0.0, eta_boost=0.0, edit_end=0.67, boost_start=1.0,
                         follow_guidance=follow)
    samplers.agg_guider(g, end_percent=end_percent)
    with probes.guided_steps() as calls:
        r = session.run(g.prompt)
    assert r.ok, r.error_text()
    assert len(calls) == STEPS, len(calls)
    return calls


def rms(t: torch.Tensor) -> float:
    return float(t.pow(2).mean().sqrt())


@pytest.mark.parametrize("follow", [True, False])
def test_edit_zone_follows_the_guidance_window(session, follow):
    """Window = the first step only (end_percent 0.75 is the schedule's second sigma). Following it, step 1 is
    ancestral (eta_edit 1) and step 2 deterministic (eta 0); with follow_guidance off, `edit_end` 0.67 makes
    steps 1 and 2 ancestral."""
    calls = run_zones(session, follow=follow, end_percent=0.75)
    assert [c["guided"] for c in calls] == [True, False, False], [(c["sigma"], c["guided"]) for c in calls]
    expected = [1.0, 0.0] if follow else [1.0, 1.0]
    for i, eta in enumerate(expected):
        noise, up = ddim_noise(calls[i], calls[i + 1], eta)
        deterministic, _ = ddim_noise(calls[i], calls[i + 1], 0.0)
        print(f"follow {follow}, step {i + 1} (sigma {calls[i]['sigma']:.4g}): eta {eta}, sigma_up {up:.4f}, "
              f"unexplained {rms(noise):.2e}, beyond the deterministic step {rms(deterministic):.4f}")
        if eta == 0.0:
            # measured: the deterministic step explains the state to 1e-7
            assert rms(noise) < 1e-4 * max(rms(calls[i + 1]["x"]), 1.0), rms(noise)
        else:
            # the noise z left over is unit normal: measured RMS 1.04 and 0.93 of sigma_up over the 64 latent elements
            assert up > 0 and 0.6 < rms(noise) / up < 1.5, (rms(noise), up)
