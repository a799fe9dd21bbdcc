"""A wheel carries the shipped search spaces, and an install of it lists them.

The spaces live at the repository's top level (``search_spaces/``); pyproject maps that
folder into the package as ``dala_search.search_spaces``. The wheel is built from a copy
of the project files (no ``build/`` left in the checkout), installed into a fresh folder,
and ``dala-search spaces`` is run from outside the repository against that copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Every space in the checkout must reach the wheel and be listed by an installed copy.
SHIPPED = tuple(sorted(p.stem for p in (ROOT / "search_spaces").glob("*.yaml")))


def test_every_package_folder_is_listed_in_pyproject() -> None:
    # pyproject lists the packages by hand (to map search_spaces/ in): a new subpackage
    # left out of the list would be missing from the wheel.
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    folders = {
        ".".join(p.relative_to(ROOT).parts)
        for p in (ROOT / "dala_search").rglob("*")
        if p.is_dir() and p.name != "__pycache__" and any(p.glob("*.py"))
    } | {"dala_search"}
    assert folders <= listed, sorted(folders - listed)
    assert "dala_search.search_spaces" in listed and "dala_search.templates" in listed


def _build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("dala_search", "search_spaces"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation"]
        + ["--no-index", "-q", "-w", str(tmp / "dist")],
        capture_output=True,
        text=True,
        cwd=tmp,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp / "dist").glob("dala_search-*.whl")
    return wheel


def test_wheel_ships_the_spaces_and_an_install_lists_them(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    for space in SHIPPED:
        assert f"dala_search/search_spaces/{space}.yaml" in names, sorted(names)
    assert "dala_search/templates/report.html.j2" in names

    target = tmp_path / "site"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q"]
        + ["--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr

    # Only the installed copy on the path (not the checkout), run from outside the repo.
    env = {**os.environ, "PYTHONPATH": str(target)}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import sys, dala_search; print(dala_search.__file__, file=sys.stderr);"
        "from dala_search.cli import main; main()"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "spaces"],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    loaded_from = Path(out.stderr.strip().splitlines()[0])
    assert loaded_from.is_relative_to(target), loaded_from
    listed = [line.split()[0] for line in out.stdout.splitlines() if line.strip()]
    assert listed == list(SHIPPED), out.stdout
