"""A v-prediction model through the nodes: ComfyUI's ModelSamplingDiscrete (v_prediction) on the tiny
checkpoint, with an exact network (agg_testing.probes.AGGTestExactUNet) that outputs the true v for Gaussian
data, so ComfyUI's own V_PREDICTION conversion makes the clean estimate the hook guides.

v and eps models share the k-diffusion coordinates x = x0 + sigma eps: with the same data and schedule the
guided run must be the eps model's, step for step.
"""

from __future__ import annotations

import pytest
import torch
from agg_testing import graphs, probes
from agg_testing.analytic import ddim_vp_step, gaussian

STEPS = 3


@pytest.fixture(scope="module")
def session(comfy):
    probes.register()
    return comfy


def graph(prediction: str, *, guided: bool, manifold: str = "finite_difference", seed: int = 601):
    g = probes.agg_img2img(seed=seed, steps=STEPS, weight=None)
    graphs.insert_model_patch(g, "AGGTestExactUNet", name="exact", latent=g["encode"][0], std=0.5, mean_scale=0.5)
    if prediction == "v_prediction":  # before the exact network, which reads the model's parameterisation
        graphs.insert_model_patch(g, "ModelSamplingDiscrete", name="sampling", sampling="v_prediction", zsnr=False)
    if guided:
        probes.add_agg(g, weight=0.5, manifold=manifold)
    return g


def run(session, g):
    with probes.guided_steps() as calls:
        r = session.run(g.prompt)
    assert r.ok, r.error_text()
    out = r.output(g["sampler"].id)["samples"]
    assert torch.isfinite(out).all()
    return r, out, calls


def l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().mean())


@pytest.mark.parametrize("manifold", ["finite_difference", "autograd"])
def test_v_prediction_model_is_guided_as_its_eps_twin(session, manifold, caplog):
    import logging

    import comfy.model_sampling

    g = graph("v_prediction", guided=True, manifold=manifold)
    with caplog.at_level(logging.WARNING, logger="AGG"):
        r, v_out, calls = run(session, g)
    assert not [rec.getMessage() for rec in caplog.records if rec.name == "AGG"]  # no fallback of any kind
    model = r.output(g["exact"].id)
    assert isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.V_PREDICTION)
    assert len(calls) == STEPS and all(c["guided"] and c["family"] == "v_prediction" for c in calls)
    events = r.events("agg.terms")
    assert len(events) == STEPS and not any(e["skipped"] or e["fallback"] for e in events), events

    # the clean estimate the hook saw is the exact posterior mean, through ComfyUI's v conversion
    source = model.model.process_latent_in(r.output(g["encode"].id)["samples"].float())
    data = gaussian(0.5 * source[0], 0.5)
    for c in calls:
        exact = data.denoise(c["x"], torch.tensor([c["sigma"]]), "v_prediction")
        assert torch.allclose(c["D"], exact, atol=1e-4), (c["sigma"], float((c["D"] - exact).abs().max()))

    # every state is the asymmetric DDIM step from the previous one
    sigmas = [c["sigma"] for c in calls] + [0.0]
    xs = [c["x"] for c in calls] + [model.model.process_latent_in(v_out.float())]
    for i, c in enumerate(calls):
        want = ddim_vp_step(c["x"], c["D"], c["delta"], sigmas[i], sigmas[i + 1]).float()
        assert torch.allclose(xs[i + 1], want, atol=1e-4), (i, float((xs[i + 1] - want).abs().max()))

    # the eps twin: same data, same schedule, same guidance -> the same run
    _, eps_out, eps_calls = run(session, graph("eps", guided=True, manifold=manifold))
    assert [c["family"] for c in eps_calls] == ["eps"] * STEPS
    for a, b in zip(calls, eps_calls, strict=True):
        assert torch.allclose(a["delta"], b["delta"], atol=1e-4)
    assert torch.allclose(v_out, eps_out, rtol=1e-4, atol=1e-4), float((v_out - eps_out).abs().max())

    # and the guidance acts: Structure Loss brings the result closer to the source than the unguided v run
    plain = graph("v_prediction", guided=False)
    rp = session.run(plain.prompt)
    assert rp.ok, rp.error_text()
    base = rp.output(plain["sampler"].id)["samples"]
    src = r.output(g["encode"].id)["samples"]
    print(f"{manifold}: L1 to source unguided {l1(base, src):.4f}, guided {l1(v_out, src):.4f}")
    assert l1(v_out, src) < l1(base, src)

