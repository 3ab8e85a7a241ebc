"""The pack's custom socket types."""

from comfy_api.latest import io

AGGLossType = io.Custom("AGG_LOSS")
AGGTrajectoryType = io.Custom("AGG_TRAJECTORY")
AGGClipType = io.Custom("AGG_CLIP")
