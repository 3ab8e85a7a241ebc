"""Recorded clean estimates along an inversion, read back at any sigma by linear interpolation."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Trajectory:
    """Clean estimates D recorded at strictly ascending noise levels.

    sigmas: [N] ascending; denoised: [N, B, C, H, W] (model latent space), denoised[i] recorded at sigmas[i].
    """

    sigmas: torch.Tensor
    denoised: torch.Tensor

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

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """[B, C, H, W] of one recorded clean estimate."""
        return tuple(self.denoised.shape[1:])  # type: ignore[return-value]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Trajectory:
        """The same trajectory with its denoised tensor moved / cast (sigmas keep their dtype)."""
        return Trajectory(self.sigmas.to(device=device), self.denoised.to(device=device, dtype=dtype))


def trajectory_at(traj: Trajectory, sigma: torch.Tensor | float) -> torch.Tensor:
    """The recorded clean estimate at `sigma`, linear in sigma between recorded levels.

    sigma: a scalar or a per-sample [B] tensor. Outside the recorded range the nearest end is used.
    Exact at recorded sigmas. Returns [B, C, H, W]: B is the trajectory's batch, or len(sigma) when the
    trajectory's batch is 1 (one source image broadcast over the run); otherwise the two agree
    (structure.check_reference checks a trajectory against the run once).
    """
    d = traj.denoised
    s_rec = traj.sigmas.to(device=d.device, dtype=torch.float64)
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

    def append(self, sigma: torch.Tensor | float, denoised: torch.Tensor) -> None:
        s = float(torch.as_tensor(sigma).reshape(-1)[0])
        if self.sigmas and s <= self.sigmas[-1]:
            raise ValueError(f"trajectory sigmas must ascend: {s} after {self.sigmas[-1]}")
        if self.denoised and denoised.shape != self.denoised[0].shape:
            raise ValueError(
                f"trajectory entry shape changed: expected {tuple(self.denoised[0].shape)}, got {tuple(denoised.shape)}"
            )
        self.sigmas.append(s)
        self.denoised.append(denoised.detach().clone().to(self.device or denoised.device))

    def build(self) -> Trajectory:
        if not self.sigmas:
            raise ValueError("no trajectory entries were recorded")
        d = torch.stack(self.denoised)
        return Trajectory(torch.tensor(self.sigmas, dtype=torch.float64, device=d.device), d)
