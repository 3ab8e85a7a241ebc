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
    """Gradient-capable views of a diffusion model's weights, swapped in only around autograd passes.

    Each view is `ordinary` on its weight's memory, so a run holds no second copy of the weights and
    ComfyUI's own parameters are never changed."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        with torch.inference_mode(False):
            self.copies = {
                (mod_name, p_name): torch.nn.Parameter(ordinary(p.detach()), requires_grad=False)
                for mod_name, mod in module.named_modules()
                for p_name, p in mod._parameters.items()
                if p is not None
            }

    def __enter__(self):
        self.saved = {}
        mods = dict(self.module.named_modules())
        for (mod_name, p_name), view in self.copies.items():
            mod = mods[mod_name]
            self.saved[(mod_name, p_name)] = mod._parameters[p_name]
            mod._parameters[p_name] = view
        return self

    def __exit__(self, *exc):
        mods = dict(self.module.named_modules())
        for (mod_name, p_name), orig in self.saved.items():
            mods[mod_name]._parameters[p_name] = orig
        self.saved = {}
        return False
