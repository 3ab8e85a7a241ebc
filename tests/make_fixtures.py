#!/usr/bin/env python
"""Generate the random-weight test models and lay them out as a ComfyUI models tree.

    python tests/make_fixtures.py DEST [--full] [--no-kl] [--trained [--no-evidence]] [--yaml PATH]

DEST gets checkpoints/, controlnet/, vae_approx/ and open_clip/ with links to the cached files
($AGG_HOME/fixtures, generated on first use); one line per file is printed: folder, name, size,
target. --full adds the ~2 GiB full-size SD1.5 checkpoint (benchmarks). --trained adds the tiny SD1.5
that learned to denoise, with a VAE decoder trained to reconstruct its photos (trained on first use,
about 5 minutes on 2 cores): the checkpoint in checkpoints/, its TAESD pair in vae_approx_trained/, and
the demo's photos in demo/ (color_source.png, color_reference.png); it prints the figures that show it is a
denoiser (error table on held-back latents, Jacobian symmetry, finite-difference vs autograd manifold
gradients, the decoder's reconstruction error) unless --no-evidence. --yaml writes an
extra_model_paths.yaml for `main.py --extra-model-paths-config` naming those folders and ComfyUI's
custom_nodes folder. Run it with the environment's Python (scripts/setup.sh builds it); scripts/translate.sh
runs it for its demo.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))  # the test models live in agg_testing, next to it
from agg_testing.comfy_env import COMFYUI_DIR, configure_comfy  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", type=Path, help="folder to lay out as a ComfyUI models tree")
    parser.add_argument("--full", action="store_true", help="also the full-size SD1.5 checkpoint (~2 GiB)")
    parser.add_argument("--no-kl", action="store_true", help="skip the tiny checkpoint with the full KL VAE")
    parser.add_argument("--trained", action="store_true",
                        help="also the trained tiny SD1.5 (minutes on first use), with its evidence table")
    parser.add_argument("--no-evidence", action="store_true", help="with --trained: skip the evidence (a minute)")
    parser.add_argument("--yaml", type=Path, help="write an extra_model_paths.yaml here")
    args = parser.parse_args(argv)

    try:
        configure_comfy(cpu=True)
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    from agg_testing import fixtures

    t0 = time.perf_counter()
    tree = fixtures.models_dir(args.dest, kl=not args.no_kl, full=args.full, trained=args.trained)
    kinds = list(fixtures.ModelsTree.FOLDERS)
    if args.trained:
        from agg_testing import trained

        trained.link_trained(args.dest)
        kinds.append(trained.VAE_APPROX_TRAINED)
        for image in trained.demo_images(Path(args.dest) / "demo").values():
            print(f"demo\t{image.name}\t{image.stat().st_size / 2**20:.1f} MiB\t{image}")
    for kind in kinds:
        for link in sorted(tree.folder(kind).iterdir()):
            target = link.resolve()
            print(f"{kind}\t{link.name}\t{target.stat().st_size / 2**20:.1f} MiB\t{target}")
    for path, seconds, size in fixtures.GENERATED.entries:
        print(f"generated {Path(path).name}: {size / 2**20:.1f} MiB in {seconds:.1f} s", file=sys.stderr)
    if args.trained and not args.no_evidence:
        print(trained.evidence(trained.sd15_trained_files()).format())
    if args.yaml:
        fixtures.write_extra_model_paths(args.yaml, tree, custom_nodes=COMFYUI_DIR / "custom_nodes")
        print(f"yaml\t{args.yaml}")
    print(f"done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
