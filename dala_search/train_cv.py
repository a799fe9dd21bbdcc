"""A cross-validated trial: K models on K inner folds, trained in lockstep.

``train_cv_trial(config, data, folds, reporter)`` is ``train.train_trial`` for a
cross-validated objective (``--cv K``): one `train.FoldRun` per inner fold
(``data.splits.inner_folds``), all stepped one epoch at a time, so the value reported at
each epoch is the mean over the folds and a pruner that judges it stops every fold of a
weak configuration at once. One validation split of ~12 patients is a noisy judge (the
standard error of a balanced accuracy is several points); the mean over K folds that
validate every non-test patient once is a steadier one, at K times the training cost.

Reported per epoch, for every validation metric ``val_<m>`` of a fold:
``cv_fold_<k>_val_<m>`` (k = 1..K), ``val_<m>`` = their mean (``numpy.mean``, exactly) and
``val_<m>_std`` (population SD over the folds); ``train_loss`` is the folds' mean and
``cv_fold_<k>_train_loss`` each fold's. The best epoch is the epoch of the best mean of the
selection metric (one epoch for all folds) and early stopping watches that mean. The test
figures are those of the K best-epoch models' averaged probabilities on the test patients,
which no fold ever trained or validated on; ``keep_model`` returns that ensemble
(`model.ensemble.ProbabilityEnsemble`).

Every fold starts from the same initial weights (the config's seed): folds differ by their
data only, and K = 1 reproduces ``train_trial`` exactly. Memory: the folds share the device
and one copy of the non-test images (each fold's sides are views of it) plus one of the
test images; per fold a model, its optimiser state and a host copy of its best weights.
Each epoch reports ``cv_folds`` and, on CUDA, ``cuda_peak_memory_gb`` (the device's peak
allocation since the trial started). Data parallel training is not supported here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from dala_search.config import TrialConfig
from dala_search.data.splits import Split
from dala_search.epoch_loop import Reporter, progress_bar, run_epochs
from dala_search.errors import ConfigError, DataError
from dala_search.metrics import classification_metrics
from dala_search.model.dalaresnet import build_dalaresnet
from dala_search.model.ensemble import ProbabilityEnsemble
from dala_search.train import FoldRun, TrialResult, check_image_size, resolve_device, trial_result
from dala_search.trial_data import Batches, TrialData, _Batches

FOLD_PREFIX = "cv_fold_"


def fold_key(k: int, name: str) -> str:
    """The name of fold ``k``'s (1-based) figure ``name``: ``cv_fold_<k>_<name>``."""
    return f"{FOLD_PREFIX}{k}_{name}"


def combine_folds(per_fold: Sequence[dict[str, float]]) -> dict[str, float]:
    """One lockstep epoch's reported dict from the folds' dicts (see the module docstring).

    A metric undefined (NaN) on one fold makes its mean NaN: the epoch is then not a best
    epoch, rather than a mean over fewer folds that would not compare with the others.
    """
    out: dict[str, float] = {}
    for name in per_fold[0]:
        values = [m[name] for m in per_fold]
        if name.startswith("val_") or name == "train_loss":
            for k, v in enumerate(values, start=1):
                out[fold_key(k, name)] = v
            out[name] = float(np.mean(values))
            if name.startswith("val_"):
                out[f"{name}_std"] = float(np.std(values))
        elif name == "train_images_per_s":  # folds train one after the other: the mean rate
            out[name] = float(np.mean(values))
        elif name == "precise_bn_s":
            out[name] = float(np.sum(values))
        elif name == "micro_batch":  # the smallest any fold had to fall back to
            out[name] = float(np.min(values))
    out["lr"] = per_fold[0]["lr"]  # one schedule for all folds
    return out


def _shared_sides(
    data: TrialData, folds: Sequence[Split], device: torch.device
) -> list[tuple[Batches, Batches]]:
    """(train, val) batch servers per fold: views of one copy of the non-test images."""
    pool = sorted(set().union(*(set(f.train) | set(f.val) for f in folds)))
    where = {idx: pos for pos, idx in enumerate(pool)}
    shared = _Batches(data, pool, device)
    return [
        (shared.view([where[i] for i in f.train]), shared.view([where[i] for i in f.val]))
        for f in folds
    ]


def train_cv_trial(
    config: TrialConfig,
    data: TrialData,
    folds: Sequence[Split],
    reporter: Reporter | None = None,
    *,
    keep_model: bool = False,
    progress: bool = False,
    build_model: Callable[[TrialConfig], nn.Module] = build_dalaresnet,
) -> TrialResult:
    """Train one configuration on every fold in lockstep; report fold means; test the ensemble.

    ``folds`` index ``data.records`` and share one test side (``inner_folds`` makes them).
    Returns a TrialResult whose ``history``/``best`` hold the combined dicts, whose
    ``test`` figures are the ensemble's, and whose ``model`` (with ``keep_model``) is a
    `ProbabilityEnsemble` of the fold models. Raises NonFiniteLossError as ``train_trial``.
    """
    folds = list(folds)
    if not folds:
        raise ConfigError("train_cv_trial: no folds given")
    test = folds[0].test
    if any(f.test != test for f in folds):
        raise DataError("train_cv_trial: the folds of one trial must share one test side")
    check_image_size(config, data)
    device = resolve_device(config.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = [
        FoldRun(config, data, fold, build_model=build_model, sides=sides)
        for fold, sides in zip(folds, _shared_sides(data, folds, device), strict=True)
    ]
    bar = progress_bar(config, f"train {data.magnification} ({len(runs)} folds)", progress)

    def step(epoch: int) -> dict[str, float]:
        start = time.perf_counter()
        metrics = combine_folds([run.epoch(epoch) for run in runs])
        metrics["epoch_time_s"] = time.perf_counter() - start
        metrics["epoch"] = float(epoch)
        metrics["cv_folds"] = float(len(runs))
        if device.type == "cuda":
            metrics["cuda_peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        return metrics

    def snapshot() -> None:
        for run in runs:
            run.snapshot()

    def restore() -> None:
        for run in runs:
            run.restore_best()

    best, history = run_epochs(config, step, snapshot, restore, reporter, bar)
    test_b = _Batches(data, test, device)
    tested = [run.test(test_b) for run in runs]
    y_true = tested[0][1]
    y_prob = np.mean(np.stack([t[2] for t in tested]), axis=0)
    metrics = classification_metrics(y_true, y_prob, slides=data.slides(test))
    model = None
    if keep_model:
        model = ProbabilityEnsemble([run.kept_model() for run in runs])
    return trial_result(best, history, (metrics, y_true, y_prob), runs[0].n_classes, model)
