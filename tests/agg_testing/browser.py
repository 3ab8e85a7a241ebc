"""The headless-Chromium WebDriver client and the ComfyUI page helpers (their home is agg_dev.browser), and
the page's server, ``agg_testing.server.ComfyServer``, importable from here too.
"""

from __future__ import annotations

from agg_dev.browser import (
    CHROMEDRIVER,
    CHROMIUM,
    CHROMIUM_FLAGS,
    JS_APP_READY,
    JS_PAGE_ERRORS,
    JS_VISIBLE_PROBLEMS,
    Browser,
    WebDriverError,
    browser_available,
    close_dialogs,
    http_json,
    open_comfy,
)
from agg_testing.server import ComfyServer

__all__ = ["Browser", "CHROMEDRIVER", "CHROMIUM", "CHROMIUM_FLAGS", "ComfyServer", "JS_APP_READY", "JS_PAGE_ERRORS",
           "JS_VISIBLE_PROBLEMS", "WebDriverError", "browser_available", "close_dialogs", "http_json", "open_comfy"]
