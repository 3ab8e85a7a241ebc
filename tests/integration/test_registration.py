"""The pack's nodes register in a real ComfyUI under the public ids, names and inputs of docs/DESIGN.md §3,
in-process (nodes.NODE_CLASS_MAPPINGS) and over HTTP (/object_info)."""

from __future__ import annotations

import pytest

SETTINGS = ("start_percent", "end_percent", "manifold", "dds_steps", "dds_lr", "asymmetric")

# node id -> (display name, inputs that must exist, inputs that must be optional, output types)
NODES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "AGGApply": ("Apply AGG", ("model", "loss", *SETTINGS), (), ("MODEL",)),
    "AGGGuider": ("AGG Guider", ("model", "positive", "negative", "cfg", "loss", *SETTINGS), (), ("GUIDER",)),
    "AGGStructureLoss": ("Structure Loss", ("weight",), ("source", "trajectory", "loss"), ("AGG_LOSS",)),
    "AGGCLIPDirectionLoss": (
        "CLIP Direction Loss",
        ("clip", "vae", "source_text", "target_text", "weight"),
        ("source_image", "loss"),
        ("AGG_LOSS",),
    ),
    "AGGImageStyleLoss": ("Image Style Loss", ("clip", "vae", "style_image", "weight"), ("loss",), ("AGG_LOSS",)),
    "AGGInvert": ("AGG Invert", ("model", "latent", "positive", "sigmas"), (), ("LATENT", "AGG_TRAJECTORY")),
    "AGGCLIPLoader": ("AGG CLIP Loader", ("clip_name",), (), ("AGG_CLIP",)),
    "AGGSampler": ("AGG Sampler", ("eta_edit", "eta", "eta_boost"), (), ("SAMPLER",)),
}


def check_info(node_id: str, required: dict, optional: dict, outputs: list, category: str, display: str | None):
    name, must, must_optional, out_types = NODES[node_id]
    assert category == "AGG" or category.startswith("AGG/"), f"{node_id}: category {category!r}"
    if display is not None:
        assert display == name
    all_inputs = set(required) | set(optional)
    missing = [k for k in must if k not in all_inputs]
    assert not missing, f"{node_id}: inputs {missing} missing (has {sorted(all_inputs)})"
    not_optional = [k for k in must_optional if k not in optional]
    assert not not_optional, f"{node_id}: inputs {not_optional} should be optional"
    assert tuple(outputs) == out_types, f"{node_id}: outputs {outputs}"


def pack_log(comfy) -> str:
    lines = [ln for ln in comfy.init_log.lines if "agg" in ln.lower() or "Traceback" in ln]
    return "\n".join(lines[-40:])


@pytest.mark.parametrize("node_id", sorted(NODES))
def test_node_registered_in_process(comfy, node_id):
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS.get(node_id)
    assert cls is not None, f"{node_id} not registered; custom node start-up log:\n{pack_log(comfy)}"
    assert cls.RELATIVE_PYTHON_MODULE.startswith("custom_nodes.")
    types = cls.INPUT_TYPES()
    check_info(
        node_id,
        types.get("required", {}),
        types.get("optional", {}),
        list(cls.RETURN_TYPES),
        cls.CATEGORY,
        nodes.NODE_DISPLAY_NAME_MAPPINGS.get(node_id),
    )


def test_nodes_listed_by_the_server(comfy_server):
    info = comfy_server.get("/object_info")
    missing = sorted(set(NODES) - set(info))
    assert not missing, f"/object_info lacks {missing}"
    for node_id in NODES:
        entry = info[node_id]
        check_info(
            node_id,
            entry["input"].get("required", {}),
            entry["input"].get("optional", {}),
            entry["output"],
            entry["category"],
            entry["display_name"],
        )
    assert comfy_server.startup_seconds is not None
