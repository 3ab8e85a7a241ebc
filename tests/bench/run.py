"""AGG's cost next to plain sampling: time and peak memory per guidance mode, on the same graph.

    python tests/bench/run.py --quick --out /tmp/agg-bench.json     # tiny fixture at 64 px
    python tests/bench/run.py --out /tmp/agg-bench.json             # tiny @ 256 px + full SD1.5 @ 512 px
    python tests/bench/run.py --configs tiny1024 --out /tmp/agg-1024.json   # tiny UNet + KL VAE @ 1024 px (slow on CPU)

The graph is the stock img2img one (LoadImage -> VAEEncode -> KSampler -> SaveLatent) at denoise 1.0
(a txt2img-like run: the whole schedule is sampled) with 20 euler steps and cfg 5. Each AGG mode
inserts Apply AGG after the checkpoint loader with the guidance window start_percent 0 ..
end_percent 0.35; the guided fraction of steps is counted from the guidance runs themselves.

Time: one worker process runs every mode, interleaved (plain, mode 1, mode 2, ..., repeated), after
one warm-up round; only the sampling call (comfy.sample.sample) is timed and each ratio is the
median time of the mode over the median time of plain sampling in that same process. Every model pass is
timed too, so each run's time is also split, in units of its own CFG passes, into the finite-difference probe's
passes and everything else the guidance adds ("in-run" ratio: steady when the machine's speed drifts between runs).
Peak memory: each mode runs once in a fresh process (load + sample); the ratio is its peak RSS
(getrusage ru_maxrss) over the plain run's, so peaks of different modes never mix. On a GPU the
peak allocated device memory is reported beside it.

Random-weight fixtures (tests/agg_testing/fixtures.py) stand in for real weights: the cost of a
network does not depend on its weights' values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests/: the shared agg_testing helpers
from agg_testing.comfy_env import AGG_HOME, configure_comfy  # noqa: E402

BENCH_HOME = AGG_HOME / "bench"

MODES = ("structure_none", "structure_fd", "structure_autograd", "clip_taesd", "clip_vae")
STEPS = 20
END_PERCENT = 0.35
CFG = 5.0

# peak RSS over plain sampling's, per mode (a fresh process each): guidance itself adds almost nothing; the `vae`
# decoder adds its decoder copy and that decoder's backward pass
PEAK_RSS_LIMITS = {"structure_none": 1.05, "structure_fd": 1.05, "clip_taesd": 1.05, "clip_vae": 1.3}

# name -> (checkpoint attribute of the models tree, image size, repeats in full mode)
CONFIGS = {
    "tiny256": ("checkpoint_kl", 256, 3),
    "full512": ("checkpoint_full", 512, 1),
    # SDXL's image size with the tiny UNet: the VAE decoder's share of a guided step is what it is at 1024 px.
    # On a 2-core CPU one plain run takes about 18 min (a CFG pass 54 s), so it is not in the default set.
    "tiny1024": ("checkpoint_kl", 1024, 1),
}
DEFAULT_CONFIGS = ("tiny256", "full512")
QUICK_CONFIG = ("checkpoint", 64, 1)


def setup_paths(device: str = "auto") -> str:
    """Make ComfyUI, the pack and tests/ importable (as tests/conftest.py does); returns the device used.

    ComfyUI runs in CPU mode unless a CUDA device is there (device "auto") or asked for ("cuda").
    """
    import torch

    use_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    configure_comfy(cpu=use_cpu)
    import comfy.model_management  # noqa: F401  (reads args.cpu once, at import)

    # agg_testing.runner refuses to start unless args.cpu is set; model_management has already chosen its
    # device above, and nothing reads the flag later.
    comfy.cli_args.args.cpu = True
    return "cpu" if use_cpu else "cuda"


def machine_info(device: str) -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_kib"] = int(f.readline().split()[1])
    except OSError:
        pass
    return info


# -- graphs ------------------------------------------------------------------------------------------


def build_prompt(mode: str, ckpt_name: str, size: int, seed: int, open_clip: str) -> dict:
    from agg_testing.graphs import img2img, insert_model_patch

    g = img2img(ckpt_name=ckpt_name, size=size, seed=seed, steps=STEPS, cfg=CFG, denoise=1.0,
                positive="a photo of a mountain lake", negative="blurry")
    for role in ("decode", "save"):
        del g.prompt[g[role].id]
    g.node("SaveLatent", name="save_latent", samples=g["sampler"][0], filename_prefix="agg_bench")
    if mode == "plain":
        return g.prompt
    from agg_kernels.guidance import DEFAULT_DDS_LR, DEFAULT_DDS_STEPS
    from agg_kernels.strength import DEFAULT_CLIP_WEIGHT, DEFAULT_STRUCTURE_WEIGHT

    window = {"start_percent": 0.0, "end_percent": END_PERCENT, "dds_steps": DEFAULT_DDS_STEPS, "dds_lr": DEFAULT_DDS_LR,
              "asymmetric": True}
    if mode.startswith("structure_"):
        manifold = {"none": "none", "fd": "finite_difference", "autograd": "autograd"}[mode.removeprefix("structure_")]
        loss = g.node("AGGStructureLoss", weight=DEFAULT_STRUCTURE_WEIGHT, source=g["encode"][0])
        insert_model_patch(g, "AGGApply", loss=loss[0], manifold=manifold, **window)
    elif mode.startswith("clip_"):
        loader = g.node("AGGCLIPLoader", clip_name=open_clip)
        loss = g.node("AGGCLIPDirectionLoss", clip=loader[0], vae=g["ckpt"][2], source_text="a photo",
                      target_text="a watercolor painting", weight=DEFAULT_CLIP_WEIGHT, decoder=mode.removeprefix("clip_"),
                      cutouts=8, range_weight=0.0, seed=0)
        insert_model_patch(g, "AGGApply", loss=loss[0], manifold="finite_difference", **window)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return g.prompt


class SampleTimer:
    """Times every comfy.sample.sample call (what KSampler runs) and counts the guided steps of AGG runs."""

    def __init__(self) -> None:
        import comfy.sample
        import comfy.samplers

        self.seconds: list[float] = []
        self.guided: list[int] = []
        self.sigmas: list[list[float]] = []
        # per sampling run: seconds and count of the model passes by how many conds they evaluate (2: a CFG
        # pass, cond and uncond together; 1: the finite-difference probe's conditional pass, at cfg != 1)
        self.passes: list[dict[int, list[float]]] = []
        original, calc = comfy.sample.sample, comfy.samplers.calc_cond_batch

        def timed(*args, **kwargs):
            sync()
            self.passes.append({})
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                sync()
                self.seconds.append(time.perf_counter() - t0)

        def timed_pass(model, conds, *args, **kwargs):
            sync()
            t0 = time.perf_counter()
            try:
                return calc(model, conds, *args, **kwargs)
            finally:
                sync()
                if self.passes:
                    self.passes[-1].setdefault(len(conds), []).append(time.perf_counter() - t0)

        comfy.sample.sample = timed
        # module attribute: comfy.samplers' own CFG code and the pack's probe both look it up at call time
        comfy.samplers.calc_cond_batch = timed_pass
        runtime = next(
            m for name, m in list(sys.modules.items())
            if name.endswith("nodes.runtime") and callable(getattr(m, "open_run", None))
        )
        open_run, report = runtime.open_run, runtime.report
        timer = self
        steps = [0]  # guided steps reported since the run opened

        def counting_report(*args, **kwargs):
            steps[0] += 1
            return report(*args, **kwargs)

        def counting_open(*args, **kwargs):
            run = open_run(*args, **kwargs)
            steps[0] = 0

            def close():
                timer.guided.append(steps[0])
                timer.sigmas.append([float(s) for s in run.sigmas])
                return run.close()

            return replace(run, close=close)

        runtime.open_run, runtime.report = counting_open, counting_report


def sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def open_session(config: tuple[str, int, int]):
    from agg_testing.fixtures import models_dir
    from agg_testing.runner import ComfySession

    attr, _, _ = config
    models = models_dir(BENCH_HOME / "models", kl=True, full=attr == "checkpoint_full")
    session = ComfySession(models, BENCH_HOME / "work", cache_type="classic")
    return session, getattr(models, attr), models.open_clip


def run_checked(session, prompt: dict) -> None:
    result = session.run(prompt)
    if not result.ok:
        raise RuntimeError(result.error_text())


# -- workers (each in its own process) ---------------------------------------------------------------


def worker_timing(config: tuple[str, int, int], modes: list[str], repeats: int, device: str, warmup_all: bool = True) -> dict:
    import torch

    session, ckpt, open_clip = open_session(config)
    timer = SampleTimer()
    size = config[1]
    all_modes = ["plain", *modes]
    seed = 0
    for mode in all_modes if warmup_all else ["plain"]:  # warm-up: loads, per-graph caches, first-call allocations
        seed += 1
        run_checked(session, build_prompt(mode, ckpt, size, seed, open_clip))
    seconds = {m: [] for m in all_modes}
    guided = {m: [] for m in modes}
    passes: dict[str, list[dict]] = {m: [] for m in all_modes}
    for _ in range(repeats):
        for mode in all_modes:
            seed += 1
            n_before, g_before = len(timer.seconds), len(timer.guided)
            run_checked(session, build_prompt(mode, ckpt, size, seed, open_clip))
            seconds[mode].append(timer.seconds[n_before])
            passes[mode].append({str(k): v for k, v in timer.passes[n_before].items()})
            if mode != "plain":
                guided[mode].append(timer.guided[g_before] if len(timer.guided) > g_before else 0)
    sigmas = timer.sigmas[-1] if timer.sigmas else []
    return {"seconds": seconds, "guided_steps": guided, "sigmas": sigmas, "passes": passes,
            "torch_threads": torch.get_num_threads()}


def run_shares(seconds: float, passes: dict[str, list[float]]) -> dict[str, float]:
    """One sampling run's time in units of its own CFG passes' time: the probe passes' share, the rest's
    (loss, decoder, CLIP, the guidance arithmetic, the sampler), and the probe pass over a CFG pass."""
    cfg, probe = passes.get("2", []), passes.get("1", [])
    base = sum(cfg)
    pass_ratio = (statistics.median(probe) / statistics.median(cfg)) if probe else 0.0
    return {"probe": sum(probe) / base, "rest": (seconds - base - sum(probe)) / base, "probe_pass_x_cfg_pass": pass_ratio,
            # the probe's share from the median passes: a pass slowed by other work on the machine moves a sum, not this
            "probe_from_medians": len(probe) * pass_ratio / len(cfg)}


def accounted(timing: dict, modes: list[str]) -> dict[str, dict[str, float]]:
    """Each mode's time over plain's, rebuilt from shares measured inside each run (medians over repeats):
    1 + the probe's share + the rest's share beyond plain's own rest (`ratio`; `ratio_from_medians` takes the
    probe's share from the median passes). Unlike the ratio of two runs' medians it does not move when the machine
    speeds up or slows down between runs."""
    def med(mode: str) -> dict[str, float]:
        shares = [run_shares(s, p) for s, p in zip(timing["seconds"][mode], timing["passes"][mode], strict=True)]
        return {k: median([sh[k] for sh in shares]) for k in shares[0]}

    plain = med("plain")
    out = {}
    for mode in modes:
        m = med(mode)
        extra = m["rest"] - plain["rest"]
        out[mode] = {"probe_share": m["probe"], "other_share": extra, "ratio": 1 + m["probe"] + extra,
                     "ratio_from_medians": 1 + m["probe_from_medians"] + extra,
                     "probe_pass_x_cfg_pass": m["probe_pass_x_cfg_pass"]}
    return out


def worker_memory(config: tuple[str, int, int], mode: str, device: str) -> dict:
    import resource

    import torch

    session, ckpt, open_clip = open_session(config)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run_checked(session, build_prompt(mode, ckpt, config[1], 1, open_clip))
    out = {"peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "unet_weight_bytes": unet_weight_bytes()}
    if device == "cuda":
        out["peak_vram_bytes"] = torch.cuda.max_memory_allocated()
    return out


def unet_weight_bytes() -> int:
    """Bytes of the loaded diffusion model's weights: what one autograd weight copy costs."""
    import comfy.model_management

    for loaded in comfy.model_management.current_loaded_models:
        net = getattr(getattr(loaded.model, "model", None), "diffusion_model", None)
        if net is not None:
            return sum(p.numel() * p.element_size() for p in net.parameters())
    return 0


def worker_profile(config: tuple[str, int, int], mode: str, device: str, top: int = 30) -> dict:
    """cProfile of one sampling run of `mode` after a warm-up: own time per function, then AGG's parts cumulatively."""
    import cProfile
    import io
    import pstats

    session, ckpt, open_clip = open_session(config)
    timer = SampleTimer()
    run_checked(session, build_prompt("plain", ckpt, config[1], 1, open_clip))
    run_checked(session, build_prompt(mode, ckpt, config[1], 2, open_clip))
    prof = cProfile.Profile()
    prof.enable()
    run_checked(session, build_prompt(mode, ckpt, config[1], 3, open_clip))
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(top)  # where the time is spent
    stats.sort_stats("cumulative").print_stats(r"agg|losses|decoders|runtime|manifold|guidance|dds|taesd|vae|clip", top)
    return {"mode": mode, "seconds": timer.seconds[-1], "profile": buf.getvalue()}


def spawn(args: list[str], timeout: float | None, script: str = __file__) -> dict:
    """Run `script` (this file by default) with `args` in a fresh process; its AGG_BENCH_RESULT line as data."""
    cmd = [sys.executable, str(Path(script).resolve()), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("AGG_BENCH_RESULT "):
            return json.loads(line.removeprefix("AGG_BENCH_RESULT "))
    raise RuntimeError(f"worker {' '.join(args)} printed no result:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


# -- orchestration -----------------------------------------------------------------------------------


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def bench_config(name: str, config: tuple[str, int, int], modes: list[str], repeats: int, device: str,
                 memory: bool, timeout: float | None, memory_jobs: int = 2, timed: bool = True) -> dict:
    cfg = json.dumps(list(config))
    common = ["--config-json", cfg, "--device", device]
    t0 = time.perf_counter()
    steps_total = STEPS
    out: dict = {
        "config": name, "checkpoint": config[0], "size_px": config[1], "steps": steps_total, "cfg": CFG,
        "sampler": "euler", "scheduler": "normal", "denoise": 1.0, "start_percent": 0.0, "end_percent": END_PERCENT,
        "repeats": repeats,
    }
    if timed:
        # every mode gets its warm-up run: a mode's first run pays one-off costs (5.7x plain for
        # structure_none in a quick run without it), which are not what the ratios are about
        warm = ["--warmup-all"]
        timing = spawn(["--worker", "timing", "--modes", ",".join(modes), "--repeats", str(repeats), *warm, *common], timeout)
        plain = median(timing["seconds"]["plain"])
        out.update({
            "seconds": timing["seconds"], "median_seconds": {m: median(v) for m, v in timing["seconds"].items()},
            "ratios": {m: median(timing["seconds"][m]) / plain for m in modes},
            "guided_steps": {m: (timing["guided_steps"][m][-1] if timing["guided_steps"][m] else 0) for m in modes},
            "torch_threads": timing["torch_threads"], "accounted": accounted(timing, modes),
        })
        guided = max(out["guided_steps"].values()) if out["guided_steps"] else 0
        out["guided_fraction"] = guided / steps_total
    if memory:
        # separate processes, so running a few at once does not mix their peaks
        from concurrent.futures import ThreadPoolExecutor

        all_modes = ["plain", *modes]
        with ThreadPoolExecutor(max_workers=max(1, memory_jobs)) as pool:
            found = pool.map(lambda m: spawn(["--worker", "memory", "--mode", m, *common], timeout), all_modes)
            peaks = dict(zip(all_modes, found, strict=True))
        out["peak_rss_kib"] = {m: p["peak_rss_kib"] for m, p in peaks.items()}
        out["unet_weight_bytes"] = peaks["plain"]["unet_weight_bytes"]
        out["peak_rss_ratio"] = {m: peaks[m]["peak_rss_kib"] / peaks["plain"]["peak_rss_kib"] for m in modes}
        if device == "cuda":
            out["peak_vram_bytes"] = {m: p["peak_vram_bytes"] for m, p in peaks.items()}
            out["peak_vram_ratio"] = {m: peaks[m]["peak_vram_bytes"] / max(1, peaks["plain"]["peak_vram_bytes"]) for m in modes}
    out["wall_seconds"] = time.perf_counter() - t0
    return out


def targets(result: dict) -> dict:
    """Each target: (measured, limit, met)."""
    r, f = result.get("ratios", {}), result.get("guided_fraction", 0.0)
    checks = {}
    if "structure_none" in r:
        checks["time structure_none <= 1.05"] = (r["structure_none"], 1.05)
    if "structure_fd" in r:
        # the finite-difference probe is one conditional pass: half a CFG pass, plus the guidance's own work
        checks[f"time structure_fd <= 1 + 0.6 x {f:.2f}"] = (r["structure_fd"], 1 + 0.6 * f)
        checks[f"time structure_fd, in-run accounting, <= 1 + 0.6 x {f:.2f}"] = (
            result["accounted"]["structure_fd"]["ratio"], 1 + 0.6 * f)
    if "clip_taesd" in r and result["checkpoint"] == "checkpoint_full":
        checks["time clip_taesd <= 1.5 (full size, 512 px)"] = (r["clip_taesd"], 1.5)
    rss = result.get("peak_rss_ratio", {})
    for m, limit in PEAK_RSS_LIMITS.items():
        if m in rss:
            checks[f"peak RSS {m} <= {limit}"] = (rss[m], limit)
    if "structure_autograd" in rss:
        # its cause: `autograd` differentiates through the diffusion model, which needs its weights as ordinary
        # (non-inference) tensors, one extra copy of them while the run lasts; no more than that copy is allowed
        copy = result["unet_weight_bytes"] / (result["peak_rss_kib"]["plain"] * 1024)
        checks[f"peak RSS structure_autograd <= 1.05 + one UNet weight copy ({copy:.3f})"] = (rss["structure_autograd"],
                                                                                             1.05 + copy)
    return {k: {"measured": v, "limit": lim, "met": v <= lim} for k, (v, lim) in checks.items()}


def table(result: dict) -> str:
    nan = float("nan")
    modes = list(result.get("ratios") or result.get("peak_rss_ratio") or {})
    seconds, ratios = result.get("median_seconds", {}), result.get("ratios", {})
    guided = result.get("guided_steps", {})
    lines = [
        f"{result['config']}: {result['size_px']} px, {result['steps']} euler steps, cfg {result['cfg']}, "
        + (f"guided {max(guided.values(), default=0)}/{result['steps']} steps "
           f"(fraction {result['guided_fraction']:.2f}), {result['repeats']} interleaved repeats" if ratios else "not timed"),
        f"{'mode':<20}{'median s':>10}{'time x':>9}{'in-run x':>10}{'probe':>8}{'other':>8}{'probe/CFG':>11}"
        f"{'peak RSS MiB':>14}{'RSS x':>8}",
    ]
    rss = result.get("peak_rss_kib", {})
    lines.append(f"{'plain':<20}{seconds.get('plain', nan):>10.3f}{1.0:>9.3f}{1.0:>10.3f}{'':>27}"
                 f"{rss.get('plain', 0) / 1024:>14.0f}{1.0:>8.3f}")
    for m in modes:
        a = result.get("accounted", {}).get(m, {})
        lines.append(f"{m:<20}{seconds.get(m, nan):>10.3f}{ratios.get(m, nan):>9.3f}{a.get('ratio', nan):>10.3f}"
                     f"{a.get('probe_share', nan):>8.3f}{a.get('other_share', nan):>8.3f}"
                     f"{a.get('probe_pass_x_cfg_pass', nan):>11.3f}"
                     f"{rss.get(m, 0) / 1024:>14.0f}{result.get('peak_rss_ratio', {}).get(m, nan):>8.3f}")
    if result.get("accounted"):
        lines.append("  in-run x = 1 + probe + other: each run's time in units of its own CFG passes (probe: the "
                     "finite-difference passes; other: loss, decoder, CLIP, guidance arithmetic beyond plain's); "
                     "probe/CFG: one probe pass over one CFG pass")
    for name, t in result.get("targets", {}).items():
        lines.append(f"  target {name}: {t['measured']:.3f} vs {t['limit']:.3f} -> {'met' if t['met'] else 'MISSED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny fixture (TAESD VAE) at 64 px, 1 repeat")
    ap.add_argument("--out", type=Path, help="write the JSON results here")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="full mode: which of " + ", ".join(CONFIGS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--repeats", type=int, help="interleaved timing repeats (default per config)")
    ap.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak-memory runs")
    ap.add_argument("--no-timing", action="store_true", help="skip the interleaved timing runs (peak memory only)")
    ap.add_argument("--memory-jobs", type=int, default=2, help="fresh-process memory runs at a time (default 2)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--timeout", type=float, default=None, help="seconds per worker process")
    ap.add_argument("--profile", metavar="MODE", help="print a cProfile of one run of MODE (first config) and exit")
    ap.add_argument("--worker", choices=("timing", "memory", "profile"), help=argparse.SUPPRESS)
    ap.add_argument("--config-json", help=argparse.SUPPRESS)
    ap.add_argument("--warmup-all", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    device = setup_paths(args.device)

    if args.worker:
        config = tuple(json.loads(args.config_json))
        if args.worker == "timing":
            res = worker_timing(config, args.modes.split(","), args.repeats or 1, device, args.warmup_all)
        elif args.worker == "profile":
            res = worker_profile(config, args.mode, device)
        else:
            res = worker_memory(config, args.mode, device)
        print("AGG_BENCH_RESULT " + json.dumps(res))
        return 0

    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        ap.error(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    if args.quick:
        plan = {"tiny64_quick": QUICK_CONFIG}
    else:
        plan = {name: CONFIGS[name] for name in args.configs.split(",") if name}
    if args.profile:
        name, config = next(iter(plan.items()))
        res = spawn(["--worker", "profile", "--mode", args.profile, "--config-json", json.dumps(list(config)),
                     "--device", device], args.timeout)
        print(f"{name} {args.profile}: {res['seconds']:.3f} s sampling\n{res['profile']}")
        return 0
    report: dict = {"quick": args.quick, "machine": machine_info(device), "command": " ".join(sys.argv), "configs": {}}
    for name, config in plan.items():
        repeats = args.repeats or config[2]
        res = bench_config(name, config, modes, repeats, device, not args.no_memory, args.timeout, args.memory_jobs,
                           timed=not args.no_timing)
        res["targets"] = targets(res)
        report["configs"][name] = res
        print(table(res), flush=True)
        if args.out:  # written after every config, so a long run keeps what it measured
            write_report(report, args.out)
    if args.out:
        write_report(report, args.out)
        print(f"wrote {args.out}")
    return 0


def write_report(report: dict, path: Path) -> None:
    """Top-level "ratios" / "peak_rss_ratio" etc. come from the last (largest) configuration measured."""
    last = list(report["configs"].values())[-1]
    for key in ("ratios", "peak_rss_ratio", "peak_vram_ratio", "median_seconds", "seconds", "steps",
                "guided_fraction", "guided_steps", "targets"):
        if key in last:
            report[key] = last[key]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.exit(main())
