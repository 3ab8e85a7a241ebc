"""agg_cli: translate images with the pack's workflows through ComfyUI's HTTP API, from the command line.

    python -m agg_cli --image photo.jpg --source "a photo of a cat" --target "a watercolor painting of a cat" \
        --checkpoint /models/v1-5-pruned-emaonly.safetensors --clip /models/open_clip_model.safetensors

It either starts a headless ComfyUI of its own (with the given model files) or uses servers that are
already running (``--server URL``, several to spread a folder over them). Standard library only,
plus Pillow (image sizes, side-by-side) and matplotlib (loss plots, optional). ComfyUI does not import
this package: it is not part of the nodes.
"""

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    from .main import main as _main

    return _main(argv)
