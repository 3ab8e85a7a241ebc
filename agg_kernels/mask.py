"""Local edits: a mask (1 = the region to change) restricts what a loss judges and where it pulls.

  region      = the mask resized to the latent (or pixel) grid, values in [0, 1]
  a term's region (objective.Term.region): the term is judged at  r * x0 + (1 - r) * stop_grad(x0)
                (at_region: same values, gradient r * grad), its weight scaled by sqrt(mean r) of each sample's
                own region (region_scale), so a weight still means an RMS pull of that size per element of the
                region (a term's pull is normalised over the whole latent, see strength), whatever the other
                images' masks
  focused     = a decoder of the latent cropped to the mask's box (plus a margin) whose pixels outside the
                mask are mid-grey, so an image loss (CLIP) sees only the region it is asked to change and
                decodes only that region

Target and style losses take the region to edit; Structure Loss takes its complement (it holds the rest).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Decoder = Callable[[torch.Tensor], torch.Tensor]

# Pixels at or below this mask value count as outside the region when cropping to it.
INSIDE = 1e-3


def as_mask(mask: torch.Tensor) -> torch.Tensor:
    """A mask [H, W], [B, H, W] or [B, 1, H, W] as float [B, 1, H, W], clamped to [0, 1]."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"a mask must be [H, W], [B, H, W] or [B, 1, H, W]; got shape {tuple(mask.shape)}")
    return mask.detach().float().clamp(0, 1)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The mask as [B, 1, h, w] on a (h, w) grid: area averaging when shrinking (a latent cell is the share
    of its pixels inside), bilinear when growing."""
    m = as_mask(mask)
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    shrinking = m.shape[-2] >= size[0] and m.shape[-1] >= size[1]
    if shrinking:
        return F.adaptive_avg_pool2d(m, size)
    return F.interpolate(m, size=size, mode="bilinear", align_corners=False).clamp(0, 1)


def per_frame(mask: torch.Tensor, batch: int, frames: int) -> bool:
    """Whether a mask holds one mask per frame of a video: a batch of several masks for a run of one clip of
    several latent frames (a batch of 1 or of the run's batch is one mask per image or clip)."""
    return frames > 1 and batch == 1 and as_mask(mask).shape[0] > 1


def check_mask(mask: torch.Tensor, batch: int, frames: int = 1) -> None:
    """Raise a ValueError when the mask is empty or its batch does not fit the run's (`frames`: the latent
    frames of a video run, whose one clip may take a mask per frame)."""
    m = as_mask(mask)
    if m.shape[0] not in (1, batch) and not per_frame(m, batch, frames):
        per = " (one mask per video frame needs a run of one video)" if frames > 1 else ""
        raise ValueError(f"mask batch {m.shape[0]} does not match the run's batch {batch} (expected {batch} or "
                         f"1){per}")
    if not bool((m > INSIDE).any()):
        raise ValueError("the mask is empty (all black): nothing would be edited; paint the region to change in white")


def frame_masks(mask: torch.Tensor, frames: int) -> torch.Tensor:
    """A per-frame mask of N frames ([N, 1, H, W] after as_mask) on a clip of `frames` latent frames, as
    [frames, 1, H, W]: latent frame t holds the union of the mask frames i with ceil(i (frames - 1) / (N - 1))
    = t. N = frames maps one to one; a video's pixel frames (a causal video VAE's 1 + k (frames - 1)) give each
    latent frame the union of the k frames it encodes, the first frame its own."""
    m = as_mask(mask)
    n = m.shape[0]
    if n == frames:
        return m
    if frames == 1:
        return m.amax(0, keepdim=True)
    owner = [-(-i * (frames - 1) // (n - 1)) for i in range(n)]
    return torch.stack([m[[i for i in range(n) if owner[i] == t]].amax(0) if t in owner
                        else m[min(range(n), key=lambda i: abs(owner[i] - t))] for t in range(frames)])


def video_region(mask: torch.Tensor, batch: int, frames: int, hw: tuple[int, int]) -> torch.Tensor:
    """The mask on a video run's latent grid, [B or 1, 1, T or 1, h, w]: one mask per clip (or for all clips)
    holds for every frame; one mask per frame (per_frame) for its latent frame (frame_masks)."""
    if per_frame(mask, batch, frames):
        return resize_mask(frame_masks(mask, frames), hw).movedim(0, 1)[None]
    return resize_mask(mask, hw).unsqueeze(2)


def union_mask(mask: torch.Tensor) -> torch.Tensor:
    """Every mask of a batch together, [1, 1, H, W]: where an image loss looks when judging a video's frames
    against one mask per frame."""
    return as_mask(mask).amax(0, keepdim=True)


def region_scale(region: torch.Tensor) -> torch.Tensor:
    """sqrt(mean r) per sample ([B or 1], float32 on the CPU): the weight factor that keeps a restricted term's
    per-element pull at its weight. Per sample: a batch mean would give a small mask's image a weaker pull
    per element, and a large mask's a stronger one, than each gets alone."""
    return region.detach().float().flatten(1).mean(1).clamp_min(1e-12).sqrt().cpu()


def at_region(x0: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """r * x0 + (1 - r) * stop_grad(x0): x0's values, with gradient only where the region is (scaled by r)."""
    r = region.to(device=x0.device, dtype=x0.dtype)
    return r * x0 + (1 - r) * x0.detach()


def box(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the smallest box holding every pixel inside the mask, over the batch."""
    m = as_mask(mask).amax(dim=(0, 1)) > INSIDE
    rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
    if rows.numel() == 0:
        return 0, m.shape[0], 0, m.shape[1]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def focus(pixels: torch.Tensor, mask: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Pixels [B, 3, H, W] with everything outside the mask set to `fill` (0 = mid-grey in [-1, 1]), cropped
    to the mask's box. The mask is resized to the pixels' size."""
    m = resize_mask(mask, tuple(pixels.shape[-2:])).to(device=pixels.device, dtype=pixels.dtype)
    top, bottom, left, right = box(m)
    out = pixels * m + fill * (1 - m)
    return out[..., top:bottom, left:right]


# Latent cells kept around the mask's box when cropping before decoding: what a decoder's convolutions reach
# into from outside the box, so the pixels inside it decode as in the whole image (on the trained test model's
# decoder the loss gradient through the crop has cosine 0.9996 or more with the whole decode's at 4 cells,
# 0.996 at 2; tests/nodes/test_mask_crop.py).
MARGIN = 4


def latent_box(mask: torch.Tensor, hw: tuple[int, int], margin: int = MARGIN) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) on an (h, w) latent grid: the cells covering the mask's box (any pixel of
    them inside it), widened by `margin` cells and clipped to the grid."""
    m = as_mask(mask)
    mh, mw = m.shape[-2:]
    h, w = int(hw[0]), int(hw[1])
    top, bottom, left, right = box(m)
    return (max(0, top * h // mh - margin), min(h, -(-bottom * h // mh) + margin),
            max(0, left * w // mw - margin), min(w, -(-right * w // mw) + margin))


def focused(decode: Decoder, mask: torch.Tensor, margin: int = MARGIN) -> Decoder:
    """An image loss's view of the mask's region: the latent cropped to the mask's box (plus `margin` cells)
    and decoded, then `focus`ed with the mask cropped alike. Decoding only the box costs its share of the
    image; the gradient outside the crop is zero, as `focus` makes it outside the mask anyway."""
    m = as_mask(mask)

    def decode_region(x0: torch.Tensor) -> torch.Tensor:
        h, w = x0.shape[-2:]
        top, bottom, left, right = latent_box(m, (h, w), margin)
        pixels = decode(x0[..., top:bottom, left:right])
        # the mask on the whole image's pixel grid (as focus would resize it for the whole decode), then cropped
        ry, rx = pixels.shape[-2] // (bottom - top), pixels.shape[-1] // (right - left)
        whole = resize_mask(m, (h * ry, w * rx))
        return focus(pixels, whole[..., top * ry : bottom * ry, left * rx : right * rx])

    return decode_region
