"""ComfyUI glue of the AGG pack: V3 nodes calling into agg_kernels.

The V3 API is imported from its versioned module `comfy_api.v0_0_2` (present from ComfyUI 0.3.52 on, the
oldest version the tests run), not from `comfy_api.latest`, which follows whatever ComfyUI ships next.
"""

from comfy_api.v0_0_2 import ComfyExtension, io

from .apply import AGGApply, AGGGuider
from .clip_model import AGGCLIPLoader, register_folder
from .invert import AGGInvert
from .losses import AGGCLIPDirectionLoss, AGGColorLoss, AGGImageStyleLoss, AGGStructureLoss
from .sampler import AGGSampler

NODES: list[type[io.ComfyNode]] = [
    AGGApply,
    AGGGuider,
    AGGStructureLoss,
    AGGCLIPDirectionLoss,
    AGGImageStyleLoss,
    AGGColorLoss,
    AGGInvert,
    AGGCLIPLoader,
    AGGSampler,
]


class AGGExtension(ComfyExtension):
    async def on_load(self) -> None:
        register_folder()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        register_folder()  # not every ComfyUI version calls on_load; registering twice is harmless
        return NODES
