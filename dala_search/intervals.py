"""Patient-level (cluster) bootstrap intervals over pooled out-of-fold predictions.

``evaluate.py`` and ``comparison.py`` pool every fold's test predictions (image labels,
probabilities, patients) and call ``cluster_bootstrap``; the intervals it returns are the
primary figures of ``dala-search evaluate`` and ``dala-search baselines``.

Why patients, not images or folds: the images of one patient are strongly correlated, so
the patient is the unit of independent evidence. An image-level bootstrap treats 2,000
images as 2,000 independent draws and is far too narrow (``tests/test_intervals.py``
measures its coverage); a t-interval over K fold values has K - 1 degrees of freedom
(t = 12.7 at K = 2) and leaves the metric's range.

The method:

- The resampling unit is the patient (``clusters``): each resample draws patients with
  replacement and keeps all of a drawn patient's images. Draws are stratified by class: a
  patient's class is the majority label of its images (ties: the lower class index, as in
  ``metrics.classification_metrics``; for the 8-class subtype task this is the patient's
  subtype), and each class's patients are drawn within their class, as many as it has. So
  every resample holds every class the data holds, and a resample is a data set of the
  same make-up.
- A patient drawn twice counts as two patients: its copies are different patients for the
  patient-level metrics (``materialise`` relabels them; the vectorised path weights the
  patient by its draw count, which is the same thing).
- ``units`` (default: the clusters) are the patient-level scoring units. With the
  ``seeds`` protocol a patient can be tested by several repetitions; each (repetition,
  patient) is then its own scored unit (each model made its own patient prediction) while
  the patient stays one cluster (all its predictions are drawn together).
- Each metric is recomputed on every resample. Undefined values (NaN: e.g. a metric that
  needs a class the resample lacks) are dropped and counted; when more than
  ``max_undefined`` of the resamples are undefined the interval is ``None`` with a reason.
- The interval is the percentile interval (2.5 % and 97.5 % quantiles of the defined
  resampled values, numpy's linear interpolation): it lies within the range of values the
  metric took, so inside [0, 1] for every metric of ``metrics.py``.

The resampling is written here, not taken from ``scipy.stats.bootstrap``: scipy resamples
observations and leaves a NaN statistic in its distribution (its percentile and BCa
intervals are then NaN), whereas we stratify, drop and count undefined resamples, and
score all resamples at once from per-patient counts (``weighted_metrics``: a resample is
a vector of draw counts per patient, every metric a weighted sum or a function of weighted
sums; ROC AUC from weighted counts per score). ``tests/test_intervals.py`` checks the
vectorised metrics against ``classification_metrics`` on materialised resamples to 1e-9.
BCa is not offered: its jackknife acceleration with dropped undefined resamples is not a
documented procedure, and the percentile interval is already range-respecting.

Numpy only, no framework imports (core, like ``metrics.py``). Cost, measured by
``bench/intervals.py`` (its block in ``bench/README.md``): one 2,000-resample interval set
of 1,828 images of 80 patients took 0.21 s (binary, the evaluation's 7 metrics) and 0.99 s
(8-class), against 45 s for ``classification_metrics`` on each resample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dala_search.metrics import (
    BINARY_METRICS,
    MULTICLASS_METRICS,
    PATIENT_METRICS,
    patient_predictions,
)

N_RESAMPLES = 2000
CONFIDENCE = 0.95
MAX_UNDEFINED = 0.10  # share of undefined resamples above which no interval is given
_CHUNK = 500  # resamples scored at once (bounds the (chunk, scores) work arrays)


def method_name(
    n_resamples: int = N_RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE
) -> str:
    """The method as the documents name it."""
    return (
        f"patient-level cluster bootstrap of the pooled out-of-fold predictions, stratified "
        f"by class, {n_resamples} resamples, percentile {confidence:.0%}, seed {seed}"
    )


@dataclass(frozen=True)
class Interval:
    """One metric's pooled value and bootstrap interval (``low``/``high`` None: ``reason``)."""

    estimate: float | None  # the metric on the pooled predictions (None: undefined there)
    low: float | None
    high: float | None
    n_resamples: int
    n_undefined: int  # resamples where the metric was undefined (dropped)
    reason: str | None = None  # why there is no interval


def strata_of(
    y_true: np.ndarray, cluster_of: np.ndarray, n_clusters: int, n_classes: int
) -> np.ndarray:
    """Each cluster's class: the majority label of its images (ties: the lower index)."""
    counts = np.zeros((n_clusters, n_classes))
    np.add.at(counts, (cluster_of, y_true), 1)
    return counts.argmax(axis=1)


def resample_counts(strata: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_resamples, n_clusters)`` draw counts: each stratum's clusters drawn with
    replacement within the stratum, as many draws as it has clusters."""
    counts = np.zeros((n_resamples, len(strata)), dtype=np.int64)
    rows = np.arange(n_resamples)[:, None]
    for s in np.unique(strata):
        members = np.flatnonzero(strata == s)
        m = len(members)
        draws = rng.integers(0, m, size=(n_resamples, m))  # positions within the stratum
        # Draw counts per resample row: one bincount over (row, position) pairs.
        flat = np.bincount((rows * m + draws).ravel(), minlength=n_resamples * m)
        counts[:, members] = flat.reshape(n_resamples, m)
    return counts


def materialise(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    clusters: Sequence[str],
    counts: np.ndarray,
    units: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One resample as a data set: each drawn cluster's images, copy ``j`` of a cluster
    drawn ``n`` times with its units relabelled ``<unit>#<j>`` (a different patient).

    ``counts`` is one row of ``resample_counts`` (clusters in ``np.unique`` order). The
    reference definition of a resample; ``weighted_metrics`` computes the same without it.
    """
    ids, cluster_of = np.unique(np.asarray(list(clusters)), return_inverse=True)
    units_arr = np.asarray(list(units if units is not None else clusters))
    idx, labels = [], []
    for c in range(len(ids)):
        members = np.flatnonzero(cluster_of == c)
        for j in range(int(counts[c])):
            idx.append(members)
            labels.extend(f"{u}#{j}" for u in units_arr[members])
    order = np.concatenate(idx) if idx else np.zeros(0, dtype=np.int64)
    return np.asarray(y_true)[order], np.asarray(y_prob)[order], labels


class ClusterTable:
    """Per-cluster sufficient statistics of the pooled predictions: every metric of a
    resample is a function of ``counts @ <table>``."""

    def __init__(
        self,
        y_true: np.ndarray,
        y_prob: np.ndarray,
        clusters: Sequence[str],
        units: Sequence[str] | None,
        positive: int,
    ) -> None:
        self.y_true = np.asarray(y_true, dtype=np.int64)
        self.y_prob = np.asarray(y_prob, dtype=np.float64)
        n, c = self.y_prob.shape
        self.n_classes, self.binary, self.positive = c, c == 2, positive
        self.ids, self.cluster_of = np.unique(np.asarray(list(clusters)), return_inverse=True)
        p = len(self.ids)
        self.strata = strata_of(self.y_true, self.cluster_of, p, c)
        y_pred = self.y_prob.argmax(axis=1)
        # Image confusion per cluster, flattened (true * C + pred).
        self.image_cm = np.zeros((p, c * c))
        np.add.at(self.image_cm, (self.cluster_of, self.y_true * c + y_pred), 1)
        # Patient-level units: their scored labels and image accuracy, and their cluster.
        unit_keys = np.asarray(list(units if units is not None else clusters))
        u_ids, u_true, u_pred, u_acc = patient_predictions(
            self.y_true, self.y_prob, unit_keys, self.binary
        )
        first = {}
        for i, u in enumerate(unit_keys):
            first.setdefault(u, i)
        unit_cluster = self.cluster_of[[first[u] for u in u_ids]]
        if len({(u, k) for u, k in zip(unit_keys, self.cluster_of, strict=True)}) != len(u_ids):
            raise ValueError("a patient-level unit spans several clusters")
        self.unit_cm = np.zeros((p, c * c))
        np.add.at(self.unit_cm, (unit_cluster, u_true * c + u_pred), 1)
        self.unit_acc = np.bincount(unit_cluster, weights=u_acc, minlength=p)
        self._auc_parts: list[tuple[np.ndarray, np.ndarray]] | None = None

    @property
    def auc_parts(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """ROC AUC: per class scored (the positive one when binary), per cluster, the
        positive and negative image counts at each distinct score (ascending)."""
        if self._auc_parts is None:
            p, self._auc_parts = len(self.ids), []
            for k in [self.positive] if self.binary else range(self.n_classes):
                scores, group = np.unique(self.y_prob[:, k], return_inverse=True)
                pos = np.zeros((p, len(scores)))
                neg = np.zeros((p, len(scores)))
                is_pos = self.y_true == k
                np.add.at(pos, (self.cluster_of[is_pos], group[is_pos]), 1)
                np.add.at(neg, (self.cluster_of[~is_pos], group[~is_pos]), 1)
                self._auc_parts.append((pos, neg))
        return self._auc_parts


def _div(a: np.ndarray, b: np.ndarray, zero: float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), zero)


def _weighted_auc(w: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """ROC AUC per resample from weighted positive/negative counts per ascending score:
    P(score_pos > score_neg) + 0.5 P(tie), as scikit-learn's (trapezoidal) AUC."""
    pw, nw = w @ pos, w @ neg  # (B, scores)
    below = np.cumsum(nw, axis=1) - nw  # negative weight strictly below each score
    total_p, total_n = pw.sum(axis=1), nw.sum(axis=1)
    num = (pw * (below + 0.5 * nw)).sum(axis=1)
    return _div(num, total_p * total_n, math.nan)


def _from_confusion(cm: np.ndarray, binary: bool, positive: int) -> dict[str, np.ndarray]:
    """Image-level metrics of ``(B, C, C)`` weighted confusion matrices, by the conventions
    of ``metrics.classification_metrics`` (scikit-learn's and imbalanced-learn's)."""
    total = cm.sum(axis=(1, 2))
    diag = np.diagonal(cm, axis1=1, axis2=2)
    rows, cols = cm.sum(axis=2), cm.sum(axis=1)
    present = rows > 0
    recall = _div(diag, rows, math.nan)
    out = {
        "accuracy": _div(diag.sum(axis=1), total, math.nan),
        "balanced_accuracy": np.nanmean(np.where(present, recall, np.nan), axis=1),
    }
    # Macro F1 over the classes in y_true or y_pred (scikit-learn), 0 where undefined.
    f1_c = _div(2 * diag, rows + cols, 0.0)
    seen = (rows + cols) > 0
    f1_macro = (f1_c * seen).sum(axis=1) / seen.sum(axis=1)
    if binary:
        neg = 1 - positive
        tp, fp, fn = diag[:, positive], cols[:, positive] - diag[:, positive], rows[:, positive]
        fn = fn - tp
        sens = np.where(present[:, positive], recall[:, positive], np.nan)
        spec = np.where(present[:, neg], recall[:, neg], np.nan)
        out.update(
            f1=_div(2 * tp, 2 * tp + fp + fn, 0.0),
            f1_macro=f1_macro,
            precision=_div(tp, tp + fp, 0.0),
            sensitivity=sens,
            specificity=spec,
            gmean=np.sqrt(sens * spec),
            iba=(1 + 0.1 * (sens - spec)) * sens * spec,
        )
        return out
    n_present = present.sum(axis=1)
    enough = n_present >= 2
    with np.errstate(divide="ignore"):
        log_recall = np.where(present, np.log(np.where(present, recall, 1.0)), 0.0)
    gmean = np.exp(log_recall.sum(axis=1) / np.maximum(n_present, 1))
    # One-vs-rest specificity of each class: true negatives over the other classes' images.
    spec_c = _div(total[:, None] - rows - cols + diag, total[:, None] - rows, math.nan)
    s = np.where(present, recall, 0.0).sum(axis=1) / np.maximum(n_present, 1)
    p = np.where(present, spec_c, 0.0).sum(axis=1) / np.maximum(n_present, 1)
    out.update(
        f1=f1_macro,
        f1_macro=f1_macro,
        gmean=np.where(enough, gmean, np.nan),
        iba=np.where(enough, (1 + 0.1 * (s - p)) * s * p, np.nan),
    )
    return out


def weighted_metrics(
    table: ClusterTable, counts: np.ndarray, names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Each metric in ``names`` for each row of ``counts`` (``(B, clusters)`` draw counts)."""
    c = table.n_classes
    w = counts.astype(np.float64)
    out = _from_confusion((w @ table.image_cm).reshape(-1, c, c), table.binary, table.positive)
    if "roc_auc" in names:  # the costliest part: (B, scores) arrays per class
        aucs = [_weighted_auc(w, pos, neg) for pos, neg in table.auc_parts]
        if table.binary:
            out["roc_auc"] = aucs[0]
        else:
            # Macro over the classes present in the resample (the others' AUC is NaN).
            stacked = np.stack(aucs, axis=1)
            defined = np.isfinite(stacked).sum(axis=1)
            total = np.where(np.isfinite(stacked), stacked, 0.0).sum(axis=1)
            out["roc_auc"] = np.where(defined >= 2, total / np.maximum(defined, 1), np.nan)
    if any(n in PATIENT_METRICS for n in names):
        unit_cm = (w @ table.unit_cm).reshape(-1, c, c)
        scored = _from_confusion(unit_cm, table.binary, table.positive)
        out["patient_accuracy"] = scored["accuracy"]
        out["patient_balanced_accuracy"] = scored["balanced_accuracy"]
        out["patient_recognition_rate"] = _div(
            w @ table.unit_acc, unit_cm.sum(axis=(1, 2)), math.nan
        )
    return {n: out[n] for n in names}


def cluster_bootstrap(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    clusters: Sequence[str],
    names: Sequence[str],
    *,
    units: Sequence[str] | None = None,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
    max_undefined: float = MAX_UNDEFINED,
    positive: int = 1,
) -> dict[str, Interval]:
    """The pooled value and the stratified patient-level bootstrap interval of each metric.

    ``y_true`` ``(n,)`` and ``y_prob`` ``(n, C)`` as ``classification_metrics`` takes them;
    ``clusters[i]``: the patient of image ``i`` (the resampling unit); ``units[i]``: its
    patient-level scoring unit (default: the patient). Same ``seed``, same intervals.
    """
    known = set(BINARY_METRICS + MULTICLASS_METRICS + PATIENT_METRICS)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"no bootstrap for metric(s) {unknown}; known: {sorted(known)}")
    if n_resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"n_resamples {n_resamples}, confidence {confidence}: out of range")
    y_true = np.asarray(y_true, dtype=np.int64)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if len(y_true) == 0:
        return {n: Interval(None, None, None, 0, 0, "no predictions") for n in names}
    table = ClusterTable(y_true, y_prob, clusters, units, positive)
    # The pooled value: every patient drawn once (equal to classification_metrics on the
    # pooled predictions, tested; this path skips scikit-learn's per-call validation).
    once = weighted_metrics(table, np.ones((1, len(table.ids)), dtype=np.int64), names)
    pooled = {n: float(v[0]) for n, v in once.items()}
    rng = np.random.default_rng(seed)
    counts = resample_counts(table.strata, n_resamples, rng)
    values = {n: np.empty(n_resamples) for n in names}
    for start in range(0, n_resamples, _CHUNK):
        part = weighted_metrics(table, counts[start : start + _CHUNK], names)
        for n in names:
            values[n][start : start + _CHUNK] = part[n]
    alpha = (1 - confidence) / 2
    out = {}
    for n in names:
        est = pooled[n] if math.isfinite(pooled[n]) else None
        finite = values[n][np.isfinite(values[n])]
        undefined = n_resamples - len(finite)
        reason = None
        if est is None:
            reason = "undefined on the pooled predictions"
        elif undefined > max_undefined * n_resamples:
            reason = (
                f"undefined in {undefined} of {n_resamples} resamples "
                f"(more than {max_undefined:.0%})"
            )
        if reason:
            out[n] = Interval(est, None, None, n_resamples, undefined, reason)
            continue
        low, high = np.quantile(finite, [alpha, 1 - alpha])
        out[n] = Interval(est, float(low), float(high), n_resamples, undefined)
    return out
