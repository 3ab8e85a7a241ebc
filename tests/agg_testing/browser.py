"""A real ComfyUI server with the pack, and a minimal WebDriver client for headless Chromium.

``ComfyServer`` starts ``main.py`` (CPU unless a GPU is present) on a free loopback port with a
models tree, its own output/temp/input/user folders, and talks to it over HTTP (urllib) and
websocket (aiohttp, already a ComfyUI dependency). ``Browser`` drives Debian's ``chromedriver``
through the W3C WebDriver HTTP protocol with urllib only: new session, navigate, execute (async)
script, screenshot. ``scripts/setup_browser.sh`` installs chromium and chromium-driver.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("AGG_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("AGG_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1600,1000",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, data: Any = None, method: str | None = None, timeout: float = 60.0) -> Any:
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, method=method or ("POST" if body is not None else "GET"))
    if body is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
    return json.loads(raw) if raw.strip() else None


def browser_available() -> bool:
    return Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()


# ---------------------------------------------------------------------------------------------------
# ComfyUI server


class ComfyServer:
    """A ComfyUI ``main.py`` subprocess. Use as a context manager or call start()/stop()."""

    def __init__(
        self,
        comfyui_dir: Path,
        work: Path,
        extra_model_paths: Path | None = None,
        *,
        python: str = sys.executable,
        cpu: bool | None = None,
        extra_args: Iterable[str] = (),
        log_path: Path | None = None,
        output_dir: Path | None = None,
    ) -> None:
        self.comfyui_dir = Path(comfyui_dir)
        self.work = Path(work)
        self.extra_model_paths = extra_model_paths
        self.python = python
        if cpu is None:
            cpu = not _has_cuda(python)
        self.cpu = cpu
        self.extra_args = list(extra_args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dirs = {k: self.work / k for k in ("output", "temp", "input", "user")}
        if output_dir is not None:
            self.dirs["output"] = Path(output_dir)
        self.log_path = log_path or (self.work / "server.log")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> ComfyServer:
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        example = self.dirs["input"] / "example.png"
        if not example.exists():
            shutil.copyfile(self.comfyui_dir / "input" / "example.png", example)
        cmd = [
            self.python, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
            "--disable-api-nodes", "--disable-auto-launch", "--database-url", "sqlite:///:memory:",
            "--output-directory", str(self.dirs["output"]), "--temp-directory", str(self.dirs["temp"]),
            "--input-directory", str(self.dirs["input"]), "--user-directory", str(self.dirs["user"]),
        ]
        if self.cpu:
            cmd.append("--cpu")
        if self.extra_model_paths is not None:
            cmd += ["--extra-model-paths-config", str(self.extra_model_paths)]
        cmd += self.extra_args
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=self.comfyui_dir, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                http_json(self.url + "/object_info/KSampler", timeout=5)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # --- HTTP API
    def get(self, path: str, timeout: float = 60.0) -> Any:
        return http_json(self.url + path, timeout=timeout)

    def post(self, path: str, data: Any, timeout: float = 60.0) -> Any:
        return http_json(self.url + path, data=data, timeout=timeout)

    def object_info(self) -> dict:
        return self.get("/object_info")

    def set_setting(self, key: str, value: Any) -> None:
        self.post(f"/settings/{urllib.parse.quote(key)}", value)

    def queue(self, prompt: dict, client_id: str | None = None) -> dict:
        req = urllib.request.Request(
            self.url + "/prompt",
            data=json.dumps({"prompt": prompt, "client_id": client_id or uuid.uuid4().hex}).encode(),
            method="POST",
        )
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:  # validation errors come back as 400 with a JSON body
            return json.loads(e.read() or b"{}")

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """Poll /history until the prompt is done; returns its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = self.get(f"/history/{prompt_id}")
            if prompt_id in h and h[prompt_id].get("status", {}).get("completed") is not None:
                entry = h[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f}s")

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        res = self.queue(prompt)
        if "prompt_id" not in res:
            raise RuntimeError(f"prompt rejected: {json.dumps(res)[:3000]}")
        return self.wait(res["prompt_id"], timeout)

    def output_images(self, entry: dict) -> list[Path]:
        out = []
        for node_out in entry.get("outputs", {}).values():
            for im in node_out.get("images", []):
                base = self.dirs["output" if im.get("type") == "output" else "temp"]
                out.append(base / im.get("subfolder", "") / im["filename"])
        return out


def _has_cuda(python: str) -> bool:
    try:
        r = subprocess.run([python, "-c", "import torch;print(torch.cuda.is_available())"],
                           capture_output=True, text=True, timeout=120)
        return r.stdout.strip().endswith("True")
    except (OSError, subprocess.TimeoutExpired):
        return False


# ---------------------------------------------------------------------------------------------------
# WebDriver


class WebDriverError(RuntimeError):
    pass


class Browser:
    """Headless Chromium through chromedriver's W3C WebDriver HTTP API."""

    def __init__(self, chromedriver: str = CHROMEDRIVER, chromium: str = CHROMIUM, flags: Iterable[str] = CHROMIUM_FLAGS):
        self.profile = tempfile.mkdtemp(prefix="agg-chromium-")
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._log = open(Path(self.profile).parent / f"agg-chromedriver-{self.port}.log", "wb")
        self.proc = subprocess.Popen([chromedriver, f"--port={self.port}"], stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                if http_json(self.base + "/status", timeout=2)["value"].get("ready"):
                    break
            except (urllib.error.URLError, OSError, KeyError, TypeError):
                pass
            if time.monotonic() > deadline:
                self.close()
                raise WebDriverError("chromedriver did not start")
            time.sleep(0.2)
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": chromium, "args": [*flags, f"--user-data-dir={self.profile}"]}}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]
        self._call("POST", f"/session/{self.session}/timeouts", {"script": 300_000, "pageLoad": 120_000})

    def _call(self, method: str, path: str, data: Any = None) -> Any:
        req = urllib.request.Request(self.base + path, method=method,
                                     data=None if data is None else json.dumps(data).encode())
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                res = json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                val = json.loads(e.read()).get("value", {})
            except ValueError:
                val = {}
            raise WebDriverError(f"{method} {path}: {val.get('error')}: {str(val.get('message'))[:2000]}") from None
        return res.get("value")

    def get(self, url: str) -> None:
        self._call("POST", f"/session/{self.session}/url", {"url": url})

    def execute(self, script: str, *args: Any) -> Any:
        return self._call("POST", f"/session/{self.session}/execute/sync", {"script": script, "args": list(args)})

    def execute_async(self, script: str, *args: Any) -> Any:
        """Runs `script` as the body of an async function: `return await ...` works; arguments are
        `arguments[0..]`. Errors come back as {"__error__": message}."""
        wrapped = (
            "const __done = arguments[arguments.length - 1];"
            "const __args = Array.prototype.slice.call(arguments, 0, -1);"
            f"(async function() {{ {script} }}).apply(null, __args)"
            ".then(v => __done(v === undefined ? null : v))"
            ".catch(e => __done({__error__: String(e && e.stack || e)}));"
        )
        res = self._call("POST", f"/session/{self.session}/execute/async", {"script": wrapped, "args": list(args)})
        if isinstance(res, dict) and "__error__" in res:
            raise WebDriverError(res["__error__"])
        return res

    def screenshot(self, path: Path | None = None) -> bytes:
        png = base64.b64decode(self._call("GET", f"/session/{self.session}/screenshot"))
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_bytes(png)
        return png

    def set_window_size(self, width: int, height: int) -> None:
        self._call("POST", f"/session/{self.session}/window/rect", {"width": width, "height": height})

    def wait_for(self, predicate_js: str, timeout: float = 60.0, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            v = self.execute(predicate_js)
            if v:
                return v
            if time.monotonic() > deadline:
                raise TimeoutError(f"page: {what} not reached in {timeout:.0f}s")
            time.sleep(0.25)

    def close(self) -> None:
        try:
            if getattr(self, "session", None):
                self._call("DELETE", f"/session/{self.session}")
        except (WebDriverError, OSError):
            pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------
# The ComfyUI page

JS_APP_READY = "return !!(window.app && window.app.graph && window.app.canvas && document.querySelector('canvas'));"

JS_PAGE_ERRORS = """
window.__aggErrors = window.__aggErrors || [];
if (!window.__aggHooked) {
  window.__aggHooked = true;
  window.addEventListener('error', e => window.__aggErrors.push(String(e.message)));
  window.addEventListener('unhandledrejection', e => window.__aggErrors.push(String(e.reason)));
}
"""

# Dialogs and toasts the frontend shows for missing nodes, missing models and load errors.
JS_VISIBLE_PROBLEMS = """
const sel = ['.comfy-missing-nodes', '.comfy-missing-models', '.p-dialog', '.comfy-modal[style*="block"]',
             '.p-toast-message-error'];
const out = [];
for (const s of sel) for (const el of document.querySelectorAll(s)) {
  if (el.offsetParent !== null || getComputedStyle(el).display !== 'none')
    out.push(s + ': ' + (el.innerText || '').slice(0, 300));
}
return out.concat(window.__aggErrors || []);
"""


def open_comfy(browser: Browser, server: ComfyServer, timeout: float = 120.0) -> None:
    """Open the ComfyUI frontend with the first-run dialogs off, and wait for the canvas."""
    for key, value in (("Comfy.TutorialCompleted", True), ("Comfy.Validation.Workflows", True),
                       ("LiteGraph.Canvas.LowQualityRenderingZoomThreshold", 0.1), ("Comfy.Minimap.Visible", False)):
        try:
            server.post(f"/settings/{urllib.parse.quote(key)}", value)
        except (urllib.error.URLError, OSError):
            pass
    browser.get(server.url + "/")
    browser.wait_for(JS_APP_READY, timeout, "ComfyUI app")
    browser.execute(JS_PAGE_ERRORS)


def close_dialogs(browser: Browser) -> None:
    browser.execute("""
      for (const b of document.querySelectorAll('.p-dialog-close-button, .p-dialog-header-close')) b.click();
    """)

