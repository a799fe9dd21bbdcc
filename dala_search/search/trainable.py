"""The Ray Tune function trial: sampled params -> TrialConfig -> ``train_trial``
(``train_cv_trial`` with ``--cv K``: K inner folds in lockstep, the fold mean reported).

Runs inside a Ray worker process, wherever the trial was placed. It opens its own MLflow
child run, reports every epoch to Tune (which feeds OptunaSearch and the pruning
scheduler) and to MLflow, and logs figures and, when the trial beats the best completed so
far, its model. A trial that Tune stops early is killed mid-epoch: the driver closes its
run (``callbacks.py``).
"""

from __future__ import annotations

import math
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray import tune

from dala_search import faults
from dala_search.config import TIMM_PREFIX, TrialConfig
from dala_search.costs import measure_config_costs
from dala_search.data.splits import Split
from dala_search.epoch_loop import Reporter
from dala_search.errors import ConfigError
from dala_search.runs import schema
from dala_search.search import tracking
from dala_search.search.pruning import FINAL_EPOCH_KEY
from dala_search.space import SearchSpace
from dala_search.train import TrialData, TrialResult, train_trial
from dala_search.train_cv import train_cv_trial


@dataclass(frozen=True)
class TrialContext:
    """Plain strings and numbers the trial needs besides its params (pickled to workers)."""

    search: str
    magnification: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    metric: str  # e.g. "val_balanced_accuracy"
    space: SearchSpace
    overrides: dict[str, Any]  # CLI overrides of the space (epochs, image_size, device)
    synthetic: bool
    code_version: str
    log_models: bool = True
    # ``--cv K``: the K inner folds every trial trains on (``data.splits.inner_folds``); empty
    # for one validation split. Same folds for every trial, so their means compare.
    folds: tuple[Split, ...] = ()
    # Costs the objectives or constraints name (objectives.COST_METRICS): measured once,
    # before training, and sent with every epoch's result.
    costs: tuple[str, ...] = ()
    # Several objectives: every completed trial logs its model (not only one that beats the
    # completed ones on the primary), so each point of the Pareto front can be registered.
    log_every_model: bool = False


def run_trial(params: dict[str, Any], *, data: TrialData, ctx: TrialContext) -> None:
    """Ray Tune function trainable (bound with ``tune.with_parameters``)."""
    tune_ctx = tune.get_context()
    record_trial(
        params,
        data=data,
        ctx=ctx,
        trial_id=tune_ctx.get_trial_id(),
        send=tune.report,
    )


def trial_config(params: dict[str, Any], ctx: TrialContext) -> TrialConfig:
    """The trial's config: Tune's sampled params (keys without a leading ``_``) + overrides."""
    sampled = {k: v for k, v in params.items() if not k.startswith("_")}
    return ctx.space.trial_config(sampled, **ctx.overrides)


def record_trial(
    params: dict[str, Any],
    *,
    data: TrialData,
    ctx: TrialContext,
    trial_id: str,
    send: Callable[[dict[str, float]], None],
    distributed: bool = False,
    extra_tags: dict[str, str] | None = None,
) -> None:
    """Train one trial and record it: its MLflow child run, per-epoch metrics through
    ``send``, figures, model, final state.

    The body of ``run_trial`` (``send`` = ``ray.tune.report``) and of rank 0 of a
    data-parallel trial (``distributed.py``: ``send`` = ``ray.train.report``,
    ``distributed`` = True, ``extra_tags`` saying how many workers).
    """
    config = trial_config(params, ctx)
    gpu_ids = [str(g) for g in ray.get_gpu_ids()]
    # The split protocol on every trial run: an image-level (LEAKY) search is marked in
    # the MLflow UI's trial lists, not only on its parent run.
    tags = {
        schema.TAG_PROTOCOL: data.split.protocol,
        schema.TAG_LEAKY: str(data.split.leaky).lower(),
        **(extra_tags or {}),
    }
    tracker = _open_run(params, config, ctx, trial_id, gpu_ids, tags)
    report = _EpochReport(ctx.metric, config.epochs, tracker, send)
    try:
        check_gpu_visible(gpu_ids, config)
        if ctx.costs:
            report.constant = measure_config_costs(config, ctx.costs)
            tracker.log_metrics(report.constant, step=0)
        result = _train(config, data, ctx, report, distributed)
    except Exception as e:
        # A raised error (a bug, a NaN loss, out of memory) would repeat: the run is marked
        # so a restart by Tune's FailureConfig ends at once instead of training again.
        tracker.finish(
            "failed", error=f"{type(e).__name__}: {e}\n{traceback.format_exc()}", raised=True
        )
        raise
    tracker.log_metrics(result.summary(), step=result.epochs_run)
    if result.test_scores:
        tracker.log_dict(test_predictions(data, result), schema.TEST_PREDICTIONS)
    _log_figures(tracker, result)
    if (
        ctx.log_models
        and result.model is not None
        and (ctx.log_every_model or _beats_completed(ctx, result))
    ):
        tracker.log_model(result.model, config.to_dict(), ctx.magnification)
    tracker.finish("completed")


def _open_run(
    params: dict[str, Any],
    config: TrialConfig,
    ctx: TrialContext,
    trial_id: str,
    gpu_ids: list[str],
    extra_tags: dict[str, str] | None,
) -> tracking.TrialTracker:
    """The trial's MLflow child run, tagged with where it runs, its config logged."""
    tracker = tracking.TrialTracker(
        ctx.tracking_uri,
        ctx.experiment_id,
        ctx.parent_run_id,
        run_name=schema.trial_run_name(ctx.magnification, params.get("_optuna_number"), trial_id),
        tags={
            schema.TAG_MAG: ctx.magnification,
            schema.TAG_RAY_ID: trial_id,
            schema.TAG_NODE: ray.get_runtime_context().get_node_id(),
            schema.TAG_PID: str(os.getpid()),
            schema.TAG_GPUS: ",".join(gpu_ids) or "none",
            schema.TAG_OPTUNA_NUMBER: str(params.get("_optuna_number", "")),
            schema.TAG_SYNTHETIC: str(ctx.synthetic).lower(),
            schema.TAG_SEARCH: ctx.search,
            schema.TAG_CODE: ctx.code_version,
            schema.TAG_CV: str(max(1, len(ctx.folds))),
            **(extra_tags or {}),
        },
        params=config.to_dict(),
    )
    tracker.log_dict(config.to_dict(), "trial_config.json")
    return tracker


class _EpochReport:
    """The trial's reporter: each epoch's metrics, with the best value so far, to MLflow
    and to Tune (``send``)."""

    def __init__(
        self,
        metric: str,
        epochs: int,
        tracker: tracking.TrialTracker,
        send: Callable[[dict[str, float]], None],
    ) -> None:
        self.metric, self.epochs, self.tracker, self.send = metric, epochs, tracker, send
        self.best_so_far = -math.inf
        self.constant: dict[str, float] = {}  # measured costs, in every result to Tune
        self.micro_batch: float | None = None

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        value = metrics.get(self.metric, float("nan"))
        if math.isfinite(value):
            self.best_so_far = max(self.best_so_far, value)
        best = self.best_so_far if math.isfinite(self.best_so_far) else float("nan")
        out = {**metrics, f"best_{self.metric}": best}
        self.tracker.log_metrics(out, step=epoch)
        micro = metrics.get("micro_batch")
        if micro is not None and micro != self.micro_batch:  # halved after an out-of-memory
            self.tracker.set_tag(schema.TAG_MICRO_BATCH, str(int(micro)))
            self.micro_batch = micro
        # Tune (not MLflow) is told which epoch is the last: no pruner judges it. A trial
        # that early-stops (patience) is not flagged: its end is decided after the report.
        self.send({**out, **self.constant, FINAL_EPOCH_KEY: float(epoch >= self.epochs)})
        faults.after_epoch(epoch)  # no-op unless a reliability test injects a fault


def _train(
    config: TrialConfig,
    data: TrialData,
    ctx: TrialContext,
    report: Reporter,
    distributed: bool,
) -> TrialResult:
    """``train_trial``, or ``train_cv_trial`` on the context's folds (``--cv``); a
    ``timm:`` backbone trains a head on its cached embeddings (``train_head.py``)."""
    if config.backbone.startswith(TIMM_PREFIX):
        from dala_search.train_head import train_head_trial

        if ctx.folds:
            raise ConfigError(f"--cv with backbone {config.backbone!r} is not supported yet")
        return train_head_trial(
            config, data, report, keep_model=ctx.log_models, distributed=distributed
        )
    if ctx.folds:  # the reported val_* are the folds' means: Optuna and pruner judge them
        if distributed:
            raise ConfigError("--cv with --workers-per-trial > 1 is not supported")
        return train_cv_trial(config, data, ctx.folds, report, keep_model=ctx.log_models)
    return train_trial(config, data, report, keep_model=ctx.log_models, distributed=distributed)


def test_predictions(data: TrialData, result: TrialResult) -> dict[str, Any]:
    """The trial's test predictions (best epoch's weights; with ``--cv`` the fold models'
    averaged probabilities), image by image in the order of ``data.split.test``.

    ``positions`` index the magnification's records (``TrialData.records``), ``slides`` are
    the patients: a reader can score them again, pool them with other trials' (a nested
    evaluation pools its outer folds') and check which patients were tested. A few KB per
    trial (two floats per test image for the binary task).
    """
    test = list(data.split.test)
    y_true = [int(v) for v in result.test_scores["y_true"]]
    if len(y_true) != len(test):
        raise RuntimeError(f"{len(y_true)} test predictions for {len(test)} test images")
    return {
        "positions": test,
        "slides": data.slides(test),
        "y_true": y_true,
        "y_prob": [[float(p) for p in row] for row in result.test_scores["y_prob"]],
    }


def check_gpu_visible(gpu_ids: list[str], config: TrialConfig) -> None:
    """A trial that Ray gave GPUs trains on one, or says why not: with ``device: auto`` and
    no CUDA in its process (a driver or CUDA_VISIBLE_DEVICES problem on that node) it would
    otherwise train on the CPU, tens of times slower, while holding the GPU. ``device: cpu``
    in the space is an explicit choice and is kept."""
    if gpu_ids and config.device == "auto" and not torch.cuda.is_available():
        raise ConfigError(
            f"key 'device': auto, and Ray gave this trial GPU {','.join(gpu_ids)} but CUDA "
            f"is not available in its process (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}, torch {torch.__version__}); "
            "fix the node's CUDA, or search with --gpus-per-trial 0"
        )


def _beats_completed(ctx: TrialContext, result: TrialResult) -> bool:
    """Log a model only when this trial beats every trial completed before it (strictly).

    The search's final best then always has its model, while hundreds of trials do not
    each store ~100 MB of weights.
    """
    from mlflow import MlflowClient

    key = f"best_{ctx.metric}"
    mine = result.best.get(ctx.metric, float("nan"))
    if not math.isfinite(mine):
        return False
    client = MlflowClient(tracking_uri=ctx.tracking_uri)
    best = schema.best_completed_run(client, ctx.experiment_id, ctx.parent_run_id, key)
    # Strictly better: a tie with a completed trial adds no model (that trial holds one,
    # and the search's best among tied runs is the one with a model).
    return best is None or mine > best.data.metrics.get(key, -math.inf)


def _log_figures(tracker: tracking.TrialTracker, result: TrialResult) -> None:
    """Confusion matrix and ROC curve of the best epoch's weights on the test patients,
    and the learning curves."""
    from dala_search.plots import confusion_figure, learning_curves_figure, roc_figure

    for fig, path in (
        (confusion_figure(result.test_confusion), "figures/test_confusion_matrix.png"),
        (roc_figure(result.test_scores), "figures/test_roc_curve.png"),
        (learning_curves_figure(result.history), "figures/learning_curves.png"),
    ):
        if fig is not None:
            tracker.log_figure(fig, path)
            import matplotlib.pyplot as plt

            plt.close(fig)
