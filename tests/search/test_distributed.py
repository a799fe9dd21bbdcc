"""Data-parallel trials (``--workers-per-trial``): DDP equals one process; real Ray searches.

* ``test_ddp_matches_one_process``: two gloo processes (this file run as a script) train
  with ``train.py``'s DDP hook; the test process trains the same thing alone. A model
  without BatchNorm or dropout has the same gradient however a batch is split, so weights,
  losses and the reported validation/test numbers must agree.
* ``test_ddp_search_prunes_then_completes``: a real Ray search with two workers per trial
  on two CPUs. Trial 0 is pruned after epoch 1 (a pruner that says so); trial 1 can only
  start its workers once trial 0's are freed, then completes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dala_search.config import TrialConfig
from dala_search.errors import ConfigError

# No augmentation, no class weights, SGD: what one process and two ranks must agree on.
PLAIN = dict(
    pretrained="none",
    image_size=32,
    epochs=2,
    optimizer="sgd",
    lr=0.05,
    loss_weighting="none",
    sampling="none",
    flip=False,
    rotate90=False,
    crop_scale=1.0,
    color_jitter=0.0,
    stain_jitter=0.0,
    device="cpu",
    num_threads=1,
)


class TinyNet(nn.Module):
    """No BatchNorm, no dropout: its gradient on a batch does not depend on how the batch is
    split across ranks (DALAResNet50's BatchNorm statistics would, on the CPU)."""

    def __init__(self, config: TrialConfig | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        return [{"params": list(self.parameters()), "weight_decay": weight_decay}]


def _one_step(data, config: TrialConfig, order: np.ndarray, rank: int, world: int) -> dict:
    """One pass of ``train_one_epoch`` over ``order`` from a seeded TinyNet (SGD)."""
    from dala_search.train import _Batches
    from dala_search.train_steps import train_one_epoch

    torch.manual_seed(0)
    model = TinyNet()
    wrapped = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    idx = np.asarray(data.split.train)
    stats = train_one_epoch(
        wrapped,
        _Batches(data, idx, torch.device("cpu")),
        torch.from_numpy(data.labels("binary")[idx]),
        order,
        config=config,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
        rank=rank,
        world_size=world,
    )
    return {"state": model.state_dict(), "stats": stats}


def _run(job: dict, rank: int, world: int) -> dict:
    """One step and one whole trial on this rank (``world`` 1: the one-process reference)."""
    from dala_search.train import train_trial

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # as the ranks, whose results must match
        step = _one_step(job["data"], job["step_config"], job["order"], rank, world)
        reports: list[tuple[int, dict]] = []
        result = train_trial(
            job["config"],
            job["data"],
            lambda epoch, m: reports.append((epoch, dict(m))),
            keep_model=True,
            build_model=TinyNet,
            distributed=world > 1,
        )
    finally:
        torch.set_num_threads(threads)
    return {
        "step": step,
        "reports": reports,
        "test": result.test,
        "n_test_scores": len(result.test_scores["y_true"]),
        "state": None if result.model is None else result.model.state_dict(),
    }


def _rank_main(rank: int, world: int, port: int, inp: str, out: str) -> None:
    """One rank of the equivalence test, in its own process."""
    import torch.distributed as dist

    with open(inp, "rb") as f:
        job = pickle.load(f)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        result = _run(job, rank, world)
    finally:
        dist.destroy_process_group()
    with open(out, "wb") as f:
        pickle.dump(result, f)


def _same(a: float, b: float, tol: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


def _batch_size(n_train: int) -> int:
    """A batch size whose last batch both layouts train (a remainder of 2 or 3 gives each
    rank under two samples, which DDP drops and one process does not)."""
    return next(bs for bs in range(16, 4, -1) if n_train % bs not in (2, 3))


def test_ddp_matches_one_process(demo_root: Path, tmp_path: Path, unused_port: int) -> None:
    from dala_search.train import prepare_data

    data = prepare_data(demo_root, "40X", image_size=32)
    job = {
        "data": data,
        # 13 samples in batches of 8: shares of 4+4, then of 3+2 (unequal, loss-weighted).
        "order": np.arange(13),
        "step_config": TrialConfig(**{**PLAIN, "batch_size": 8}),
        "config": TrialConfig(**{**PLAIN, "batch_size": _batch_size(len(data.split.train))}),
    }
    inp = tmp_path / "job.pkl"
    inp.write_bytes(pickle.dumps(job))
    port = unused_port
    runs = {"r0": (0, 2), "r1": (1, 2)}
    procs = {
        k: subprocess.Popen(
            [sys.executable, __file__, str(r), str(w), str(port), str(inp), str(tmp_path / k)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for k, (r, w) in runs.items()
    }
    one = _run(job, 0, 1)  # the reference, here, while the ranks run
    for k, p in procs.items():
        output, _ = p.communicate(timeout=240)
        assert p.returncode == 0, f"{k}: {output[-3000:]}"
    r0, r1 = (pickle.loads((tmp_path / k).read_bytes()) for k in runs)

    # One step: both ranks hold the weights one process gets from the whole global batches.
    for rank in (r0, r1):
        for name, w in one["step"]["state"].items():
            torch.testing.assert_close(rank["step"]["state"][name], w, atol=1e-6, rtol=1e-5)
        assert rank["step"]["stats"]["train_loss"] == pytest.approx(
            one["step"]["stats"]["train_loss"], rel=1e-6
        )

    # A whole trial: same weights, and every epoch's reported numbers as one process's.
    for name, w in one["state"].items():
        torch.testing.assert_close(r0["state"][name], w, atol=1e-5, rtol=1e-4)
    assert r1["state"] is None  # the model stays with rank 0
    assert [e for e, _ in r0["reports"]] == [e for e, _ in one["reports"]] == [1, 2]
    reports = zip(r0["reports"], r1["reports"], one["reports"], strict=True)
    for (_, m0), (_, m1), (_, ref) in reports:
        val = [k for k in ref if k.startswith("val_")]
        assert val and set(val) <= set(m0)
        for k in val:
            assert m0[k] == m1[k] or (math.isnan(m0[k]) and math.isnan(m1[k])), k
            assert _same(m0[k], ref[k], 1e-6), (k, m0[k], ref[k])
        assert m0["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5)
    # Test numbers over the whole test split, the same on both ranks and as one process's.
    assert r0["n_test_scores"] == r1["n_test_scores"] == len(data.split.test)
    assert r0["test"].keys() == one["test"].keys()
    for k, v in one["test"].items():
        assert _same(r0["test"][k], v, 1e-6) and _same(r1["test"][k], r0["test"][k], 0.0), k


def test_layout_concurrency_and_fit() -> None:
    from dala_search.search.distributed import (
        WorkerLayout,
        check_fits,
        max_concurrent_trials,
    )

    cpu2 = WorkerLayout(workers=2, cpus=1.0, gpus=0.0)
    assert cpu2.per_worker() == {"CPU": 1.0}
    assert max_concurrent_trials(0, cpu2, {"CPU": 5.0}) == 2  # 2 CPUs per trial
    assert max_concurrent_trials(1, cpu2, {"CPU": 8.0}) == 1  # asked for fewer
    gpu = WorkerLayout(workers=4, cpus=2.0, gpus=1.0)
    assert gpu.per_worker() == {"CPU": 2.0, "GPU": 1.0}
    assert max_concurrent_trials(0, gpu, {"CPU": 64.0, "GPU": 8.0}) == 2  # GPUs limit
    check_fits(cpu2, {"CPU": 2.0})
    with pytest.raises(ConfigError, match="--gpus-per-trial 0.5 with --workers-per-trial 2"):
        WorkerLayout(workers=2, cpus=1.0, gpus=0.5)
    with pytest.raises(ConfigError, match="--workers-per-trial 4.*8 CPU and 4 GPU"):
        check_fits(gpu, {"CPU": 64.0, "GPU": 2.0})


@pytest.mark.slow
@pytest.mark.timeout(600)  # a stopped trial's workers never freed: the next trial hangs
def test_ddp_search_prunes_then_completes(
    demo_root: Path, tiny_space: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import optuna
    import ray
    from mlflow import MlflowClient

    from dala_search.runs import schema
    from dala_search.runs.schema import TAG_WORKERS
    from dala_search.search.pruning import PRUNERS
    from dala_search.search.tuner import plan_search, run_search

    class PruneTrialZero(optuna.pruners.BasePruner):
        """Prunes Optuna trial 0 at its first report, so a DDP trial is pruned on cue."""

        def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
            return trial.number == 0 and trial.last_step is not None

    # The pruning scheduler runs in this (driver) process, so a registry entry reaches it.
    monkeypatch.setitem(PRUNERS, "trial0", lambda **kw: PruneTrialZero())
    # ... and the start options' table accepts its name (the --pruner row's choices).
    from dala_search import start_options as so

    row = dataclasses.replace(so.OPTIONS["pruner"], choices=(*so.PRUNERS, "trial0"))
    monkeypatch.setitem(so.OPTIONS, "pruner", row)
    rows = tuple(row if o.name == "pruner" else o for o in so.START_OPTIONS)
    monkeypatch.setattr(so, "START_OPTIONS", rows)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # "local": a Ray of our own even while a `ray start` cluster runs on this machine.
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
    )
    try:
        plan = plan_search(
            space=str(tiny_space),
            name="ddp",
            data_dir=demo_root,
            trials=2,
            pruner="trial0",
            workers_per_trial=2,
            max_concurrent=2,  # capped to 1: two trials x two workers do not fit two CPUs
            tracking_uri=uri,
            runs_dir=tmp_path / "runs",
        )
        # No ~100 MB model pickles: rank 0 logs models with the single-process code.
        plan = dataclasses.replace(plan, log_models=False)
        (outcome,) = run_search(plan)
    finally:
        ray.shutdown()

    assert (outcome.finished, outcome.completed, outcome.pruned, outcome.failed) == (2, 1, 1, 0)
    study = optuna.load_study(study_name=plan.study_name("40X"), storage=plan.storage)
    states = {t.number: t.state.name for t in study.get_trials()}
    assert states == {0: "PRUNED", 1: "COMPLETE"}

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(schema.experiment_name("ddp"))
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{schema.TAG_ROLE}` = 'trial'"
    )
    by_number = {r.data.tags[schema.TAG_OPTUNA_NUMBER]: r for r in runs}
    assert sorted(by_number) == ["0", "1"]
    pruned, done = by_number["0"], by_number["1"]
    assert pruned.data.tags[schema.TAG_STATE] == "pruned"
    assert pruned.info.status == "KILLED"
    assert done.data.tags[schema.TAG_STATE] == "completed"
    assert done.info.status == "FINISHED"
    assert pruned.data.tags[TAG_WORKERS] == done.data.tags[TAG_WORKERS] == "2"
    history = client.get_metric_history(done.info.run_id, plan.tune_metric)
    assert sorted(m.step for m in history) == [1, 2]  # one value per epoch
    assert "test_balanced_accuracy" in done.data.metrics
    assert done.data.params["lr"]  # the sampled config is on the run
    artifacts = {a.path for a in client.list_artifacts(done.info.run_id, "figures")}
    assert "figures/learning_curves.png" in artifacts
    assert outcome.best_run_id == done.info.run_id


if __name__ == "__main__":  # one process of test_ddp_matches_one_process
    rank_, world_, port_, inp_, out_ = sys.argv[1:]
    _rank_main(int(rank_), int(world_), int(port_), inp_, out_)
