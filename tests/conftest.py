"""Shared fixtures: a small synthetic BreakHis tree, generated once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep every test's caches out of the user's home.
os.environ.setdefault(
    "DALA_CACHE_DIR", str(Path(__file__).parent / ".." / ".pytest_cache" / "dala")
)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 patients x 4 magnifications x 4 images at 96x64: enough for patient splits."""
    from dala_search.data.synthetic import generate_demo

    return generate_demo(
        tmp_path_factory.mktemp("demo") / "breakhis", images_per_mag=4, width=96, height=64
    )


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")
