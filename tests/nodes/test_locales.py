"""locales/en/nodeDefs.json: the labels ComfyUI's frontend shows for the nodes' inputs.

The frontend labels a widget by its i18n entry `nodeDefs.<node>.inputs.<input>.name` (falling back to the input
name), not by the schema's input display_name; ComfyUI serves a pack's `locales/` folder to it. The file must say
exactly what the schemas say (display names that tell what an input does; ids unchanged).

    AGG_WRITE_LOCALES=1 pytest tests/nodes/test_locales.py    # rewrites the file from the schemas
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PACK = Path(__file__).resolve().parents[2]
LOCALE = PACK / "locales" / "en" / "nodeDefs.json"


def expected(mappings: dict) -> dict:
    out = {}
    for node_id, cls in sorted(mappings.items()):
        if not node_id.startswith("AGG") or not hasattr(cls, "define_schema") or "Test" in node_id:
            continue
        schema = cls.define_schema()
        inputs = {i.id: {"name": i.display_name} for i in schema.inputs if i.display_name}
        entry = {"display_name": schema.display_name}
        if inputs:
            entry["inputs"] = inputs
        out[node_id] = entry
    return out


def test_locale_file_says_what_the_schemas_say(comfy):
    want = expected(comfy.node_class_mappings)
    if os.environ.get("AGG_WRITE_LOCALES"):
        LOCALE.parent.mkdir(parents=True, exist_ok=True)
        LOCALE.write_text(json.dumps(want, indent=2, ensure_ascii=False) + "\n")
    got = json.loads(LOCALE.read_text())
    assert got == want, "locales/en/nodeDefs.json is out of date: rerun with AGG_WRITE_LOCALES=1"
    assert got["AGGApply"]["inputs"]["manifold"]["name"].endswith("(expert)")
