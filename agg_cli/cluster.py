"""Translating on a Ray cluster (``--ray [ADDRESS]``, or several ``--server``): imported only then.

Each worker is a Ray actor that owns one ComfyUI: either one it starts on its node (listening on
127.0.0.1 only, one per GPU: the actor asks Ray for ``num_gpus=1`` where the cluster has GPUs, one
CPU otherwise), or a ``--server`` URL the user already runs (one actor per URL). Every image is one
call of ``ComfyWorker.translate``; its result images come back to the CLI, which writes the output
folder as on one machine.

Faults are Ray's: a worker whose ComfyUI dies mid-image ends its own process, Ray restarts the actor
(a fresh ComfyUI; ``max_restarts``) and runs the call again on it (``max_task_retries``); when a
worker cannot come back, its image goes to another worker. An image that fails on its own (the
server refused or failed its graph) is an ordinary result and is not retried. Results are written
only by the CLI, once per image, so a retried image is never written twice.

A Ray cluster this module starts itself (``--ray`` with no address, or several ``--server``) has
token authentication on (``RAY_AUTH_MODE=token``, a fresh random token unless ``RAY_AUTH_TOKEN`` is
set) and no dashboard: Ray's ports answer only to processes that hold the token.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .comfy import Client, JobFailed, LocalServer, ServerLost
from .work import ImageTask, Outcome, RunSpec, Translator

INSTALL_HINT = ("Ray is not installed: pip install 'asymmetric-gradient-guidance[cluster]' "
                "(or pip install -r requirements-cluster.txt in the pack's folder)")


@dataclass
class WorkerSpec:
    """How a worker gets its ComfyUI: wrap `url`, or start the ComfyUI in `comfyui` with the model
    files in `models` (``--checkpoint`` etc.: paths that must exist on every node)."""

    url: str | None = None
    comfyui: str | None = None
    python: str | None = None
    models: dict[str, str] = field(default_factory=dict)  # MODEL_INPUTS key -> model file
    vae_approx: str | None = None
    cpu: bool | None = None
    work_dir: str | None = None  # where started ComfyUIs keep their folders and log (default: a temporary one)
    # The CLI's own OMP_NUM_THREADS (None: unset). Ray sets it to the actor's CPU count in workers; the
    # ComfyUI gets the CLI's instead, so that it computes as a ComfyUI started on one machine does.
    omp_threads: str | None = field(default_factory=lambda: os.environ.get("OMP_NUM_THREADS"))


@dataclass
class WorkerStats:
    name: str
    where: str = ""
    done: int = 0
    failed: int = 0
    busy_seconds: float = 0.0
    lost: int = 0  # images this worker lost its ComfyUI (or itself) under
    gone: bool = False  # Ray could not bring it back
    error: str | None = None


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RuntimeError(INSTALL_HINT) from None
    return ray


def connect(address: str | None, num_cpus: int) -> bool:
    """Connect to the Ray cluster at `address` ('auto', 'ray://host:10001', 'host:6379'), or start a
    local one (`address` empty or None) with `num_cpus` CPUs, token authentication and no dashboard.
    Uses the connection this process already has, if any. True when a local Ray was started here."""
    pack_root = str(Path(__file__).resolve().parent.parent)
    started = not address
    if started and "ray" not in sys.modules:
        # Read by Ray when it is imported: the head, its workers and this driver share the token.
        os.environ["RAY_AUTH_MODE"] = "token"
        if not os.environ.get("RAY_AUTH_TOKEN") and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = import_ray()
    if ray.is_initialized():
        return False
    # The workers import this package from the same folder (the pack must be at the same path on every node).
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(
        p for p in (pack_root, os.environ.get("PYTHONPATH", "")) if p)}}
    if started:
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            raise RuntimeError("a Ray cluster started by agg_cli must use token authentication "
                               "(RAY_AUTH_MODE=token), not " + repr(os.environ.get("RAY_AUTH_MODE")))
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env=runtime_env,
                 configure_logging=False)
    else:
        ray.init(address=address, log_to_driver=False, runtime_env=runtime_env, configure_logging=False)
    return started


def cluster_gpus() -> int:
    return int(import_ray().cluster_resources().get("GPU", 0))


def default_workers() -> int:
    """One worker per GPU in the cluster; without GPUs one per node."""
    ray = import_ray()
    return cluster_gpus() or max(1, sum(1 for n in ray.nodes() if n.get("Alive")))


class ComfyWorker:
    """A Ray actor around one ComfyUI (see the module's doc). Its calls run one at a time."""

    def __init__(self, name: str, wspec: WorkerSpec, spec: RunSpec, events: Any) -> None:
        import ray

        self.name, self.events = name, events
        ctx = ray.get_runtime_context()
        self.restarted = bool(ctx.was_current_actor_reconstructed)
        self.host = socket.gethostname()
        self.server: LocalServer | None = None
        self.own_work: Path | None = None
        if wspec.url:
            url = wspec.url
            Client(url, timeout=10).get_json("/system_stats")  # raises ServerLost when it is not there
        else:
            self.server = self._start(wspec)
            url = self.server.url
        self.client = Client(url)
        self.translator = Translator(self.client, spec)

    def _start(self, wspec: WorkerSpec) -> LocalServer:
        from .main import write_models_tree  # noqa: PLC0415 - the worker's node builds its own tree

        if wspec.work_dir:
            base = Path(wspec.work_dir)
            base.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=base))
        else:
            work = self.own_work = Path(tempfile.mkdtemp(prefix=f"agg-{self.name}-"))
        assert wspec.comfyui is not None
        yaml = write_models_tree({k: Path(v) for k, v in wspec.models.items()},
                                 Path(wspec.vae_approx) if wspec.vae_approx else None, Path(wspec.comfyui), work)
        server = LocalServer(Path(wspec.comfyui), work / "server", work / "server.log", yaml,
                             python=wspec.python or sys.executable, cpu=wspec.cpu, die_with_parent=True)
        if wspec.omp_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)  # the ComfyUI inherits this actor's environment
        else:
            os.environ["OMP_NUM_THREADS"] = wspec.omp_threads
        server.start()
        (work / "comfyui.pid").write_text(str(server.proc.pid if server.proc else ""))
        return server

    def describe(self) -> dict:
        return {"name": self.name, "where": self.where(), "restarted": self.restarted,
                "startup_seconds": self.server.startup_seconds if self.server else None,
                "log": str(self.server.log_path) if self.server else None}

    def where(self) -> str:
        return f"{self.name}@{self.host} ({self.client.url})"

    def check(self, graphs: list[dict], used: dict) -> list[str]:
        """Problems of these graphs on this worker's ComfyUI (missing nodes, models, samplers)."""
        from . import graph as G

        try:
            info = self.client.object_info()
        except (ServerLost, JobFailed) as e:
            return [f"{self.where()}: not reachable ({e})"]
        seen: list[str] = []
        for g in graphs:
            for p in G.check_against_server(g, info, self.client.url, used):
                if p not in seen:
                    seen.append(p)
        return seen

    def _emit(self, event: tuple) -> None:
        try:
            self.events.put_nowait(event)
        except Exception:  # noqa: BLE001 - progress is best effort; the result still comes back
            pass

    def translate(self, task: ImageTask) -> Outcome:
        self._emit(("start", task.index, self.name, self.where()))
        where = self.where()
        try:
            outcome = self.translator(task, lambda *a: self._emit(("step", where, *a)))
        except ServerLost as e:
            # The ComfyUI is gone: end this worker so that Ray restarts it (a fresh ComfyUI) and runs
            # the image again.
            self._emit(("lost", task.index, self.name, str(e)))
            self.shutdown()
            os._exit(1)
        outcome.where = where
        return outcome

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.own_work is not None:
            shutil.rmtree(self.own_work, ignore_errors=True)  # the temporary folder made above
            self.own_work = None


def start_workers(wspecs: list[WorkerSpec], spec: RunSpec, events: Any) -> list[tuple[str, Any]]:
    """One actor per WorkerSpec: (name, handle)."""
    ray = import_ray()
    gpus = cluster_gpus()
    actor_cls = ray.remote(ComfyWorker)
    out = []
    for i, w in enumerate(wspecs):
        name = f"worker{i}"
        if w.url:  # the work happens on the user's server
            opts: dict[str, Any] = {"num_cpus": 0, "max_restarts": 1, "max_task_retries": 1}
        elif gpus:
            w.cpu = False if w.cpu is None else w.cpu
            opts = {"num_gpus": 1, "num_cpus": 0, "max_restarts": 2, "max_task_retries": 2}
        else:
            w.cpu = True
            opts = {"num_cpus": 1, "max_restarts": 2, "max_task_retries": 2}
        out.append((name, actor_cls.options(name=None, **opts).remote(name, w, spec, events)))
    return out


def make_events() -> Any:
    from ray.util.queue import Queue

    return Queue(actor_options={"num_cpus": 0})


def drain(events: Any) -> list[tuple]:
    from ray.util.queue import Empty

    try:
        n = events.qsize()
        return list(events.get_nowait_batch(n)) if n else []
    except Empty:
        return []


OnEvent = Callable[[tuple], None]
OnOutcome = Callable[[Outcome, list[dict]], None]


def run_images(workers: list[tuple[str, Any]], tasks: list[ImageTask], events: Any, on_event: OnEvent,
               on_outcome: OnOutcome, load: Callable[[ImageTask], ImageTask] = lambda t: t,
               ) -> tuple[list[WorkerStats], float]:
    """Every task on the workers, one in flight per worker (`load` fills in a task's photo as it is
    handed out). `on_outcome(outcome, attempts)` is called once per image, in the CLI's process;
    `on_event` for every progress event."""
    ray = import_ray()
    from ray.exceptions import RayActorError, RayTaskError

    t0 = time.monotonic()
    stats = {name: WorkerStats(name) for name, _ in workers}
    handles = dict(workers)
    attempts: dict[int, list[dict]] = {t.index: [] for t in tasks}
    tried: dict[int, set[str]] = {t.index: set() for t in tasks}

    def take(ev: tuple) -> None:
        kind = ev[0]
        if kind == "start":
            _, index, name, where = ev
            prev = attempts[index]
            if prev and prev[-1]["outcome"] == "running":
                prev[-1]["outcome"] = "worker lost"  # the call Ray ran again after a restart
            prev.append({"worker": name, "where": where, "outcome": "running"})
        elif kind == "lost":
            _, index, name, err = ev
            stats[name].lost += 1
            if attempts[index] and attempts[index][-1]["outcome"] == "running":
                attempts[index][-1].update(outcome="worker lost", error=err)
        on_event(ev)

    idle = [name for name, _ in workers if not stats[name].gone]
    pending = deque(tasks)
    inflight: dict[Any, tuple[ImageTask, str, float]] = {}
    while pending or inflight:
        for name in list(idle):
            task = next((t for t in pending if name not in tried[t.index]), None)
            if task is None:
                continue
            pending.remove(task)
            try:
                loaded = load(task)
            except ValueError as e:  # the photo itself is bad: it fails here, once, without a worker
                attempts[task.index].append({"worker": None, "where": "", "outcome": "failed", "error": str(e)})
                on_outcome(Outcome(task.index, task.stem, False, str(e)), attempts[task.index])
                continue
            idle.remove(name)
            tried[task.index].add(name)
            inflight[handles[name].translate.remote(loaded)] = (task, name, time.monotonic())
        if not inflight:  # what is left was tried on every worker that is still there
            for task in pending:
                out = Outcome(task.index, task.stem, False, "no worker left to run it")
                on_outcome(out, attempts[task.index])
            break
        ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.25)
        for ev in drain(events):
            take(ev)
        for ref in ready:
            task, name, started = inflight.pop(ref)
            st = stats[name]
            st.busy_seconds += time.monotonic() - started
            try:
                outcome = ray.get(ref)
            except RayActorError as e:  # Ray could not bring the worker back: the image goes elsewhere
                for ev in drain(events):
                    take(ev)
                st.gone, st.error = True, _first_line(e)
                a = attempts[task.index]
                if a and a[-1]["outcome"] == "running":
                    a[-1].update(outcome="worker lost", error=st.error)
                elif not a or a[-1]["worker"] != name:
                    a.append({"worker": name, "where": st.where or name, "outcome": "worker lost", "error": st.error})
                on_event(("gone", task.index, name, st.error))
                pending.appendleft(task)
                continue
            except RayTaskError as e:  # a bug in the worker's handling of this image: it fails alone
                outcome = Outcome(task.index, task.stem, False, _first_line(e), name)
            a = attempts[task.index]
            if a and a[-1]["outcome"] == "running":
                a[-1].update(outcome="done" if outcome.ok else "failed", error=outcome.error)
            else:
                a.append({"worker": name, "where": outcome.where, "outcome": "done" if outcome.ok else "failed",
                          "error": outcome.error})
            st.where = outcome.where or st.where
            if outcome.ok:
                st.done += 1
            else:
                st.failed += 1
            on_outcome(outcome, a)
            idle.append(name)
    return list(stats.values()), time.monotonic() - t0


def stop_workers(workers: list[tuple[str, Any]], timeout: float = 60.0) -> None:
    """Stop every worker's ComfyUI, then the actors."""
    ray = import_ray()
    refs = [h.shutdown.remote() for _, h in workers]
    try:
        ray.wait(refs, num_returns=len(refs), timeout=timeout)
    except Exception:  # noqa: BLE001 - a worker that is gone has nothing left to stop
        pass
    for _, h in workers:
        try:
            ray.kill(h, no_restart=True)
        except Exception:  # noqa: BLE001
            pass


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines() or [type(e).__name__])[0][:500]
