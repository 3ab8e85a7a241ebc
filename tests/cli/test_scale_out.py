"""Scale-out: `agg_cli --server A --server B --images-dir D` spreads a folder over two real ComfyUI
servers on loopback (the test models), one image at a time each. Server B is killed while it runs its
second image: that image is moved to A, every image ends up done exactly once, results land in one
folder with the photos' aspect ratios, and the summary names the lost server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from agg_testing.comfy_env import COMFYUI_DIR
from agg_testing.server import ComfyServer
from PIL import Image

PACK_ROOT = Path(__file__).resolve().parents[2]
N_IMAGES = 6
SIZES = [(96, 64), (64, 96), (80, 80), (120, 72), (72, 120), (64, 64)]  # (w, h), various aspect ratios


def make_images(folder: Path) -> list[Path]:
    folder.mkdir()
    out = []
    for i, (w, h) in enumerate(SIZES[:N_IMAGES]):
        p = folder / f"photo_{i}.png"
        im = Image.linear_gradient("L").resize((w, h)).convert("RGB")
        im.paste((40 * i % 255, 90, 200), (0, 0, w // 3, h // 3))
        im.save(p)
        out.append(p)
    return out


@pytest.mark.server
@pytest.mark.slow
def test_two_servers_one_killed_mid_run_loses_nothing(agg_models, tmp_path):
    photos = make_images(tmp_path / "photos")
    out_dir = tmp_path / "out"
    a = ComfyServer(COMFYUI_DIR, agg_models, tmp_path / "a")
    b = ComfyServer(COMFYUI_DIR, agg_models, tmp_path / "b")
    a.start()
    proc = None
    try:
        b.start()
        cmd = [sys.executable, "-m", "agg_cli", "--server", a.url, "--server", b.url, "--images-dir", str(tmp_path / "photos"),
               "--workflow", "img2img_ksampler", "--source", "a photo", "--target", "a watercolor painting",
               "--checkpoint", agg_models.checkpoint, "--clip", agg_models.open_clip, "--steps", "2", "--size", "64",
               "--no-unguided", "--test-models", "--output-dir", str(out_dir)]
        env = {**os.environ, "PYTHONPATH": str(PACK_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # Kill B once it has taken its second prompt (so one of its images is in flight).
        killed_after = None
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            if b.log_text().count("got prompt") >= 2:
                b.proc.kill()
                killed_after = time.monotonic() - t0
                break
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=900)
        seconds = time.monotonic() - t0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        b.stop()
        a.stop()
    assert killed_after is not None, f"server B never took a second image:\n{out[-3000:]}"
    assert proc.returncode == 0, out[-4000:]
    summary = json.loads((out_dir / "summary.json").read_text())
    images = summary["images"]
    assert len(images) == N_IMAGES and all(i["status"] == "done" for i in images), json.dumps(images, indent=1)
    for i in images:  # every image done exactly once
        assert [att["outcome"] for att in i["attempts"]].count("done") == 1
    servers = {s["url"]: s for s in summary["servers"]}
    assert servers[b.url]["lost"] and not servers[a.url]["lost"]
    assert servers[a.url]["done"] + servers[b.url]["done"] == N_IMAGES
    assert servers[b.url]["done"] >= 1  # B did real work before it was killed
    moved = [i for i in images if i["attempts"][0]["outcome"] == "server lost"]
    assert len(moved) == 1 and moved[0]["attempts"][0]["server"] == b.url and moved[0]["server"] == a.url
    assert moved[0]["name"] in servers[b.url]["moved_to_other_servers"]
    # One folder of results, one per photo, each keeping its photo's aspect ratio at 64 px.
    results = sorted(out_dir.glob("*_agg.png"))
    assert len(results) == N_IMAGES
    for photo in photos:
        w, h = Image.open(photo).size
        with Image.open(out_dir / f"{photo.stem}_agg.png") as r:
            want = (64, round(64 * h / w / 8) * 8) if w >= h else (round(64 * w / h / 8) * 8, 64)
            assert r.size == want, (photo.name, r.size, want)
        assert (out_dir / f"{photo.stem}_terms.json").exists()
    assert "LOST" in out and "went to other servers" in out
    print(f"\nscale-out: {N_IMAGES} images, 2 servers, {seconds:.1f} s in all ({summary['seconds']:.1f} s scheduling); "
          f"B killed after {killed_after:.1f} s with {servers[b.url]['done']} done; moved {moved[0]['name']} to A; "
          f"A {servers[a.url]['done']} done in {servers[a.url]['busy_seconds']:.1f} s busy")


@pytest.mark.server
def test_server_checks_model_and_sampler_names_before_queueing(comfy_server, tmp_path):
    """With --server, the model and sampler names are checked against that server's node list, and
    nothing is queued when one is wrong."""
    photo = make_images(tmp_path / "photos")[0]
    before = comfy_server.get("/history")
    cmd = [sys.executable, "-m", "agg_cli", "--server", comfy_server.url, "--image", str(photo),
           "--workflow", "img2img_ksampler", "--source", "a photo", "--target", "a painting",
           "--checkpoint", "no-such-model.safetensors", "--sampler", "no_such_sampler",
           "--output-dir", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": str(PACK_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"--checkpoint 'no-such-model.safetensors': not offered by {comfy_server.url}" in r.stderr
    assert comfy_server.models.checkpoint in r.stderr  # lists what the server has
    assert "--sampler 'no_such_sampler': not offered" in r.stderr and "euler" in r.stderr
    assert comfy_server.get("/history") == before  # nothing was queued
