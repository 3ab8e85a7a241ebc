"""scripts/setup.sh never destroys anything: it uses the pack where it already lives in custom_nodes/,
creates or replaces only its own link, and refuses (changing nothing) when something else holds the
link name.

Each case runs the real script from a copy of the pack against a stand-in ComfyUI tree (main.py,
requirements.txt, custom_nodes/), with AGG_PYTHON set so that no virtualenv is built and AGG_COMFYUI
set so that nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACK_ROOT = Path(__file__).resolve().parents[1]
MAIN = "ComfyUI-0.33.0"  # where the script puts the ComfyUI everything runs on
PACK_FILES = ["scripts/setup.sh", "requirements.txt", "requirements-dev.txt", "pyproject.toml", "__init__.py"]


def make_pack(dest: Path, edit: str | None = None) -> Path:
    """A copy of the files the set-up reads, plus an uncommitted 'local edit'."""
    for rel in PACK_FILES:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PACK_ROOT / rel, dest / rel)
    if edit is not None:
        (dest / "my_local_edit.py").write_text(edit)
    return dest


def make_comfy(dest: Path) -> Path:
    (dest / "custom_nodes").mkdir(parents=True)
    (dest / "main.py").write_text("# stand-in\n")
    (dest / "requirements.txt").write_text("torch\n")
    (dest / "custom_nodes" / "someone_elses_pack.py").write_text("# must survive\n")
    return dest


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under `folder` (links not followed) -> its kind and content or target."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = "file:" + p.read_text(errors="replace")
    return out


def run_setup(pack: Path, comfy: Path, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "AGG_HOME": str(home), "AGG_COMFYUI": str(comfy), "AGG_PYTHON": sys.executable}
    return subprocess.run(["bash", str(pack / "scripts" / "setup.sh")], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def env(tmp_path):
    return make_comfy(tmp_path / "ComfyUI"), tmp_path / "home"


@pytest.mark.parametrize("folder_name", ["agg-comfyui", "AGG_fork"])
def test_clone_inside_custom_nodes_is_used_as_is(env, folder_name):
    comfy, home = env
    pack = make_pack(comfy / "custom_nodes" / folder_name, edit="x = 1  # not committed\n")
    before = snapshot(comfy)
    r = run_setup(pack, comfy, home)
    assert r.returncode == 0, r.stderr
    assert "already in ComfyUI" in r.stderr
    assert snapshot(comfy) == before  # nothing created, replaced or removed
    assert (pack / "my_local_edit.py").read_text() == "x = 1  # not committed\n"
    assert not (comfy / "custom_nodes" / folder_name).is_symlink()


def test_pack_linked_under_another_name_is_used(env, tmp_path):
    comfy, home = env
    pack = make_pack(tmp_path / "checkout")
    (comfy / "custom_nodes" / "my-agg").symlink_to(pack)
    before = snapshot(comfy)
    r = run_setup(pack, comfy, home)
    assert r.returncode == 0, r.stderr
    assert snapshot(comfy) == before


def test_fresh_link_then_second_run_keeps_it(env, tmp_path):
    comfy, home = env
    pack = make_pack(tmp_path / "checkout")
    before = snapshot(comfy)
    r = run_setup(pack, comfy, home)
    assert r.returncode == 0, r.stderr
    link = comfy / "custom_nodes" / "agg-comfyui"
    assert link.is_symlink() and link.resolve() == pack.resolve()
    assert (home / ".agg-links").read_text().splitlines() == [str(link)]
    after_first = snapshot(comfy)
    assert set(after_first) - set(before) == {"custom_nodes/agg-comfyui"}  # the one new entry
    r2 = run_setup(pack, comfy, home)
    assert r2.returncode == 0, r2.stderr
    assert snapshot(comfy) == after_first
    assert (home / ".agg-links").read_text().splitlines() == [str(link)]  # recorded once


@pytest.mark.parametrize("kind", ["folder", "file", "foreign_link"])
def test_something_else_holding_the_name_is_refused(env, tmp_path, kind):
    comfy, home = env
    pack = make_pack(tmp_path / "checkout")
    holder = comfy / "custom_nodes" / "agg-comfyui"
    if kind == "folder":
        holder.mkdir()
        (holder / "user_work.txt").write_text("precious\n")
    elif kind == "file":
        holder.write_text("precious\n")
    else:
        other = tmp_path / "another_pack"
        other.mkdir()
        (other / "user_work.txt").write_text("precious\n")
        holder.symlink_to(other)
    before = snapshot(comfy)
    r = run_setup(pack, comfy, home)
    assert r.returncode != 0
    assert str(holder) in r.stderr and "error" in r.stderr
    assert snapshot(comfy) == before
    assert "precious" in (holder / "user_work.txt" if kind != "file" else holder).read_text()


def test_dangling_old_link_is_replaced(env, tmp_path):
    comfy, home = env
    pack = make_pack(tmp_path / "checkout")
    link = comfy / "custom_nodes" / "agg-comfyui"
    link.symlink_to(tmp_path / "moved-away-clone")
    r = run_setup(pack, comfy, home)
    assert r.returncode == 0, r.stderr
    assert "dangling" in r.stderr
    assert link.resolve() == pack.resolve()
    assert (comfy / "custom_nodes" / "someone_elses_pack.py").read_text() == "# must survive\n"


def test_own_link_to_an_older_checkout_is_replaced_and_the_checkout_kept(env, tmp_path):
    comfy, home = env
    old = make_pack(tmp_path / "old-checkout", edit="old = True\n")
    assert run_setup(old, comfy, home).returncode == 0
    new = make_pack(tmp_path / "new-checkout")
    r = run_setup(new, comfy, home)
    assert r.returncode == 0, r.stderr
    assert (comfy / "custom_nodes" / "agg-comfyui").resolve() == new.resolve()
    assert (old / "my_local_edit.py").read_text() == "old = True\n"  # a link removed, never its target


def test_unpack_refuses_a_foreign_comfyui_folder(tmp_path):
    """Without AGG_COMFYUI the script unpacks into $AGG_HOME/ComfyUI-0.33.0; a folder it did not unpack
    there is refused before any download."""
    pack = make_pack(tmp_path / "checkout")
    home = tmp_path / "home"
    (home / MAIN).mkdir(parents=True)
    (home / MAIN / "notes.txt").write_text("mine\n")
    env = {k: v for k, v in os.environ.items() if k != "AGG_COMFYUI"}
    env.update(AGG_HOME=str(home), AGG_PYTHON=sys.executable, PIP_NO_INDEX="1")
    r = subprocess.run(["bash", str(pack / "scripts" / "setup.sh")], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0
    assert str(home / MAIN) in r.stderr and "not unpacked by this script" in r.stderr
    assert (home / MAIN / "notes.txt").read_text() == "mine\n"
    assert sorted(p.name for p in home.iterdir()) == [MAIN]


def test_unknown_option_is_named(tmp_path):
    pack = make_pack(tmp_path / "checkout")
    r = subprocess.run(["bash", str(pack / "scripts" / "setup.sh"), "--oldst"], capture_output=True, text=True)
    assert r.returncode != 0 and "--oldst" in r.stderr


def test_old_unrecorded_link_in_the_comfyui_it_unpacked_is_replaced(tmp_path):
    """Earlier set-ups kept no record of their link; in the ComfyUI the set-up unpacked itself the link name is
    its own, so a link there to another checkout is replaced (the link only, never the checkout)."""
    home = tmp_path / "home"
    comfy = make_comfy(home / MAIN)
    (comfy / ".agg-unpacked").write_text("0.33.0\n")
    old = make_pack(tmp_path / "old-checkout", edit="old = True\n")
    link = comfy / "custom_nodes" / "agg-comfyui"
    link.symlink_to(old)
    new = make_pack(tmp_path / "new-checkout")
    env = {**os.environ, "AGG_HOME": str(home), "AGG_PYTHON": sys.executable}
    env.pop("AGG_COMFYUI", None)
    r = subprocess.run(["bash", str(new / "scripts" / "setup.sh")], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "this set-up unpacked" in r.stderr
    assert link.resolve() == new.resolve()
    assert (old / "my_local_edit.py").read_text() == "old = True\n"
    assert (comfy / "custom_nodes" / "someone_elses_pack.py").read_text() == "# must survive\n"
