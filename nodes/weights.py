"""Gradient-capable weights: ordinary tensors autograd may save, on memory ComfyUI already holds.

ComfyUI runs a prompt under torch.inference_mode, so the weights it loads or moves during a prompt are
inference tensors, which autograd cannot save for backward. The pack never copies a model's weights to get
around that where a view will do: `ordinary` makes a non-inference tensor on the same memory (the weights are
frozen, so that memory is never written through it).

ComfyUI's model management also hangs its own loading state on the modules it loads: with Dynamic VRAM
(ComfyUI 0.33's default on NVIDIA GPUs) each layer holds a handle on its slot of the streamed weight
arena, its pinned host buffers and the weights last streamed to the GPU (an inference tensor on that slot),
which its forward uses in place of the module's own parameters. That state belongs to the model it was made
for: a copy never duplicates it (a duplicated handle frees ComfyUI's arena when the copy dies) and the
autograd passes see the streamed weights through ordinary views too.

This module is the nodes' one home of what makes weights and tensors usable by autograd: the constants a
loss holds (`grad_constant`), model loads and moves that keep weights ordinary (`load_ordinary`,
`cast_text_tower`), forwards autograd can go back through (`vision_embedding`, `checkpoint_blocks`) and the
errors that say it cannot (`AUTOGRAD_LIMITS`). Inference mode is left only through agg_kernels.autograd's
contexts, re-exported here: `ordinary_tensors` (new tensors are ordinary) and `grad_enabled` (that, with
autograd on).
"""

from __future__ import annotations

import copy
import types
from collections.abc import Callable, Iterator

import torch

from ..agg_kernels.autograd import grad_enabled as grad_enabled
from ..agg_kernels.autograd import ordinary_tensors as ordinary_tensors

# A module's own torch state; everything else in its __dict__ is an attribute the model's code or ComfyUI set.
TORCH_SLOTS = frozenset({"_parameters", "_buffers", "_modules", "training"})


def is_plain_tensor(t: object) -> bool:
    """A plain tensor (or Parameter) whose memory a view may share; tensor subclasses (ComfyUI's quantized
    weights) are left as they are."""
    return type(t) in (torch.Tensor, torch.nn.Parameter)


def ordinary(t: torch.Tensor) -> torch.Tensor:
    """An ordinary (non-inference) tensor on the same memory as `t`: autograd may save it, and it costs nothing.
    Call outside inference mode."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


# Functions and methods a layer may hold (hooks, bound forwards): never walked into.
ROUTINES = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.MethodWrapperType,
            types.MethodDescriptorType, types.WrapperDescriptorType)


def _holds(value: object, kind: Callable[[object], bool], depth: int = 0) -> bool:
    """`kind(value)` for `value` or anything inside the tuples, lists, sets and dicts ComfyUI keeps it in, or in
    the attributes of the plain objects it hangs on a layer (a LoRA patch of a streamed layer keeps the pin state)."""
    if kind(value):
        return True
    if depth >= 4 or isinstance(value, (torch.Tensor, torch.nn.Module, type)) or isinstance(value, ROUTINES):
        return False
    if isinstance(value, dict):
        return any(_holds(v, kind, depth + 1) for v in value.values())
    if isinstance(value, (tuple, list, set, frozenset)):
        return any(_holds(v, kind, depth + 1) for v in value)
    attrs = getattr(value, "__dict__", None)
    return isinstance(attrs, dict) and any(_holds(v, kind, depth + 1) for v in attrs.values())


def _is_handle(value: object) -> bool:
    """A handle of ComfyUI's Dynamic VRAM allocator (comfy_aimdo's weight arenas and pinned host buffers)."""
    return type(value).__module__.split(".")[0] == "comfy_aimdo"


def loading_state(module: torch.nn.Module) -> list[str]:
    """The attributes ComfyUI's Dynamic VRAM loading put on `module` itself (not its children): those holding an
    allocator handle and, on a module that has one, those holding tensors (the weights it streamed to the GPU,
    its pinned host copies). A module without a handle has none. The layers compute without them once their
    weights are in place (they then cast their own parameters)."""
    names = [n for n, v in vars(module).items() if n not in TORCH_SLOTS and _holds(v, _is_handle)]
    if not names:
        return []
    return [n for n, v in vars(module).items()
            if n not in TORCH_SLOTS and (n in names or _holds(v, lambda t: isinstance(t, torch.Tensor)))]


def gradient_capable(module: torch.nn.Module) -> None:
    """Replace, in place, each inference-tensor weight of `module` by an ordinary view of the same memory."""
    with ordinary_tensors():
        for m in module.modules():
            for name, t in list(m._parameters.items()):
                if t is not None and is_plain_tensor(t) and t.is_inference():  # a new Parameter: an inference one cannot take new data
                    m._parameters[name] = torch.nn.Parameter(ordinary(t.detach()), requires_grad=False)
            for name, t in list(m._buffers.items()):
                if t is not None and is_plain_tensor(t) and t.is_inference():
                    m._buffers[name] = ordinary(t.detach())


def gradient_copy(module: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                  leave_out: tuple[str, ...] = ()) -> torch.nn.Module:
    """A copy of `module` whose weights are ordinary (non-inference) tensors, frozen, on `device`.

    A weight already on `device` in `dtype` is shared, not copied (`ordinary`); any other is copied once,
    straight to `device` and (if floating point) `dtype`. The children named in `leave_out` are None in the
    copy and cost nothing. ComfyUI's loading state (`loading_state`) is neither copied nor kept: the copy's
    layers compute from their own parameters."""
    with ordinary_tensors():
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
            if is_plain_tensor(t) and t.device == torch.device(device) and t.dtype == want:
                data = ordinary(t.detach())
            else:
                data = t.detach().to(device=device, dtype=want, copy=True)
            memo[id(t)] = torch.nn.Parameter(data, requires_grad=False) if isinstance(t, torch.nn.Parameter) else data
        dropped: dict[str, list[str]] = {}
        for mod_name, m in module.named_modules():
            for name in loading_state(m):
                value = vars(m)[name]
                memo[id(value)] = value  # shared while copying (never duplicated), removed from the copy below
                dropped.setdefault(mod_name, []).append(name)
        out = copy.deepcopy(module, memo).eval()
        for mod_name, m in out.named_modules():
            for name in dropped.get(mod_name, ()):
                m.__dict__.pop(name, None)
        return out


class GradientWeights:
    """Gradient-capable views of a diffusion model's weights and buffers, swapped in only around autograd passes.

    The views are made afresh on each entry, on the memory the model holds at that moment (ComfyUI may have
    moved, offloaded or re-streamed its weights since the last pass), so a run never keeps ComfyUI's freed
    memory alive and ComfyUI's own parameters and buffers are never changed. Inference tensors the layers hold
    as plain attributes (the weights Dynamic VRAM streamed to the GPU, which their forward uses instead of the
    parameters) get ordinary views too. On exit each slot gets its own tensor back, unless ComfyUI replaced
    the view during the pass (a weight it streamed or patched anew), which stays."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.swapped: list[tuple[dict, str, torch.Tensor, torch.Tensor]] = []  # (slot dict, name, original, view)

    def __enter__(self) -> GradientWeights:
        swapped = []
        with ordinary_tensors():
            for m in self.module.modules():
                for slot, name, t in self._slots(m):
                    view = ordinary(t.detach())
                    if slot is m._parameters:
                        view = torch.nn.Parameter(view, requires_grad=False)
                    slot[name] = view
                    swapped.append((slot, name, t, view))
        self.swapped = swapped
        return self

    @staticmethod
    def _slots(m: torch.nn.Module) -> Iterator[tuple[dict, str, torch.Tensor]]:
        for slot in (m._parameters, m._buffers):
            for name, t in slot.items():
                if t is not None and is_plain_tensor(t):
                    yield slot, name, t
        for name, t in vars(m).items():
            if name not in TORCH_SLOTS and is_plain_tensor(t) and t.is_inference():
                yield vars(m), name, t

    def __exit__(self, *exc: object) -> bool:
        for slot, name, original, view in reversed(self.swapped):
            if slot.get(name) is view:
                slot[name] = original
        self.swapped = []
        return False


# RuntimeError messages of the model paths autograd cannot go back through: inference weights, in-place
# updates, and fused kernels without a backward (ComfyUI 0.33's comfy_kitchen rope, used by Flux).
AUTOGRAD_LIMITS = ("Inference tensors cannot be saved for backward", "modified by an inplace operation",
                   "no autograd formula was registered")


def grad_constant(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A float32 copy of `t` on `device` usable inside autograd (inference tensors cannot be saved for backward)."""
    with ordinary_tensors():
        return t.detach().to(device=device, dtype=torch.float32).clone()


def load_ordinary(patchers: list) -> None:
    """ComfyUI's load_models_gpu outside inference mode: the weights it moves onto the device are ordinary
    tensors, which the image losses can differentiate through."""
    import comfy.model_management

    with ordinary_tensors():
        comfy.model_management.load_models_gpu(patchers)


IMAGE_ONLY = ("logit_scale", "logit_bias")  # root tensors of an open_clip CLIP that the text tower does not use


def cast_text_tower(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Everything of an open_clip CLIP but `visual` (and the logit scale) to `dtype`, as ordinary tensors."""
    with ordinary_tensors():
        for name, child in model.named_children():
            if name != "visual":
                child.to(dtype)
        for name, t in (*model.named_parameters(recurse=False), *model.named_buffers(recurse=False)):
            if name not in IMAGE_ONLY and t.is_floating_point():
                t.data = t.data.to(dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask=None) -> torch.Tensor:
    """Multi-head attention on [B, T, H*d] inputs (the signature ComfyUI's CLIP attention calls)."""
    b, t, _ = q.shape
    q, k, v = (a.reshape(b, t, heads, -1).transpose(1, 2) for a in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, t, -1)


def vision_embedding(net: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The projected image embedding of ComfyUI's CLIPVisionModelProjection (CLIP ViTs), computed with
    out-of-place residuals: ComfyUI's own forward adds in place, which autograd cannot differentiate."""
    vm = net.vision_model
    x = vm.pre_layrnorm(vm.embeddings(pixel_values))
    for layer in vm.encoder.layers:
        x = x + layer.self_attn(layer.layer_norm1(x), None, attention)
        x = x + layer.mlp(layer.layer_norm2(x))
    return net.visual_projection(vm.post_layernorm(x[:, 0, :]))


def checkpointed_block_types() -> tuple[type, ...]:
    """The VAE decoder blocks `checkpoint_blocks` recomputes (those ComfyUI's diffusionmodules model has)."""
    from comfy.ldm.modules.diffusionmodules import model as blocks

    return tuple(getattr(blocks, name) for name in ("ResnetBlock", "AttnBlock", "Upsample") if hasattr(blocks, name))


def checkpoint_blocks(net: torch.nn.Module) -> torch.nn.Module:
    """Activation checkpointing of the VAE decoder's resnet, attention and upsampling blocks when a gradient is
    taken: the backward pass keeps only each block's input and recomputes its inside (one more decoder forward
    per guided step), instead of every activation at full resolution (1.5 GB for SD1.5's decoder at 256 px)."""
    from torch.utils.checkpoint import checkpoint

    kinds = checkpointed_block_types()
    for m in net.modules():
        if isinstance(m, kinds):
            forward = m.forward

            def recomputed(*args, _forward=forward, **kwargs):
                if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
                    return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
                return _forward(*args, **kwargs)

            m.forward = recomputed
    return net
