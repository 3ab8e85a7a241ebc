"""Spreading images over ComfyUI servers: one worker thread per server, each with one image at a
time in its server's queue. An image whose server is lost (refused, reset, timed out, socket
closed) goes back to the front of the queue for the other servers, and that server takes no more
work; an image the server ran and failed stays failed (the same graph would fail elsewhere too)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .comfy import Client, JobFailed, ServerLost


@dataclass
class Job:
    index: int
    path: Path
    stem: str
    status: str = "queued"  # queued | running | done | failed
    server: str | None = None
    seconds: float = 0.0
    error: str | None = None
    attempts: list[dict] = field(default_factory=list)  # {"server", "outcome", "error", "seconds"}
    outputs: dict[str, str] = field(default_factory=dict)


@dataclass
class ServerStats:
    url: str
    done: int = 0
    failed: int = 0
    busy_seconds: float = 0.0
    lost: bool = False
    error: str | None = None
    retried_elsewhere: list[str] = field(default_factory=list)


RunOne = Callable[[Client, Job], None]


class Scheduler:
    def __init__(self, urls: list[str], jobs: list[Job], run_one: RunOne,
                 on_lost: Callable[[ServerStats, Job, str], None] | None = None,
                 client_factory: Callable[[str], Client] = Client) -> None:
        self.jobs = jobs
        self.stats = [ServerStats(u) for u in urls]
        self.run_one = run_one
        self.on_lost = on_lost
        self.client_factory = client_factory
        self.pending: deque[Job] = deque(jobs)
        self.cond = threading.Condition()
        self.seconds = 0.0

    def _live(self) -> list[ServerStats]:
        return [s for s in self.stats if not s.lost]

    def _take(self, st: ServerStats) -> Job | None:
        """The next job this server may run, or None when there is nothing left for it."""
        with self.cond:
            while True:
                if st.lost:
                    return None
                for job in self.pending:
                    if all(a["server"] != st.url for a in job.attempts):
                        self.pending.remove(job)
                        job.status = "running"
                        return job
                if not any(j.status == "running" for j in self.jobs):
                    return None  # nothing queued for us and nothing in flight that could come back
                self.cond.wait(0.5)

    def _worker(self, st: ServerStats) -> None:
        client = self.client_factory(st.url)
        try:
            while (job := self._take(st)) is not None:
                t0 = time.monotonic()
                try:
                    self.run_one(client, job)
                except ServerLost as e:
                    dt = time.monotonic() - t0
                    with self.cond:
                        st.lost, st.error, st.busy_seconds = True, str(e), st.busy_seconds + dt
                        job.attempts.append({"server": st.url, "outcome": "server lost", "error": str(e), "seconds": dt})
                        if any(all(a["server"] != s.url for a in job.attempts) for s in self._live()):
                            job.status = "queued"
                            self.pending.appendleft(job)
                            st.retried_elsewhere.append(job.stem)
                        else:
                            job.status, job.error = "failed", f"no server left to run it (last: {e})"
                        self.cond.notify_all()
                    if self.on_lost:
                        self.on_lost(st, job, str(e))
                    return
                except Exception as e:  # noqa: BLE001 - JobFailed, or a bug in one image's handling
                    # Either way that image failed; the worker goes on so the server keeps serving.
                    error = str(e) if isinstance(e, JobFailed) else f"{type(e).__name__}: {e}"
                    dt = time.monotonic() - t0
                    with self.cond:
                        job.status, job.error, job.server, job.seconds = "failed", error, st.url, dt
                        job.attempts.append({"server": st.url, "outcome": "failed", "error": error, "seconds": dt})
                        st.failed += 1
                        st.busy_seconds += dt
                        self.cond.notify_all()
                else:
                    dt = time.monotonic() - t0
                    with self.cond:
                        job.status, job.server, job.seconds = "done", st.url, dt
                        job.attempts.append({"server": st.url, "outcome": "done", "error": None, "seconds": dt})
                        st.done += 1
                        st.busy_seconds += dt
                        self.cond.notify_all()
        finally:
            client.close()

    def run(self) -> list[Job]:
        t0 = time.monotonic()
        threads = [threading.Thread(target=self._worker, args=(st,), daemon=True, name=f"agg-{st.url}")
                   for st in self.stats]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for job in self.jobs:  # every server lost before these could move elsewhere
            if job.status in ("queued", "running"):
                job.status = "failed"
                job.error = job.error or "every server was lost"
        self.seconds = time.monotonic() - t0
        return self.jobs
