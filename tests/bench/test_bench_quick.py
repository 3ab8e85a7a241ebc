"""tests/bench/run.py --quick runs end to end and writes well-formed ratios, and every mode guides the window's
steps; at tiny256 (where the decoder's memory shows) the documented peak-memory ratios hold, and the
finite-difference probe's cost, measured inside one run against that run's own CFG passes (steady where the
run-to-run time ratio is not), is within its target."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

RUN = Path(__file__).resolve().parent / "run.py"
MODES = ("structure_none", "structure_fd", "structure_autograd", "clip_taesd", "clip_vae")


def run_bench(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(RUN), *args, "--out", str(out)], capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    return json.loads(out.read_text())


def test_quick_benchmark_writes_positive_finite_ratios(tmp_path):
    """Time ratios at 64 px (printed, not asserted) and the guided steps of every mode; memory is measured at
    tiny256 below (at 64 px every mode peaks at the plain run's 1.00)."""
    report = run_bench(tmp_path, "--quick", "--no-memory")
    for key in ("ratios", "median_seconds", "seconds", "steps", "guided_fraction", "machine"):
        assert key in report, f"missing {key!r} in {sorted(report)}"
    assert set(report["ratios"]) == set(MODES)
    for mode, value in report["ratios"].items():
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (mode, value)
    assert report["steps"] == 20
    # 20 normal-scheduler steps with the window end_percent 0.35: a strict, non-empty part of the run is guided
    assert 0 < report["guided_fraction"] < 1
    assert "plain" in report["median_seconds"] and report["median_seconds"]["plain"] > 0
    # every mode guided exactly the schedule's steps inside start_percent 0 .. end_percent 0.35
    expected = expected_guided_steps(report["steps"], 0.35)
    assert 0 < expected < report["steps"]
    assert report["guided_steps"] == {mode: expected for mode in MODES}, (expected, report["guided_steps"])
    assert report["guided_fraction"] == expected / report["steps"]


def test_peak_memory_at_tiny256_is_the_documented_ratio(tmp_path):
    """docs/PERFORMANCE.md's peak RSS over plain sampling at tiny256 (tiny UNet + full KL VAE, 256 px; a fresh
    process per mode): the `vae` decoder's copy and its checkpointed backward 1.22x (1.221 documented; 1.86
    before the decoder-only copy, 1.00 if the decoder were not run), the structure finite-difference mode no
    more than plain's. About 2.5 min of CPU on two cores (clip_vae's run is most of it)."""
    report = run_bench(tmp_path, "--configs", "tiny256", "--no-timing", "--modes", "structure_fd,clip_vae")
    rss = report["peak_rss_ratio"]
    print("peak RSS ratios at tiny256:", rss)
    assert rss["structure_fd"] <= 1.05, rss
    assert 1.12 < rss["clip_vae"] < 1.32, rss
    for name, t in report["targets"].items():
        if name.startswith("peak RSS"):
            assert t["met"] and t["measured"] <= t["limit"], (name, t)


def test_the_finite_difference_probe_costs_half_a_cfg_pass_at_tiny256(tmp_path):
    """docs/PERFORMANCE.md: at tiny256 (tiny UNet + KL VAE, 256 px; where a UNet pass, not Python, is the cost) the
    probe is one batch-1 conditional pass, 0.49 of a batch-2 CFG pass, and structure_fd costs 1.17x plain, under
    its 1 + 0.6 x 0.35 = 1.21 target. Asserted from the in-run accounting (each run's passes timed against its own
    CFG passes): in the runs measured on the 2-core machine the probe pass took 0.40-0.51 of a CFG pass, so the
    band here is 0.30-0.60 (below it the probe would not be a whole model pass), and the ratio rebuilt from the
    median passes must meet the target. The run-to-run ratio is printed (it swings +-15 % on that machine), and
    so is the in-run ratio from the sums of the passes, which a burst of other work on the machine moves. About
    2 min."""
    report = run_bench(tmp_path, "--configs", "tiny256", "--no-memory", "--modes", "structure_fd", "--repeats", "1")
    result = report["configs"]["tiny256"]
    fd, f = result["accounted"]["structure_fd"], result["guided_fraction"]
    print("structure_fd at tiny256:", fd, "run-to-run ratio", result["ratios"]["structure_fd"])
    assert result["guided_steps"]["structure_fd"] == 7, result["guided_steps"]
    assert 0.30 <= fd["probe_pass_x_cfg_pass"] <= 0.60, fd
    # the probe passes are the whole of the mode's extra cost: the guidance arithmetic stays within 5 % of the run
    assert abs(fd["other_share"]) < 0.05, fd
    # the ratio from the median passes (docs/PERFORMANCE.md: 1 + f x probe/CFG + other): a pass slowed by something
    # else on the machine moves a sum of passes, not their median
    assert fd["ratio_from_medians"] <= 1 + 0.6 * f, (fd, f)


def test_vram_script_runs_its_cpu_smoke_mode(tmp_path):
    """tests/bench/vram.py (peak VRAM per mode, for a machine with a GPU) runs end to end in its CPU smoke mode."""
    out = tmp_path / "vram.json"
    proc = subprocess.run([sys.executable, str(RUN.parent / "vram.py"), "--smoke", "--out", str(out)], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    report = json.loads(out.read_text())
    assert report["device"] == "cpu"
    (smoke,) = report["configs"].values()
    assert set(smoke["peak_bytes"]) == {"plain", "clip_vae", "structure_fd"}
    assert all(b > 0 for b in smoke["peak_bytes"].values())
    for mode, ratio in smoke["ratio"].items():
        assert math.isfinite(ratio) and 0.95 < ratio < 1.3, (mode, ratio)
    assert "clip_vae" in proc.stdout and "x plain" in proc.stdout


def expected_guided_steps(steps: int, end_percent: float) -> int:
    """Steps of ComfyUI's "normal" schedule for an SD1.5 model (the quick fixture) whose sigma lies in the
    window [percent_to_sigma(end_percent), sigma_max], from ComfyUI's own model_sampling."""
    import comfy.model_sampling
    import comfy.samplers

    class SD15(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
        pass

    sampling = SD15()
    sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", steps).tolist()
    low = float(sampling.percent_to_sigma(end_percent))
    return sum(1 for s in sigmas[:-1] if s >= low * (1 - 1e-4))


# README: ddpm is exact on eps / v models only (on a flow state it steps without the alpha rescale)
FLOW_APPROXIMATE = {("ddpm", "const")}


def test_sampler_bench_finds_exactly_the_readme_samplers_exact(tmp_path):
    """tests/bench/samplers.py (the real hook, cond != uncond, finite differences) on the README's exact samplers
    and on a multistep one: exact to float32 rounding, and clearly not. It runs in its own process, as users run
    it: it imports ComfyUI in its own order, which must not leak into the in-process ComfyUI of the tests."""
    from agg_testing.probes import node_test_module

    exact = node_test_module("test_samplers").README_EXACT
    names = ",".join((*exact, "dpmpp_2m"))
    proc = subprocess.run([sys.executable, str(RUN.parent / "samplers.py"), "--samplers", names, "--families",
                           "eps,const", "--steps", "4", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    report = json.loads((tmp_path / "samplers.json").read_text())
    tol = report["exact_tol"]
    for name in (*exact, "dpmpp_2m"):
        for family in ("eps", "const"):
            dev = report["samplers"][name]["families"][family]
            assert dev["steps_measured"] >= 3, (name, family, dev)
            if name in exact and (name, family) not in FLOW_APPROXIMATE:
                assert dev["max_deviation"] < tol, (name, family, dev)
            else:
                assert dev["max_deviation"] > 0.05, (name, family, dev)


def test_decoder_checkpointing_bench_saves_the_documented_memory():
    """tests/bench/decoder.py at 256 px (docs/PERFORMANCE.md's size; at 64 px the activations are too small to
    show): the checkpointed decoder peaks at the documented 0.69x the memory of a plain backward pass (0.69 - 0.70
    in four runs, idle and loaded; a decoder that checkpoints nothing measures 1.00). Time is printed, not
    asserted: the documented 1.24x measured 1.47x, 0.89x and 0.63x on loaded machines, a spread larger than the
    recomputation's own cost. About 2.5 min of CPU on two cores."""
    import re

    proc = subprocess.run([sys.executable, str(RUN.parent / "decoder.py"), "--size", "256", "--repeats", "1"],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| forward", "| plain", "| checkpointed"))]
    assert len(rows) == 3, proc.stdout
    m = re.search(r"costs ([0-9.]+)x the time .* peaks at ([0-9.]+)x its memory", proc.stdout)
    assert m, proc.stdout
    time_ratio, memory_ratio = (float(v) for v in m.groups())
    assert math.isfinite(time_ratio) and time_ratio > 0, proc.stdout
    assert 0.62 < memory_ratio < 0.76, memory_ratio
