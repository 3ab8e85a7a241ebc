"""Gradient-capable weights: ordinary tensors autograd may save, on memory ComfyUI already holds.

ComfyUI runs a prompt under torch.inference_mode, so the weights it loads or moves during a prompt are
inference tensors, which autograd cannot save for backward. The pack never copies a model's weights to get
around that where a view will do: `ordinary` makes a non-inference tensor on the same memory (the weights are
frozen, so that memory is never written through it).
"""

from __future__ import annotations

import copy

import torch


def ordinary(t: torch.Tensor) -> torch.Tensor:
    """An ordinary (non-inference) tensor on the same memory as `t`: autograd may save it, and it costs nothing.
    Call outside inference mode."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


def gradient_capable(module: torch.nn.Module) -> None:
    """Replace, in place, each inference-tensor weight of `module` by an ordinary view of the same memory."""
    with torch.inference_mode(False):
        for m in module.modules():
            for name, t in list(m._parameters.items()):
                if t is not None and t.is_inference():  # a new Parameter: an inference one cannot take new data
                    m._parameters[name] = torch.nn.Parameter(ordinary(t.detach()), requires_grad=False)
            for name, t in list(m._buffers.items()):
                if t is not None and t.is_inference():
                    m._buffers[name] = ordinary(t.detach())


def gradient_copy(module: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                  leave_out: tuple[str, ...] = ()) -> torch.nn.Module:
    """A copy of `module` whose weights are ordinary (non-inference) tensors, frozen, on `device`.

    A weight already on `device` in `dtype` is shared, not copied (`ordinary`); any other is copied once,
    straight to `device` and (if floating point) `dtype`. The children named in `leave_out` are None in the
    copy and cost nothing."""
    with torch.inference_mode(False):
        memo: dict[int, object] = {}
        for name in leave_out:
            part = module._modules.get(name)
            if part is not None:
                memo[id(part)] = None
        left_out = {id(t) for name in leave_out if module._modules.get(name) is not None
                    for t in (*module._modules[name].parameters(), *module._modules[name].buffers())}
        for t in (*module.parameters(), *module.buffers()):
            if id(t) in left_out or id(t) in memo:
                continue
            want = dtype if t.is_floating_point() else t.dtype
            if t.device == torch.device(device) and t.dtype == want:
                data = ordinary(t.detach())
            else:
                data = t.detach().to(device=device, dtype=want, copy=True)
            memo[id(t)] = torch.nn.Parameter(data, requires_grad=False) if isinstance(t, torch.nn.Parameter) else data
        return copy.deepcopy(module, memo).eval()


class GradientWeights:
    """Gradient-capable views of a diffusion model's weights and buffers, swapped in only around autograd passes.

    Each view is `ordinary` on its tensor's memory, so a run holds no second copy of the weights and
    ComfyUI's own parameters and buffers are never changed."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        with torch.inference_mode(False):
            self.views = {
                (mod_name, slot, name): (torch.nn.Parameter(ordinary(t.detach()), requires_grad=False)
                                         if slot == "_parameters" else ordinary(t.detach()))
                for mod_name, mod in module.named_modules()
                for slot in ("_parameters", "_buffers")
                for name, t in getattr(mod, slot).items()
                if t is not None
            }
        self.saved: dict[tuple[str, str, str], torch.Tensor] = {}

    def _put(self, tensors: dict[tuple[str, str, str], torch.Tensor]) -> None:
        mods = dict(self.module.named_modules())
        for (mod_name, slot, name), t in tensors.items():
            getattr(mods[mod_name], slot)[name] = t

    def __enter__(self) -> GradientWeights:
        mods = dict(self.module.named_modules())
        self.saved = {key: getattr(mods[key[0]], key[1])[key[2]] for key in self.views}
        self._put(self.views)
        return self

    def __exit__(self, *exc: object) -> bool:
        self._put(self.saved)
        self.saved = {}
        return False
