"""What the nodes share besides the hook: user errors, the model family check, the guidance settings and the
per-run information a loss builds itself from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import comfy.model_sampling
import torch

from ..agg_kernels.settings import AGGSettings, SettingError, check_guidance

T = TypeVar("T")

RUNS_KEY = "agg_runs"  # transformer_options entry holding the open runs of this sampling call
WINDOWS_KEY = "agg_windows"  # transformer_options entry: {patch key: (start_percent, end_percent)} of each AGG patch


class AGGError(ValueError):
    """A user-facing error; the message names the node and the input."""


def checked(node: str, inputs: str | tuple[str, ...], check: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """check(*args, **kwargs): a kernel's input rule, applied once at the node boundary; its ValueError comes
    back as an AGGError naming the node and the input(s)."""
    try:
        return check(*args, **kwargs)
    except ValueError as e:
        names = (inputs,) if isinstance(inputs, str) else inputs
        label = ("input " if len(names) == 1 else "inputs ") + " / ".join(f"'{n}'" for n in names)
        raise AGGError(f"{node}: {label}: {e}") from e


def model_family(model_sampling: Any) -> str | None:
    """The pack's coordinate family for a ComfyUI model_sampling object, None when unsupported.

    Only the relation between x, x0 and sigma matters, not the prediction type: EPS, V_PREDICTION,
    EDM and X0 all use x = x0 + sigma * eps; CONST (SD3, Flux) uses x = (1 - sigma) x0 + sigma * eps.
    """
    ms = comfy.model_sampling
    if isinstance(model_sampling, ms.CONST):
        return "const"
    if isinstance(model_sampling, ms.V_PREDICTION):
        return "v_prediction"
    if isinstance(model_sampling, ms.EPS):
        return "eps"
    return None


def require_family(model_sampling: Any, node: str, input_name: str = "model") -> str:
    family = model_family(model_sampling)
    if family is None:
        kinds = ", ".join(c.__name__ for c in type(model_sampling).__mro__[:-1])
        raise AGGError(
            f"{node}: input '{input_name}' samples with {kinds}, which AGG does not support "
            "(supported: EPS and V_PREDICTION models such as SD1.x/SD2.x/SDXL, and CONST flow models such as SD3/Flux)."
        )
    return family


def guidance_settings(node: str, **inputs: Any) -> AGGSettings:
    """The node's guidance inputs as AGGSettings, checked once (agg_kernels.settings.check_guidance)."""
    settings = AGGSettings(**inputs)
    try:
        check_guidance(settings)
    except SettingError as e:
        label = ("input " if len(e.inputs) == 1 else "inputs ") + " / ".join(f"'{n}'" for n in e.inputs)
        raise AGGError(f"{node}: {label}: {e}") from e
    return settings


@dataclass
class RunInfo:
    """What a loss may need to build itself for one sampling run; `cache` and `release` are per run."""

    model: Any  # comfy BaseModel: process_latent_in/out, latent_format, model_sampling
    family: str
    device: torch.device
    latent_shape: tuple[int, ...]
    sigmas: torch.Tensor
    cache: dict = field(default_factory=dict)
    release: list[Callable[[], None]] = field(default_factory=list)

    def cached(self, key: Any, make: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def close(self) -> None:
        for fn in reversed(self.release):
            fn()
        self.release.clear()
        self.cache.clear()
