"""The figures of an evaluation: every fold's test predictions pooled into one estimate per
metric with its patient-level cluster-bootstrap interval, beside the per-fold mean and SD
(``evaluate.py``'s docstring says what each figure is)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dala_search.intervals import N_RESAMPLES, cluster_bootstrap
from dala_search.runs.documents import MetricSummary

EVAL_METRICS: tuple[str, ...] = (
    "accuracy",
    "balanced_accuracy",
    "f1",
    "gmean",
    "iba",
    "roc_auc",
    "patient_accuracy",
)


@dataclass(frozen=True)
class FoldOutcome:
    """One fold's test figures and the predictions they came from (pooled across folds)."""

    test: dict[str, float]  # the fold's test metrics (train_trial's)
    y_true: np.ndarray  # (n,) test labels, in the order of split.test
    y_prob: np.ndarray  # (n, C) test probabilities
    slides: list[str]  # the patient of each test image


def fold_figures(values: Sequence[float | None]) -> dict[str, Any]:
    """Per-fold ``values`` (NaN -> None), the ``mean`` and sample ``sd`` of the defined ones."""
    kept = [None if v is None or not math.isfinite(v) else float(v) for v in values]
    finite = np.array([v for v in kept if v is not None], dtype=np.float64)
    mean = float(finite.mean()) if len(finite) else None
    sd = float(finite.std(ddof=1)) if len(finite) >= 2 else None
    return {"mean": mean, "sd": sd, "values": tuple(kept)}


def pooled(folds: Sequence[FoldOutcome]) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """All folds' test predictions: labels, probabilities, patients (the bootstrap's
    clusters) and ``<fold>:<patient>`` (the patient-level units: a patient tested by several
    folds/seeds is one prediction per fold's model)."""
    y_true = np.concatenate([f.y_true for f in folds]).astype(np.int64)
    y_prob = np.concatenate([f.y_prob for f in folds])
    clusters = [s for f in folds for s in f.slides]
    units = [f"{i}:{s}" for i, f in enumerate(folds) for s in f.slides]
    return y_true, y_prob, clusters, units


def summarise(
    folds: Sequence[FoldOutcome], names: Sequence[str], *, seed: int
) -> dict[str, MetricSummary]:
    """Per metric: the pooled estimate with its cluster-bootstrap interval, and the fold
    figures (``evaluate.py``'s docstring)."""
    y_true, y_prob, clusters, units = pooled(folds)
    intervals = cluster_bootstrap(
        y_true, y_prob, clusters, names, units=units, n_resamples=N_RESAMPLES, seed=seed
    )
    out = {}
    for n in names:
        iv = intervals[n]
        out[n] = MetricSummary(
            estimate=iv.estimate,
            ci_low=iv.low,
            ci_high=iv.high,
            **fold_figures([f.test.get(n, math.nan) for f in folds]),
            n_undefined=iv.n_undefined,
            ci_note=iv.reason,
        )
    return out
