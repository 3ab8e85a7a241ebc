"""The pack's custom socket types."""

from comfy_api.v0_0_2 import io

AGGLossType = io.Custom("AGG_LOSS")
AGGTrajectoryType = io.Custom("AGG_TRAJECTORY")
AGGClipType = io.Custom("AGG_CLIP")
