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


TINY_SPACE = """\
name: tiny
description: the smoke space shrunk for tests (32 px, 2 epochs, 3 trials, one magnification)
search:
  metric: balanced_accuracy
  trials: 3
  magnifications: [40X]
  sampler: tpe
  pruner: median
  max_concurrent: 2
fixed:
  pretrained: none
  image_size: 32
  epochs: 2
  batch_size: 16
  freeze_stages: 0
  fc2: 16
params:
  attention:      {type: categorical, choices: [eca, none]}
  fc1:            {type: int, low: 16, high: 32, step: 16}
  lr:             {type: float, low: 1e-3, high: 1e-2, log: true}
  loss_weighting: {type: categorical, choices: [none, focal]}
  focal_gamma:    {type: float, low: 0.5, high: 5.0, condition: {loss_weighting: focal}}
"""


@pytest.fixture(scope="session")
def tiny_space(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A search space small enough for end-to-end searches in tests (a YAML file)."""
    path = tmp_path_factory.mktemp("spaces") / "tiny.yaml"
    path.write_text(TINY_SPACE)
    return path


@pytest.fixture(scope="session")
def finished_search(
    tmp_path_factory: pytest.TempPathFactory, demo_root: Path, tiny_space: Path
) -> dict:
    """One real finished search (3 trials at 40X, sqlite MLflow store), shared read-only.

    Returns ``{"name", "runs_dir", "tracking_uri", "plan", "outcomes"}``. Tests must not
    change it; a test that needs to mutate a search runs its own.
    """
    import ray

    from dala_search.search.tuner import plan_search, run_search

    root = tmp_path_factory.mktemp("finished")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    plan = plan_search(
        space=str(tiny_space),
        name="tiny",
        data_dir=demo_root,
        tracking_uri=uri,
        runs_dir=root / "runs",
    )
    try:
        outcomes = run_search(plan)
    finally:
        ray.shutdown()
    return {
        "name": plan.name,
        "runs_dir": root / "runs",
        "tracking_uri": uri,
        "plan": plan,
        "outcomes": outcomes,
    }
