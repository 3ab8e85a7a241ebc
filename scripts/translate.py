"""Translate images with an AGG example workflow, headless, in a real ComfyUI server.

    bash scripts/translate.sh --image photo.jpg --checkpoint /models/v1-5-pruned-emaonly.safetensors \
        --clip /models/open_clip_model.safetensors --target "a watercolor painting of a cat"

Starts ComfyUI (with this pack) on a free loopback port, runs the chosen workflow (default: the
text-guided one) on each image, once with AGG and once without it (same graph and seed, AGG bypassed),
and writes into a new folder under ComfyUI's output directory: the AGG result, a side-by-side
comparison (source | unguided | AGG) and a per-step plot of the loss terms. Without --checkpoint /
--clip it uses generated random-weight test models: the pictures are then noise, useful only to
check that everything runs.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path

PACK = Path(__file__).resolve().parent.parent
AGG_HOME = Path(os.environ.get("AGG_HOME", Path.home() / ".cache" / "agg-comfyui"))
COMFYUI = Path(os.environ.get("AGG_COMFYUI", AGG_HOME / "ComfyUI"))
WORKFLOWS = {p.stem.removeprefix("agg_"): p for p in sorted((PACK / "workflows" / "api").glob("*.json"))}
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workflow", default="text_guided", choices=sorted(WORKFLOWS), help="example workflow to run")
    ap.add_argument("--image", type=Path, help="source image (default: ComfyUI's input/example.png)")
    ap.add_argument("--images-dir", type=Path, help="translate every image of this folder in one go")
    ap.add_argument("--checkpoint", type=Path, help="a Stable Diffusion .safetensors checkpoint (default: random test model)")
    ap.add_argument("--clip", type=Path, help="open_clip weights, one .safetensors file (default: random test model)")
    ap.add_argument("--controlnet", type=Path, help="ControlNet .safetensors for the controlnet workflow")
    ap.add_argument("--source", help="text describing the source image")
    ap.add_argument("--target", help="text describing the wanted result")
    ap.add_argument("--style-image", type=Path, help="style image for the image_style workflow")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, help="sampling steps (default: the workflow's; 8 with the test model)")
    ap.add_argument("--size", type=int, help="working size in pixels (default: the workflow's; 128 with the test model)")
    ap.add_argument("--no-unguided", action="store_true", help="skip the unguided comparison run")
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------------------
# Models


def models_tree(args: argparse.Namespace, root: Path):
    """A models tree linking the user's files, or generated test models where none is given."""
    sys.path.insert(0, str(COMFYUI))
    sys.path.append(str(PACK / "tests"))
    from agg_testing import fixtures

    random_parts = []
    root.mkdir(parents=True, exist_ok=True)

    def link(kind: str, src: Path) -> str:
        dst = root / kind / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        dst.symlink_to(src.resolve())
        return src.name

    if args.checkpoint:
        ckpt = link("checkpoints", args.checkpoint)
    else:
        ckpt = link("checkpoints", fixtures.sd15_tiny_checkpoint("taesd"))
        random_parts.append("checkpoint")
    if args.clip:
        clip = link("open_clip", args.clip)
    else:
        clip = link("open_clip", fixtures.open_clip_tiny())
        random_parts.append("open_clip")
    if args.controlnet:
        cn = link("controlnet", args.controlnet)
    else:
        cn = link("controlnet", fixtures.controlnet_tiny())
        if args.workflow == "controlnet":
            random_parts.append("controlnet")
    tree = fixtures.ModelsTree(root=root, checkpoint=ckpt, open_clip=clip, controlnet=cn)
    return tree, random_parts


# ---------------------------------------------------------------------------------------------------
# Prompts


def titled(api: dict, class_type: str, title: str | None = None) -> list[dict]:
    return [n for n in api.values() if n["class_type"] == class_type
            and (title is None or n.get("_meta", {}).get("title") == title)]


def customise(api: dict, args: argparse.Namespace, models, image_name: str, style_name: str | None,
              prefix: str) -> dict:
    p = copy.deepcopy(api)
    for node in p.values():
        ins, ct = node["inputs"], node["class_type"]
        if ct == "CheckpointLoaderSimple":
            ins["ckpt_name"] = models.checkpoint
        elif ct == "AGGCLIPLoader":
            ins["clip_name"] = models.open_clip
        elif ct == "ControlNetLoader":
            ins["control_net_name"] = models.controlnet
        elif ct == "ImageScale" and args.size:
            ins.update(width=args.size, height=args.size)
        elif ct in ("KSampler", "BasicScheduler") and args.steps:
            ins["steps"] = args.steps
        if ct == "KSampler":
            ins["seed"] = args.seed
        if "seed" in ins and ct.startswith("AGG"):
            ins["seed"] = args.seed
        if ct == "SaveImage":
            ins["filename_prefix"] = prefix
        if ct == "AGGCLIPDirectionLoss":
            if args.source:
                ins["source_text"] = args.source
            if args.target:
                ins["target_text"] = args.target
    for n in titled(p, "CLIPTextEncode", "Source prompt"):
        n["inputs"]["text"] = args.source or n["inputs"]["text"]
    for n in titled(p, "CLIPTextEncode", "Target prompt") + titled(p, "CLIPTextEncode", "Prompt"):
        n["inputs"]["text"] = args.target or n["inputs"]["text"]
    sources = titled(p, "LoadImage", "Source image") or titled(p, "LoadImage")[:1]
    for n in sources:
        n["inputs"]["image"] = image_name
    for n in titled(p, "LoadImage", "Style image"):
        n["inputs"]["image"] = style_name or image_name
    return p


def without_agg(api: dict) -> dict:
    """The same graph with AGG taken out: Apply AGG bypassed, AGG Guider replaced by CFGGuider."""
    p = copy.deepcopy(api)
    for nid, node in list(p.items()):
        if node["class_type"] == "AGGApply":
            model = node["inputs"]["model"]
            del p[nid]
            for other in p.values():
                for k, v in other["inputs"].items():
                    if v == [nid, 0]:
                        other["inputs"][k] = model
        elif node["class_type"] == "AGGGuider":
            ins = node["inputs"]
            p[nid] = {"class_type": "CFGGuider", "inputs": {k: ins[k] for k in ("model", "positive", "negative", "cfg")}}
    return p


# ---------------------------------------------------------------------------------------------------
# Websocket listener


class Listener:
    """Collects the server's websocket messages for one client id (aiohttp, in a thread)."""

    def __init__(self, url: str, client_id: str) -> None:
        self.url = url.replace("http://", "ws://") + f"/ws?clientId={client_id}"
        self.events: list[tuple[str, dict]] = []
        self.cond = threading.Condition()
        self.ready = threading.Event()
        threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True).start()
        if not self.ready.wait(30):
            raise RuntimeError("websocket did not connect")

    async def _run(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session, session.ws_connect(self.url, max_msg_size=0) as ws:
            self.ready.set()
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    m = json.loads(msg.data)
                    with self.cond:
                        self.events.append((m.get("type"), m.get("data") or {}))
                        self.cond.notify_all()
                elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    break

    def run(self, server, prompt: dict, client_id: str, label: str, timeout: float = 3600) -> tuple[dict, list[dict]]:
        """Queue `prompt`, print progress until it is done; returns (history entry, agg.terms events)."""
        with self.cond:
            start = len(self.events)
        res = server.queue(prompt, client_id)
        if "prompt_id" not in res:
            raise RuntimeError(f"ComfyUI rejected the prompt: {json.dumps(res, indent=1)[:3000]}")
        pid = res["prompt_id"]
        seen = start
        terms: list[dict] = []
        deadline = time.monotonic() + timeout
        titles = {k: v.get("_meta", {}).get("title", v["class_type"]) for k, v in prompt.items()}
        while time.monotonic() < deadline:
            with self.cond:
                self.cond.wait(1.0)
                new = self.events[seen:]
                seen = len(self.events)
            for kind, data in new:
                if data.get("prompt_id") not in (None, pid):
                    continue
                if kind == "progress":
                    print(f"  [{label}] {titles.get(str(data.get('node')), data.get('node'))}: step "
                          f"{data['value']}/{data['max']}", flush=True)
                elif kind == "agg.terms":
                    terms.append(data)
                    t = ", ".join(f"{k}={v:.4g}" for k, v in (data.get("terms") or {}).items()
                                  if isinstance(v, (int, float)))
                    print(f"  [{label}] AGG step {data.get('step')} sigma={data.get('sigma'):.3f} {t}"
                          + (" (skipped)" if data.get("skipped") else ""), flush=True)
                elif kind == "executing" and data.get("node") is None and data.get("prompt_id") == pid:
                    return server.wait(pid, 60), terms
                elif kind == "execution_error":
                    raise RuntimeError(f"{data.get('node_type')}: {data.get('exception_message')}")
        raise TimeoutError(f"{label}: not done after {timeout:.0f}s")


# ---------------------------------------------------------------------------------------------------
# Outputs


def side_by_side(paths: list[Path], labels: list[str], out: Path, height: int = 384) -> None:
    from PIL import Image, ImageDraw

    ims = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            ims.append(im.resize((round(im.width * height / im.height), height), Image.LANCZOS))
    bar = 24
    canvas = Image.new("RGB", (sum(i.width for i in ims) + 8 * (len(ims) - 1), height + bar), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for im, label in zip(ims, labels, strict=True):
        canvas.paste(im, (x, bar))
        draw.text((x + 6, 6), label, fill="black")
        x += im.width + 8
    canvas.save(out)


def plot_terms(terms: list[dict], out: Path, title: str) -> bool:
    if not terms:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({k for t in terms for k, v in (t.get("terms") or {}).items() if isinstance(v, (int, float))})
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = list(range(len(terms)))
    for name in names:
        ax.plot(steps, [t["terms"].get(name, float("nan")) for t in terms], marker="o", ms=3, label=name)
    ax.set_xlabel("guided step")
    ax.set_ylabel("loss term")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(COMFYUI))
    sys.path.append(str(PACK / "tests"))
    from agg_testing.browser import ComfyServer
    from agg_testing.fixtures import write_extra_model_paths

    if args.images_dir:
        images = sorted(p for p in args.images_dir.iterdir() if p.suffix.lower() in IMAGE_EXT)
        if not images:
            print(f"no images in {args.images_dir}", file=sys.stderr)
            return 2
    else:
        images = [args.image or COMFYUI / "input" / "example.png"]
    for p in images + ([args.style_image] if args.style_image else []):
        if not p.exists():
            print(f"not found: {p}", file=sys.stderr)
            return 2

    run_id = time.strftime("%Y%m%d-%H%M%S")
    work = AGG_HOME / "translate" / run_id
    models, random_parts = models_tree(args, work / "models")
    if random_parts:
        print("=" * 78)
        print(f"NOTE: no real {' / '.join(random_parts)} given: using RANDOM-WEIGHT TEST MODELS.")
        print("The results are noise. They only show that the workflow runs. Pass --checkpoint and")
        print("--clip with real weights (see workflows/ Notes) for real translations.")
        print("=" * 78)
        if "checkpoint" in random_parts:
            args.steps = args.steps or 8
            args.size = args.size or 128
    yaml = write_extra_model_paths(work / "extra_model_paths.yaml", models)
    out_root = COMFYUI / "output"
    out_dir = out_root / "agg_translate" / run_id
    out_dir.mkdir(parents=True, exist_ok=True)
    api = json.loads(WORKFLOWS[args.workflow].read_text())

    server = ComfyServer(COMFYUI, work / "server", yaml, output_dir=out_root)
    print(f"starting ComfyUI ({'CPU' if server.cpu else 'GPU'}) ...", flush=True)
    t0 = time.monotonic()
    with server:
        print(f"ComfyUI up at {server.url} in {time.monotonic() - t0:.0f}s; results go to {out_dir}", flush=True)
        client_id = uuid.uuid4().hex
        listener = Listener(server.url, client_id)
        style_name = None
        if args.style_image:
            style_name = f"agg_style_{args.style_image.name}"
            shutil.copyfile(args.style_image, server.dirs["input"] / style_name)
        for i, image in enumerate(images):
            name = f"agg_{i:03d}_{image.name}"
            shutil.copyfile(image, server.dirs["input"] / name)
            stem = image.stem if len(images) == 1 else f"{i:03d}_{image.stem}"
            print(f"[{i + 1}/{len(images)}] {image}", flush=True)
            prefix = f"agg_translate/{run_id}/{stem}"
            guided = customise(api, args, models, name, style_name, prefix + "_agg")
            entry, terms = listener.run(server, guided, client_id, "AGG")
            agg_img = server.output_images(entry)[0]
            shown = [image]
            labels = ["source"]
            if not args.no_unguided:
                plain = without_agg(customise(api, args, models, name, style_name, prefix + "_unguided"))
                entry2, _ = listener.run(server, plain, client_id, "unguided")
                shown.append(server.output_images(entry2)[0])
                labels.append("unguided")
            shown.append(agg_img)
            labels.append("AGG")
            if random_parts:
                labels = [f"{lb} (random test model)" if lb != "source" else lb for lb in labels]
            side_by_side(shown, labels, out_dir / f"{stem}_side_by_side.png")
            (out_dir / f"{stem}_terms.json").write_text(json.dumps(terms, indent=1))
            plotted = plot_terms(terms, out_dir / f"{stem}_terms.png", f"AGG loss terms: {stem}")
            print(f"  result: {agg_img}")
            print(f"  side by side: {out_dir / f'{stem}_side_by_side.png'}")
            print(f"  loss terms: {out_dir / f'{stem}_terms.png'}" if plotted else "  (no agg.terms events received)")
    print(f"done: {out_dir}")
    if random_parts:
        print("REMINDER: these images come from random-weight test models and are noise.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
