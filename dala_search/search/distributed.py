"""Data-parallel trials (``--workers-per-trial N``): one Tune trial trained by N workers.

Ray Train V2 inside Ray Tune: the Tune function trial (``run_ddp_trial``) starts a
``TorchTrainer`` whose N workers (``_worker_loop``) each run
``train_trial(distributed=True)``: the model in ``DistributedDataParallel`` (gloo on the
CPU, NCCL on GPUs), every rank training its share of every global batch. Rank 0 opens and
writes the trial's MLflow child run exactly as a single-process trial does
(``trainable.record_trial``); every rank calls ``ray.train.report`` once per epoch (Ray
Train needs the same count on every rank) and ``TuneReportCallback`` hands rank 0's
metrics to Tune, where OptunaSearch and the pruning scheduler see them like any trial's.

Starting a worker group costs seconds (10-20 s on a small CPU machine), so a one-worker
trial never comes here: it trains in the Tune function itself (``trainable.run_trial``).

Resources: the workers' placement group is Ray Train's, outside Tune's accounting. The
Tune function (which only waits on the Train controller) asks for no CPU or GPU, and the
tuner caps concurrent trials so that trials x workers fit the cluster
(``max_concurrent_trials``). When the pruner stops a trial, Tune ends the Tune function;
the controller it owns dies with it, but the workers' placement group outlives it (Ray
removes a group with its creator only once the whole job ends). Ray Train's own cleaner
asks the state API, which needs a running dashboard and, on a machine with several Ray
instances, can ask the wrong one. So rank 0 reports its placement group with its metrics
and ``FreeWorkersCallback`` (driver side) removes it when the trial ends: the next trial's
workers never wait on a stopped trial's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray import PlacementGroupID, train, tune
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.util import get_current_placement_group
from ray.util.placement_group import (
    PlacementGroup,
    placement_group_table,
    remove_placement_group,
)

from dala_search.errors import ConfigError
from dala_search.runs.schema import TAG_WORKERS
from dala_search.search.trainable import TrialContext, record_trial, trial_config
from dala_search.train import TrialData, train_trial

# Ray refuses an all-zero resource request for a Tune trial; one byte of memory is the
# smallest real request and leaves every CPU and GPU to the workers.
DRIVER_RESOURCES = {"cpu": 0, "gpu": 0, "memory": 1}

# Result key of the workers' placement group id (hex), read by FreeWorkersCallback.
PG_KEY = "dala_workers_pg"


@dataclass(frozen=True)
class WorkerLayout:
    """How one data-parallel trial is spread: ``workers`` ranks, each with these resources."""

    workers: int
    cpus: float  # per worker (its torch threads on the CPU)
    gpus: float  # per worker; 0: CPU training with gloo

    def __post_init__(self) -> None:
        if 0 < self.gpus < 1:  # NCCL refuses two ranks of one group on the same GPU
            raise ConfigError(
                f"--gpus-per-trial {self.gpus:g} with --workers-per-trial {self.workers}: each "
                "data-parallel worker needs whole GPUs (NCCL runs one rank per GPU); use "
                "--gpus-per-trial 1, or one worker per trial to pack trials on a GPU"
            )

    @property
    def use_gpu(self) -> bool:
        return self.gpus > 0

    def per_worker(self) -> dict[str, float]:
        """Ray Train's ``resources_per_worker``."""
        out = {"CPU": float(self.cpus)}
        if self.use_gpu:
            out["GPU"] = float(self.gpus)
        return out

    def footprint(self) -> dict[str, float]:
        """What one whole trial holds while it trains (all of it in the workers)."""
        return {"cpu": self.workers * self.cpus, "gpu": self.workers * self.gpus}


def trials_that_fit(layout: WorkerLayout, cluster: Mapping[str, float]) -> int:
    """How many trials' worker groups the cluster's CPUs and GPUs hold at once."""
    fits = math.floor(cluster.get("CPU", 0) / layout.footprint()["cpu"] + 1e-9)
    if layout.use_gpu:
        fits = min(fits, math.floor(cluster.get("GPU", 0) / layout.footprint()["gpu"] + 1e-9))
    return fits


def check_fits(layout: WorkerLayout, cluster: Mapping[str, float]) -> None:
    """Refuse a layout the cluster can never hold (Ray Train would wait for it forever).

    Called for a Ray started by the search itself; a cluster given by ``--address`` may
    autoscale, so its current size proves nothing.
    """
    if trials_that_fit(layout, cluster) < 1:
        need = layout.footprint()
        have = f"{cluster.get('CPU', 0):g} CPU, {cluster.get('GPU', 0):g} GPU"
        raise ConfigError(
            f"--workers-per-trial {layout.workers}: one trial needs {need['cpu']:g} CPU and "
            f"{need['gpu']:g} GPU ({layout.cpus:g} CPU and {layout.gpus:g} GPU per worker; "
            f"see --cpus-per-trial and --gpus-per-trial) but this Ray has {have}"
        )


def max_concurrent_trials(
    requested: int, layout: WorkerLayout, cluster: Mapping[str, float]
) -> int:
    """Concurrent data-parallel trials: what fits the cluster, at most ``requested`` (0: no cap).

    Tune does not count the workers, so without this cap it would start trials whose
    Train runs then queue for resources, each holding a Tune slot and an Optuna trial.
    """
    fits = max(1, trials_that_fit(layout, cluster))
    return min(fits, requested) if requested > 0 else fits


def ddp_trainable(data: TrialData, ctx: TrialContext, layout: WorkerLayout) -> Any:
    """The Tune trainable of a data-parallel search (``run_ddp_trial`` with its resources)."""
    fn = tune.with_parameters(run_ddp_trial, data=data, ctx=ctx, layout=layout)
    return tune.with_resources(fn, DRIVER_RESOURCES)


def run_ddp_trial(
    params: dict[str, Any], *, data: TrialData, ctx: TrialContext, layout: WorkerLayout
) -> None:
    """Ray Tune function trainable: run one trial on ``layout.workers`` Ray Train workers.

    Returns when training ends; raises (so Tune marks the trial errored) when a worker
    failed. A pruned trial is ended by Tune while ``fit`` waits (see the module notes).
    """
    tune_ctx = tune.get_context()
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "params": params,
            "data": data,
            "ctx": ctx,
            "trial_id": tune_ctx.get_trial_id(),
            "use_gpu": layout.use_gpu,
        },
        torch_config=TorchConfig(backend="nccl" if layout.use_gpu else "gloo"),
        scaling_config=train.ScalingConfig(
            num_workers=layout.workers,
            use_gpu=layout.use_gpu,
            resources_per_worker=layout.per_worker(),
        ),
        run_config=train.RunConfig(
            name="ddp",
            storage_path=tune_ctx.get_trial_dir(),
            callbacks=[TuneReportCallback()],
            # A worker that raised would raise again: the trial fails, as a
            # single-process trial does (Tune's own FailureConfig covers lost processes).
            failure_config=train.FailureConfig(max_failures=0),
        ),
    )
    trainer.fit()


def _worker_loop(cfg: dict[str, Any]) -> None:
    """One Ray Train worker (rank) of a data-parallel trial."""
    if cfg["use_gpu"]:
        torch.cuda.set_device(ray.train.torch.get_device())
    params, data, ctx = cfg["params"], cfg["data"], cfg["ctx"]
    train_ctx = ray.train.get_context()
    pg = get_current_placement_group()
    pg_hex = pg.id.hex() if pg is not None else ""

    def send(metrics: dict[str, float]) -> None:
        ray.train.report({**metrics, PG_KEY: pg_hex})

    if train_ctx.get_world_rank() == 0:
        record_trial(
            params,
            data=data,
            ctx=ctx,
            trial_id=cfg["trial_id"],
            send=send,
            distributed=True,
            extra_tags={TAG_WORKERS: str(train_ctx.get_world_size())},
        )
    else:
        # Same metrics as rank 0 (train_trial shares them); Tune only reads rank 0's.
        train_trial(
            trial_config(params, ctx), data, lambda epoch, m: send(dict(m)), distributed=True
        )


def _free_placement_group(pg_hex: str) -> bool:
    """Remove the placement group ``pg_hex`` unless it is gone already; True if removed."""
    pg = PlacementGroup(PlacementGroupID(bytes.fromhex(pg_hex)))
    if placement_group_table(pg).get("state") in (None, "REMOVED"):
        return False
    remove_placement_group(pg)
    return True


class FreeWorkersCallback(Callback):
    """Driver-side Tune callback: when a data-parallel trial ends (completed, pruned,
    failed), remove its workers' placement group if Ray Train has not.

    A completed trial's controller removed it already; a pruned one's did not (see the
    module notes). Listed before the tracking callback, so the workers are gone before
    the trial's MLflow run is closed. Holds no state: safe to pickle for ``Tuner.restore``.
    """

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._free(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._free(trial)

    @staticmethod
    def _free(trial: Any) -> None:
        pg_hex = (trial.last_result or {}).get(PG_KEY)
        if pg_hex:
            _free_placement_group(pg_hex)
