"""Video clips [B, C, T, h, w]: which frames an image loss judges at each guided step, and how steady a clip is.

Image losses (CLIP, style, colour) judge pixels. Decoding every frame of a clip at every guided step would make
the step's cost grow with the clip's length. `on_frames` instead gives each term of the loss `frames` latent
frames of the clip (it wraps each term's value function, `on_chosen_frames`), chosen afresh at each guided step by a generator seeded with (seed, step). Every evaluation within
a step sees the same frames, a rerun sees them again, and over a run every frame takes its turn.

The loss sees the chosen frames as a shorter clip [B, C, F, h, w]. Its decoder folds them into the batch
(`fold_frames`: one image per frame), and the loss averages its per-image values over each clip's frames
(`per_clip`). Every term stays one value per clip, so the chosen frames' pulls add up to one step for the
whole clip, and only the chosen frames get a gradient.

Images ([B, C, h, w], or [B, C, 1, h, w] for the families that sample one-frame video latents) pass through
unchanged: a one-frame latent is its own only frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from .objective import Loss, LossContext, TermFn

# Mixed into the frame generator's seed: the same node seed drives the cut-outs (seed + step), and the frames
# a step judges should not follow the crops it draws.
FRAME_SEED_MIX = 1_000_003


def frame_count(shape: Sequence[int]) -> int:
    """Frames of a latent of this shape: T of [B, C, T, h, w], 1 of an image latent [B, C, h, w]."""
    return int(shape[2]) if len(shape) == 5 else 1


def chosen_frames(n: int, frames: int, seed: int, step: int) -> list[int]:
    """`frames` distinct frame indices out of n, ascending, drawn for guided step `step` of a run seeded by
    `seed`; all n frames when frames >= n."""
    if frames >= n:
        return list(range(n))
    g = torch.Generator().manual_seed((int(seed) * FRAME_SEED_MIX + int(step)) % (2**63 - 1))
    return sorted(int(i) for i in torch.randperm(n, generator=g)[: max(int(frames), 1)])


def fold_frames(x: torch.Tensor) -> torch.Tensor:
    """A clip [B, C, F, h, w] as F one-frame clips per sample, [B * F, C, 1, h, w], clip-major (rows b*F ..
    b*F + F - 1 are clip b's frames in order). An image latent [B, C, h, w] is returned as it is."""
    if x.ndim != 5:
        return x
    b, c, f, h, w = x.shape
    return x.movedim(2, 1).reshape(b * f, c, 1, h, w)


def per_clip(values: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-image values [B * F] (clip-major, as fold_frames orders them) as each clip's mean, [B]. With one
    frame per clip it is the identity."""
    return values.reshape(batch, -1).mean(1)


def frames_of(x: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """The frames `idx` of a clip, [B, C, len(idx), h, w] (gradient flows back to those frames only)."""
    return x[:, :, idx]


def on_chosen_frames(fn: TermFn, frames: int, seed: int) -> TermFn:
    """A term's value function judging `frames` latent frames of a clip, drawn for each guided step (chosen_frames
    from (seed, ctx.step)); the state is cut to the same frames. An image latent is judged whole."""
    frames, seed = int(frames), int(seed)

    def judged(x0: torch.Tensor, ctx: LossContext) -> torch.Tensor:
        n = frame_count(x0.shape)
        if n <= 1:
            return fn(x0, ctx)
        idx = chosen_frames(n, frames, seed, ctx.step)
        return fn(frames_of(x0, idx), replace(ctx, x=frames_of(ctx.x, idx)))

    return judged


def on_frames(loss: Loss, frames: int, seed: int) -> Loss:
    """The loss judging `frames` frames of a clip per guided step, chosen afresh each step: each term's value
    function wrapped (on_chosen_frames); weights, anchors, floors and regions stay the term's own."""
    return tuple(replace(term, fn=on_chosen_frames(term.fn, frames, seed)) for term in loss)


def temporal_change(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute change from each frame to the next, per clip [B]: the flicker a clip shows
    (0 for a still clip; an image latent has none)."""
    if frame_count(x.shape) <= 1:
        return torch.zeros(x.shape[0], device=x.device)
    return (x[:, :, 1:] - x[:, :, :-1]).abs().flatten(1).mean(1)


def steadiness(guided: torch.Tensor, unguided: torch.Tensor) -> torch.Tensor:
    """temporal_change(guided) / temporal_change(unguided) per clip [B]: 1 = guidance added no frame-to-frame
    change, above 1 = it added flicker. A still unguided clip compares against a tiny floor."""
    return temporal_change(guided.float()) / temporal_change(unguided.float()).clamp_min(1e-12)
