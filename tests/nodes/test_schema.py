"""The node schemas: public ids, category, input names of the contract, and a tooltip everywhere."""

from __future__ import annotations

import pytest

CONTRACT = {
    "AGGApply": ["model", "loss", "start_percent", "end_percent", "manifold", "dds_steps", "dds_lr", "asymmetric"],
    "AGGGuider": ["model", "positive", "negative", "cfg", "loss", "start_percent", "end_percent", "manifold",
                  "dds_steps", "dds_lr", "asymmetric"],
    "AGGStructureLoss": ["weight", "source", "trajectory", "loss", "mask"],
    "AGGCLIPDirectionLoss": ["clip", "vae", "source_text", "target_text", "weight", "source_image", "loss", "decoder", "mask"],
    "AGGImageStyleLoss": ["clip", "vae", "style_image", "weight", "loss", "decoder", "mask"],
    "AGGInvert": ["model", "latent", "positive", "sigmas"],
    "AGGCLIPLoader": ["clip_name"],
    "AGGSampler": ["eta_edit", "eta", "eta_boost", "edit_end", "boost_start", "follow_guidance"],
}
# Sub-categories: where each node sits in the node library.
CATEGORY = {"AGGApply": "AGG/sampling", "AGGGuider": "AGG/sampling", "AGGInvert": "AGG/sampling", "AGGSampler": "AGG/sampling",
            "AGGStructureLoss": "AGG/losses", "AGGCLIPDirectionLoss": "AGG/losses", "AGGImageStyleLoss": "AGG/losses",
            "AGGCLIPLoader": "AGG/loaders"}
# The expert settings: their display names say so, so users know which inputs to leave alone.
EXPERT = {"manifold", "dds_steps", "dds_lr", "asymmetric", "trust_region"}


@pytest.mark.parametrize("node_id", sorted(CONTRACT))
def test_schema_contract_and_tooltips(comfy, node_id):
    cls = comfy.node_class_mappings[node_id]
    schema = cls.define_schema()
    assert schema.node_id == node_id
    assert schema.category == CATEGORY[node_id]
    assert schema.description
    names = [i.id for i in schema.inputs]
    missing = [n for n in CONTRACT[node_id] if n not in names]
    assert not missing, f"{node_id} lacks contract inputs {missing}"
    untipped = [i.id for i in schema.inputs if not i.tooltip] + [o.display_name or o.io_type for o in schema.outputs if not o.tooltip]
    assert not untipped, f"{node_id}: no tooltip on {untipped}"


def test_settings_defaults_are_valid(comfy):
    """Every widget default lies within its own bounds (a workflow saved with defaults validates)."""
    for node_id in CONTRACT:
        for i in comfy.node_class_mappings[node_id].define_schema().inputs:
            default = getattr(i, "default", None)
            lo, hi = getattr(i, "min", None), getattr(i, "max", None)
            if default is not None and lo is not None:
                assert lo <= default <= hi, f"{node_id}.{i.id} default {default} outside [{lo}, {hi}]"


@pytest.mark.parametrize("node_id", ["AGGApply", "AGGGuider"])
def test_expert_settings_are_named_as_such(comfy, node_id):
    inputs = {i.id: i for i in comfy.node_class_mappings[node_id].define_schema().inputs}
    for name in EXPERT:
        assert "(expert)" in (inputs[name].display_name or ""), name
    assert "expert" not in (inputs["end_percent"].display_name or "")


def test_loss_decoders_default_to_taesd(comfy):
    for node_id in ("AGGCLIPDirectionLoss", "AGGImageStyleLoss"):
        inputs = {i.id: i for i in comfy.node_class_mappings[node_id].define_schema().inputs}
        assert inputs["decoder"].default == "taesd"


def test_image_style_loss_takes_agg_clip_or_clip_vision(comfy):
    inputs = {i.id: i for i in comfy.node_class_mappings["AGGImageStyleLoss"].define_schema().inputs}
    assert set(inputs["clip"].get_io_type().split(",")) == {"AGG_CLIP", "CLIP_VISION"}
