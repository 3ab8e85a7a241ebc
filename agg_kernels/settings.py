"""The guidance settings of one Apply AGG / AGG Guider, named like the nodes' inputs, and their rules.

The node schemas, the workflow builder and the CLI read names and defaults from `AGGSettings`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .guidance import DEFAULT_DDS_LR, DEFAULT_DDS_STEPS
from .manifold import MANIFOLD_MODES
from .schedule import REFERENCE_END_PERCENT, check_window
from .strength import DEFAULT_TRUST


@dataclass(frozen=True)
class AGGSettings:
    start_percent: float = 0.0
    end_percent: float = round(REFERENCE_END_PERCENT, 4)
    manifold: str = "finite_difference"
    dds_steps: int = DEFAULT_DDS_STEPS
    dds_lr: float = DEFAULT_DDS_LR
    asymmetric: bool = True
    trust_region: float = DEFAULT_TRUST


SETTING_NAMES = tuple(f.name for f in fields(AGGSettings))


class SettingError(ValueError):
    """A setting that breaks its rule; `inputs` names the setting(s) as AGGSettings does."""

    def __init__(self, inputs: tuple[str, ...], message: str):
        super().__init__(message)
        self.inputs = inputs


def check_guidance(s: AGGSettings) -> None:
    """Raise a SettingError for the first setting that breaks its rule."""
    try:
        check_window(s.start_percent, s.end_percent)
    except ValueError as e:
        raise SettingError(("start_percent", "end_percent"), str(e)) from e
    if s.manifold not in MANIFOLD_MODES:
        raise SettingError(("manifold",), f"must be one of {', '.join(MANIFOLD_MODES)}, got {s.manifold!r}")
    if s.dds_steps < 0 or not 0.0 <= s.dds_lr <= 1.0:
        raise SettingError(("dds_steps", "dds_lr"), "dds_steps must not be negative and dds_lr must lie in 0..1 "
                           f"(got {s.dds_steps}, {s.dds_lr})")
    if not s.trust_region > 0:
        raise SettingError(("trust_region",), f"must be above 0 (got {s.trust_region})")
