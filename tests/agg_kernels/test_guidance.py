"""guided_delta: per-term pulls -> covariance step -> refinement -> trust region, in model-independent units."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from agg_testing.analytic import mixture

from agg_kernels.guidance import guided_delta
from agg_kernels.manifold import covariance_operator
from agg_kernels.objective import AdaptiveRule, LossContext, Term, chained, evaluate
from agg_kernels.strength import DEFAULT_TRUST, posterior_variance, rms, trust_radius, unit

FAMILIES = ("eps", "v_prediction", "const")
SHAPE = (3, 2, 4, 4)


def data():
    g = torch.Generator().manual_seed(0)
    return mixture(torch.randn(2, *SHAPE[1:], generator=g), 0.5)


def setup(family, sigma=None):
    sigma = sigma if sigma is not None else (0.5 if family == "const" else 2.0)
    mix = data()
    g = torch.Generator().manual_seed(1)
    x = mix.noised(mix.sample(SHAPE[0], g)[0], sigma, family, g)
    s = torch.full((SHAPE[0],), sigma)
    d = mix.denoise(x, s, family)
    return mix, x, s, d, LossContext(sigma=s, x=x, family=family)


def pull(goal, weight=0.05, scale=1.0):
    return (Term("pull", lambda x0, ctx: scale * (x0 - goal).pow(2).flatten(1).mean(1), weight),)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("manifold", ["finite_difference", "autograd", "none"])
def test_finite_case_gives_finite_delta_that_lowers_the_loss(family, manifold):
    mix, x, s, d, ctx = setup(family)
    loss = pull(mix.means[1], 0.05)
    res = guided_delta(loss, d, ctx, covariance_operator(manifold, x, ctx.sigma, ctx.family, lambda z: mix.denoise(z, s, family), base=d), dds_steps=2, dds_lr=0.5)
    assert res.skipped is None and res.delta is not None and res.fallback is None
    assert torch.isfinite(res.delta).all() and res.delta.shape == d.shape
    before, after = evaluate(loss, d, ctx)["pull"], evaluate(loss, d + res.delta, ctx)["pull"]
    assert (after < before).all(), (before, after)
    assert set(res.terms) == {"pull"} and res.terms["pull"] == pytest.approx(before.mean().item(), rel=1e-5)
    assert res.step_rms["pull"] == pytest.approx(0.05, rel=1e-4) and res.delta_rms > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_delta_is_the_covariance_step_when_no_refinement(family):
    # K = 0: delta = -(sigma^2 / alpha) J pull, pull = w * g / RMS(g), with the exact J from autograd.
    mix, x, s, d, ctx = setup(family)
    goal = torch.zeros(SHAPE[1:])
    w = 0.2
    res = guided_delta(pull(goal, w), d, ctx, covariance_operator("autograd", x, ctx.sigma, ctx.family, lambda z: mix.denoise(z, s, family), base=d), dds_steps=0, trust=100)
    p = w * unit(d - goal)
    with torch.enable_grad():
        xg = x.clone().requires_grad_(True)
        (jp,) = torch.autograd.grad(mix.denoise(xg, s, family), xg, grad_outputs=p)
    sigma = s[0].item()
    scale = sigma**2 / (1 - sigma if family == "const" else 1.0)
    assert torch.allclose(res.delta, -scale * jp, atol=1e-5), (res.delta - -scale * jp).abs().max()


@pytest.mark.parametrize("manifold", ["finite_difference", "autograd", "none"])
@pytest.mark.parametrize("family", ["eps", "const"])
def test_invariant_to_the_raw_size_of_the_loss(manifold, family):
    mix, x, s, d, ctx = setup(family)
    structure = (Term("structure", lambda x0, ctx: (x0 - mix.means[0]).abs().flatten(1).mean(1), 0.1,
                      lambda x0, ctx: mix.means[0].expand_as(x0)),)
    ref = None
    for c in (1e-4, 1e-2, 1.0, 1e2, 1e4):
        loss = chained(pull(mix.means[1], 0.2, c), structure)
        res = guided_delta(loss, d, ctx, covariance_operator(manifold, x, ctx.sigma, ctx.family, lambda z: mix.denoise(z, s, family), base=d))
        if ref is None:
            ref = res.delta
        rel = float((rms(res.delta - ref) / rms(ref)).max())
        assert rel < 0.01, (c, rel)


def test_weight_zero_is_exactly_no_guidance_and_no_model_call():
    mix, x, s, d, ctx = setup("eps")
    calls = []

    def denoise(z):
        calls.append(1)
        return mix.denoise(z, s, "eps")

    res = guided_delta(pull(mix.means[1], 0.0), d, ctx, covariance_operator("finite_difference", x, ctx.sigma, ctx.family, denoise, base=d), dds_steps=3)
    assert torch.equal(res.delta, torch.zeros_like(d)) and not calls


def test_a_larger_weight_moves_further_until_the_trust_region():
    mix, x, s, d, ctx = setup("eps", 4.0)
    sizes = []
    for w in (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 30.0):
        res = guided_delta(pull(mix.means[1], w), d, ctx, None, dds_steps=0)
        sizes.append((res.delta_rms, res.trust_region))
    radius = float(trust_radius(s, "eps")[0])
    assert all(b[0] >= a[0] - 1e-6 for a, b in zip(sizes, sizes[1:], strict=False)), sizes
    assert sizes[0][0] == pytest.approx(0.01 * float(posterior_variance(4.0, "eps")), rel=1e-4) and not sizes[0][1]
    assert sizes[-1][1] and sizes[-1][0] == pytest.approx(radius, rel=1e-4)


@pytest.mark.parametrize("manifold", ["autograd", "none"])
def test_past_the_cap_a_larger_weight_gives_the_step_the_cap_gives(manifold):
    """Direction and size decided together: at the trust region every weight is scaled down until the
    covariance step fits and the refinement runs at those weights, so 3x, 10x or 100x a weight that already
    reaches the cap gives the same step, not one rotated toward the refinement's gradient taken farther away."""
    mix, x, s, d, ctx = setup("eps", 2.0)
    denoise = lambda xp: mix.denoise(xp, s, "eps")  # noqa: E731
    goals = (mix.means[1], mix.means[0] * 0.3)
    steps = {}
    for m in (1, 3, 10, 100):
        loss = chained(pull(goals[0], 2.0 * m), (Term("far", lambda x0, c: (x0 - goals[1]).abs().flatten(1).mean(1), 0.8 * m),))
        res = guided_delta(loss, d, ctx, covariance_operator(manifold, x, ctx.sigma, ctx.family, denoise, base=d), dds_steps=2)
        assert res.trust_region
        steps[m] = res.delta
    # every sample at the cap already at x1
    assert torch.allclose(rms(steps[1]), trust_radius(s, "eps"), rtol=1e-4)
    for m in (3, 10, 100):
        assert torch.allclose(steps[m], steps[1], atol=1e-5), (m, float((steps[m] - steps[1]).abs().max()))


def test_rate_scales_every_weight_and_the_trust_radius():
    """A step of `rate` reference steps pulls as a step of rate x the weights, and may move rate x as far."""
    mix, x, s, d, ctx = setup("eps", 2.0)
    for w, rate in ((0.02, 3.0), (0.1, 0.25)):
        scaled = guided_delta(pull(mix.means[1], w), d, ctx, None, rate=rate)
        plain = guided_delta(pull(mix.means[1], w * rate), d, ctx, None, trust=DEFAULT_TRUST * rate)
        assert not scaled.trust_region
        assert torch.allclose(scaled.delta, plain.delta, atol=1e-6)
    capped = guided_delta(pull(mix.means[1], 30.0), d, ctx, None, rate=0.25)
    assert torch.allclose(rms(capped.delta), trust_radius(s, "eps", DEFAULT_TRUST * 0.25), rtol=1e-4)


def test_non_descent_jacobian_falls_back_and_says_so():
    # A denoiser whose Jacobian is -I points the covariance step uphill: the prior covariance is used instead.
    mix, x, s, d, ctx = setup("eps")
    loss = pull(mix.means[1], 0.1)
    res = guided_delta(loss, d, ctx, covariance_operator("finite_difference", x, ctx.sigma, ctx.family, lambda z: -z, base=d), dds_steps=0)
    assert res.fallback and "descent" in res.fallback
    none = guided_delta(loss, d, ctx, None, dds_steps=0)
    assert torch.allclose(res.delta, none.delta)
    assert (evaluate(loss, d + res.delta, ctx)["pull"] < evaluate(loss, d, ctx)["pull"]).all()


def test_nan_loss_skips_with_a_reason():
    mix, x, s, d, ctx = setup("eps")
    bad = (Term("bad", lambda x0, ctx: (x0 * float("nan")).flatten(1).mean(1), 1.0),)
    res = guided_delta(bad, d, ctx, covariance_operator("finite_difference", x, ctx.sigma, ctx.family, lambda z: mix.denoise(z, s, "eps"), base=d))
    assert res.delta is None and res.skipped and "non-finite" in res.skipped


def test_nan_denoiser_falls_back_to_the_prior_step():
    mix, x, s, d, ctx = setup("eps")
    res = guided_delta(pull(mix.means[1]), d, ctx, covariance_operator("finite_difference", x, ctx.sigma, ctx.family, lambda z: torch.full_like(z, float("nan")), base=d))
    assert res.delta is not None and torch.isfinite(res.delta).all() and res.fallback


def test_inf_gradient_skips():
    mix, x, s, d, ctx = setup("const")
    explode = (Term("e", lambda x0, ctx: torch.exp(1e4 * x0).flatten(1).mean(1), 1.0),)
    res = guided_delta(explode, d, ctx, None)
    assert res.delta is None and res.skipped


@pytest.mark.parametrize("family", FAMILIES)
def test_context_tensors_made_under_inference_mode_can_enter_autograd(family):
    # ComfyUI runs every prompt under inference_mode: sigma and x reach the losses as inference tensors.
    # A loss that multiplies the estimate by them (as the CLIP noisy mix does) must still be differentiable.
    mix, x, s, d, _ = setup(family)
    loss = (Term("mix", lambda x0, ctx: ((ctx.sigma[:, None, None, None] * x0 + ctx.x) ** 2).flatten(1).mean(1), 0.1),)
    with torch.inference_mode():
        xi, si, di = x.clone(), s.clone(), d.clone()
        res = guided_delta(loss, di, LossContext(sigma=si, x=xi, family=family), None)
    assert res.delta is not None and torch.isfinite(res.delta).all()


def test_dtype_is_kept():
    mix, x, s, d, ctx = setup("eps")
    res = guided_delta(pull(mix.means[1], 0.05), d.half(), ctx, None, dds_steps=1)
    assert res.delta.dtype == torch.float16 and torch.isfinite(res.delta).all()


def test_report_is_plain_json():
    import json

    mix, x, s, d, ctx = setup("eps")
    res = guided_delta(pull(mix.means[1], 0.05), d, ctx, None)
    rep = json.loads(json.dumps(res.report()))
    assert set(rep) >= {"terms", "grad_rms", "step_rms", "delta_rms", "trust_region", "fallback", "skipped"}


def test_structure_alone_never_moves_an_element_away_from_or_past_its_reference():
    # A denoiser whose Jacobian is 3 I triples the covariance step: without the anchor bound, elements
    # close to the reference would pass it.
    mix, x, s, d, ctx = setup("eps")
    ref = mix.means[0]
    structure = (Term("structure", lambda x0, ctx: (x0 - ref).abs().flatten(1).mean(1), 1.0,
                      lambda x0, ctx: ref.expand_as(x0)),)
    res = guided_delta(structure, d, ctx, covariance_operator("finite_difference", x, ctx.sigma, ctx.family, lambda z: 3 * z, base=d), dds_steps=1, trust=100)
    gap = ref - d
    moved = res.delta
    assert (moved * gap >= -1e-6).all()  # never away
    assert (moved.abs() <= gap.abs() + 1e-6).all()  # never past
    assert float(moved.abs().sum()) > 0.1 * float(gap.abs().sum())  # and it does move


# -- terms: one name each, and the adaptive weight carried from step to step -------------------------------------


def test_chaining_names_each_term_once():
    mix, x, s, d, ctx = setup("eps")
    loss = chained(pull(mix.means[0]), pull(mix.means[1]), pull(mix.means[0], 0.1), pull(mix.means[1]))
    names = [t.name for t in loss]
    assert names == ["pull", "pull_2", "pull_3", "pull_4"]
    assert [t.weight for t in loss] == [0.05, 0.05, 0.1, 0.05]
    # a name that already carries a suffix keeps its own, and the repeat of it gets one more
    again = chained(loss[:2], (loss[1],), pull(mix.means[0]))
    assert [t.name for t in again] == ["pull", "pull_2", "pull_2_2", "pull_3"]
    res = guided_delta(loss, d, ctx, None)
    assert list(res.terms) == names and list(res.values) == names and list(res.step_rms) == names
    assert all(v.shape == (SHAPE[0],) for v in res.values.values())
    assert all(a is b for a, b in zip(chained(loss), loss, strict=True))  # already unique: the same terms


def adaptive_pull(goal: torch.Tensor, values: list[list[float]]):
    """A loss whose term follows `goal` but reports the raw values given per step (per sample), with the CLIP
    direction loss's adaptive rule: the multiplier each step uses follows the previous step's values."""

    def fn(x0, ctx):
        fake = torch.tensor(values[ctx.step], dtype=x0.dtype)
        pulled = (x0 - goal).pow(2).flatten(1).mean(1)
        return pulled - pulled.detach() + fake  # the values given, the gradient of the pull

    return (Term("clip_direction", fn, 0.05, adaptive=AdaptiveRule()),)


def test_the_adaptive_multiplier_follows_each_samples_previous_value_through_guided_delta():
    # Per sample: above -0.5 -> x2, below -> x1/2, at it -> x1, a non-finite value keeps the sample's previous
    # multiplier; 1 at the first step; never compounding. The step is sized by the multiplied weight.
    mix, x, s, d, _ = setup("eps")
    nan = float("nan")
    values = [[-0.2, -0.9, -0.5], [-0.2, nan, 0.0], [-0.8, -0.5, -0.3], [nan, 0.3, -0.7], [0.1, 0.1, 0.1]]
    want = [[1.0, 1.0, 1.0], [2.0, 0.5, 1.0], [2.0, 0.5, 2.0], [0.5, 1.0, 2.0], [0.5, 2.0, 0.5]]
    loss = adaptive_pull(mix.means[1], values)
    previous = None
    fixed = (replace(loss[0], adaptive=None),)
    for step in range(4):
        ctx = LossContext(sigma=s, x=x, family="eps", step=step)
        res = guided_delta(loss, d, ctx, None, dds_steps=0, previous=previous)
        # a non-finite value skips the step, and its report still carries what the next step needs
        assert (res.delta is None) == any(v != v for v in values[step])
        assert torch.equal(res.multipliers["clip_direction"], torch.tensor(want[step])), (step, res.multipliers)
        assert torch.allclose(res.values["clip_direction"], torch.tensor(values[step]), equal_nan=True)
        if res.delta is not None:  # the pull is the base weight times the sample's multiplier
            plain = guided_delta(fixed, d, ctx, None, dds_steps=0)
            for i, m in enumerate(want[step]):
                assert float(rms(res.delta[i : i + 1])) == pytest.approx(m * float(rms(plain.delta[i : i + 1])), rel=1e-5)
        previous = res
    # the same `previous` again (a retry of the step) gives the same multipliers; none at all starts afresh
    ctx = LossContext(sigma=s, x=x, family="eps", step=4)
    again = [guided_delta(loss, d, ctx, None, dds_steps=0, previous=previous) for _ in range(2)]
    assert all(torch.equal(r.multipliers["clip_direction"], torch.tensor(want[4])) for r in again)
    assert torch.equal(guided_delta(loss, d, ctx, None, dds_steps=0).multipliers["clip_direction"], torch.ones(3))
    assert loss[0].weight == 0.05  # the term itself never changes


def test_a_masked_adaptive_term_steps_under_inference_mode():
    # ComfyUI runs the whole prompt under inference_mode: the loss is built there (its region an inference
    # tensor) and each step sets the adaptive weight there; the region must still enter autograd.
    mix, x, s, d, _ = setup("eps")
    values = [[-0.2, -0.9, 0.0]] * 2
    with torch.inference_mode():
        region = torch.zeros(SHAPE[0], 1, *SHAPE[2:])
        region[..., :2] = 1
        loss = (replace(adaptive_pull(mix.means[1], values)[0], region=region),)
        previous = None
        for step in range(2):
            ctx = LossContext(sigma=s.clone(), x=x.clone(), family="eps", step=step)
            previous = guided_delta(loss, d.clone(), ctx, None, dds_steps=1, previous=previous)
            assert previous.delta is not None and torch.isfinite(previous.delta).all()
    assert torch.equal(previous.multipliers["clip_direction"], torch.tensor([2.0, 0.5, 2.0]))
    assert float(previous.delta[..., 2:].abs().max()) == 0.0  # nothing moves outside the region
