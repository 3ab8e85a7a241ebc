"""Test session set-up: find the ComfyUI tree the set-up script built and make it importable."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))  # the shared `agg_testing` helpers
from agg_testing.comfy_env import COMFYUI_DIR, configure_comfy  # noqa: E402

configure_comfy(cpu=True)


# ---------------------------------------------------------------------------------------------------
# Shared ComfyUI fixtures: generated models, an in-process ComfyUI (`comfy`) and a real server
# (`comfy_server`, marked `server`). All session-scoped: model files are cached across sessions
# under $AGG_HOME/fixtures, the in-process ComfyUI loads once per test process.

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def agg_models(tmp_path_factory):
    """A ComfyUI models tree (checkpoints/, controlnet/, vae_approx/, open_clip/) linking to the
    generated fixtures: agg_testing.fixtures.ModelsTree."""
    from agg_testing.fixtures import models_dir

    return models_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def comfy(agg_models, tmp_path_factory):
    """In-process ComfyUI (agg_testing.runner.ComfySession): `comfy.run(prompt) -> RunResult`."""
    from agg_testing.runner import ComfySession

    return ComfySession(agg_models, tmp_path_factory.mktemp("comfy"))


@pytest.fixture(scope="session")
def comfy_server(agg_models, tmp_path_factory):
    """A real ComfyUI server on loopback (agg_testing.server.ComfyServer), stopped after the session."""
    from agg_testing.server import ComfyServer

    server = ComfyServer(COMFYUI_DIR, agg_models, tmp_path_factory.mktemp("server"))
    server.start()
    yield server
    server.stop()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "comfy_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.server)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and "comfy_server" in getattr(item, "fixturenames", ()):
        server = item.funcargs.get("comfy_server") if hasattr(item, "funcargs") else None
        if server is not None:
            report.sections.append(("ComfyUI server log (tail)", server.log_tail(60)))
