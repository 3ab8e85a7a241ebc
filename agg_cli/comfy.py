"""ComfyUI over HTTP (urllib) and its websocket event stream (websocket-client), and a headless
ComfyUI process of our own.

``Client`` speaks the server API a browser uses: ``/object_info``, ``/upload/image``, ``/prompt``,
``/history/{id}``, ``/view`` and the ``/ws?clientId=`` event stream. Any failure to reach the server
(refused, reset, timed out, closed socket) raises ``ServerLost``, so callers can move the work to
another server; a prompt the server rejects or fails raises ``JobFailed``.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ServerLost(ConnectionError):
    """The server could not be reached, or stopped answering."""


class JobFailed(RuntimeError):
    """The server ran the prompt and reported an error (or refused it)."""


def normalise_url(url: str) -> str:
    """'127.0.0.1:8188' -> 'http://127.0.0.1:8188'; raises ValueError for what is not an http(s) URL."""
    if "://" not in url:
        url = "http://" + url
    u = urllib.parse.urlparse(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"{url!r} is not an http(s)://host:port URL")
    try:
        u.port  # noqa: B018 - raises on a bad port
    except ValueError as e:
        raise ValueError(f"{url!r}: {e}") from None
    return url.rstrip("/")


# ---------------------------------------------------------------------------------------------------
# HTTP


@dataclass
class Progress:
    """What a running prompt reported: the sampler's steps and the AGG terms."""

    value: int = 0
    total: int = 0
    node: str | None = None
    terms: list[dict] = field(default_factory=list)


class Client:
    """One ComfyUI server. Not thread-safe: one Client per worker thread."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.url = normalise_url(url)
        self.timeout = timeout
        self.client_id = f"agg-cli-{uuid.uuid4().hex[:12]}"
        self.ws: Any = None  # a websocket.WebSocket once connected

    def __repr__(self) -> str:
        return f"Client({self.url})"

    def _request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                 timeout: float | None = None) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            if path.startswith("/prompt") and e.code == 400:
                raise JobFailed(_prompt_error(raw)) from None
            raise JobFailed(f"{method} {path}: HTTP {e.code}: {raw[:300]!r}") from None
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            raise ServerLost(f"{self.url}: {getattr(e, 'reason', e)}") from None

    def get_json(self, path: str, timeout: float | None = None) -> Any:
        raw = self._request("GET", path, timeout=timeout)
        try:
            return json.loads(raw)
        except ValueError:
            raise ServerLost(f"{self.url}{path}: not a JSON answer (is this a ComfyUI server?)") from None

    def object_info(self) -> dict:
        return self.get_json("/object_info", timeout=max(self.timeout, 60))

    def upload_image(self, image: Path | bytes, name: str, subfolder: str = "agg_cli") -> str:
        """Upload an image (a local file, or its bytes) into the server's input folder; returns the
        LoadImage value."""
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        boundary = uuid.uuid4().hex
        parts = []
        for key, value in (("type", "input"), ("subfolder", subfolder), ("overwrite", "true")):
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        raw = self._request("POST", "/upload/image", b"".join(parts),
                            {"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout=max(self.timeout, 120))
        info = json.loads(raw)
        return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]

    def connect(self) -> None:
        """Open the event stream (``/ws?clientId=``) that ComfyUI sends this client's progress on."""
        if self.ws is not None:
            return
        websocket = _websocket()
        ws_url = self.url.replace("https://", "wss://").replace("http://", "ws://")
        ws = websocket.WebSocket()
        try:
            ws.connect(f"{ws_url}/ws?clientId={self.client_id}", timeout=self.timeout)
        except (websocket.WebSocketException, OSError) as e:
            raise ServerLost(f"{self.url}: websocket: {e}") from None
        self.ws = ws

    def close(self) -> None:
        if self.ws is not None:
            try:
                self.ws.close(timeout=1)
            except Exception:  # noqa: BLE001 - a connection that is already gone closes as well
                pass
            self.ws = None

    def _recv(self, timeout: float) -> str | bytes | None:
        """The next websocket message (text as str, binary as bytes; websocket-client answers pings),
        or None when none came within `timeout`. Raises ServerLost when the connection is gone."""
        websocket = _websocket()
        try:
            self.ws.settimeout(timeout)
            return self.ws.recv()
        except websocket.WebSocketTimeoutException:
            return None
        except (websocket.WebSocketException, OSError) as e:
            self.ws = None
            raise ServerLost(f"{self.url}: websocket: {e or type(e).__name__}") from None

    def queue(self, prompt: dict) -> str:
        body = json.dumps({"prompt": prompt, "client_id": self.client_id}).encode()
        res = json.loads(self._request("POST", "/prompt", body, {"Content-Type": "application/json"}))
        if "prompt_id" not in res:
            raise JobFailed(_prompt_error(json.dumps(res).encode()))
        return res["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        h = self.get_json(f"/history/{prompt_id}")
        return h.get(prompt_id) if isinstance(h, dict) else None

    def run(self, prompt: dict, on_progress: Callable[[Progress], None] | None = None,
            timeout: float = 3600.0, poll: float = 2.0) -> tuple[dict, Progress]:
        """Queue `prompt` and follow it to the end; returns (history entry, progress with agg.terms).
        One prompt at a time per Client."""
        self.connect()
        pid = self.queue(prompt)
        prog = Progress()
        deadline = time.monotonic() + timeout
        next_poll = time.monotonic() + poll
        while True:
            msg = self._recv(0.5)
            if isinstance(msg, str):
                try:
                    m = json.loads(msg)
                except ValueError:
                    m = {}
                kind, data = m.get("type"), m.get("data") or {}
                if data.get("prompt_id") not in (None, pid):
                    continue
                if kind == "progress":
                    prog.value, prog.total, prog.node = int(data.get("value", 0)), int(data.get("max", 0)), data.get("node")
                    if on_progress:
                        on_progress(prog)
                elif kind == "agg.terms":
                    prog.terms.append(data)
                    if on_progress:
                        on_progress(prog)
                elif kind == "execution_error":
                    raise JobFailed(f"node {data.get('node_id')} ({data.get('node_type')}): "
                                    f"{data.get('exception_type', 'error')}: {data.get('exception_message', '')}".strip())
                elif kind == "execution_interrupted":
                    raise JobFailed("the run was interrupted on the server")
                elif (kind == "executing" and data.get("node") is None and data.get("prompt_id") == pid) or \
                        (kind == "execution_success" and data.get("prompt_id") == pid):
                    next_poll = 0.0
            now = time.monotonic()
            if now >= next_poll:
                entry = self.history(pid)
                if entry:  # ComfyUI writes the history entry when the prompt has finished, ok or not
                    status = entry.get("status", {})
                    if status.get("status_str") == "error":
                        errs = [d for e, d in status.get("messages", []) if e == "execution_error"]
                        d = errs[0] if errs else {}
                        raise JobFailed(f"node {d.get('node_id')} ({d.get('node_type')}): {d.get('exception_message', 'error')}")
                    return entry, prog
                next_poll = now + poll
            if now > deadline:
                raise JobFailed(f"not finished after {timeout:.0f} s")

    def images(self, entry: dict) -> list[tuple[str, dict]]:
        """(node id, image ref) of every image a history entry lists, output images first."""
        out = []
        for node_id, node_out in (entry.get("outputs") or {}).items():
            for im in node_out.get("images", []) or []:
                out.append((node_id, im))
        out.sort(key=lambda t: t[1].get("type") != "output")
        return out

    def fetch(self, image: dict) -> bytes:
        q = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                    "type": image.get("type", "output")})
        return self._request("GET", f"/view?{q}", timeout=max(self.timeout, 120))


def _websocket() -> Any:
    try:
        import websocket  # websocket-client
    except ImportError:
        raise RuntimeError("agg_cli needs websocket-client: pip install websocket-client") from None
    return websocket


def _prompt_error(raw: bytes) -> str:
    """ComfyUI's validation answer as one readable line per problem."""
    try:
        body = json.loads(raw)
    except ValueError:
        return raw[:500].decode(errors="replace")
    lines = []
    err = body.get("error")
    if isinstance(err, dict):
        lines.append(f"{err.get('message', '')} {err.get('details', '')}".strip())
    for node_id, ne in (body.get("node_errors") or {}).items():
        for e in ne.get("errors", []):
            lines.append(f"node {node_id} ({ne.get('class_type')}): {e.get('message')}: {e.get('details')}")
    return "; ".join(x for x in lines if x) or json.dumps(body)[:500]


# ---------------------------------------------------------------------------------------------------
# A ComfyUI of our own


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_cuda(python: str) -> bool:
    """Whether torch under `python` sees a CUDA device (asked in a subprocess: that python may not be ours)."""
    try:
        r = subprocess.run([python, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True, timeout=180)
        return r.stdout.strip().endswith("True")
    except (OSError, subprocess.TimeoutExpired):
        return False


def _die_with_parent() -> None:
    """In the child, before exec: Linux sends it SIGTERM when the process that started it dies (a
    worker killed without a chance to stop its ComfyUI leaves none behind)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class LocalServer:
    """``main.py`` of a ComfyUI folder on a free loopback port: offline, no API nodes, an in-memory
    database, ``--cpu`` unless torch sees CUDA, its input/output/temp/user folders under `work` (or as
    `dirs` overrides them), the models named in `extra_model_paths`, its log at `log_path`
    (default ``work/server.log``). ``extra_args`` go last on the command line. With ``die_with_parent``
    the server is stopped by the kernel when the process that started it dies (Linux).

    ``start()`` returns once the server answers (``startup_seconds`` says how long that took) or raises
    RuntimeError with the log's tail; ``stop()`` may be called any number of times, and runs at exit
    if nobody called it."""

    DIRS = ("input", "output", "temp", "user")

    def __init__(self, comfyui: Path, work: Path, log_path: Path | None = None, extra_model_paths: Path | None = None,
                 python: str = sys.executable, cpu: bool | None = None, *, extra_args: Iterable[str] = (),
                 dirs: Mapping[str, Path] | None = None, port: int | None = None,
                 die_with_parent: bool = False) -> None:
        self.comfyui, self.work = Path(comfyui), Path(work)
        self.log_path = Path(log_path) if log_path is not None else self.work / "server.log"
        self.extra_model_paths, self.python = extra_model_paths, python
        self.cpu = (not has_cuda(python)) if cpu is None else cpu
        self.extra_args = list(extra_args)
        self.dirs = {k: self.work / k for k in self.DIRS}
        self.dirs.update({k: Path(v) for k, v in (dirs or {}).items()})
        if set(self.dirs) != set(self.DIRS):
            raise ValueError(f"dirs: only {', '.join(self.DIRS)} can be set, not {sorted(set(self.dirs) - set(self.DIRS))}")
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self.die_with_parent = die_with_parent

    def command(self) -> list[str]:
        """The ``main.py`` command line (run with the ComfyUI folder as working directory)."""
        d = self.dirs
        cmd = [self.python, "main.py", "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
               "--disable-api-nodes", "--database-url", "sqlite:///:memory:",
               "--input-directory", str(d["input"]), "--output-directory", str(d["output"]),
               "--temp-directory", str(d["temp"]), "--user-directory", str(d["user"])]
        if self.cpu:
            cmd.append("--cpu")
        if self.extra_model_paths:
            cmd += ["--extra-model-paths-config", str(self.extra_model_paths)]
        return cmd + self.extra_args

    def start(self, timeout: float = 300.0) -> LocalServer:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"ComfyUI at {self.url} is already running")
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", DO_NOT_TRACK="1")
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:  # the child keeps its own handle; ours closes here
            self.proc = subprocess.Popen(self.command(), cwd=self.comfyui, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env,
                                         preexec_fn=_die_with_parent if self.die_with_parent else None)
        atexit.register(self.stop)  # no orphan server when the caller dies without stopping it
        client = Client(self.url, timeout=5)
        deadline = t0 + timeout
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise RuntimeError(f"ComfyUI exited with code {code} while starting; "
                                   f"its log: {self.log_path}\n{self.log_tail()}")
            try:
                # ComfyUI listens only once its nodes are loaded, so any answer means ready.
                client.get_json("/system_stats", timeout=5)
                break
            except (ServerLost, JobFailed):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s; "
                                       f"its log: {self.log_path}\n{self.log_tail()}") from None
                time.sleep(0.25)
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self, timeout: float = 20.0) -> None:
        atexit.unregister(self.stop)
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
