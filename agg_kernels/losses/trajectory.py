"""Recorded clean estimates (and states) along an inversion, read back at any sigma by linear interpolation."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Trajectory:
    """Clean estimates D recorded at strictly ascending noise levels, and the states they were taken at.

    sigmas: [N] ascending; denoised: [N, B, C, H, W] (model latent space), denoised[i] recorded at sigmas[i];
    states: None, or [N, B, C, H, W] the inversion's state x at sigmas[i] (k-diffusion coordinates), from
    which a run that starts on the inversion can tell how far it has left it (losses.structure).
    """

    sigmas: torch.Tensor
    denoised: torch.Tensor
    states: torch.Tensor | None = None

    def __post_init__(self) -> None:
        s, d = self.sigmas, self.denoised
        if s.ndim != 1 or s.shape[0] == 0:
            raise ValueError(f"trajectory sigmas must be a non-empty 1-D tensor; got shape {tuple(s.shape)}")
        if d.ndim not in (5, 6):  # [N, B, C, T, H, W] for video-shaped image latents (Qwen-Image)
            raise ValueError(f"trajectory denoised must be [N, B, C, H, W]; got shape {tuple(d.shape)}")
        if d.shape[0] != s.shape[0]:
            raise ValueError(f"trajectory has {s.shape[0]} sigmas but {d.shape[0]} denoised entries")
        if s.shape[0] > 1 and not bool((s[1:] > s[:-1]).all()):
            raise ValueError(f"trajectory sigmas must be strictly ascending; got {s.tolist()}")
        if self.states is not None and self.states.shape != d.shape:
            raise ValueError(f"trajectory states must match its denoised entries {tuple(d.shape)}; got {tuple(self.states.shape)}")

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """[B, C, H, W] of one recorded clean estimate."""
        return tuple(self.denoised.shape[1:])  # type: ignore[return-value]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Trajectory:
        """The same trajectory with its denoised tensor (and states) moved / cast (sigmas keep their dtype)."""
        states = None if self.states is None else self.states.to(device=device, dtype=dtype)
        return Trajectory(self.sigmas.to(device=device), self.denoised.to(device=device, dtype=dtype), states)


def trajectory_at(traj: Trajectory, sigma: torch.Tensor | float) -> torch.Tensor:
    """The recorded clean estimate at `sigma`, linear in sigma between recorded levels.

    sigma: a scalar or a per-sample [B] tensor. Outside the recorded range the nearest end is used.
    Exact at recorded sigmas. Returns [B, C, H, W]: B is the trajectory's batch, or len(sigma) when the
    trajectory's batch is 1 (one source image broadcast over the run); otherwise the two agree
    (structure.check_reference checks a trajectory against the run once).
    """
    return interpolated(traj.sigmas, traj.denoised, sigma)


def trajectory_state_at(traj: Trajectory, sigma: torch.Tensor | float) -> torch.Tensor:
    """The inversion's state at `sigma`, read as trajectory_at reads its clean estimates (requires states)."""
    if traj.states is None:
        raise ValueError("this trajectory recorded no states")
    return interpolated(traj.sigmas, traj.states, sigma)


def interpolated(sigmas: torch.Tensor, stack: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """stack[i] recorded at sigmas[i], read at `sigma` (linear in sigma, nearest end outside the range)."""
    d = stack
    s_rec = sigmas.to(device=d.device, dtype=torch.float64)
    s = torch.as_tensor(sigma, device=d.device).to(torch.float64).reshape(-1)
    tb = d.shape[1]
    if s.shape[0] == 1 and tb > 1:
        s = s.expand(tb)
    b = s.shape[0]
    rows = torch.arange(b, device=d.device) if tb == b else torch.zeros(b, dtype=torch.long, device=d.device)
    if s_rec.shape[0] == 1:
        return d[0, rows]
    s = s.clamp(s_rec[0], s_rec[-1])
    lo = (torch.searchsorted(s_rec, s, right=True) - 1).clamp(0, s_rec.shape[0] - 2)
    t = (s - s_rec[lo]) / (s_rec[lo + 1] - s_rec[lo])
    t = t.to(d.dtype).reshape(b, *([1] * (d.ndim - 2)))
    return (1 - t) * d[lo, rows] + t * d[lo + 1, rows]


@dataclass
class TrajectoryRecorder:
    """Collects (sigma, D) pairs in ascending sigma order and builds a Trajectory.

    Entries are detached copies; `device` (e.g. "cpu") moves them off the accelerator as they come.
    """

    device: torch.device | str | None = None
    sigmas: list[float] = field(default_factory=list)
    denoised: list[torch.Tensor] = field(default_factory=list)
    states: list[torch.Tensor] = field(default_factory=list)

    def append(self, sigma: torch.Tensor | float, denoised: torch.Tensor, state: torch.Tensor | None = None) -> None:
        """Record D at sigma, and the state it was taken at (every entry, or none)."""
        s = float(torch.as_tensor(sigma).reshape(-1)[0])
        if self.sigmas and s <= self.sigmas[-1]:
            raise ValueError(f"trajectory sigmas must ascend: {s} after {self.sigmas[-1]}")
        if self.denoised and denoised.shape != self.denoised[0].shape:
            raise ValueError(
                f"trajectory entry shape changed: expected {tuple(self.denoised[0].shape)}, got {tuple(denoised.shape)}"
            )
        if (state is None) != (not self.states) and self.sigmas:
            raise ValueError("trajectory entries must all record their state, or none")
        self.sigmas.append(s)
        self.denoised.append(denoised.detach().clone().to(self.device or denoised.device))
        if state is not None:
            self.states.append(state.detach().clone().to(self.device or state.device))

    def build(self) -> Trajectory:
        if not self.sigmas:
            raise ValueError("no trajectory entries were recorded")
        d = torch.stack(self.denoised)
        states = torch.stack(self.states) if self.states else None
        return Trajectory(torch.tensor(self.sigmas, dtype=torch.float64, device=d.device), d, states)
