"""agg_cli: translate images with the pack's workflows through ComfyUI's HTTP API, from the command line.

    python -m agg_cli --image photo.jpg --source "a photo of a cat" --target "a watercolor painting of a cat" \
        --checkpoint /models/v1-5-pruned-emaonly.safetensors --clip /models/open_clip_model.safetensors

It either starts a headless ComfyUI of its own (with the given model files) or uses servers that are
already running (``--server URL``), and runs the images in order; on a Ray cluster (``--ray``, or
several ``--server``) each worker owns one ComfyUI (agg_cli.cluster, the only module that imports
Ray). Needs Pillow (image sizes, side-by-side), websocket-client (ComfyUI's event stream), tqdm
(progress bars), matplotlib (loss plots, optional) and Ray for clusters. ComfyUI does not import this
package: it is not part of the nodes.
"""

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    from .main import main as _main

    return _main(argv)
