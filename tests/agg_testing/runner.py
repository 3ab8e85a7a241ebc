"""Run API-format prompts in this process through ComfyUI's real validation and PromptExecutor.

The set-up follows ComfyUI's own start-up (main.py) without the HTTP server: CPU mode is set before
``comfy.model_management`` is imported (tests/conftest.py does it), ``utils.extra_config`` is
imported first, the built-in extra nodes and the custom nodes (the pack is linked into ComfyUI's
custom_nodes/) are loaded once per process, fixture model folders are registered with folder_paths,
and a stub stands in for the PromptServer, recording every message the executor sends.

Usage (tests get a ready session from the ``comfy`` fixture in tests/conftest.py)::

    result = comfy.run(prompt)
    assert result.ok, result.errors
    result.images          # paths of SaveImage/PreviewImage files
    result.output("7")     # first output of node "7" (a LATENT dict, an IMAGE tensor, ...)
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agg_testing.fixtures import ModelsTree

CLIENT_ID = "agg-tests"


class LogCapture(logging.Handler):
    """Keeps the formatted log records emitted while it is attached (for error reports)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(f"{record.levelname}: {record.getMessage()}")
        except Exception:  # pragma: no cover - a bad log call must not break a test run
            pass

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


class ServerStub:
    """What PromptExecutor and the progress handlers need of a PromptServer; records messages."""

    def __init__(self) -> None:
        from aiohttp import web

        self.client_id: str | None = CLIENT_ID
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        # Advertise preview metadata so latent previews arrive with their node id.
        self.sockets_metadata: dict[str, dict] = {
            CLIENT_ID: {"feature_flags": {"supports_preview_metadata": True}}
        }
        self.messages: list[tuple[Any, Any]] = []
        self.routes = web.RouteTableDef()  # packs may register routes at import time
        self.prompt_queue = None
        try:  # ComfyUI 0.33: built-in nodes register their replacements with the server at start-up
            from app.node_replace_manager import NodeReplaceManager
        except ImportError:
            pass
        else:
            self.node_replace_manager = NodeReplaceManager()

    def send_sync(self, event: Any, data: Any, sid: str | None = None) -> None:
        self.messages.append((event, data))

    def send_progress_text(self, text: str, node_id: str, sid: str | None = None) -> None:
        self.messages.append(("progress_text", {"node": node_id, "text": text}))

    def queue_updated(self) -> None:
        pass


@dataclass
class RunResult:
    """What one prompt produced. Errors are data: validation errors (`type` "validation") and
    execution errors (`type` "execution_error" / "execution_interrupted", the executor's message)."""

    prompt_id: str
    outputs: dict[str, dict] = field(default_factory=dict)  # node id -> ui output ({"images": [...]})
    images: list[Path] = field(default_factory=list)  # files listed under a node's ui "images"
    files: list[Path] = field(default_factory=list)  # every file a ui output lists (images, latents...)
    errors: list[dict] = field(default_factory=list)
    messages: list[tuple[Any, Any]] = field(default_factory=list)
    seconds: float = 0.0
    node_outputs: dict[str, list] = field(default_factory=dict)  # node id -> outputs (lists of items)

    @property
    def ok(self) -> bool:
        return not self.errors

    def output(self, node_id: str, index: int = 0, item: int = 0) -> Any:
        """Output `index` of a node (item `item` of its output list). Needs a caching executor
        (the default): with cache_type "none" nothing is kept."""
        if node_id not in self.node_outputs:
            raise KeyError(f"no outputs kept for node {node_id!r} (kept: {sorted(self.node_outputs)})")
        return self.node_outputs[node_id][index][item]

    def events(self, name: str) -> list[Any]:
        return [data for event, data in self.messages if event == name]

    @property
    def previews(self) -> list[tuple[str, Any]]:
        """(node id, PIL image) of every latent preview sent during the run."""
        from protocol import BinaryEventTypes

        out = []
        for event, data in self.messages:
            if event == BinaryEventTypes.PREVIEW_IMAGE_WITH_METADATA:
                (_fmt, image, _size), meta = data
                out.append((meta.get("node_id"), image))
        return out

    def error_text(self) -> str:
        parts = []
        for e in self.errors:
            if e.get("type") == "validation":
                parts.append(f"validation: {e.get('error')} {e.get('node_errors')}")
            else:
                data = e.get("data", {})
                parts.append(
                    f"{e.get('type')} in node {data.get('node_id')} ({data.get('node_type')}): "
                    f"{data.get('exception_type')}: {data.get('exception_message')}\n"
                    + "".join(data.get("traceback") or [])
                )
        return "\n".join(parts)


def load_image(path: Path):
    """An image file as a ComfyUI IMAGE tensor (1, H, W, 3) in 0..1."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]


_INITIALISED: dict[str, Any] = {}


def comfyui_dir() -> Path:
    import folder_paths

    return Path(folder_paths.base_path)


def init_comfy(init_custom_nodes: bool = True) -> LogCapture:
    """Load ComfyUI's extra nodes and the custom nodes once per process; returns the captured log
    of that start-up (import errors of a pack show up there)."""
    if "log" in _INITIALISED:
        return _INITIALISED["log"]
    import comfy.cli_args

    if not comfy.cli_args.args.cpu:
        raise RuntimeError("set comfy.cli_args.args.cpu = True before importing comfy.model_management")
    # ComfyUI's own start-up imports utils.extra_config before anything else.
    importlib.import_module("utils.extra_config")
    import comfy.model_management  # noqa: F401
    import server

    import nodes

    stub = ServerStub()
    if getattr(server.PromptServer, "instance", None) is None:
        # Nodes that report through PromptServer.instance (progress text, routes) find the stub.
        server.PromptServer.instance = stub

    capture = LogCapture()
    root = logging.getLogger()
    root.addHandler(capture)
    old_level = root.level
    root.setLevel(min(old_level, logging.INFO) if old_level else logging.INFO)
    try:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=init_custom_nodes, init_api_nodes=False))
    finally:
        root.removeHandler(capture)
        root.setLevel(old_level)
    _INITIALISED["log"] = capture
    _INITIALISED["stub"] = stub
    return capture


def register_models(models: ModelsTree) -> None:
    import folder_paths

    for kind in ModelsTree.FOLDERS:
        folder_paths.add_model_folder_path(kind, str(models.folder(kind)), is_default=True)


def prepare_dirs(work: Path) -> dict[str, Path]:
    """Output, temp and input folders under `work`; input holds ComfyUI's example.png."""
    dirs = {name: Path(work) / name for name in ("output", "temp", "input")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    example = dirs["input"] / "example.png"
    if not example.exists():
        shutil.copyfile(comfyui_dir() / "input" / "example.png", example)
    return dirs


class ComfySession:
    """One in-process ComfyUI: executes prompts with a persistent executor (its cache reuses
    loaded checkpoints across runs, keyed by node inputs, as the server does)."""

    def __init__(self, models: ModelsTree, work: Path, cache_type: str = "classic") -> None:
        import folder_paths

        self.models = models
        self.dirs = prepare_dirs(work)
        folder_paths.set_output_directory(str(self.dirs["output"]))
        folder_paths.set_temp_directory(str(self.dirs["temp"]))
        folder_paths.set_input_directory(str(self.dirs["input"]))
        register_models(models)  # before the packs load, for packs that list files at import
        self.init_log = init_comfy()
        register_models(models)  # and after, in case a pack re-declared a folder
        self._install_progress_hook()
        self.cache_type = cache_type
        self.stub: ServerStub = _INITIALISED["stub"]
        self.executor = self._make_executor(cache_type)

    @staticmethod
    def _make_executor(cache_type: str):
        import execution

        # Cache kinds and the executor's cache arguments differ across ComfyUI versions (0.3.52: no
        # NONE / RAM_PRESSURE, `cache_size` instead of `cache_args`).
        names = {"classic": "CLASSIC", "none": "NONE", "lru": "LRU", "ram": "RAM_PRESSURE"}
        if not hasattr(execution.CacheType, names[cache_type]):
            raise ValueError(f"cache_type {cache_type!r} needs a newer ComfyUI")
        kind = getattr(execution.CacheType, names[cache_type])
        if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:
            return execution.PromptExecutor(_INITIALISED["stub"], cache_type=kind, cache_args={"lru": 10, "ram": 0, "ram_inactive": 0})
        return execution.PromptExecutor(_INITIALISED["stub"], cache_type=kind, cache_size=10)

    def _install_progress_hook(self) -> None:
        # The server's progress hook (main.hijack_progress), sending to the stub.
        import comfy.model_management
        import comfy.utils
        from comfy_execution.progress import get_progress_state
        from comfy_execution.utils import get_executing_context

        def hook(value, total, preview_image, prompt_id=None, node_id=None):
            stub = _INITIALISED["stub"]
            ctx = get_executing_context()
            if prompt_id is None and ctx is not None:
                prompt_id = ctx.prompt_id
            if node_id is None and ctx is not None:
                node_id = ctx.node_id
            comfy.model_management.throw_exception_if_processing_interrupted()
            prompt_id = prompt_id or stub.last_prompt_id
            node_id = node_id or stub.last_node_id
            get_progress_state().update_progress(node_id, value, total, preview_image)
            stub.send_sync("progress", {"value": value, "max": total, "prompt_id": prompt_id, "node": node_id})

        comfy.utils.set_progress_bar_global_hook(hook)

    @property
    def node_class_mappings(self) -> dict:
        import nodes

        return nodes.NODE_CLASS_MAPPINGS

    def reset_cache(self) -> None:
        self.executor.reset()

    def run(self, prompt: dict, *, fresh: bool = False) -> RunResult:
        """Validate and execute an API-format prompt. `fresh` drops the executor's cache first
        (identical nodes are otherwise served from it, as on a server)."""
        import execution
        import folder_paths

        if fresh:
            self.executor.reset()
        prompt_id = str(uuid.uuid4())
        result = RunResult(prompt_id=prompt_id)
        stub = self.stub
        stub.messages = []
        stub.last_prompt_id = prompt_id
        t0 = time.perf_counter()
        valid, error, good_outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid:
            result.errors.append({"type": "validation", "error": error, "node_errors": node_errors})
            result.seconds = time.perf_counter() - t0
            return result
        if node_errors:
            result.errors.append({"type": "validation", "error": None, "node_errors": node_errors})
        self.executor.execute(prompt, prompt_id, {"client_id": CLIENT_ID}, good_outputs)
        result.seconds = time.perf_counter() - t0
        result.messages = list(stub.messages)
        for event, data in self.executor.status_messages:
            if event in ("execution_error", "execution_interrupted"):
                result.errors.append({"type": event, "data": data})
        history = getattr(self.executor, "history_result", {}) or {}
        result.outputs = dict(history.get("outputs", {}))
        for node_output in result.outputs.values():
            for key, entries in node_output.items():
                for item in entries if isinstance(entries, list) else []:
                    if isinstance(item, dict) and "filename" in item:
                        base = folder_paths.get_directory_by_type(item.get("type", "output"))
                        if base is not None:
                            path = Path(base) / item.get("subfolder", "") / item["filename"]
                            result.files.append(path)
                            if key == "images":
                                result.images.append(path)
        for node_id in prompt:
            entry = self.executor.caches.outputs.get(node_id)
            if inspect.iscoroutine(entry):  # ComfyUI 0.33's caches are read asynchronously
                entry = asyncio.run(entry)
            outputs = getattr(entry, "outputs", entry)  # a CacheEntry; ComfyUI 0.3.52 keeps the list itself
            if outputs is not None:
                result.node_outputs[node_id] = outputs
        return result
