"""Small builders of API-format prompts ({id: {"class_type", "inputs"}}): plain data, no ComfyUI import.

    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name="v1-5-pruned-emaonly-fp16.safetensors")
    pos = g.node("CLIPTextEncode", clip=ckpt[1], text="a cat")
    ...
    prompt = g.prompt
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class NodeRef:
    """A node of a Graph; `ref[i]` is a link to its output i."""

    id: str
    class_type: str

    def __getitem__(self, index: int) -> list:
        return [self.id, index]


@dataclass
class Graph:
    prompt: dict[str, dict[str, Any]] = field(default_factory=dict)
    names: dict[str, NodeRef] = field(default_factory=dict)  # roles of nodes in stock graphs

    def node(self, class_type: str, *, node_id: str | None = None, name: str | None = None, **inputs: Any) -> NodeRef:
        """Add a node; inputs are literal values or links (`other[0]`)."""
        if node_id is None:
            node_id = str(1 + max((int(k) for k in self.prompt if k.isdigit()), default=0))
        if node_id in self.prompt:
            raise ValueError(f"node id {node_id} already used")
        self.prompt[node_id] = {"class_type": class_type, "inputs": dict(inputs)}
        ref = NodeRef(node_id, class_type)
        if name is not None:
            self.names[name] = ref
        return ref

    def __getitem__(self, name: str) -> NodeRef:
        return self.names[name]

    def set_input(self, node: NodeRef | str, **inputs: Any) -> None:
        node_id = node.id if isinstance(node, NodeRef) else node
        self.prompt[node_id]["inputs"].update(inputs)

    def consumers(self, node: NodeRef, output: int = 0) -> list[tuple[str, str]]:
        """(node id, input name) of every input linked to `node`'s output."""
        out = []
        for nid, n in self.prompt.items():
            for key, value in n["inputs"].items():
                if isinstance(value, list) and len(value) == 2 and value[0] == node.id and value[1] == output:
                    out.append((nid, key))
        return out

    def rewire(self, old: list, new: list, *, skip: str | None = None) -> None:
        """Point every input linked to `old` at `new` (except the inputs of node `skip`)."""
        for nid, n in self.prompt.items():
            if nid == skip:
                continue
            for key, value in n["inputs"].items():
                if value == old:
                    n["inputs"][key] = list(new)

    def copy(self) -> Graph:
        return Graph(copy.deepcopy(self.prompt), dict(self.names))
