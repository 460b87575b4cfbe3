"""The wheel holds everything a pip-installed culturemert needs at run time: every recipe the CLI can name (the
shipped ones, the quickstart's) and the quickstart's shipped base and teacher."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from culturemert.quickstart import QUICKSTART_RECIPES, SHIPPED_BASE
from culturemert.train import shipped_recipes

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _setuptools_ok() -> bool:
    if importlib.util.find_spec("setuptools") is None:
        return False
    import setuptools

    return int(setuptools.__version__.split(".")[0]) >= 77


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # build from a copy, so the test never leaves build/ or *.egg-info in the checkout
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)]
    if _setuptools_ok():  # offline: the installed build backend; otherwise pip fetches setuptools into isolation
        cmd.insert(4, "--no-build-isolation")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        if "No matching distribution" in proc.stderr or "Could not find a version" in proc.stderr:
            pytest.skip(f"cannot build a wheel here (no setuptools >= 77 and no package index): {proc.stderr[-300:]}")
        raise AssertionError(proc.stderr)
    (found,) = out.glob("culturemert-*.whl")
    return found


def test_wheel_holds_every_recipe_the_cli_can_name_and_the_quickstart_assets(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = shipped_recipes()
    assert set(QUICKSTART_RECIPES) <= set(shipped)
    for name in shipped:
        assert f"culturemert/recipes/{name}.yaml" in names, name
    package = SHIPPED_BASE.parents[1]
    for path in sorted(SHIPPED_BASE.rglob("*")):
        if path.is_file():
            assert f"culturemert/{path.relative_to(package).as_posix()}" in names, path
    assert "culturemert/py.typed" in names
    assert not [n for n in names if n.startswith(("tests/", "bench/", "recipes/"))]
