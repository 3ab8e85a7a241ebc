"""What every AGG loss is: a tuple of named terms of the clean estimate at one step, each with its strength.

A term (`Term`) is frozen: its raw per-sample value `fn(x0_hat, ctx) -> [B]`, its weight (a latent-space
distance per reference step, see agg_kernels.strength; a number or a per-sample [B] tensor), and optionally
  anchor:   (x0, ctx) -> the reference its minimum lies at, which its step never passes (Structure Loss);
  floor:    the least value it can take, near which its pull fades (range, colour, style, CLIP terms);
  region:   the latent cells it acts on, [B or 1, 1, h, w] ([B or 1, 1, T or 1, h, w] on a video latent), 1 =
            acts: the term is judged at r x0 + (1 - r) stop_grad(x0) and its weight scaled per sample by
            sqrt(mean r) (agg_kernels.mask); a mask is `dataclasses.replace(term, region=...)`;
  adaptive: a rule that sets a multiplier on its weight each guided step from the previous step's raw value
            (the CLIP direction loss's); the guided step applies it (guidance.guided_delta's `previous`).
A loss (`Loss`) is a tuple of terms, each named once: `chained` joins several losses and gives a repeated name a
suffix. Multiplying a term's value by a constant changes nothing (its gradient is normalised).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from .autograd import ordinary_tensors
from .mask import at_region


@dataclass(frozen=True)
class LossContext:
    """What a loss may read besides the clean estimate.

    sigma: [B] noise level of the step; x: the sampler state at that level (model latent space);
    family: "eps", "v_prediction" or "const"; step: index of the guided step within the run;
    extra: free-form per-run values a caller wants to pass along.
    """

    sigma: torch.Tensor
    x: torch.Tensor
    family: str
    step: int = 0
    extra: Mapping[str, object] = field(default_factory=dict)


Terms = dict[str, torch.Tensor]
Weight = float | torch.Tensor
# A term's raw (unweighted) per-sample value [B] of the clean estimate, and its reference (same shape as x0).
TermFn = Callable[[torch.Tensor, LossContext], torch.Tensor]
AnchorFn = Callable[[torch.Tensor, LossContext], torch.Tensor]


def as_weight(v: float | torch.Tensor) -> Weight:
    """A term's weight as given: a per-sample tensor stays one (detached), anything else becomes a float."""
    return v.detach() if isinstance(v, torch.Tensor) else float(v)


def as_region(region: torch.Tensor) -> torch.Tensor:
    """A region as float in [0, 1] with its channel axis: [h, w], [B, h, w] or [B, 1, h, w] as [B, 1, h, w]; a
    video latent's [B or 1, 1, T or 1, h, w] as it is. An ordinary tensor even inside ComfyUI's inference mode
    (a term made during a step, e.g. with this step's adaptive weight, keeps a region autograd may save)."""
    if region.ndim not in (2, 3, 4, 5) or (region.ndim >= 4 and region.shape[1] != 1):
        raise ValueError(f"a region must be [h, w], [B, h, w], [B, 1, h, w] or [B, 1, T, h, w]; got shape "
                         f"{tuple(region.shape)}")
    with ordinary_tensors():
        r = region.detach().float().clamp(0, 1)
        return r[None, None] if r.ndim == 2 else r[:, None] if r.ndim == 3 else r


@dataclass(frozen=True)
class AdaptiveRule:
    """A weight multiplier set afresh each guided step from the term's previous raw value, per sample.

    For the CLIP direction loss (-mean cos, in [-1, 1]): a previous value above `threshold` (-0.5: cosine below
    0.5, the image does not follow the direction yet) gives `factor`; below it, 1 / factor; exactly at it, 1.
    It never compounds across steps. A non-finite previous value (a skipped step) keeps the previous multiplier;
    the first step has none and takes 1.
    """

    threshold: float = -0.5
    factor: float = 2.0

    def multiplier(self, previous_value: torch.Tensor, previous_multiplier: Weight = 1.0) -> torch.Tensor:
        """[B] float32 multipliers on the CPU, one per sample of `previous_value` ([B])."""
        prev = previous_value.detach().double().reshape(-1).cpu()
        new = torch.where(prev > self.threshold, self.factor,
                          torch.where(prev < self.threshold, 1 / self.factor, 1.0)).double()
        old = torch.as_tensor(previous_multiplier, dtype=torch.float64).reshape(-1).cpu().expand_as(new)
        return torch.where(torch.isfinite(prev), new, old).float()


@dataclass(frozen=True, eq=False)
class Term:
    """One named term of a loss (see the module docstring). `region` is kept as float in [0, 1] (as_region)."""

    name: str
    fn: TermFn
    weight: Weight = 1.0
    anchor: AnchorFn | None = None
    region: torch.Tensor | None = None
    floor: float | None = None
    adaptive: AdaptiveRule | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight", as_weight(self.weight))
        if self.region is not None:
            object.__setattr__(self, "region", as_region(self.region))
        if self.floor is not None:
            object.__setattr__(self, "floor", float(self.floor))


# A loss: its terms, each named once (chained names repeated ones).
Loss = tuple[Term, ...]


def unique_name(name: str, taken: set[str] | Mapping[str, object]) -> str:
    """`name`, or name_2, name_3, ... : the first not taken."""
    key, n = name, 2
    while key in taken:
        key, n = f"{name}_{n}", n + 1
    return key


def chained(*losses: Loss) -> Loss:
    """The losses' terms in order, as one loss; a name already taken gets a suffix ("structure", "structure_2")."""
    taken: set[str] = set()
    out = []
    for loss in losses:
        for term in loss:
            name = unique_name(term.name, taken)
            taken.add(name)
            out.append(term if name == term.name else replace(term, name=name))
    return tuple(out)


def value_of(term: Term, x0: torch.Tensor, ctx: LossContext) -> torch.Tensor:
    """The term's raw per-sample value [B] at x0, judged through its region if it has one."""
    return term.fn(x0 if term.region is None else at_region(x0, term.region), ctx)


def evaluate(loss: Loss, x0: torch.Tensor, ctx: LossContext) -> Terms:
    """{name: raw per-sample value [B]} of every term of the loss at x0."""
    return {term.name: value_of(term, x0, ctx) for term in loss}


def base_weights(loss: Loss) -> dict[str, Weight]:
    """{name: the weight it was given} (before a region's or an adaptive rule's factor)."""
    return {term.name: term.weight for term in loss}


def total(terms: Mapping[str, torch.Tensor], weights: Mapping[str, Weight] | None = None) -> torch.Tensor:
    """Sum of the terms per sample, each times its weight (1 where none is given)."""
    values = [v * (1.0 if weights is None else weights.get(k, 1.0)) for k, v in terms.items()]
    if not values:
        raise ValueError("a loss returned no terms")
    out = values[0]
    for v in values[1:]:
        out = out + v
    return out


def sample_slice(ctx: LossContext, i: int) -> LossContext:
    """The context of sample i alone (sigma and x of batch 1; a shared [1] sigma stays shared)."""
    sigma = ctx.sigma.reshape(-1)
    return LossContext(sigma=sigma[i : i + 1] if sigma.numel() > 1 else sigma, x=ctx.x[i : i + 1], family=ctx.family,
                       step=ctx.step, extra=ctx.extra)


def _stacked(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) if v.ndim <= 1 else v for v in values])


def _per_sample_fn(fns: Sequence[TermFn]) -> Callable[[torch.Tensor, LossContext], torch.Tensor]:
    def each(x0: torch.Tensor, ctx: LossContext) -> torch.Tensor:
        return _stacked([fn(x0[i : i + 1], sample_slice(ctx, i)) for i, fn in enumerate(fns)])

    return each


def _per_sample_term(parts: Sequence[Term]) -> Term:
    first = parts[0]
    weight = torch.cat([torch.as_tensor(p.weight, dtype=torch.float32).reshape(-1).cpu() for p in parts])
    anchored = [p.anchor is not None for p in parts]
    if any(anchored) and not all(anchored):
        raise ValueError(f"term {first.name!r} is anchored in some per-sample losses and not in others")
    anchor = _per_sample_fn([p.anchor for p in parts]) if all(anchored) else None  # type: ignore[misc]
    region = None
    if any(p.region is not None for p in parts):
        like = next(p.region for p in parts if p.region is not None)[:1]
        region = torch.cat([p.region if p.region is not None else torch.ones_like(like) for p in parts])
    return Term(first.name, _per_sample_fn([p.fn for p in parts]), weight, anchor, region, first.floor, first.adaptive)


def per_sample(parts: Sequence[Loss]) -> Loss:
    """Sample i of the batch judged by parts[i] alone, as if it ran in a batch of one (e.g. a CLIP loss seeing each
    image through its own mask's crop): one term per name whose value dispatches sample i to parts[i]'s term and
    whose weight and region are the parts' stacked per sample. Every part has the same terms, in the same order;
    one part is returned as it is."""
    if len(parts) == 1:
        return tuple(parts[0])
    names = [[t.name for t in p] for p in parts]
    if any(n != names[0] for n in names):
        raise ValueError(f"per-sample losses must have the same terms; got {names}")
    return tuple(_per_sample_term([p[j] for p in parts]) for j in range(len(parts[0])))
