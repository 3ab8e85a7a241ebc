"""What the user sees: progress bars (tqdm) on the terminal, the side-by-side picture and the per-step plot
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


def loss_text(events: list[dict]) -> str:
    """The AGG loss terms of the latest 'agg.terms' event, e.g. 'structure=0.0123 clip=0.871'."""
    if not events:
        return ""
    terms = events[-1].get("terms") or {}
    return " ".join(f"{k}={_num(v):.3g}" for k, v in terms.items())


class Display:
    """Progress for a folder of images: one tqdm bar per running image (the sampler's step, the
    phase, the latest AGG loss) under one bar for the folder. When the stream is not a terminal (a
    log file, CI) plain lines are printed instead: one whenever an image's bar moves by a tenth, and
    one per finished image."""

    def __init__(self, total: int, stream: IO[str] | None = None, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.total, self.done, self.failed = total, 0, 0
        self.bars: dict[str, Any] = {}  # image -> its tqdm bar (terminal only)
        self.last_tenth: dict[tuple[str, str], int] = {}
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.overall = None
        if self.tty:
            from tqdm import tqdm

            self._tqdm = tqdm
            self.overall = tqdm(total=total, desc="images", unit="img", file=self.stream, position=0,
                                dynamic_ncols=True, leave=True)

    def say(self, line: str) -> None:
        """A line of its own (above the bars on a terminal)."""
        with self.lock:
            if self.tty:
                self._tqdm.write(line, file=self.stream)
            else:
                self.stream.write(line + "\n")
                self.stream.flush()

    def step(self, where: str, image: str, phase: str, value: int, total: int, loss: str = "") -> None:
        """Image `image` (running on `where`) is at sampler step `value` of `total` in `phase`."""
        with self.lock:
            if self.tty:
                b = self.bars.get(image)
                if b is None:
                    b = self._tqdm(total=total or 1, desc=image, unit="step", file=self.stream,
                                   position=len(self.bars) + 1, dynamic_ncols=True, leave=False)
                    self.bars[image] = b
                if total and b.total != total:
                    b.reset(total=total)
                b.n = value
                b.set_postfix_str(" ".join(x for x in (phase, loss, short(where)) if x), refresh=False)
                b.refresh()
                return
            tenth = int(10 * value / total) if total else 0
            key = (image, phase)
            if self.last_tenth.get(key) != tenth:
                self.last_tenth[key] = tenth
                self.stream.write(f"  {image} [{phase}] {bar(value, total)} step {value}/{total}"
                                  + (f" loss {loss}" if loss else "") + f" ({short(where)})\n")
                self.stream.flush()

    def finished(self, image: str, ok: bool) -> None:
        with self.lock:
            if ok:
                self.done += 1
            else:
                self.failed += 1
            b = self.bars.pop(image, None)
            if b is not None:
                b.close()
            if self.overall is not None:
                self.overall.set_postfix_str(f"{self.failed} failed" if self.failed else "", refresh=False)
                self.overall.update(1)
            else:
                self.stream.write(f"{bar(self.done + self.failed, self.total)} {self.done + self.failed}/{self.total} "
                                  f"images ({self.failed} failed, {time.monotonic() - self.t0:.0f} s)\n")
                self.stream.flush()

    def close(self) -> None:
        with self.lock:
            for b in self.bars.values():
                b.close()
            self.bars.clear()
            if self.overall is not None:
                self.overall.close()
                self.overall = None


def short(url: str) -> str:
    return url.split("://", 1)[-1]


def side_by_side(paths: list[Path | IO[bytes]], labels: list[str], out: Path, height: int = 384) -> None:
    """The pictures (files, or file-like PNG bytes) in a row at one height, each under its label."""
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
    marks = [(i, e) for i, e in enumerate(events)
             if e.get("trust_region") or e.get("element_bound") or e.get("fallback") or e.get("skipped")]
    for i, e in marks:
        for row in axes:
            row[0].axvline(steps[i], color="red" if e.get("skipped") else "orange", alpha=0.25, lw=3)
    axes[-1][0].set_xlabel("guided step" + ("  (shaded: trust region / element bound / fallback / skipped)" if marks else ""))
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
