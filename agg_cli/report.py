"""What the user sees: progress bars on the terminal, the side-by-side picture and the per-step plot
of AGG's loss terms and step sizes (from the server's 'agg.terms' events)."""

from __future__ import annotations

import math
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any


def bar(done: float, total: float, width: int = 20) -> str:
    frac = 0.0 if total <= 0 else min(1.0, max(0.0, done / total))
    n = int(round(frac * width))
    return "[" + "#" * n + "-" * (width - n) + "]"


class Display:
    """Progress for a folder of images, one bar per running image. On a terminal the status line is
    redrawn in place; otherwise (a log file, CI) a line is printed whenever a bar moves by a tenth."""

    def __init__(self, total: int, stream: IO[str] | None = None, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.total, self.done, self.failed = total, 0, 0
        self.running: dict[str, tuple[str, str, int, int]] = {}  # server -> (image, phase, value, max)
        self.last_tenth: dict[tuple[str, str], int] = {}
        self.lock = threading.Lock()
        self.t0 = time.monotonic()

    def _status(self) -> str:
        parts = [f"{bar(self.done + self.failed, self.total)} {self.done + self.failed}/{self.total} images"]
        for server, (image, phase, value, total) in self.running.items():
            parts.append(f"{short(server)} {image} {phase} {bar(value, total, 10)} {value}/{total}")
        return " | ".join(parts)

    def _redraw(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K" + self._status()[:max(40, _columns() - 1)])
            self.stream.flush()

    def say(self, line: str) -> None:
        """A line of its own (above the status line on a terminal)."""
        with self.lock:
            if self.tty:
                self.stream.write("\r\x1b[K")
            self.stream.write(line + "\n")
            self._redraw()
            self.stream.flush()

    def step(self, server: str, image: str, phase: str, value: int, total: int) -> None:
        with self.lock:
            self.running[server] = (image, phase, value, total)
            if self.tty:
                self._redraw()
                return
            tenth = int(10 * value / total) if total else 0
            key = (server, image + phase)
            if self.last_tenth.get(key) != tenth:
                self.last_tenth[key] = tenth
                self.stream.write(f"  {image} [{phase}] {bar(value, total)} step {value}/{total} ({short(server)})\n")
                self.stream.flush()

    def finished(self, server: str, ok: bool) -> None:
        with self.lock:
            self.running.pop(server, None)
            if ok:
                self.done += 1
            else:
                self.failed += 1
            if not self.tty:
                self.stream.write(f"{bar(self.done + self.failed, self.total)} {self.done + self.failed}/{self.total} "
                                  f"images ({self.failed} failed, {time.monotonic() - self.t0:.0f} s)\n")
                self.stream.flush()
            self._redraw()

    def close(self) -> None:
        with self.lock:
            if self.tty:
                self.stream.write("\r\x1b[K")
                self.stream.flush()


def short(url: str) -> str:
    return url.split("://", 1)[-1]


def _columns() -> int:
    import shutil

    return shutil.get_terminal_size((120, 20)).columns


def side_by_side(paths: list[Path], labels: list[str], out: Path, height: int = 384) -> None:
    from PIL import Image, ImageDraw

    ims = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            ims.append(im.resize((max(1, round(im.width * height / im.height)), height), Image.LANCZOS))
    band = 24
    canvas = Image.new("RGB", (sum(i.width for i in ims) + 8 * (len(ims) - 1), height + band), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for im, label in zip(ims, labels, strict=True):
        canvas.paste(im, (x, band))
        draw.text((x + 6, 6), label, fill="black")
        x += im.width + 8
    canvas.save(out)


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def series(events: list[dict]) -> dict[str, list[float]]:
    """Per-step series from agg.terms events (fields read defensively; absent ones give NaN):
    'loss/<term>', 'grad_rms/<term>', 'step_rms/<term>', 'delta_rms'. Terms of several AGG nodes are
    prefixed with the node's name."""
    nodes = {e.get("node") for e in events}
    out: dict[str, list[float]] = {}
    for i, e in enumerate(events):
        tag = f"{e.get('node')}: " if len(nodes) > 1 else ""
        entries: list[tuple[str, Any]] = []
        for field, prefix in (("terms", "loss"), ("grad_rms", "grad_rms"), ("step_rms", "step_rms")):
            d = e.get(field)
            if isinstance(d, dict):
                entries += [(f"{prefix}/{tag}{k}", v) for k, v in d.items()]
        if "delta_rms" in e:
            entries.append((f"delta_rms{('/' + tag.rstrip(': ')) if tag else ''}", e.get("delta_rms")))
        for key, v in entries:
            out.setdefault(key, [math.nan] * i)
            out[key].append(_num(v))
        for key in out:
            if len(out[key]) < i + 1:
                out[key].append(math.nan)
    return out


# pyplot and its mathtext parser keep global state: plots from several server threads at once
# corrupt it (IndexError in the parser), so one plot is drawn at a time.
_PLOT_LOCK = threading.Lock()


def plot_terms(events: list[dict], out: Path, title: str) -> bool:
    """Two panels over the guided steps: the loss terms, and the step sizes (gradient RMS and step
    RMS per term, RMS of the applied edit Δ), with trust-region / fallback / skipped steps marked.
    False when there is nothing to plot or matplotlib is missing."""
    if not events:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    with _PLOT_LOCK:
        _draw_terms(plt, events, out, title)
    return True


def _draw_terms(plt: Any, events: list[dict], out: Path, title: str) -> None:
    s = series(events)
    numbered = all(isinstance(e.get("step"), int) for e in events)
    steps = [e["step"] for e in events] if numbered else list(range(len(events)))
    sizes = {k: v for k, v in s.items() if not k.startswith("loss/") and any(not math.isnan(x) for x in v)}
    fig, axes = plt.subplots(2 if sizes else 1, 1, figsize=(8, 6.5 if sizes else 4), sharex=True, squeeze=False)
    ax = axes[0][0]
    for k, v in s.items():
        if k.startswith("loss/"):
            ax.plot(steps, v, marker="o", ms=3, label=k.removeprefix("loss/"))
    ax.set_ylabel("loss term")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    if sizes:
        ax2 = axes[1][0]
        for k, v in sizes.items():
            style = "-" if k.startswith("delta") else ("--" if k.startswith("grad") else ":")
            ax2.plot(steps, [x if x > 0 else math.nan for x in v], style, marker=".", label=k)
        ax2.set_yscale("log")
        ax2.set_ylabel("RMS (log)")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=7, ncol=2)
    marks = [(i, e) for i, e in enumerate(events) if e.get("trust_region") or e.get("fallback") or e.get("skipped")]
    for i, e in marks:
        for row in axes:
            row[0].axvline(steps[i], color="red" if e.get("skipped") else "orange", alpha=0.25, lw=3)
    axes[-1][0].set_xlabel("guided step" + ("  (shaded: trust region / fallback / skipped)" if marks else ""))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def terms_summary(events: list[dict]) -> str:
    """One line: number of guided steps and the last step's loss terms."""
    if not events:
        return "no agg.terms events (no guided step reported)"
    last = events[-1].get("terms") or {}
    shown = ", ".join(f"{k}={_num(v):.4g}" for k, v in last.items())
    skipped = sum(1 for e in events if e.get("skipped"))
    return f"{len(events)} guided steps" + (f" ({skipped} skipped)" if skipped else "") + (f"; last: {shown}" if shown else "")
