"""Scale-out on Ray, against real ComfyUI servers with the test models.

The same folder (four photos and one truncated file) is translated twice: on one machine (no Ray
imported), and on a local Ray with two workers, each with a ComfyUI of its own, one of which is
killed while it runs an image. Every photo's result exists once and equals the one-machine result;
the truncated file fails alone, once. A Ray cluster started with token authentication refuses a
client without the token. The websocket client and the progress bars run against a real server.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from agg_testing.comfy_env import COMFYUI_DIR
from PIL import Image

PACK_ROOT = Path(__file__).resolve().parents[2]
SIZES = [(96, 64), (64, 96), (80, 80), (120, 72)]  # (w, h), various aspect ratios
BROKEN = "z_broken"  # sorts last


def make_images(folder: Path) -> list[Path]:
    folder.mkdir()
    out = []
    for i, (w, h) in enumerate(SIZES):
        p = folder / f"photo_{i}.png"
        im = Image.linear_gradient("L").resize((w, h)).convert("RGB")
        im.paste((40 * i % 255, 90, 200), (0, 0, w // 3, h // 3))
        im.save(p)
        out.append(p)
    # A PNG whose header reads (the CLI's up-front check passes) but whose pixels are cut off, as a
    # damaged file in a folder: it fails when its turn comes (ComfyUI itself would load it half-grey).
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buf, "PNG")
    (folder / f"{BROKEN}.png").write_bytes(buf.getvalue()[:200])
    return out


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = str(PACK_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    return env


def translate_args(models, photos: Path, out_dir: Path) -> list[str]:
    return ["--images-dir", str(photos), "--workflow", "img2img_ksampler", "--source", "a photo",
            "--target", "a watercolor painting", "--checkpoint", str(models.path("checkpoints", models.checkpoint)),
            "--clip", str(models.path("open_clip", models.open_clip)), "--steps", "2", "--size", "64",
            "--no-unguided", "--test-models", "--cpu", "--comfyui", str(COMFYUI_DIR), "--output-dir", str(out_dir)]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("scale_out")
    return root / "photos", make_images(root / "photos")


@pytest.fixture(scope="module")
def one_machine(agg_models, folder, tmp_path_factory):
    """The folder translated on one machine (one started ComfyUI, in order), in a process that
    reports whether anything imported Ray."""
    photos, _ = folder
    out_dir = tmp_path_factory.mktemp("one_machine") / "out"
    code = ("import sys, agg_cli.main as m; rc = m.main(sys.argv[1:]); "
            "print('RAY_IMPORTED=' + str(sorted(k for k in sys.modules if k == 'ray' or k.startswith('ray.')))); "
            "sys.exit(rc)")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code, *translate_args(agg_models, photos, out_dir)], cwd=out_dir.parent,
                       env=cli_env(), capture_output=True, text=True, timeout=600)
    return r, out_dir, time.monotonic() - t0


@pytest.mark.server
@pytest.mark.slow
def test_one_machine_runs_in_order_without_ray_and_a_broken_image_fails_alone(one_machine, folder):
    r, out_dir, seconds = one_machine
    photos = folder[1]
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-4000:]  # one image failed
    assert "RAY_IMPORTED=[]" in r.stdout, out[-2000:]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["mode"] == "one machine" and summary["workers"] == []
    images = {i["name"]: i for i in summary["images"]}
    assert [i["name"] for i in summary["images"]] == [p.stem for p in photos] + [BROKEN]  # in order
    assert all(images[p.stem]["status"] == "done" for p in photos)
    broken = images[BROKEN]
    assert broken["status"] == "failed" and "unreadable image" in broken["error"] and len(broken["attempts"]) == 1
    assert not broken["outputs"] and not list(out_dir.glob(f"{BROKEN}*"))
    assert summary["servers"][0]["done"] == 4 and summary["servers"][0]["failed"] == 1
    assert sorted(p.name for p in out_dir.glob("*.part")) == []
    # Progress from ComfyUI's websocket, as plain lines (the output is not a terminal): the sampler's
    # steps, the phase and the AGG loss of each image.
    for p in photos:
        assert f"  {p.stem} [AGG: KSampler] [####################] step 2/2 loss structure=" in r.stderr, r.stderr[-3000:]
    for p in photos:
        with Image.open(out_dir / f"{p.stem}_agg.png") as im, Image.open(p) as src:
            w, h = src.size
            assert im.size == ((64, round(64 * h / w / 8) * 8) if w >= h else (round(64 * w / h / 8) * 8, 64))
        assert (out_dir / f"{p.stem}_side_by_side.png").is_file() and (out_dir / f"{p.stem}_terms.png").is_file()
        assert json.loads((out_dir / f"{p.stem}_terms.json").read_text())["events"]
    print(f"\none machine: {len(photos)} images + 1 broken in {seconds:.1f} s (ComfyUI start included)")


def comfyui_pids(work: Path) -> dict[Path, int]:
    return {f.parent: int(f.read_text()) for f in work.glob("*/comfyui.pid") if f.read_text().strip()}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for its parent counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.server
@pytest.mark.slow
def test_ray_two_workers_one_comfyui_killed_mid_image(agg_models, folder, one_machine, tmp_path):
    photos_dir, photos = folder
    ref_dir = one_machine[1]
    out_dir, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, "-m", "agg_cli", "--ray", "--workers", "2", "--work-dir", str(work),
           *translate_args(agg_models, photos_dir, out_dir)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    killed = None
    seen_pids: set[int] = set()
    try:
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline and killed is None:
            for folder_, pid in comfyui_pids(work).items():
                seen_pids.add(pid)
                log = (folder_ / "server.log").read_text(errors="replace") if (folder_ / "server.log").exists() else ""
                if log.count("got prompt") >= 2:  # its second image is in flight
                    os.kill(pid, signal.SIGKILL)
                    killed = (folder_.name, time.monotonic() - t0)
                    break
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    seconds = time.monotonic() - t0
    seen_pids |= set(comfyui_pids(work).values())
    assert killed is not None, f"no worker took a second image:\n{out[-4000:]}"
    assert proc.returncode == 1, out[-6000:]  # the broken file failed, nothing else
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["mode"] == "ray"
    images = {i["name"]: i for i in summary["images"]}
    assert sorted(images) == sorted([p.stem for p in photos] + [BROKEN])
    for p in photos:
        i = images[p.stem]
        assert i["status"] == "done", json.dumps(i, indent=1)
        assert [a["outcome"] for a in i["attempts"]].count("done") == 1
    broken = images[BROKEN]
    assert broken["status"] == "failed" and "unreadable image" in broken["error"] and "truncated" in broken["error"]
    assert [a["outcome"] for a in broken["attempts"]] == ["failed"]  # its own fault: not retried
    retried = [i for i in images.values() if len(i["attempts"]) > 1]
    assert len(retried) == 1 and [a["outcome"] for a in retried[0]["attempts"]] == ["worker lost", "done"]
    workers = {w["name"]: w for w in summary["workers"]}
    assert len(workers) == 2 and sum(w["lost"] for w in workers.values()) == 1
    assert sum(w["done"] for w in workers.values()) == 4  # the broken file never reached a worker
    assert not any(w["gone"] for w in workers.values())  # Ray restarted the worker
    # Three ComfyUIs in all (two, and the restarted worker's), every one stopped at the end.
    assert len(seen_pids) == 3, seen_pids
    deadline = time.monotonic() + 30
    while any(alive(p) for p in seen_pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in seen_pids)
    # Each result written once, in the one folder, equal to the one-machine result (same seed).
    names = sorted(p.name for p in out_dir.iterdir())
    expected = sorted([f"{p.stem}{s}" for p in photos for s in ("_agg.png", "_side_by_side.png", "_terms.json",
                                                                "_terms.png")] + ["summary.json"])
    assert names == expected
    for p in photos:
        assert np.array_equal(pixels(out_dir / f"{p.stem}_agg.png"), pixels(ref_dir / f"{p.stem}_agg.png")), p.stem
    assert "lost its ComfyUI while running" in out and "restarted by Ray" in out
    print(f"\nray: 4 images + 1 broken on 2 workers in {seconds:.1f} s (Ray and ComfyUI starts included); "
          f"{killed[0]}'s ComfyUI killed at {killed[1]:.1f} s; {retried[0]['name']} run again on the restarted worker; "
          f"one machine took {one_machine[2]:.1f} s")


@pytest.mark.slow
def test_ray_head_with_token_auth_refuses_a_client_without_the_token(tmp_path):
    """README's cluster recipe: RAY_AUTH_MODE=token ray start --head. A driver without the token is
    turned away by the cluster; one with it runs a task."""
    token = secrets.token_hex(32)
    port = _free_port()
    ray_bin = str(Path(sys.executable).parent / "ray")
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base.update(HOME=str(tmp_path), RAY_USAGE_STATS_ENABLED="0")  # no ~/.ray/auth_token of anyone's
    head_env = dict(base, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
                             "--include-dashboard=false", "--disable-usage-stats"], env=head_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
             "print('RESULT', ray.get(ray.remote(lambda: 6 * 7).remote())); ray.shutdown()")
    try:
        address = None
        deadline = time.monotonic() + 180
        while address is None and time.monotonic() < deadline:
            assert head.poll() is None, head.stdout.read()
            r = subprocess.run([sys.executable, "-c", "import ray._private.services as s; print(s.get_node_ip_address())"],
                               env=base, capture_output=True, text=True, timeout=60)
            ip = r.stdout.strip()
            import socket

            with socket.socket() as s:
                s.settimeout(1)
                if s.connect_ex((ip, port)) == 0:
                    address = f"{ip}:{port}"
                    break
            time.sleep(1)
        assert address is not None
        # no token, auth not asked for: the cluster refuses the connection
        plain = subprocess.run([sys.executable, "-c", probe, address], env=dict(base, RAY_gcs_rpc_server_connect_timeout_s="10"),
                               capture_output=True, text=True, timeout=180)
        assert plain.returncode != 0 and "RESULT" not in plain.stdout
        assert "Authentication token is missing or incorrect" in plain.stdout + plain.stderr, plain.stderr[-3000:]
        # a wrong token: refused as well
        wrong = subprocess.run([sys.executable, "-c", probe, address],
                               env=dict(base, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
                                        RAY_gcs_rpc_server_connect_timeout_s="10"),
                               capture_output=True, text=True, timeout=180)
        assert wrong.returncode != 0 and "RESULT" not in wrong.stdout
        # the token: in
        good = subprocess.run([sys.executable, "-c", probe, address], env=head_env, capture_output=True, text=True,
                              timeout=180)
        assert "RESULT 42" in good.stdout, good.stdout[-2000:] + good.stderr[-3000:]
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()


def _free_port() -> int:
    from agg_cli.comfy import free_port

    return free_port()


@pytest.mark.server
def test_websocket_progress_and_bars_against_a_real_server(comfy_server, folder):
    """The Client's websocket (websocket-client) follows a prompt on a real ComfyUI: the sampler's
    steps and AGG's per-step reports arrive, and the terminal display draws them."""
    from agg_cli import graph as G
    from agg_cli.comfy import Client
    from agg_cli.report import Display
    from agg_cli.work import ImageTask, RunSpec, Translator

    _, api = G.load_workflow("img2img_ksampler")
    m = comfy_server.models
    settings = G.Settings(source="a photo", target="a painting", steps=2, checkpoint=m.checkpoint, clip=m.open_clip)
    photo = folder[1][0]
    stream = io.StringIO()
    display = Display(1, stream, tty=True)
    steps: list[tuple] = []

    def on_step(stem, phase, value, total, loss):
        steps.append((stem, phase, value, total, loss))
        display.step(comfy_server.url, stem, phase, value, total, loss)

    client = Client(comfy_server.url)
    try:
        outcome = Translator(client, RunSpec(api=api, settings=settings, run_id="ws", no_unguided=True))(
            ImageTask(0, "cat", str(photo), photo.read_bytes(), (64, 48)), on_step)
        assert client.ws is not None and client.ws.connected
    finally:
        client.close()
    display.finished("cat", outcome.ok)
    display.close()
    assert outcome.ok, outcome.error
    assert [(v, t) for _, _, v, t, _ in steps if t == 2] == [(1, 2), (2, 2)]
    assert all(s[1] == "AGG: KSampler" for s in steps if s[3] == 2)
    assert outcome.terms and steps[-1][4].startswith("structure=")  # the AGG loss reached the bar
    with Image.open(io.BytesIO(outcome.results["AGG"][0])) as im:
        assert im.size == (64, 48)
    shown = stream.getvalue()
    assert "\r" in shown and "cat" in shown and "2/2" in shown and "AGG: KSampler structure=" in shown


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
