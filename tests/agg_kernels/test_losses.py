"""Structure, range, CLIP direction and style losses; trajectories."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from agg_testing.analytic import toy_decoder

from agg_kernels.losses import (
    Trajectory,
    TrajectoryRecorder,
    check_reference,
    clip_direction_loss,
    image_embedding,
    noisy_mix,
    pixel_structure_loss,
    prompt_templates,
    range_loss,
    self_similarity,
    self_similarity_loss,
    structure_loss,
    style_loss,
    target_direction,
    template_text_embedding,
    trajectory_at,
)
from agg_kernels.losses.structure import FOLLOW_TOLERANCE, STATE_GAIN
from agg_kernels.objective import AdaptiveRule, LossContext, base_weights, chained, evaluate, total


def ctx_for(x0: torch.Tensor, sigma: float = 1.0, family: str = "eps", step: int = 0, x=None) -> LossContext:
    s = torch.full((x0.shape[0],), sigma)
    return LossContext(sigma=s, x=x if x is not None else x0.detach().clone(), family=family, step=step)


def toy_encoder(dim: int = 16, seed: int = 1):
    """Pooled pixels -> linear embedding: a differentiable stand-in for a CLIP image tower."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, 3 * 4 * 4, generator=g)

    def encode(images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images, 4).flatten(1) @ w.to(images.dtype).T

    return encode


# ---------------------------------------------------------------- structure


def test_structure_loss_value_and_gradient_by_hand():
    x0 = torch.tensor([[[[1.0, -2.0], [0.5, 3.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])  # [2, 1, 2, 2]
    ref = torch.tensor([[[[0.0, 0.0], [1.0, 1.0]]]])  # batch 1: shared
    loss = structure_loss(2.0, ref)
    xg = x0.clone().requires_grad_(True)
    terms = evaluate(loss, xg, ctx_for(x0))
    assert set(terms) == {"structure"}
    # sample 0: |1| + |-2| + |-0.5| + |2| = 5.5, mean 1.375; sample 1: 0 + 0 + 1 + 1 = 2, mean 0.5
    assert torch.allclose(terms["structure"], torch.tensor([1.375, 0.5]))  # raw L1; the weight stands beside it
    assert base_weights(loss) == {"structure": 2.0}
    assert torch.equal(loss[0].anchor(x0, ctx_for(x0)), ref.expand_as(x0))
    terms["structure"].sum().backward()
    expected = torch.sign(x0 - ref) / 4
    assert torch.allclose(xg.grad, expected)


def test_structure_loss_is_zero_at_reference_and_per_sample_reference():
    ref = torch.randn(3, 4, 5, 6)
    terms = evaluate(structure_loss(1.0, ref), ref.clone(), ctx_for(ref))
    assert torch.equal(terms["structure"], torch.zeros(3))
    x0 = ref.clone()
    x0[1] += 1.0
    terms = evaluate(structure_loss(1.0, ref), x0, ctx_for(x0))
    assert torch.allclose(terms["structure"], torch.tensor([0.0, 1.0, 0.0]))


@pytest.mark.parametrize(
    "ref_shape, needle",
    [
        ((1, 16, 8, 8), "expected 4, got 16"),
        ((1, 4, 8, 6), "expected 8x8, got 8x6"),
        ((3, 4, 8, 8), "expected 2 or 1, got 3"),
        ((4, 8, 8), "[B, C, H, W]"),
    ],
)
def test_structure_reference_mismatch_names_expected_and_got(ref_shape, needle):
    probe = torch.empty(2, 4, 8, 8, device="meta")  # the run's latent shape is all the check needs
    with pytest.raises(ValueError) as err:
        check_reference(torch.zeros(ref_shape), probe)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "traj_shape, batch, needle",
    [((2, 1, 16, 8, 8), 1, "expected 4, got 16"), ((2, 2, 4, 8, 8), 3, "expected 3 or 1, got 2")],
)
def test_structure_trajectory_mismatch_is_reported(traj_shape, batch, needle):
    traj = Trajectory(torch.tensor([0.0, 1.0]), torch.zeros(traj_shape))
    with pytest.raises(ValueError, match=needle):
        check_reference(traj, torch.empty(batch, 4, 8, 8, device="meta"))
    check_reference(traj, torch.empty(traj_shape[1], traj_shape[2], 8, 8, device="meta"))  # a fitting run passes


def test_structure_loss_reads_trajectory_at_step_sigma():
    d = torch.stack([torch.full((1, 2, 3, 3), v) for v in (0.0, 1.0, 3.0)])
    traj = Trajectory(torch.tensor([0.0, 1.0, 2.0]), d)
    x0 = torch.zeros(2, 2, 3, 3)
    ctx = LossContext(sigma=torch.tensor([0.5, 1.5]), x=x0, family="eps")
    terms = evaluate(structure_loss(1.0, traj), x0, ctx)
    assert torch.allclose(terms["structure"], torch.tensor([0.5, 2.0]))


def test_on_a_trajectory_with_states_the_reference_takes_back_half_the_state_gap():
    # reference = D_inv(sigma) + STATE_GAIN (x_inv(sigma) - x) / alpha(sigma) for a state within FOLLOW_TOLERANCE
    # sigma of the inversion's; a state as far as fresh noise (about 1.4 sigma), or alpha below MIN_ALPHA, keeps D_inv
    sig = torch.tensor([0.0, 0.5, 0.9])
    d = torch.stack([torch.full((1, 2, 3, 3), v) for v in (0.0, 1.0, 2.0)])
    states = torch.stack([torch.full((1, 2, 3, 3), v) for v in (0.0, 0.8, 1.0)])
    traj = Trajectory(sig, d, states)
    x0 = torch.zeros(3, 2, 3, 3)
    x = torch.stack([torch.full((2, 3, 3), v) for v in (0.6, 0.8 - 1.4 * 0.5, 0.8)])  # gap 0.2, 1.4 sigma, 0
    ref = structure_loss(1.0, traj)[0].anchor(x0, LossContext(sigma=torch.full((3,), 0.5), x=x, family="const"))
    assert STATE_GAIN == 0.5 and FOLLOW_TOLERANCE == 1.0
    assert torch.allclose(ref[0], torch.full((2, 3, 3), 1.0 + 0.5 * 0.2 / 0.5))  # alpha(0.5) = 0.5 on a flow model
    assert torch.allclose(ref[1], torch.ones(2, 3, 3))  # as far as fresh noise: the inversion's estimate alone
    assert torch.allclose(ref[2], torch.ones(2, 3, 3))  # on the inversion: no gap
    near_pure_noise = LossContext(sigma=torch.full((1,), 0.95), x=torch.full((1, 2, 3, 3), 0.9), family="const")
    ref = structure_loss(1.0, traj)[0].anchor(x0[:1], near_pure_noise)
    assert torch.allclose(ref, torch.full((1, 2, 3, 3), 2.0))  # alpha 0.05 < MIN_ALPHA: no gap term
    plain = Trajectory(sig, d)  # recorded without states (older trajectories): the estimate alone
    ref = structure_loss(1.0, plain)[0].anchor(x0, LossContext(sigma=torch.full((3,), 0.5), x=x, family="const"))
    assert torch.allclose(ref, torch.ones(3, 2, 3, 3))


def test_pixel_structure_loss_compares_decoded_images():
    decode = toy_decoder()
    ref = torch.randn(1, 4, 4, 4)
    x0 = torch.randn(2, 4, 4, 4)
    terms = evaluate(pixel_structure_loss(0.5, ref, decode), x0, ctx_for(x0))
    expected = (decode(x0) - decode(ref)).abs().flatten(1).mean(1)
    assert torch.allclose(terms["structure_pixel"], expected)
    assert torch.allclose(evaluate(pixel_structure_loss(1.0, ref, decode), ref, ctx_for(ref))["structure_pixel"], torch.zeros(1))


def test_self_similarity_matrix_and_loss():
    tok = torch.randn(2, 5, 7)
    s = self_similarity(tok)
    assert s.shape == (2, 5, 5)
    assert torch.allclose(torch.diagonal(s, dim1=1, dim2=2), torch.ones(2, 5), atol=1e-6)
    assert torch.allclose(s, s.transpose(1, 2))
    # invariant to a per-token rescaling: only directions count
    assert torch.allclose(self_similarity(tok * (torch.rand(2, 5, 1) * 3 + 0.1)), s, atol=1e-5)

    decode = toy_decoder()
    proj = torch.randn(3, 8, generator=torch.Generator().manual_seed(3))

    def tokens(images: torch.Tensor) -> torch.Tensor:  # [N, 3, 32, 32] -> [N, 16, 8] patch tokens
        patches = F.avg_pool2d(images, 8).flatten(2).transpose(1, 2)
        return patches @ proj

    ref = torch.randn(1, 4, 4, 4)
    loss = self_similarity_loss(2.0, ref, decode, tokens, size=32)
    assert torch.allclose(evaluate(loss, ref.clone(), ctx_for(ref))["structure_vit"], torch.zeros(1), atol=1e-6)
    x0 = torch.randn(2, 4, 4, 4, requires_grad=True)
    value = evaluate(loss, x0, ctx_for(x0.detach()))["structure_vit"]
    assert value.shape == (2,) and bool((value > 0).all())
    value.sum().backward()
    assert x0.grad is not None and bool(torch.isfinite(x0.grad).all()) and float(x0.grad.abs().sum()) > 0


# ---------------------------------------------------------------- trajectory


def make_traj(batch: int = 1) -> Trajectory:
    g = torch.Generator().manual_seed(0)
    return Trajectory(torch.tensor([0.0, 0.5, 2.0, 4.0]), torch.randn(4, batch, 2, 3, 3, generator=g))


def test_trajectory_exact_at_recorded_sigmas():
    traj = make_traj()
    for i, s in enumerate(traj.sigmas.tolist()):
        assert torch.equal(trajectory_at(traj, s), traj.denoised[i])


def test_trajectory_linear_between_and_clamped_outside():
    traj = make_traj()
    d = traj.denoised
    assert torch.allclose(trajectory_at(traj, 1.25), 0.5 * d[1] + 0.5 * d[2], atol=1e-6)
    assert torch.allclose(trajectory_at(traj, 0.875), 0.75 * d[1] + 0.25 * d[2], atol=1e-6)
    assert torch.equal(trajectory_at(traj, 10.0), d[3])
    assert torch.equal(trajectory_at(traj, -1.0), d[0])


def test_trajectory_per_sample_sigma_and_batch_broadcast():
    traj = make_traj(batch=1)
    out = trajectory_at(traj, torch.tensor([0.5, 3.0, 9.0]))
    d = traj.denoised
    assert out.shape == (3, 2, 3, 3)
    assert torch.equal(out[0], d[1, 0])
    assert torch.allclose(out[1], 0.5 * d[2, 0] + 0.5 * d[3, 0], atol=1e-6)
    assert torch.equal(out[2], d[3, 0])

    traj2 = make_traj(batch=2)
    out2 = trajectory_at(traj2, torch.tensor([0.5, 4.0]))
    assert torch.equal(out2[0], traj2.denoised[1, 0]) and torch.equal(out2[1], traj2.denoised[3, 1])


def test_trajectory_validation_and_recorder():
    with pytest.raises(ValueError, match="strictly ascending"):
        Trajectory(torch.tensor([1.0, 0.5]), torch.zeros(2, 1, 1, 2, 2))
    with pytest.raises(ValueError, match="2 sigmas but 3"):
        Trajectory(torch.tensor([0.0, 1.0]), torch.zeros(3, 1, 1, 2, 2))
    with pytest.raises(ValueError, match=r"\[N, B, C, H, W\]"):
        Trajectory(torch.tensor([0.0, 1.0]), torch.zeros(2, 1, 2, 2))
    with pytest.raises(ValueError, match="states must match"):
        Trajectory(torch.tensor([0.0, 1.0]), torch.zeros(2, 1, 1, 2, 2), torch.zeros(2, 1, 1, 3, 3))
    mixed = TrajectoryRecorder()
    mixed.append(0.0, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="all record their state, or none"):
        mixed.append(0.3, torch.zeros(1, 1, 2, 2))
    rec = TrajectoryRecorder()
    rec.append(0.0, torch.zeros(1, 1, 2, 2))
    rec.append(torch.tensor([0.3]), torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match="ascend"):
        rec.append(0.3, torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match="expected"):
        rec.append(0.5, torch.ones(1, 1, 3, 3))
    traj = rec.build()
    assert traj.sigmas.tolist() == pytest.approx([0.0, 0.3])
    assert traj.latent_shape == (1, 1, 2, 2)
    assert torch.equal(trajectory_at(traj, 0.3), torch.ones(1, 1, 2, 2))


# ---------------------------------------------------------------- range


def test_range_loss_by_hand():
    pixels = torch.tensor([[[[0.5, 1.5], [-3.0, -1.0]]]]).expand(1, 3, 2, 2).clone()
    terms = evaluate(range_loss(4.0, lambda z: z), pixels, ctx_for(pixels))
    # per element: 0, 0.25, 4, 0 -> mean 1.0625
    assert torch.allclose(terms["range"], torch.tensor([1.0625]))
    inside = torch.rand(2, 3, 4, 4) * 2 - 1
    assert torch.equal(evaluate(range_loss(1.0, lambda z: z), inside, ctx_for(inside))["range"], torch.zeros(2))


def test_range_loss_gradient_pushes_back_into_range():
    x = torch.tensor([[[[2.0, -2.0, 0.3]]]], requires_grad=True)
    evaluate(range_loss(1.0, lambda z: z), x, ctx_for(x.detach()))["range"].sum().backward()
    assert x.grad[0, 0, 0, 0] > 0 and x.grad[0, 0, 0, 1] < 0 and x.grad[0, 0, 0, 2] == 0


# ---------------------------------------------------------------- CLIP pieces


def test_prompt_templates_and_template_embedding():
    templates = prompt_templates()
    assert len(templates) >= 5 and all("{}" in t for t in templates)
    seen: list[str] = []

    def encode_text(prompts: list[str]) -> torch.Tensor:
        seen.extend(prompts)
        g = torch.Generator().manual_seed(len(prompts))
        return torch.randn(len(prompts), 8, generator=g) * torch.arange(1, len(prompts) + 1)[:, None]

    e = template_text_embedding(encode_text, "a cat")
    assert seen == [t.format("a cat") for t in templates]
    raw = encode_text(list(seen))
    expected = F.normalize(F.normalize(raw, dim=-1).mean(0), dim=-1)
    assert torch.allclose(e, expected, atol=1e-6)
    assert math.isclose(float(e.norm()), 1.0, rel_tol=1e-6)


def test_target_direction_formula():
    g = torch.Generator().manual_seed(0)
    t, s, i = (F.normalize(torch.randn(8, generator=g), dim=-1) for _ in range(3))
    v = target_direction(t, s, i)
    assert torch.allclose(v, F.normalize(t - 0.4 * s + 0.2 * i, dim=-1), atol=1e-6)
    v2 = target_direction(t, s)
    assert torch.allclose(v2, F.normalize(t - 0.4 * s, dim=-1), atol=1e-6)
    # inputs enter normalized: scaling an embedding changes nothing
    assert torch.allclose(target_direction(5 * t, 0.1 * s, 3 * i), v, atol=1e-6)
    assert target_direction(t, s, torch.stack([i, -i])).shape == (2, 8)


@pytest.mark.parametrize("family", ["eps", "v_prediction", "const"])
def test_noisy_mix_matches_reference_weights(family):
    x0 = torch.randn(2, 4, 3, 3)
    x = torch.randn(2, 4, 3, 3)
    sigma = torch.tensor([0.3, 0.8]) if family == "const" else torch.tensor([0.5, 5.0])
    mix = noisy_mix(x0, x, sigma, family)
    for b in range(2):
        s = float(sigma[b])
        if family == "const":
            w, xt = s, x[b]
        else:
            w, xt = s / math.sqrt(1 + s * s), x[b] / math.sqrt(1 + s * s)
        assert torch.allclose(mix[b], w * x0[b] + (1 - w) * xt, atol=1e-6)


def direction_setup(batch: int = 2, seed: int = 0):
    decode, encode = toy_decoder(), toy_encoder()
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 4, 8, 8, generator=g)
    direction = F.normalize(torch.randn(16, generator=g), dim=-1)
    return decode, encode, x0, direction


def test_clip_direction_loss_decreases_under_gradient_steps():
    decode, encode, x0, v = direction_setup()
    loss = clip_direction_loss(1.0, decode, encode, v, n_cuts=4, cut_size=24, seed=7, adaptive=False)
    ctx = ctx_for(x0, sigma=0.5)
    x = x0.clone()
    values = []
    for _ in range(15):
        xg = x.clone().requires_grad_(True)
        value = evaluate(loss, xg, ctx)["clip_direction"]
        values.append(value.detach())
        (g,) = torch.autograd.grad(value.sum(), xg)
        x = x - 0.5 * g / g.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]
    assert values[0].shape == (2,)
    assert bool((values[-1] < values[0] - 0.2).all()), (values[0], values[-1])
    assert bool((values[-1] >= -1.0).all())


def test_clip_direction_loss_value_is_minus_mean_cosine():
    decode, encode, x0, v = direction_setup(batch=1)
    loss = clip_direction_loss(3.0, decode, encode, v, n_cuts=2, cut_size=16, seed=1, adaptive=False, noisy_aug=False)
    from agg_kernels.augment import clip_normalize, random_cutouts

    cuts = random_cutouts((decode(x0) + 1) / 2, 2, 16, torch.Generator().manual_seed(1 + 4))
    emb = F.normalize(encode(clip_normalize(cuts)), dim=-1)
    expected = -(emb @ v).mean()
    assert torch.allclose(evaluate(loss, x0, ctx_for(x0, step=4))["clip_direction"], expected.reshape(1), atol=1e-6)


def test_clip_direction_loss_seeded_per_step():
    decode, encode, x0, v = direction_setup()
    a = clip_direction_loss(1.0, decode, encode, v, n_cuts=2, cut_size=16, seed=3, adaptive=False)
    b = clip_direction_loss(1.0, decode, encode, v, n_cuts=2, cut_size=16, seed=3, adaptive=False)
    ctx = ctx_for(x0, sigma=0.7, step=2)
    assert torch.equal(evaluate(a, x0, ctx)["clip_direction"], evaluate(b, x0, ctx)["clip_direction"])
    assert torch.equal(evaluate(a, x0, ctx)["clip_direction"], evaluate(a, x0, ctx)["clip_direction"])  # same step, same crops
    other = evaluate(a, x0, ctx_for(x0, sigma=0.7, step=3))["clip_direction"]
    assert not torch.equal(other, evaluate(a, x0, ctx)["clip_direction"])


def test_adaptive_rule_is_set_afresh_each_step():
    rule = AdaptiveRule()
    m = torch.ones(1)
    steps = [(-0.2, 2.0),  # cosine 0.2 < 0.5: not following yet -> x2
             (-0.2, 2.0),  # again: still x2, never compounding
             (-0.8, 0.5), (-0.8, 0.5),  # cosine 0.8: following -> x0.5 of the base weight
             (float("nan"), 0.5),  # no information: unchanged
             (-0.5, 1.0),  # exactly at the threshold: the base weight
             *[(0.0, 2.0)] * 10]
    for previous, want in steps:
        m = rule.multiplier(torch.tensor([previous]), m)
        assert m.dtype == torch.float32 and torch.equal(m, torch.tensor([want])), (previous, m)
    assert torch.equal(rule.multiplier(torch.tensor([float("inf"), -1.0]), torch.tensor([0.5, 2.0])),
                       torch.tensor([0.5, 0.5]))  # per sample; an infinite loss keeps its own


def constant_encoder(vec: torch.Tensor):
    """An 'encoder' whose embedding is fixed (cosine with the direction known), still differentiable."""

    def encode(images: torch.Tensor) -> torch.Tensor:
        return vec.expand(images.shape[0], -1) + 0 * images.mean()

    return encode


def adaptive_steps(loss, x0: torch.Tensor, steps: int) -> list:
    """The guided steps of a run on a fixed clean estimate, each given the previous step's result (as the nodes'
    runtime does): the GuidanceResult of each."""
    from agg_kernels.guidance import guided_delta

    results, previous = [], None
    for step in range(steps):
        previous = guided_delta(loss, x0, ctx_for(x0, step=step), None, dds_steps=0, previous=previous)
        results.append(previous)
    return results


def test_clip_direction_adaptive_weight_follows_previous_step():
    v = F.normalize(torch.tensor([1.0, 0.0, 0.0]), dim=0)
    x0 = torch.randn(2, 4, 4, 4)
    aligned = clip_direction_loss(10.0, toy_decoder(), constant_encoder(v), v, n_cuts=1, cut_size=8)
    assert aligned[0].adaptive == AdaptiveRule() and aligned[0].weight == 10.0  # the term itself never changes
    # cos = 1 -> loss -1 < -0.5: half the base weight on the next step (and the next: no compounding)
    assert torch.allclose(evaluate(aligned, x0, ctx_for(x0, step=0))["clip_direction"], torch.full((2,), -1.0))
    results = adaptive_steps(aligned, x0, 3)
    assert torch.allclose(results[0].values["clip_direction"], torch.full((2,), -1.0))
    assert torch.equal(results[0].multipliers["clip_direction"], torch.ones(2))  # the first step: the base weight
    assert torch.equal(results[1].multipliers["clip_direction"], torch.full((2,), 0.5))  # per sample
    assert torch.equal(results[2].multipliers["clip_direction"], torch.full((2,), 0.5))
    assert aligned[0].weight == 10.0

    orthogonal = torch.tensor([0.0, 1.0, 0.0])
    lagging = clip_direction_loss(10.0, toy_decoder(), constant_encoder(orthogonal), v, n_cuts=1, cut_size=8)
    results = adaptive_steps(lagging, x0, 6)
    # twice the base weight, never compounding
    assert torch.equal(results[-1].multipliers["clip_direction"], torch.full((2,), 2.0))
    assert torch.allclose(results[-1].values["clip_direction"], torch.zeros(2))
    # a fresh run starts from the base weight again; without `previous` nothing carries over
    fresh = guided_delta_once(lagging, x0)
    assert torch.equal(fresh.multipliers["clip_direction"], torch.ones(2))
    fixed = clip_direction_loss(10.0, toy_decoder(), constant_encoder(v), v, n_cuts=1, cut_size=8, adaptive=False)
    assert fixed[0].adaptive is None and all(r.multipliers == {} for r in adaptive_steps(fixed, x0, 3))


def guided_delta_once(loss, x0: torch.Tensor):
    from agg_kernels.guidance import guided_delta

    return guided_delta(loss, x0, ctx_for(x0, step=5), None, dds_steps=0)


def test_clip_direction_adaptive_weight_is_per_sample():
    # Image 0 follows the direction (cos 1, loss -1), image 1 does not (cos 0, loss 0): after one step image 0's
    # weight is halved and image 1's doubled, each as it would be alone (a batch-mean loss of -0.5 would leave
    # both at the base weight).
    v = F.normalize(torch.tensor([1.0, 0.0, 0.0]), dim=0)
    orthogonal = torch.tensor([0.0, 1.0, 0.0])

    def by_row(images: torch.Tensor) -> torch.Tensor:  # one cut-out per image: row i is image i
        rows = torch.stack([v if i % 2 == 0 else orthogonal for i in range(images.shape[0])])
        return rows + 0 * images.mean()

    x0 = torch.randn(2, 4, 4, 4)
    loss = clip_direction_loss(10.0, toy_decoder(), by_row, v, n_cuts=1, cut_size=8)
    assert torch.allclose(evaluate(loss, x0, ctx_for(x0, step=0))["clip_direction"], torch.tensor([-1.0, 0.0]))
    results = adaptive_steps(loss, x0, 2)
    assert torch.equal(10.0 * results[1].multipliers["clip_direction"], torch.tensor([5.0, 20.0]))


# ---------------------------------------------------------------- style


def test_style_loss_cosine_and_mse():
    v = torch.tensor([3.0, 4.0, 0.0])
    x0 = torch.randn(2, 4, 4, 4)
    same = style_loss(2.0, toy_decoder(), constant_encoder(v), v * 10, n_cuts=2, cut_size=8)
    assert torch.allclose(evaluate(same, x0, ctx_for(x0))["style"], torch.zeros(2), atol=1e-6)
    ortho = style_loss(2.0, toy_decoder(), constant_encoder(v), torch.tensor([0.0, 0.0, 1.0]), n_cuts=2, cut_size=8)
    assert torch.allclose(evaluate(ortho, x0, ctx_for(x0))["style"], torch.full((2,), 1.0), atol=1e-6)
    assert base_weights(ortho) == {"style": 2.0}
    mse = style_loss(1.0, toy_decoder(), constant_encoder(v), torch.tensor([3.0, 4.0, 3.0]), metric="mse", n_cuts=2, cut_size=8)
    assert torch.allclose(evaluate(mse, x0, ctx_for(x0))["style"], torch.full((2,), 3.0), atol=1e-6)
    with pytest.raises(ValueError, match="unknown style metric"):
        style_loss(1.0, toy_decoder(), constant_encoder(v), v, metric="l3")


def test_style_loss_latent_term_resizes():
    v = torch.tensor([1.0, 0.0])
    x0 = torch.zeros(2, 4, 4, 4)
    style_latent = torch.ones(1, 4, 8, 8)
    loss = style_loss(1.0, toy_decoder(), constant_encoder(v), v, n_cuts=1, cut_size=8,
                      style_latent=style_latent, latent_mse_weight=0.5)
    terms = evaluate(loss, x0, ctx_for(x0))
    assert set(terms) == {"style", "style_latent"}
    assert torch.allclose(terms["style_latent"], torch.full((2,), 1.0))
    assert base_weights(loss) == {"style": 1.0, "style_latent": 0.5}


def test_style_loss_decreases_toward_style_embedding():
    decode, encode = toy_decoder(), toy_encoder()
    target = encode(torch.rand(1, 3, 16, 16))
    loss = style_loss(1.0, decode, encode, target, n_cuts=4, cut_size=16, seed=2)
    x = torch.randn(1, 4, 8, 8)
    first = None
    for _ in range(15):
        xg = x.clone().requires_grad_(True)
        value = evaluate(loss, xg, ctx_for(x))["style"]
        first = value.detach() if first is None else first
        (g,) = torch.autograd.grad(value.sum(), xg)
        x = x - 0.5 * g / g.norm().clamp_min(1e-12)
    assert float(evaluate(loss, x, ctx_for(x))["style"]) < float(first) * 0.7


def test_image_embedding_centre_and_cutouts():
    encode = toy_encoder()
    img = torch.rand(2, 3, 20, 30)
    centre = image_embedding(encode, img, size=16)
    assert centre.shape == (2, 16)
    cuts = image_embedding(encode, img, size=16, n_cuts=3, seed=5)
    assert cuts.shape == (2, 16) and torch.equal(cuts, image_embedding(encode, img, size=16, n_cuts=3, seed=5))


def test_losses_compose_into_named_terms():
    decode = toy_decoder()
    ref = torch.randn(1, 4, 4, 4)
    loss = chained(structure_loss(1.0, ref), range_loss(1.0, decode), structure_loss(2.0, ref))
    x0 = torch.randn(2, 4, 4, 4)
    terms = evaluate(loss, x0, ctx_for(x0))
    assert list(terms) == ["structure", "range", "structure_2"]
    assert torch.allclose(total(terms, base_weights(loss)), terms["structure"] * 3 + terms["range"])
    assert base_weights(loss) == {"structure": 1.0, "range": 1.0, "structure_2": 2.0}
    assert [t.name for t in loss if t.anchor is not None] == ["structure", "structure_2"]


def test_losses_work_inside_guided_delta_when_built_under_inference_mode():
    # ComfyUI runs every prompt under inference_mode: references, directions and trajectories arrive as
    # inference tensors, and the gradient is taken under inference_mode(False) by guided_delta.
    from agg_kernels.guidance import guided_delta

    decode, encode = toy_decoder(), toy_encoder()
    with torch.inference_mode():
        x0 = torch.randn(2, 4, 8, 8)
        ref = torch.randn(1, 4, 8, 8)
        traj = Trajectory(torch.tensor([0.0, 2.0]), torch.stack([ref, ref + 1]))
        v = F.normalize(torch.randn(16), dim=-1)
        style = torch.randn(16)
        loss = chained(
            structure_loss(1.0, ref),
            structure_loss(1.0, traj),
            pixel_structure_loss(1.0, traj, decode),
            range_loss(1.0, decode),
            clip_direction_loss(1.0, decode, encode, v, n_cuts=2, cut_size=16),
            style_loss(1.0, decode, encode, style, n_cuts=2, cut_size=16, style_latent=ref, latent_mse_weight=1.0),
            self_similarity_loss(1.0, traj, decode, lambda im: F.avg_pool2d(im, 4).flatten(2).transpose(1, 2), size=16),
        )
        x = x0 + torch.randn_like(x0)
        ctx = LossContext(sigma=torch.full((2,), 1.0), x=x, family="eps", step=0)
        result = guided_delta(loss, x0, ctx, None, dds_steps=2)
    assert result.skipped is None, result.skipped
    assert result.delta is not None and bool(torch.isfinite(result.delta).all())
    assert float(result.delta.abs().sum()) > 0
    expected = {"structure", "structure_2", "structure_pixel", "structure_vit", "range", "clip_direction", "style"}
    assert expected | {"style_latent"} <= set(result.terms)
