"""Asymmetric Gradient Guidance (AGG) for ComfyUI: structure-preserving image translation guided by text
or a style image. ComfyUI loads the nodes through `comfy_entrypoint` (V3 API)."""

from .nodes import AGGExtension


async def comfy_entrypoint() -> AGGExtension:
    return AGGExtension()
