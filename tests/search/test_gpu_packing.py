"""Fractional-GPU packing, on a Ray node that declares one GPU (this machine has none).

Ray's scheduling of fractions is real here: ``--gpus-per-trial 0.25`` must run four trials
at once on the one GPU, each tagged with the GPU id Ray gave it. What a GPU's memory and
kernels do under four trials is measured only on a lent GPU (bench/README.md). The trials
below train on the CPU because their space says ``device: cpu``; with ``device: auto`` a
trial that was given a GPU but finds no CUDA fails, naming why, instead of training on the
CPU while it holds the GPU.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from dala_search.runs import schema

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def one_gpu_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A Ray node with 4 CPUs and 1 declared GPU; yields the barrier's arrivals folder.

    After its first epoch each trial waits at a barrier (``dala_search/faults.py``) until
    four trial processes are there: trials that did not run at the same time fail it (after
    120 s). Ray's workers take the switch from this node's runtime env (a search started on
    a Ray it did not start adds no env of its own).
    """
    import ray

    arrived = tmp_path_factory.mktemp("barrier") / "arrived"
    barrier = {"kind": "barrier", "epoch": 1, "dir": str(arrived), "count": 4}
    ray.init(
        address="local",
        num_cpus=4,
        num_gpus=1,  # declared: Ray hands out the id "0" (there is no device behind it)
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
        runtime_env={"env_vars": {"DALA_FAULTS": json.dumps([barrier])}},
    )
    try:
        yield arrived
    finally:
        ray.shutdown()


def _space(tmp_path: Path, tiny_space: Path, device: str) -> Path:
    text = tiny_space.read_text().replace("  fc2: 16\n", f"  fc2: 16\n  device: {device}\n")
    assert f"device: {device}" in text
    path = tmp_path / f"tiny-{device}.yaml"
    path.write_text(text)
    return path


def _search(tmp_path: Path, demo_root: Path, space: Path, name: str, trials: int):  # noqa: ANN202
    import dataclasses

    from dala_search.search.tuner import plan_search, run_search

    plan = plan_search(
        space=str(space),
        name=name,
        data_dir=demo_root,
        trials=trials,
        epochs=1,
        pruner="none",
        gpus_per_trial=0.25,
        cpus_per_trial=1,
        max_concurrent=0,  # as many as the node's resources allow: 1 GPU / 0.25 = 4
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        runs_dir=tmp_path / "runs",
    )
    plan = dataclasses.replace(plan, log_models=False)
    (outcome,) = run_search(plan)
    return plan, outcome


def test_quarter_gpus_run_four_trials_at_once_on_one_gpu(
    one_gpu_node: Path,
    tmp_path: Path,
    demo_root: Path,
    tiny_space: Path,
    checked_records: Callable,
) -> None:
    space = _space(tmp_path, tiny_space, "cpu")
    plan, outcome = _search(tmp_path, demo_root, space, "quarters", trials=4)
    assert (outcome.completed, outcome.failed) == (4, 0)
    assert len(list(one_gpu_node.iterdir())) == 4  # four processes met at the barrier
    _, runs = checked_records(plan)
    assert [r.data.tags[schema.TAG_GPUS] for r in runs] == ["0"] * 4  # one GPU, shared
    assert len({r.data.tags[schema.TAG_PID] for r in runs}) == 4  # four trial processes
    # all four at once: every run started before any of them ended
    assert max(r.info.start_time for r in runs) < min(r.info.end_time for r in runs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_trial_given_a_gpu_without_cuda_fails_and_says_why(
    one_gpu_node: Path,
    tmp_path: Path,
    demo_root: Path,
    tiny_space: Path,
    checked_records: Callable,
) -> None:
    space = _space(tmp_path, tiny_space, "auto")
    plan, outcome = _search(tmp_path, demo_root, space, "no-cuda", trials=1)
    assert (outcome.completed, outcome.failed) == (0, 1)
    _, (run,) = checked_records(plan)
    assert run.data.tags[schema.TAG_GPUS] == "0"
    error = run.data.tags["dala.error"]
    assert "Ray gave this trial GPU 0 but CUDA is not available" in error
    assert "--gpus-per-trial 0" in error
    # no epoch was trained on the CPU behind the GPU's back
    assert not MlflowClient(plan.tracking_uri).get_metric_history(
        run.info.run_id, "val_balanced_accuracy"
    )
