"""nodes/weights.py: ordinary views of inference weights, in place or in a copy, share memory and carry gradients."""

from __future__ import annotations

import pytest
import torch
from agg_testing.probes import pack_module


@pytest.fixture(scope="module")
def weights(comfy):
    return pack_module("nodes.weights")


def inference_net() -> torch.nn.Module:
    """A small net whose weights are inference tensors, as ComfyUI leaves a model it loaded inside a prompt."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2)).eval()
    with torch.inference_mode():
        net.to(torch.float64).to(torch.float32)  # a move made inside inference mode: new, inference data
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def input_gradient(net: torch.nn.Module) -> torch.Tensor:
    x = torch.randn(3, 4, requires_grad=True)
    (g,) = torch.autograd.grad(net(x).square().sum(), x)
    return g


def test_ordinary_is_a_free_view_autograd_may_save(weights):
    with torch.inference_mode():
        t = torch.randn(3, 5)[:, 1:]
    v = weights.ordinary(t)
    assert t.is_inference() and not v.is_inference()
    assert v.data_ptr() == t.data_ptr() and v.stride() == t.stride() and torch.equal(v, t)


def test_gradient_capable_swaps_inference_weights_for_views_in_place(weights):
    net = inference_net()
    assert all(p.is_inference() for p in net.parameters())
    memory = [t.data_ptr() for t in (*net.parameters(), *net.buffers())]
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        input_gradient(net)
    weights.gradient_capable(net)
    assert not any(t.is_inference() for t in (*net.parameters(), *net.buffers()))
    assert [t.data_ptr() for t in (*net.parameters(), *net.buffers())] == memory
    assert torch.isfinite(input_gradient(net)).all()


def test_gradient_copy_shares_what_it_can_and_leaves_parts_out(weights):
    net = inference_net()
    same = weights.gradient_copy(net, torch.device("cpu"), torch.float32, leave_out=("1",))
    assert same[1] is None and net[1] is not None  # left out of the copy only
    assert same[0].weight.data_ptr() == net[0].weight.data_ptr()  # shared: already on the device in the dtype
    double = weights.gradient_copy(net, torch.device("cpu"), torch.float64)
    assert double[0].weight.dtype == torch.float64 and double[0].weight.data_ptr() != net[0].weight.data_ptr()
    assert net[0].weight.dtype == torch.float32  # the source is untouched
    copy = weights.gradient_copy(net, torch.device("cpu"), torch.float32)
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(copy(x), net(x))
    assert torch.isfinite(input_gradient(copy)).all()


def test_gradient_weights_swap_views_in_and_restore_the_model(weights):
    net = inference_net()
    originals = dict((*net.named_parameters(), *net.named_buffers()))
    with weights.GradientWeights(net):
        inside = dict((*net.named_parameters(), *net.named_buffers()))
        assert not any(t.is_inference() for t in inside.values())
        assert all(t.data_ptr() == originals[n].data_ptr() for n, t in inside.items())
        assert torch.isfinite(input_gradient(net)).all()  # BatchNorm saves its running statistics for backward
    assert all(t is originals[n] for n, t in (*net.named_parameters(), *net.named_buffers()))  # ComfyUI's own are back


# -- ComfyUI's loading state on the modules (Dynamic VRAM, ComfyUI 0.33) ----------------------------------


class Handle:
    """Stands in for a handle of ComfyUI's Dynamic VRAM allocator (comfy_aimdo's arenas, host buffers): made only
    by ComfyUI, freed by its destructor. Every object of the class is counted, however it was made."""

    made = 0

    def __new__(cls, *args, **kwargs):
        Handle.made += 1
        return super().__new__(cls)


Handle.__module__ = "comfy_aimdo.model_vbar"


class LowVramPatchLike:
    """A layer's LoRA patch as a streamed layer holds it: callable, keeping the layer's pin state."""

    def __init__(self, pin_state: dict):
        self._pin_state = pin_state

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        return w


class StreamedLinear(torch.nn.Linear):
    """A layer as Dynamic VRAM leaves it: a handle on its arena slot, pinned host state, and the weight last streamed
    to the device (an inference tensor, made during the prompt) which its forward uses instead of its parameter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = getattr(self, "_v_weight", None)
        return torch.nn.functional.linear(x, self.weight if w is None else w, self.bias)


def streamed_net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(StreamedLinear(4, 8), torch.nn.Tanh(), StreamedLinear(8, 2)).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    handle = Handle()
    net.dynamic_vbars = {"cuda:0": handle}
    for m in (net[0], net[2]):
        m._v = (handle, 4096, 512)
        m._pin_state = {"weights": (Handle(), [], [-1], [0], [0], {})}
        m._pins = {"weights": {"pin": torch.zeros(3), "registered": True}}
        m.weight_lowvram_function = LowVramPatchLike(m._pin_state)
        m.seed_key = "layer"
        with torch.inference_mode():
            m._v_weight = m.weight.detach().clone()  # same values, the streamed copy
    return net


def test_gradient_copy_never_duplicates_comfyuis_loading_state(weights):
    net = streamed_net()
    made = Handle.made
    copy = weights.gradient_copy(net, torch.device("cpu"), torch.float32)
    assert Handle.made == made, "the copy duplicated an allocator handle (its destructor would free ComfyUI's arena)"
    for m in (copy, copy[0], copy[2]):
        assert not any(hasattr(m, n) for n in ("dynamic_vbars", "_v", "_pin_state", "_pins", "_v_weight",
                                               "weight_lowvram_function"))
    assert copy[0].seed_key == "layer"  # plain attributes are copied as before
    assert net[0]._v[0] is net.dynamic_vbars["cuda:0"] and net[0]._v_weight.is_inference()  # the source is untouched
    assert copy[0].weight.data_ptr() == net[0].weight.data_ptr()  # weights still shared, not copied
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(copy(x), net(x))
    assert torch.isfinite(input_gradient(copy)).all()


def test_gradient_weights_cover_streamed_weights_and_follow_moved_storage(weights):
    net = streamed_net()
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        input_gradient(net)  # the streamed weight is what the layer computes with
    gw = weights.GradientWeights(net)
    streamed = net[0]._v_weight
    with gw:
        inside = net[0]._v_weight
        assert not inside.is_inference() and inside.data_ptr() == streamed.data_ptr()
        assert torch.isfinite(input_gradient(net)).all()
    assert net[0]._v_weight is streamed  # ComfyUI's own tensor is back
    # ComfyUI moves a weight between passes (an offload, a re-stream): the next pass's view is on the new memory.
    with torch.inference_mode():
        net[2]._v_weight = net[2]._v_weight.clone()
    moved = net[2]._v_weight
    with gw:
        assert net[2]._v_weight.data_ptr() == moved.data_ptr()
        # ComfyUI streams a layer anew during the pass: its new tensor stays after the pass.
        fresh = torch.zeros_like(moved)
        net[2]._v_weight = fresh
    assert net[2]._v_weight is fresh
    assert net[0]._v_weight is streamed
