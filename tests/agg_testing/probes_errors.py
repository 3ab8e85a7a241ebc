"""Probe nodes for the error, interrupt and leak tests (registered in-process by a test fixture).

- AGGTestPoisonLatent: a LATENT with one non-finite entry (NaN or inf), for the non-finite gradient path.
- AGGTestCountModel: a clone of a MODEL whose PREDICT_NOISE calls are counted under a tag; it can
  raise ComfyUI's interrupt flag after a given number of calls, as the server's /interrupt does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Counter:
    calls: int = 0
    interrupted_at: int | None = None  # value of `calls` when the interrupt flag was raised

    @property
    def after_interrupt(self) -> int:
        return 0 if self.interrupted_at is None else self.calls - self.interrupted_at


COUNTERS: dict[str, Counter] = {}


class AGGTestPoisonLatent:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "value": (["nan", "inf"],)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "poison"
    CATEGORY = "testing"

    def poison(self, samples, value):
        s = samples["samples"].clone()
        s[:, :, 0, 0] = math.nan if value == "nan" else math.inf
        return ({**samples, "samples": s},)


class AGGTestCountModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "tag": ("STRING", {"default": "probe"}),
                "interrupt_after": ("INT", {"default": 0, "min": 0, "max": 1000}),
            },
            "optional": {"level": (["predict_noise", "calc_cond_batch"], {"default": "predict_noise"})},
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "testing"

    def patch(self, model, tag, interrupt_after, level="predict_noise"):
        import comfy.model_management
        import comfy.patcher_extension

        counter = COUNTERS.setdefault(tag, Counter())

        def count(executor, *args):
            out = executor(*args)
            counter.calls += 1
            if interrupt_after and counter.calls == interrupt_after:
                comfy.model_management.interrupt_current_processing(True)
                counter.interrupted_at = counter.calls
            return out

        # predict_noise: one call per sampler step when placed before Apply AGG; calc_cond_batch: every
        # model pass, the guidance's conditional probe included
        kind = {"predict_noise": comfy.patcher_extension.WrappersMP.PREDICT_NOISE,
                "calc_cond_batch": comfy.patcher_extension.WrappersMP.CALC_COND_BATCH}[level]
        m = model.clone()
        m.add_wrapper_with_key(kind, f"agg_test_count_{tag}", count)
        return (m,)


class AGGTestConstLatent:
    """A LATENT of constant value and a given shape (for mismatched-size sources)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "batch": ("INT", {"default": 1, "min": 1, "max": 8}),
                "channels": ("INT", {"default": 4, "min": 1, "max": 16}),
                "height": ("INT", {"default": 8, "min": 1, "max": 64}),
                "width": ("INT", {"default": 8, "min": 1, "max": 64}),
            }
        }

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, batch, channels, height, width):
        return ({"samples": torch.full((batch, channels, height, width), 0.1)},)


PROBES = {
    "AGGTestPoisonLatent": AGGTestPoisonLatent,
    "AGGTestCountModel": AGGTestCountModel,
    "AGGTestConstLatent": AGGTestConstLatent,
}


def register() -> None:
    """Add the probe nodes to ComfyUI's node registry (idempotent)."""
    import nodes

    for name, cls in PROBES.items():
        nodes.NODE_CLASS_MAPPINGS.setdefault(name, cls)
        nodes.NODE_DISPLAY_NAME_MAPPINGS.setdefault(name, name)
