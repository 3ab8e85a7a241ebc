"""Leaving inference mode: the one way the pack makes tensors autograd may save.

ComfyUI runs a prompt under torch.inference_mode (and no_grad). A tensor made or moved there is an inference
tensor, which autograd cannot save for backward, and no gradient is recorded at all. Guidance differentiates
through a denoiser, decoders and losses in the middle of such a prompt, so every place that must make
ordinary tensors or take a gradient enters one of these contexts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def ordinary_tensors() -> torch.inference_mode:
    """A context (fresh on each call) in which new tensors are ordinary, not inference tensors, even inside
    ComfyUI's inference_mode: weights, constants and copies made there can enter autograd later."""
    return torch.inference_mode(False)


@contextmanager
def grad_enabled() -> Iterator[None]:
    """A context that allows autograd inside ComfyUI's inference_mode / no_grad."""
    with ordinary_tensors(), torch.enable_grad():
        yield


def plain(t: torch.Tensor) -> torch.Tensor:
    """A detached copy that is an ordinary tensor (not an inference tensor), so autograd may save it."""
    with ordinary_tensors():
        return t.detach().clone()
