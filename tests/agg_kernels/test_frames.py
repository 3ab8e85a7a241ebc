"""agg_kernels.frames: the frames an image loss judges per guided step, per-clip terms, steadiness."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from agg_kernels.frames import (
    chosen_frames,
    fold_frames,
    frame_count,
    on_chosen_frames,
    on_frames,
    per_clip,
    steadiness,
    temporal_change,
)
from agg_kernels.losses import clip_direction_loss, range_loss, style_loss
from agg_kernels.losses.color import color_loss
from agg_kernels.objective import LossContext, evaluate


def ctx(x: torch.Tensor, step: int = 0) -> LossContext:
    return LossContext(sigma=torch.full((x.shape[0],), 1.0), x=x.clone(), family="const", step=step)


def frame_decoder(x0: torch.Tensor) -> torch.Tensor:
    """A toy decoder as the nodes' frame_by_frame gives it: one 16 x 16 image per latent frame, [B * F, 3, H, W]."""
    x = fold_frames(x0)
    x = x[:, :, -1] if x.ndim == 5 else x
    return torch.tanh(F.interpolate(x[:, :3], scale_factor=2, mode="nearest"))


def toy_encoder(images: torch.Tensor) -> torch.Tensor:
    return images.flatten(1)[:, :32]


def clip(b: int = 2, t: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 4, t, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_chosen_frames_are_distinct_sorted_and_reproducible():
    for step in range(20):
        idx = chosen_frames(17, 3, seed=5, step=step)
        assert idx == sorted(set(idx)) and len(idx) == 3 and all(0 <= i < 17 for i in idx)
        assert idx == chosen_frames(17, 3, seed=5, step=step)
    assert chosen_frames(4, 4, 0, 0) == chosen_frames(4, 9, 0, 3) == [0, 1, 2, 3]


def test_chosen_frames_change_each_step_and_cover_the_clip():
    picks = [tuple(chosen_frames(17, 2, seed=1, step=s)) for s in range(40)]
    assert len(set(picks)) > 20  # afresh each step
    assert set().union(*map(set, picks)) == set(range(17))  # every frame takes its turn
    assert [chosen_frames(17, 2, seed=s, step=0) for s in range(5)] != [chosen_frames(17, 2, 0, 0)] * 5


def test_fold_frames_is_clip_major_and_per_clip_undoes_it():
    x = clip(2, 3)
    folded = fold_frames(x)
    assert folded.shape == (6, 4, 1, 8, 8)
    assert torch.equal(folded[4, :, 0], x[1, :, 1])  # clip 1, frame 1
    values = folded.flatten(1).mean(1)
    assert torch.allclose(per_clip(values, 2), x.mean(dim=(1, 3, 4)).mean(1))
    image = torch.randn(2, 4, 8, 8)
    assert fold_frames(image) is image and torch.equal(per_clip(values[:2], 2), values[:2])


def test_on_frames_judges_and_pulls_only_the_chosen_frames():
    x0 = clip(2, 7).requires_grad_(True)
    c = ctx(clip(2, 7, seed=1), step=3)
    seen: list[torch.Tensor] = []

    def value(x, cx):
        seen.append(x.detach())
        assert cx.x.shape == x.shape  # the state is cut to the same frames
        return x.square().flatten(1).mean(1)

    judged = on_chosen_frames(value, 2, seed=9)
    terms = {"t": judged(x0, c)}
    assert terms["t"].shape == (2,)
    idx = chosen_frames(7, 2, 9, 3)
    assert seen[0].shape == (2, 4, 2, 8, 8) and torch.equal(seen[0], x0.detach()[:, :, idx])
    (grad,) = torch.autograd.grad(terms["t"].sum(), x0)
    moved = grad.abs().sum(dim=(0, 1, 3, 4)) > 0
    assert moved.nonzero().flatten().tolist() == idx


def test_on_frames_leaves_images_and_weights_alone():
    image = torch.randn(2, 4, 8, 8)
    loss = range_loss(0.3, frame_decoder)
    judged = on_frames(loss, 2, seed=0)
    assert torch.equal(evaluate(judged, image, ctx(image))["range"], evaluate(loss, image, ctx(image))["range"])
    assert [(t.name, t.weight, t.floor, t.anchor, t.region) for t in judged] == [("range", 0.3, 0.0, None, None)]
    assert judged[0].fn is not loss[0].fn  # only the value function is wrapped


def still(image: torch.Tensor, t: int) -> torch.Tensor:
    return image.unsqueeze(2).expand(-1, -1, t, -1, -1).contiguous()


def test_image_losses_give_a_still_clip_its_frames_value():
    """A clip whose frames all equal one image: every image loss gives it the image's value (its terms are each
    clip's mean over the frames judged), whichever frames are chosen."""
    image = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    video = still(image, 5)
    direction = torch.randn(32, generator=torch.Generator().manual_seed(4))
    for make in (
        lambda: clip_direction_loss(0.1, frame_decoder, toy_encoder, direction, n_cuts=3, cut_size=8, noisy_aug=False),
        lambda: style_loss(0.1, frame_decoder, toy_encoder, direction, n_cuts=3, cut_size=8),
        lambda: color_loss(0.1, frame_decoder, torch.tensor([0.3, 0.5, 0.6]), torch.tensor([0.2, 0.2, 0.3])),
        lambda: range_loss(0.1, frame_decoder),
    ):
        want = evaluate(make(), image, ctx(image))
        got = evaluate(on_frames(make(), 3, seed=2), video, ctx(video))
        for name, value in want.items():
            assert got[name].shape == (2,)
            assert torch.allclose(got[name], value, atol=1e-5), (name, got[name], value)


def test_temporal_change_and_steadiness():
    image = torch.randn(1, 4, 8, 8)
    assert float(temporal_change(still(image, 5))) == 0.0
    assert float(temporal_change(image)) == 0.0 and frame_count(image.shape) == 1 and frame_count((1, 4, 5, 8, 8)) == 5
    ramp = torch.arange(5.0).reshape(1, 1, 5, 1, 1).expand(1, 4, 5, 8, 8)
    assert torch.allclose(temporal_change(ramp), torch.tensor([1.0]))
    flicker = ramp + 2 * torch.tensor([0.0, 1, 0, 1, 0]).reshape(1, 1, 5, 1, 1)  # 0 3 2 5 4: steps 3 1 3 1
    assert torch.allclose(steadiness(flicker, ramp), torch.tensor([2.0]))
    assert torch.allclose(steadiness(ramp + 3.0, ramp), torch.tensor([1.0]))  # a shift of every frame adds none
