"""A minimal WebDriver client for headless Chromium, and helpers for the ComfyUI page.

``Browser`` drives Debian's ``chromedriver`` through the W3C WebDriver HTTP protocol with urllib
only: new session, navigate, execute (async) script, screenshot. ``scripts/setup_browser.sh``
installs chromium and chromium-driver. ``open_comfy`` opens the page of a running ComfyUI
(``agg_cli.comfy.LocalServer``).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from agg_cli.comfy import LocalServer, free_port

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


def open_comfy(browser: Browser, server: LocalServer, timeout: float = 120.0) -> None:
    """Open the ComfyUI frontend of a running `server` with the first-run dialogs off, and wait for the canvas."""
    for key, value in (("Comfy.TutorialCompleted", True), ("Comfy.Validation.Workflows", True),
                       ("LiteGraph.Canvas.LowQualityRenderingZoomThreshold", 0.1), ("Comfy.Minimap.Visible", False)):
        try:
            http_json(f"{server.url}/settings/{urllib.parse.quote(key)}", value, timeout=30)
        except (urllib.error.URLError, OSError):  # HTTP errors included: a setting the frontend lacks
            pass
    browser.get(server.url + "/")
    browser.wait_for(JS_APP_READY, timeout, "ComfyUI app")
    browser.execute(JS_PAGE_ERRORS)


def close_dialogs(browser: Browser) -> None:
    browser.execute("""
      for (const b of document.querySelectorAll('.p-dialog-close-button, .p-dialog-header-close')) b.click();
    """)

