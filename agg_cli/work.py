"""One image through one ComfyUI, and its files in the output folder.

``translate`` runs on whatever holds the ComfyUI (the CLI itself on one machine, a Ray worker in a
cluster): it uploads the photo, runs the guided graph (and its unguided twin) and hands back the
result images and the AGG reports as bytes, writing nothing. ``write_outputs`` runs where the output
folder is, once per finished image. Everything passed between the two is plain data (picklable).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import graph as G
from .comfy import Client, JobFailed, Progress, ServerLost
from .report import loss_text, plot_terms, side_by_side, terms_summary

if TYPE_CHECKING:
    import numpy as np


@dataclass
class RunSpec:
    """What every image of a run shares."""

    api: dict
    settings: G.Settings
    run_id: str
    no_unguided: bool = False
    timeout: float = 3600.0
    style: tuple[str, bytes] | None = None  # (file name, bytes) of --style-image
    mask: tuple[str, bytes] | None = None  # (file name, bytes) of --mask
    shipped: dict[str, bytes] = field(default_factory=dict)  # file name of a picture in web/assets -> bytes


@dataclass
class ImageTask:
    index: int
    stem: str
    path: str  # the photo where the CLI runs (for the output files)
    data: bytes  # the photo itself (a worker may run on another machine)
    size: tuple[int, int] | None = None  # working size, or None for the workflow's own
    video: bool = False  # a video for a video workflow (Load Video), not a photo


@dataclass
class Outcome:
    """What came back for one image: its result images (per phase) and AGG reports, or its error."""

    index: int
    stem: str
    ok: bool
    error: str | None = None
    where: str = ""  # the ComfyUI (and worker) that ran it
    seconds: float = 0.0
    results: dict[str, list[bytes]] = field(default_factory=dict)  # "AGG" / "unguided" -> images
    terms: list[dict] = field(default_factory=list)
    suffix: str = ".png"  # of the result files, as the server saved them (".mp4" from Save Video)


# on_step(image stem, phase, value, total, loss text)
StepHook = Callable[[str, str, int, int, str], None]


class Translator:
    """Runs images on one ComfyUI (one Client); pictures shared by every image (style, mask, the
    pack's own) are uploaded once per server."""

    def __init__(self, client: Client, spec: RunSpec) -> None:
        self.client, self.spec = client, spec
        self.uploaded: dict[str, str] = {}  # key -> LoadImage value on this server

    def upload_once(self, key: str, data: bytes, name: str) -> str:
        if key not in self.uploaded:
            self.uploaded[key] = self.client.upload_image(data, name)
        return self.uploaded[key]

    def with_shipped(self, prompt: dict) -> dict:
        """The prompt with the pictures it names from the pack's web/assets uploaded to the server
        (sent along in the RunSpec, else read from this machine's copy of the pack)."""
        found = {nid: path.name for nid, path in G.shipped_images(prompt).items()}
        for nid in G.nodes_of(prompt, "LoadImage"):
            value = prompt[nid]["inputs"].get("image")
            if isinstance(value, str) and value in self.spec.shipped:
                found[nid] = value
        for nid, name in found.items():
            data = self.spec.shipped.get(name)
            if data is None:
                data = (G.ASSETS / name).read_bytes()
            prompt[nid]["inputs"]["image"] = self.upload_once(f"shipped:{name}", data, f"{self.spec.run_id}_shipped_{name}")
        return prompt

    def __call__(self, task: ImageTask, on_step: StepHook | None = None) -> Outcome:
        """One image. A failure of the image itself (the server refused or failed its graph, a bad
        input) comes back as a failed Outcome; a lost server raises ServerLost."""
        t0 = time.monotonic()
        try:
            results, terms, suffix = self._run(task, on_step)
        except ServerLost:
            raise
        except JobFailed as e:
            return Outcome(task.index, task.stem, False, str(e), self.client.url, time.monotonic() - t0)
        except Exception as e:  # noqa: BLE001 - anything else about this one image fails it alone
            return Outcome(task.index, task.stem, False, f"{type(e).__name__}: {e}", self.client.url,
                           time.monotonic() - t0)
        return Outcome(task.index, task.stem, True, None, self.client.url, time.monotonic() - t0, results, terms, suffix)

    def _run(self, task: ImageTask, on_step: StepHook | None) -> tuple[dict[str, list[bytes]], list[dict], str]:
        spec, client, s = self.spec, self.client, self.spec.settings
        suffix = Path(task.path).suffix.lower()
        image = client.upload_image(task.data, f"{spec.run_id}_{task.index:04d}_{task.stem}{suffix}")
        style = None if spec.style is None else self.upload_once("style", spec.style[1],
                                                                 f"{spec.run_id}_style_{spec.style[0]}")
        mask = None if spec.mask is None else self.upload_once("mask", spec.mask[1], f"{spec.run_id}_mask_{spec.mask[0]}")
        prefix = f"agg_cli/{spec.run_id}/{task.stem}"
        runs = [("AGG", self.with_shipped(G.customise(spec.api, s, image, task.size, prefix + "_agg", style, mask)))]
        if not spec.no_unguided:
            unguided = G.customise(spec.api, s, image, task.size, prefix + "_unguided", style, mask)
            runs.append(("unguided", G.without_agg(self.with_shipped(unguided))))
        results: dict[str, list[bytes]] = {}
        terms: list[dict] = []
        suffix = ".png"
        for phase, prompt in runs:
            titles = {nid: n.get("_meta", {}).get("title") or n["class_type"] for nid, n in prompt.items()}

            def show(p: Progress, ph: str = phase, titles: dict = titles) -> None:
                if on_step is not None:
                    where = titles.get(str(p.node), "")
                    on_step(task.stem, f"{ph}: {where}" if where else ph, p.value, p.total, loss_text(p.terms))

            entry, prog = client.run(prompt, show, timeout=spec.timeout)
            refs = client.images(entry)
            if not refs:
                raise JobFailed(f"the {phase} run produced no image (does the workflow end in SaveImage or SaveVideo?)")
            results[phase] = [client.fetch(ref) for _nid, ref in refs]
            suffix = Path(refs[0][1].get("filename", "")).suffix.lower() or ".png"
            if phase == "AGG":
                terms = prog.terms
        return results, terms, suffix


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(path)


def write_outputs(out: Path, outcome: Outcome, photo: Path, meta: dict[str, Any], test_models: bool) -> dict[str, str]:
    """The files of one finished image in `out`: NAME_agg.png (and NAME_unguided.png), NAME_terms.json,
    NAME_terms.png and NAME_side_by_side.png. Returns {kind: path}. When one cannot be written, the
    ones it wrote are removed again and the error raised."""
    files: dict[str, str] = {}
    try:
        return _write_outputs(out, outcome, photo, meta, test_models, files)
    except Exception:
        for path in files.values():
            Path(path).unlink(missing_ok=True)  # written by this call a moment ago
        raise


def _write_outputs(out: Path, outcome: Outcome, photo: Path, meta: dict[str, Any], test_models: bool,
                   files: dict[str, str]) -> dict[str, str]:
    stem, terms, suffix = outcome.stem, outcome.terms, outcome.suffix
    for phase, blobs in outcome.results.items():
        tag = "agg" if phase == "AGG" else "unguided"
        for i, blob in enumerate(blobs):
            path = out / (f"{stem}_{tag}{suffix}" if i == 0 else f"{stem}_{tag}_{i}{suffix}")
            atomic_write(path, blob)
            files[tag if i == 0 else f"{tag}_{i}"] = str(path)
    info = {"image": str(photo), "server": outcome.where, **meta, "events": terms}
    video = suffix in VIDEO_SUFFIXES
    clips = {tag: video_frames(Path(files[tag])) for tag in ("agg", "unguided") if tag in files} if video else {}
    if "unguided" in clips:
        info["steadiness"] = video_steadiness(clips["agg"], clips["unguided"])
    files["terms_json"] = str(out / f"{stem}_terms.json")
    atomic_write(out / f"{stem}_terms.json", json.dumps(info, indent=1).encode())
    label = " (toy test model)" if test_models else ""
    files["terms_plot"] = str(out / f"{stem}_terms.png")
    if not plot_terms(terms, out / f"{stem}_terms.png", f"AGG per step: {stem}{label}"):
        del files["terms_plot"]
    tags = ["source", *(["unguided"] if "unguided" in files else []), "agg"]
    shown: list[Path | io.BytesIO] = [photo if t == "source" else Path(files[t]) for t in tags]
    labels = ["source", *(("unguided" if t == "unguided" else "AGG") + label for t in tags[1:])]
    if video:  # each video's middle frame (the results' frames read once, above)
        clips["source"] = video_frames(photo)
        shown = [middle_frame(clips[t]) for t in tags]
        labels = [f"{text}, middle frame" for text in labels]
    files["side_by_side"] = str(out / f"{stem}_side_by_side.png")
    side_by_side(shown, labels, out / f"{stem}_side_by_side.png")
    return files


VIDEO_SUFFIXES = {".mp4", ".webm", ".mov", ".mkv"}  # what Save Video writes (format auto / mp4 / webm)


def video_frames(path: Path) -> np.ndarray:
    """A video's frames, [T, H, W, 3] uint8 RGB."""
    import av
    import numpy as np

    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{path}: no frames")
    return np.stack(frames)


def middle_frame(frames: np.ndarray) -> io.BytesIO:
    """The middle frame of [T, H, W, 3] frames as PNG bytes (a file-like object PIL opens)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frames[len(frames) // 2]).save(buf, "PNG")
    buf.seek(0)
    return buf


def video_steadiness(guided: np.ndarray, unguided: np.ndarray) -> dict[str, float]:
    """The guided video's mean frame-to-frame change against the unguided one's (agg_kernels.frames: 1 = no
    flicker added), and each, in 0..1 pixel units."""
    import torch

    from agg_kernels.frames import steadiness, temporal_change

    a, b = (torch.from_numpy(f).float().div(255).permute(3, 0, 1, 2)[None] for f in (guided, unguided))
    return {"ratio": float(steadiness(a, b)[0]), "agg_change": float(temporal_change(a)[0]),
            "unguided_change": float(temporal_change(b)[0])}


def settings_meta(workflow: str, size: tuple[int, int] | None, settings: G.Settings) -> dict[str, Any]:
    return {"workflow": workflow, "size": list(size) if size else None, "settings": asdict(settings)}


__all__ = ["ImageTask", "Outcome", "RunSpec", "Translator", "atomic_write", "settings_meta", "terms_summary",
           "write_outputs"]
