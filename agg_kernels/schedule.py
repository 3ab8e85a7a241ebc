"""Where guidance runs and which eta each step uses (docs/DESIGN.md §1.4).

Two independent schedules:
  the edit window  a sigma range given as ComfyUI start / end percent (0 = the highest sigma,
                   1 = sigma 0); a step is guided for the schedule time it spends inside it.
  the eta zones    the AGG sampler's three zones by step fraction i / n_steps:
                   [0, edit_end) edit, [edit_end, boost_start) middle, [boost_start, 1] boost.

Strength is a rate over schedule time v(sigma) = sigma^2 / (alpha^2 + sigma^2), the share of the state's
variance that is noise (1 - alpha_bar of the variance-preserving schedule; 1 at pure noise, 0 at the clean
image): a guided step pulls in proportion to the schedule time it spends inside the window (`step_rate`), so
a weight gives the same edit at 20 or 60 steps.

Reference set-up (100 respaced DDIM steps, start at t = 0.6 T): the remaining 60 steps are guided
for the first 19, then run unguided, with a stochastic eta = 1 boost over the last third.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .strength import posterior_variance

# The reference run: 60 steps after starting at t = 0.6 T, the first 19 of them guided.
REFERENCE_STEPS = 60
REFERENCE_GUIDED_STEPS = 19
REFERENCE_START_T = 0.6

# Eta zones, as fractions of the run's steps.
DEFAULT_EDIT_END = REFERENCE_GUIDED_STEPS / REFERENCE_STEPS
DEFAULT_BOOST_START = 2 / 3
DEFAULT_ETA_EDIT = 0.0
DEFAULT_ETA = 0.0
DEFAULT_ETA_BOOST = 1.0

# The reference edit window in ComfyUI percent (percent p <-> timestep (1 - p) T): guidance from the
# start timestep down through the 19th of 60 steps.
REFERENCE_START_PERCENT = 1.0 - REFERENCE_START_T
REFERENCE_END_PERCENT = REFERENCE_START_PERCENT + REFERENCE_START_T * DEFAULT_EDIT_END

# Relative tolerance when matching a sigma against a schedule or a window bound: schedules are
# float32 tensors while percent_to_sigma answers in float64.
SIGMA_REL_TOL = 1e-4

Window = tuple[float, float]

# Weights are per this much schedule time: one guided step of a 20-step img2img run at denoise 0.6 (normal
# scheduler, default window) spans 0.041 of it on SD1.5 and 0.061 on a flow model, so at 20 steps a weight
# pulls per step about as hard as it says.
REFERENCE_STEP_TIME = 0.04
# A step whose overlap with the window is below this share of a reference step is not guided: schedules are
# float32 while the window's bounds are float64, so a step that starts at the window's lower end overlaps it
# by rounding.
MIN_STEP_RATE = 0.01


def check_window(start_percent: float, end_percent: float) -> None:
    """Raise a ValueError unless 0 <= start_percent < end_percent <= 1 (the rule edit_window assumes)."""
    if not 0.0 <= start_percent < end_percent <= 1.0:
        raise ValueError(
            f"the guidance window needs 0 <= start_percent < end_percent <= 1 (0 = first step, 1 = last); "
            f"got start_percent={start_percent}, end_percent={end_percent}"
        )


def edit_window(percent_to_sigma: Callable[[float], float], start_percent: float, end_percent: float) -> Window:
    """(sigma_high, sigma_low) of the guidance window, from ComfyUI's start / end percent.

    Percent 0 is the highest sigma (the start of sampling), 1 is sigma 0; the percents satisfy check_window.
    """
    sigma_high = float(percent_to_sigma(start_percent))
    sigma_low = float(percent_to_sigma(end_percent))
    return sigma_high, sigma_low


def schedule_time(sigma: float, family: str) -> float:
    """v(sigma) = sigma^2 / (alpha^2 + sigma^2) in [0, 1]: the share of the state's variance that is noise for
    unit-variance data (the posterior variance of x0 given x); falls from 1 to 0 as sampling proceeds."""
    return float(posterior_variance(max(float(sigma), 0.0), family))


def step_rate(sigma: float, sigma_next: float, window: Window, family: str) -> float:
    """How much of a step's pull the step from sigma to sigma_next gets: the schedule time it spends inside
    the window, in units of REFERENCE_STEP_TIME; 0 when that is at most MIN_STEP_RATE (a step that only
    touches the window's edge, e.g. one starting at its lower end).

    Summed over a run it is the window's length whatever the step count, so the whole run's pull does not
    depend on how finely the schedule cuts the window; a coarse schedule (4 LCM steps) whose steps straddle
    the window is guided for the part that overlaps it. A whole schedule is 1 / REFERENCE_STEP_TIME = 25
    reference steps long, and little of it lies near pure noise or near the clean image.
    """
    sigma_high, sigma_low = window
    top = min(schedule_time(sigma, family), schedule_time(sigma_high, family))
    bottom = max(schedule_time(sigma_next, family), schedule_time(sigma_low, family))
    rate = max(top - bottom, 0.0) / REFERENCE_STEP_TIME
    return rate if rate > MIN_STEP_RATE else 0.0


def sigma_values(schedule: torch.Tensor | Sequence[float]) -> list[float]:
    """A schedule (tensor or sequence) as a list of floats: the one parser of sigma schedules."""
    return [float(v) for v in (schedule.flatten().tolist() if torch.is_tensor(schedule) else schedule)]


def same_sigma(a: float, b: float) -> bool:
    """Whether two sigmas are the same schedule point (relative tolerance SIGMA_REL_TOL)."""
    return math.isclose(a, b, rel_tol=SIGMA_REL_TOL, abs_tol=1e-7)


def step_index(schedule: torch.Tensor | Sequence[float], sigma: torch.Tensor | float) -> int | None:
    """Index i of the step that starts at `sigma` (schedule[i] == sigma, i < len - 1), else None.

    The schedule's last entry ends the run and starts no step; off-schedule evaluations (heun's
    corrector, sde midpoints) give None.
    """
    s = float(torch.as_tensor(sigma).flatten()[0]) if torch.is_tensor(sigma) else float(sigma)
    for i, v in enumerate(sigma_values(schedule)[:-1]):
        if same_sigma(v, s):
            return i
    return None


def next_sigma(schedule: torch.Tensor | Sequence[float] | None, sigma: float) -> float | None:
    """The schedule entry after `sigma`, or None when `sigma` starts no step of the schedule.

    Evaluations between schedule points (heun's corrector, dpm_2 and sde midpoints, s_churn) return None
    rather than a guess.
    """
    if schedule is None:
        return None
    i = step_index(schedule, sigma)
    return None if i is None else sigma_values(schedule)[i + 1]


def following_sigma(schedule: torch.Tensor | Sequence[float] | None, sigma: float) -> float | None:
    """The first schedule entry below `sigma` (where an off-schedule evaluation's step lands)."""
    if schedule is None:
        return None
    below = [v for v in sigma_values(schedule) if v < sigma and not same_sigma(v, sigma)]
    return max(below) if below else None


def window_edit_end(schedule: torch.Tensor | Sequence[float], sigma_low: float, family: str) -> float:
    """The edit zone's end, as a step fraction, that covers exactly the steps a guidance window ending at
    sigma_low acts on: the leading steps that spend schedule time above sigma_low (step_rate's own rule, so a
    step starting at sigma_low lies below the window)."""
    values = sigma_values(schedule)
    n_steps = len(values) - 1
    if n_steps <= 0:
        return 0.0
    guided = sum(1 for s, sn in zip(values[:-1], values[1:], strict=True) if step_rate(s, sn, (s, sigma_low), family) > 0)
    return guided / n_steps


@dataclass(frozen=True)
class Zones:
    """The AGG sampler's eta in each of its three zones, and the zones' bounds as fractions of the run's steps:
    [0, edit_end) edit, [edit_end, boost_start) middle, [boost_start, 1] boost (check_zones)."""

    eta_edit: float = DEFAULT_ETA_EDIT
    eta: float = DEFAULT_ETA
    eta_boost: float = DEFAULT_ETA_BOOST
    edit_end: float = DEFAULT_EDIT_END
    boost_start: float = DEFAULT_BOOST_START


DEFAULT_ZONES = Zones()


def check_zones(zones: Zones) -> None:
    """Raise a ValueError unless 0 <= edit_end <= boost_start <= 1 (the rule zone_eta assumes)."""
    if not 0.0 <= zones.edit_end <= zones.boost_start <= 1.0:
        raise ValueError(
            f"eta zones need 0 <= edit_end <= boost_start <= 1; got edit_end={zones.edit_end}, "
            f"boost_start={zones.boost_start}"
        )


def zone_eta(i: int, n_steps: int, zones: Zones = DEFAULT_ZONES) -> float:
    """Eta of step i (0 <= i < n_steps): the zone is chosen by the step fraction i / n_steps."""
    frac = i / n_steps
    if frac < zones.edit_end:
        return float(zones.eta_edit)
    if frac < zones.boost_start:
        return float(zones.eta)
    return float(zones.eta_boost)


def schedule_rate(schedule: torch.Tensor | Sequence[float], sigma: float, window: Window, family: str) -> float:
    """The share of schedule time (step_rate) of the evaluation at `sigma` of a run of `schedule`: an evaluation
    between schedule points (heun's corrector, sde midpoints) counts to the next schedule point below."""
    sigma_next = next_sigma(schedule, sigma)
    if sigma_next is None:
        sigma_next = following_sigma(schedule, sigma)
    if sigma_next is None:
        return 0.0
    return step_rate(sigma, sigma_next, window, family)
