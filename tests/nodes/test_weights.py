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
