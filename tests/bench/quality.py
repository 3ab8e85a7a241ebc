"""Real-model quality: plain img2img against AGG on real images, scored with CLIP and LPIPS.

    python tests/bench/quality.py --models DIR [--out DIR] [--steps 30] [--denoise 0.6] [--limit 8]

DIR must hold a real Stable Diffusion 1.5 checkpoint and open_clip ViT-B-32 weights:
    DIR/checkpoints/<any SD1.5 .safetensors>      (e.g. v1-5-pruned-emaonly.safetensors)
    DIR/open_clip/<ViT-B-32 .safetensors>         (e.g. open_clip_model.safetensors of
                                                   laion/CLIP-ViT-B-32-laion2B-s34B-b79K)
Without them the script exits with code 2 and says what is missing.

Images: ComfyUI's input/example.png plus the template images of the installed
comfyui_workflow_templates_media_image package (when present), each crossed with a fixed list of
(source text, target text) edits. Every image runs through the stock img2img graph (plain) and the
same graph with Apply AGG (Structure Loss on the source latent + CLIP Direction Loss, the pack's
defaults). Scores per result:
  clip_dir   CLIP directional similarity: cos(E_I(result) - E_I(source), E_T(target) - E_T(source text))
  structure  ViT token self-similarity distance to the source (CLIP vision tower tokens, DiffuseIT style)
  lpips      LPIPS(alex) to the source, when the `lpips` package is importable (column skipped otherwise)
  seconds    wall time of the sampling prompt
Runs on the GPU when there is one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (tests/bench/run.py: path and device set-up)

EDITS = [
    ("a photo", "a watercolor painting"),
    ("a photo", "a pencil sketch"),
    ("a photo", "an oil painting by Van Gogh"),
]
SUFFIXES = (".safetensors",)


def find_weights(models: Path) -> tuple[Path | None, Path | None, list[str]]:
    problems = []
    ckpts = sorted(p for p in (models / "checkpoints").glob("*") if p.suffix in SUFFIXES) if (models / "checkpoints").is_dir() else []
    clips = sorted(p for p in (models / "open_clip").glob("*") if p.suffix in SUFFIXES) if (models / "open_clip").is_dir() else []
    if not ckpts:
        problems.append(f"put a Stable Diffusion 1.5 checkpoint (.safetensors, e.g. v1-5-pruned-emaonly.safetensors) in {models / 'checkpoints'}/")
    if not clips:
        problems.append(f"put open_clip ViT-B-32 weights (open_clip_model.safetensors from laion/CLIP-ViT-B-32-laion2B-s34B-b79K) in {models / 'open_clip'}/")
    return (ckpts[0] if ckpts else None), (clips[0] if clips else None), problems


def image_list(limit: int) -> list[Path]:
    images = [bench.COMFYUI_DIR / "input" / "example.png"]
    try:
        import importlib.resources

        import comfyui_workflow_templates_media_image as media

        root = Path(importlib.resources.files(media))
        images += sorted(p for p in root.rglob("*") if p.suffix.lower() in (".webp", ".png", ".jpg", ".jpeg"))
    except ImportError:
        pass
    return images[:limit]


def graph(mode: str, ckpt: str, clip_name: str, image: str, src: str, tgt: str, steps: int, denoise: float, size: int):
    from agg_testing.graphs import img2img, insert_model_patch

    g = img2img(ckpt_name=ckpt, positive=tgt, negative="blurry, low quality", image=image, size=size, seed=0,
                steps=steps, cfg=7.5, denoise=denoise, filename_prefix=f"agg_quality_{mode}")
    if mode == "agg":
        s = g.node("AGGStructureLoss", weight=0.5, source=g["encode"][0])
        loader = g.node("AGGCLIPLoader", clip_name=clip_name)
        c = g.node("AGGCLIPDirectionLoss", clip=loader[0], vae=g["ckpt"][2], source_text=src, target_text=tgt, weight=2.0,
                   source_image=g["scale"][0], loss=s[0], decoder="taesd" if has_taesd() else "vae")
        insert_model_patch(g, "AGGApply", loss=c[0], start_percent=0.0, end_percent=0.6,
                           manifold="finite_difference", dds_steps=1, dds_lr=0.05, asymmetric=True)
    return g


def has_taesd() -> bool:
    import folder_paths

    return any(f.startswith("taesd_decoder") for f in folder_paths.get_filename_list("vae_approx"))


class Scorer:
    def __init__(self, clip_path: Path, device: str):
        import torch

        clip_model = next(m for n, m in list(sys.modules.items()) if n.endswith("nodes.clip_model") and hasattr(m, "load_open_clip"))
        self.clip = clip_model.load_open_clip(str(clip_path)).to(torch.device(device))
        self.device = device
        try:
            import lpips

            self.lpips = lpips.LPIPS(net="alex").to(device).eval()
        except Exception:  # not installed (or its weights are missing): skip the column
            self.lpips = None

    def _pixels(self, image):  # IMAGE [1, H, W, 3] -> CLIP input [1, 3, s, s]
        from agg_kernels.losses.structure import to_clip_input

        x = image.movedim(-1, 1).float().to(self.device)
        return to_clip_input(x * 2 - 1, self.clip.image_size)

    def tokens(self, pixels):
        visual = self.clip.model.visual
        captured = {}
        handle = visual.transformer.register_forward_hook(lambda m, i, o: captured.setdefault("t", o))
        try:
            visual(pixels)
        finally:
            handle.remove()
        t = captured["t"]
        return t if t.shape[0] == pixels.shape[0] else t.transpose(0, 1)

    def score(self, source, result, src_text: str, tgt_text: str) -> dict:
        import torch

        from agg_kernels.losses.structure import self_similarity

        with torch.inference_mode(False), torch.no_grad():
            ps, pr = self._pixels(source), self._pixels(result)
            ei = self.clip.encode_image(torch.cat([ps, pr]))
            et = self.clip.encode_text([src_text, tgt_text])
            di, dt = ei[1] - ei[0], et[1] - et[0]
            clip_dir = float(torch.nn.functional.cosine_similarity(di, dt, dim=0))
            ts, tr = self.tokens(ps), self.tokens(pr)
            structure = float((self_similarity(ts) - self_similarity(tr)).pow(2).mean())
            out = {"clip_dir": clip_dir, "structure": structure}
            if self.lpips is not None:
                a = source.movedim(-1, 1).to(self.device) * 2 - 1
                b = result.movedim(-1, 1).to(self.device) * 2 - 1
                out["lpips"] = float(self.lpips(a, b).mean())
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="AGG vs plain img2img on real weights")
    ap.add_argument("--models", type=Path, required=True, help="folder with checkpoints/ and open_clip/")
    ap.add_argument("--out", type=Path, default=bench.BENCH_HOME / "quality")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--denoise", type=float, default=0.6)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--limit", type=int, default=8, help="images to use")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = ap.parse_args(argv)
    ckpt, clip_path, problems = find_weights(args.models)
    if problems:
        print("quality.py needs real weights:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    device = bench.setup_paths(args.device)
    import folder_paths
    from agg_testing.fixtures import ModelsTree
    from agg_testing.runner import ComfySession

    models = ModelsTree(root=args.models)  # the real models folder, laid out as ComfyUI expects it
    session = ComfySession(models, args.out / "work")
    for kind in ("checkpoints", "open_clip", "vae_approx"):
        if (args.models / kind).is_dir():
            folder_paths.add_model_folder_path(kind, str(args.models / kind), is_default=True)
    scorer = Scorer(clip_path, "cuda" if device == "cuda" else "cpu")
    rows = []
    for path in image_list(args.limit):
        name = f"q_{len(rows)}{path.suffix}"
        target = session.dirs["input"] / name
        target.write_bytes(path.read_bytes())
        for src, tgt in EDITS:
            row = {"image": path.name, "source_text": src, "target_text": tgt}
            for mode in ("plain", "agg"):
                g = graph(mode, ckpt.name, clip_path.name, name, src, tgt, args.steps, args.denoise, args.size)
                t0 = time.perf_counter()
                res = session.run(g.prompt)
                if not res.ok:
                    raise RuntimeError(res.error_text())
                seconds = time.perf_counter() - t0
                source = res.output(g["scale"].id)
                result = res.output(g["decode"].id)
                row[mode] = {**scorer.score(source, result, src, tgt), "seconds": seconds}
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for mode in ("plain", "agg"):
        keys = [k for k in rows[0][mode]] if rows else []
        summary[mode] = {k: statistics.mean(r[mode][k] for r in rows) for k in keys}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps({"rows": rows, "summary": summary, "machine": bench.machine_info(device)}, indent=2))
    cols = ["clip_dir", "structure"] + (["lpips"] if scorer.lpips is not None else []) + ["seconds"]
    print(f"{'mode':<8}" + "".join(f"{c:>12}" for c in cols))
    for mode, s in summary.items():
        print(f"{mode:<8}" + "".join(f"{s.get(c, float('nan')):>12.4f}" for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
