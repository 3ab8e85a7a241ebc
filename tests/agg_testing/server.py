"""A real ComfyUI server process on loopback, for tests that go through HTTP.

    with ComfyServer(comfyui_dir, models, work) as srv:
        pid = srv.post_prompt(prompt)
        entry = srv.wait(pid)              # the /history entry
        srv.images(entry)                  # output image paths

The process itself is ``agg_cli.comfy.LocalServer`` (offline, no API nodes, in-memory database, its
input/output/temp/user folders in `work`, log in ``work/server.log``, stopped at exit at the latest).
This adds what tests want: ``--cpu`` by default, an extra_model_paths.yaml written from a ModelsTree
(with ComfyUI's custom_nodes folder), ComfyUI's example.png in the input folder, and small stdlib
HTTP helpers that hand back status codes and bodies as they came.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from agg_cli.comfy import LocalServer
from agg_testing.fixtures import ModelsTree, write_extra_model_paths


class ServerError(RuntimeError):
    pass


class PromptRejected(ServerError):
    """POST /prompt answered 400: `body` holds ComfyUI's error and node_errors."""

    def __init__(self, body: Any) -> None:
        super().__init__(f"prompt rejected: {json.dumps(body)[:2000]}")
        self.body = body


class ComfyServer(LocalServer):
    """`models` (a ModelsTree) is written to ``work/extra_model_paths.yaml`` at start; pass None and
    `extra_model_paths` to use a ready yaml instead. `cpu` defaults to True (the tests' models are
    CPU-sized and their numbers CPU-made); None asks torch."""

    def __init__(
        self,
        comfyui_dir: Path,
        models: ModelsTree | None,
        work: Path,
        *,
        extra_model_paths: Path | None = None,
        python: str = sys.executable,
        cpu: bool | None = True,
        extra_args: Iterable[str] = (),
        dirs: Mapping[str, Path] | None = None,
        log_path: Path | None = None,
        port: int | None = None,
    ) -> None:
        if (models is None) == (extra_model_paths is None):
            raise ValueError("give either models or extra_model_paths")
        work = Path(work)
        self.models = models
        self.yaml_path = work / "extra_model_paths.yaml" if models is not None else Path(extra_model_paths)
        super().__init__(comfyui_dir, work, log_path, self.yaml_path, python, cpu,
                         extra_args=extra_args, dirs=dirs, port=port)
        self.client_id = f"agg-tests-{uuid.uuid4().hex[:8]}"

    @property
    def input_dir(self) -> Path:
        return self.dirs["input"]

    @property
    def output_dir(self) -> Path:
        return self.dirs["output"]

    def start(self, timeout: float = 300.0) -> ComfyServer:
        self.input_dir.mkdir(parents=True, exist_ok=True)
        example = self.input_dir / "example.png"  # the stock graphs' LoadImage default
        if not example.exists():
            shutil.copyfile(self.comfyui / "input" / "example.png", example)
        if self.models is not None:
            write_extra_model_paths(self.yaml_path, self.models, custom_nodes=self.comfyui / "custom_nodes")
        super().start(timeout)
        return self

    def __enter__(self) -> ComfyServer:
        return self.start()

    # -- HTTP ---------------------------------------------------------------------------------------
    # Not agg_cli.comfy.Client: tests look at status codes and error bodies, which Client folds into
    # exceptions.

    def _request(self, method: str, path: str, data: Any = None, timeout: float = 30.0) -> tuple[int, bytes]:
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get(self, path: str, timeout: float = 30.0) -> Any:
        """GET `path`; JSON answers are decoded, others returned as bytes. Raises on HTTP errors."""
        status, raw = self._request("GET", path, timeout=timeout)
        if status >= 400:
            raise ServerError(f"GET {path}: HTTP {status}: {raw[:500]!r}")
        try:
            return json.loads(raw)
        except ValueError:
            return raw

    def post(self, path: str, data: Any, timeout: float = 30.0) -> tuple[int, Any]:
        """POST `data` as JSON; returns (status, decoded body), HTTP errors included."""
        status, raw = self._request("POST", path, data, timeout=timeout)
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw

    def post_prompt(self, prompt: dict) -> str:
        """Queue an API-format prompt; returns its prompt_id. Raises PromptRejected on validation
        errors (the body carries `error` and `node_errors`)."""
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if status != 200:
            raise PromptRejected(body)
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 120.0, poll: float = 0.1) -> dict:
        """Poll /history until the prompt finished (successfully or not); returns its entry
        ({"prompt", "outputs", "status": {"status_str", "completed", "messages"}})."""
        deadline = time.perf_counter() + timeout
        while True:
            hist = self.get(f"/history/{prompt_id}")
            entry = hist.get(prompt_id) if isinstance(hist, dict) else None
            if entry:  # ComfyUI writes the history entry when the prompt is done, ok or not
                return entry
            if self.proc is None or self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited while running {prompt_id}:\n{self.log_tail()}")
            if time.perf_counter() > deadline:
                raise ServerError(f"prompt {prompt_id} not finished after {timeout} s:\n{self.log_tail()}")
            time.sleep(poll)

    def run(self, prompt: dict, timeout: float = 120.0) -> dict:
        return self.wait(self.post_prompt(prompt), timeout=timeout)

    @staticmethod
    def errors(entry: dict) -> list[dict]:
        """The execution_error / execution_interrupted messages of a history entry."""
        msgs = entry.get("status", {}).get("messages", [])
        return [data for event, data in msgs if event in ("execution_error", "execution_interrupted")]

    def images(self, entry: dict) -> list[Path]:
        """Paths of the output images a history entry lists (type "output" or "temp")."""
        # ComfyUI puts its temp files in a "temp" folder inside --temp-directory.
        bases = {"output": self.output_dir, "temp": self.dirs["temp"] / "temp"}
        out = []
        for node_output in entry.get("outputs", {}).values():
            for img in node_output.get("images", []) or []:
                base = bases.get(img.get("type"))
                if base is not None:
                    out.append(base / img.get("subfolder", "") / img["filename"])
        return out

    def view(self, image: dict) -> bytes:
        """Bytes of an image as /view serves it (`image`: one entry of a node's "images")."""
        query = urllib.parse.urlencode(
            {"filename": image["filename"], "subfolder": image.get("subfolder", ""), "type": image.get("type", "output")}
        )
        raw = self.get(f"/view?{query}")
        if not isinstance(raw, bytes):
            raise ServerError(f"/view answered JSON: {raw}")
        return raw
