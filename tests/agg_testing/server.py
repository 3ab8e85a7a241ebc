"""A real ComfyUI server process on loopback, for tests that go through HTTP.

    with ComfyServer(comfyui_dir, models, work) as srv:
        pid = srv.post_prompt(prompt)
        entry = srv.wait(pid)              # the /history entry
        srv.images(entry)                  # output image paths

The server runs ``main.py --cpu`` with the fixture models and the custom_nodes folder named in an
extra_model_paths.yaml, offline (HF_HUB_OFFLINE=1, no API nodes, in-memory database), with output,
temp and input folders in `work` (input holds ComfyUI's example.png). Its log goes to
``work/server.log``; ``log_tail()`` returns the end of it for failure reports. Only stdlib HTTP.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from agg_testing.fixtures import ModelsTree, write_extra_model_paths

HOST = "127.0.0.1"


class ServerError(RuntimeError):
    pass


class PromptRejected(ServerError):
    """POST /prompt answered 400: `body` holds ComfyUI's error and node_errors."""

    def __init__(self, body: Any) -> None:
        super().__init__(f"prompt rejected: {json.dumps(body)[:2000]}")
        self.body = body


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(
        self,
        comfyui_dir: Path,
        models: ModelsTree,
        work: Path,
        *,
        python: str | None = None,
        extra_args: list[str] | None = None,
        port: int | None = None,
    ) -> None:
        self.comfyui_dir = Path(comfyui_dir)
        self.models = models
        self.work = Path(work)
        self.python = python or sys.executable
        self.extra_args = list(extra_args or [])
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.client_id = f"agg-tests-{uuid.uuid4().hex[:8]}"
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self.log_path = self.work / "server.log"
        self.output_dir = self.work / "output"
        self.input_dir = self.work / "input"
        self.temp_root = self.work / "temp-root"
        self.yaml_path = self.work / "extra_model_paths.yaml"

    # -- process ------------------------------------------------------------------------------------

    def command(self) -> list[str]:
        return [
            self.python,
            str(self.comfyui_dir / "main.py"),
            "--cpu",
            "--listen",
            HOST,
            "--port",
            str(self.port),
            "--disable-api-nodes",
            "--disable-auto-launch",
            "--database-url",
            "sqlite:///:memory:",
            "--extra-model-paths-config",
            str(self.yaml_path),
            "--output-directory",
            str(self.output_dir),
            "--temp-directory",
            str(self.temp_root),
            "--input-directory",
            str(self.input_dir),
            *self.extra_args,
        ]

    def start(self, timeout: float = 180.0) -> ComfyServer:
        for d in (self.output_dir, self.input_dir, self.temp_root):
            d.mkdir(parents=True, exist_ok=True)
        example = self.input_dir / "example.png"
        if not example.exists():
            shutil.copyfile(self.comfyui_dir / "input" / "example.png", example)
        write_extra_model_paths(self.yaml_path, self.models, custom_nodes=self.comfyui_dir / "custom_nodes")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "DO_NOT_TRACK": "1"}
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=str(self.comfyui_dir),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        atexit.register(self.stop)  # no orphan server if the session dies without teardown
        deadline = t0 + timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")
            try:
                self.get("/object_info", timeout=10)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                if time.perf_counter() > deadline:
                    self.stop()
                    raise ServerError(f"ComfyUI did not answer within {timeout} s:\n{self.log_tail()}") from None
                time.sleep(0.25)
        self.startup_seconds = time.perf_counter() - t0
        return self

    def stop(self, timeout: float = 15.0) -> None:
        atexit.unregister(self.stop)
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -- HTTP ---------------------------------------------------------------------------------------

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
        out = []
        for node_output in entry.get("outputs", {}).values():
            for img in node_output.get("images", []) or []:
                base = {"output": self.output_dir, "temp": self.temp_root / "temp"}.get(img.get("type"))
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
