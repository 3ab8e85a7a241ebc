"""The node schemas: public ids, category, input names of the contract, and a tooltip everywhere."""

from __future__ import annotations

import pytest

CONTRACT = {
    "AGGApply": ["model", "loss", "start_percent", "end_percent", "manifold", "dds_steps", "dds_lr", "asymmetric"],
    "AGGGuider": ["model", "positive", "negative", "cfg", "loss", "start_percent", "end_percent", "manifold",
                  "dds_steps", "dds_lr", "asymmetric"],
    "AGGStructureLoss": ["weight", "source", "trajectory", "loss"],
    "AGGCLIPDirectionLoss": ["clip", "vae", "source_text", "target_text", "weight", "source_image", "loss"],
    "AGGImageStyleLoss": ["clip", "vae", "style_image", "weight", "loss"],
    "AGGInvert": ["model", "latent", "positive", "sigmas"],
    "AGGCLIPLoader": ["clip_name"],
    "AGGSampler": ["eta_edit", "eta", "eta_boost"],
}


@pytest.mark.parametrize("node_id", sorted(CONTRACT))
def test_schema_contract_and_tooltips(comfy, node_id):
    cls = comfy.node_class_mappings[node_id]
    schema = cls.define_schema()
    assert schema.node_id == node_id
    assert schema.category == "AGG"
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
