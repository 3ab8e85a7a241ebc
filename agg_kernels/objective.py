"""What every AGG loss is: named per-sample terms of the clean estimate at one step, each with a strength.

A loss is a callable (x0_hat [B, C, H, W], context) -> {name: [B] raw value}. Its strength lives beside it,
not inside the values: `weights_of(loss)` gives each term's weight, a latent-space distance per guided step
(see agg_kernels.strength), so multiplying a loss by a constant changes nothing. A term may also name an
anchor (`anchors_of`): a reference its minimum lies at, which its step never passes (Structure Loss), or a
floor (`floors_of`): the least value it can take, near which its pull fades (range, colour, CLIP terms).
A weight is a number or a per-sample [B] tensor (a mask's or an adaptive multiplier's per image).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch


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
# A loss maps (x0_hat [B, C, H, W], context) to named, raw (unweighted), per-sample terms ([B] each).
Loss = Callable[[torch.Tensor, LossContext], Terms]
Anchors = Callable[[torch.Tensor, LossContext], Terms]
Weight = float | torch.Tensor


def as_weight(v: float | torch.Tensor) -> Weight:
    """A term's weight as given: a per-sample tensor stays one (detached), anything else becomes a float."""
    return v.detach() if isinstance(v, torch.Tensor) else float(v)


class WeightedLoss:
    """A loss with its strength: `weights` maps each term to its weight; `anchor`, if given, maps
    (x0, ctx) to {term: reference} for terms whose step must never pass their reference; `floors` maps
    terms to the least value they can take (their pull fades as they reach it, agg_kernels.strength)."""

    def __init__(self, fn: Loss, weights: Mapping[str, float | torch.Tensor], anchor: Anchors | None = None,
                 floors: Mapping[str, float] | None = None):
        self.fn, self._weights, self._anchor = fn, {k: as_weight(v) for k, v in weights.items()}, anchor
        self._floors = {k: float(v) for k, v in (floors or {}).items()}

    def __call__(self, x0: torch.Tensor, ctx: LossContext) -> Terms:
        return self.fn(x0, ctx)

    @property
    def weights(self) -> dict[str, Weight]:
        return dict(self._weights)

    @property
    def floors(self) -> dict[str, float]:
        return dict(self._floors)

    def anchors(self, x0: torch.Tensor, ctx: LossContext) -> Terms:
        return {} if self._anchor is None else self._anchor(x0, ctx)


def weights_of(loss: Loss) -> dict[str, Weight]:
    """Each term's weight (a number or a [B] tensor); a term the loss does not weigh has weight 1."""
    return dict(getattr(loss, "weights", {}) or {})


def floors_of(loss: Loss) -> dict[str, float]:
    """{term: the least value it can take} for the terms that declare one (none for a plain callable)."""
    return dict(getattr(loss, "floors", {}) or {})


def anchors_of(loss: Loss, x0: torch.Tensor, ctx: LossContext) -> Terms:
    """{term: reference} for the loss's anchored terms (none for a plain callable)."""
    fn = getattr(loss, "anchors", None)
    return fn(x0, ctx) if fn is not None else {}


def total(terms: Mapping[str, torch.Tensor], weights: Mapping[str, Weight] | None = None) -> torch.Tensor:
    """Sum of the terms per sample, each times its weight (1 where none is given)."""
    values = [v * (1.0 if weights is None else weights.get(k, 1.0)) for k, v in terms.items()]
    if not values:
        raise ValueError("a loss returned no terms")
    out = values[0]
    for v in values[1:]:
        out = out + v
    return out


def _unique(name: str, taken: Mapping[str, object] | set[str]) -> str:
    key, n = name, 2
    while key in taken:
        key, n = f"{name}_{n}", n + 1
    return key


class Composed:
    """The union of several losses' terms, weights and anchors (a repeated name gets a suffix)."""

    def __init__(self, losses: tuple[Loss, ...]):
        self.losses = losses

    def _merge(self, parts: list[Mapping[str, object]]) -> dict[str, object]:
        out: dict[str, object] = {}
        for part in parts:
            for name, value in part.items():
                out[_unique(name, out)] = value
        return out

    def _names(self) -> list[dict[str, str]]:
        """Per part, its own term names -> the composed names (from the parts' weights)."""
        taken: set[str] = set()
        maps = []
        for loss in self.losses:
            m = {}
            for name in weights_of(loss):
                m[name] = _unique(name, taken)
                taken.add(m[name])
            maps.append(m)
        return maps

    def __call__(self, x0: torch.Tensor, ctx: LossContext) -> Terms:
        return self._merge([loss(x0, ctx) for loss in self.losses])  # type: ignore[return-value]

    @property
    def weights(self) -> dict[str, Weight]:
        return self._merge([weights_of(loss) for loss in self.losses])  # type: ignore[return-value]

    @property
    def floors(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for loss, names in zip(self.losses, self._names(), strict=True):
            for name, floor in floors_of(loss).items():
                out[names.get(name, name)] = floor
        return out

    def anchors(self, x0: torch.Tensor, ctx: LossContext) -> Terms:
        out: Terms = {}
        for loss, names in zip(self.losses, self._names(), strict=True):
            for name, ref in anchors_of(loss, x0, ctx).items():
                out[names.get(name, name)] = ref
        return out


def compose(*losses: Loss) -> Composed:
    """A loss whose terms, weights, anchors and floors are the union of the given losses'."""
    return Composed(losses)


def sample_slice(ctx: LossContext, i: int) -> LossContext:
    """The context of sample i alone (sigma and x of batch 1; a shared [1] sigma stays shared)."""
    sigma = ctx.sigma.reshape(-1)
    return LossContext(sigma=sigma[i : i + 1] if sigma.numel() > 1 else sigma, x=ctx.x[i : i + 1], family=ctx.family,
                       step=ctx.step, extra=ctx.extra)


class PerSample:
    """One loss per sample of the batch (e.g. a CLIP loss seeing each image through its own mask's crop):
    sample i is judged by losses[i] alone, as if it ran in a batch of one. Every part has the same terms."""

    def __init__(self, losses: tuple[Loss, ...]):
        self.losses = losses

    def _stack(self, parts: list[Terms]) -> Terms:
        return {k: torch.cat([p[k].reshape(-1) if p[k].ndim <= 1 else p[k] for p in parts]) for k in parts[0]}

    def __call__(self, x0: torch.Tensor, ctx: LossContext) -> Terms:
        return self._stack([loss(x0[i : i + 1], sample_slice(ctx, i)) for i, loss in enumerate(self.losses)])

    @property
    def weights(self) -> dict[str, Weight]:
        parts = [weights_of(loss) for loss in self.losses]
        return {k: torch.cat([torch.as_tensor(p[k], dtype=torch.float32).reshape(-1).cpu() for p in parts]) for k in parts[0]}

    def anchors(self, x0: torch.Tensor, ctx: LossContext) -> Terms:
        parts = [anchors_of(loss, x0[i : i + 1], sample_slice(ctx, i)) for i, loss in enumerate(self.losses)]
        return self._stack(parts) if parts and parts[0] else {}

    @property
    def floors(self) -> dict[str, float]:
        return floors_of(self.losses[0])


def per_sample_loss(losses: list[Loss] | tuple[Loss, ...]) -> Loss:
    """Sample i of the batch judged by losses[i] alone (see PerSample); one loss is returned as it is."""
    return losses[0] if len(losses) == 1 else PerSample(tuple(losses))
