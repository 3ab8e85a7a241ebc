"""Asymmetric Gradient Guidance (AGG) for ComfyUI: structure-preserving image translation guided by text
or a style image. ComfyUI loads the nodes through `comfy_entrypoint` (V3 API) and serves the frontend
extension in `web/` (the per-step guidance chart, the shipped example images) from WEB_DIRECTORY."""

from .nodes import AGGExtension

WEB_DIRECTORY = "./web"


async def comfy_entrypoint() -> AGGExtension:
    return AGGExtension()
