"""The patient-level cluster bootstrap (``dala_search.intervals``) and the figures
``evaluate.summarise`` builds from it: in range, reproducible, exact, and honest about
clustering."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from dala_search.evaluate import EVAL_METRICS, FoldOutcome, summarise
from dala_search.intervals import (
    ClusterTable,
    cluster_bootstrap,
    materialise,
    resample_counts,
    weighted_metrics,
)
from dala_search.metrics import (
    BINARY_METRICS,
    MULTICLASS_METRICS,
    PATIENT_METRICS,
    classification_metrics,
)


def clustered(
    rng: np.random.Generator,
    per_class: int = 10,
    images: int = 12,
    n_classes: int = 2,
    signal: float = 1.0,
    patient_sd: float = 1.0,
    prefix: str = "P",
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Patients of each class (``per_class``), ``images`` each; a patient's random effect
    shifts all its images' logits (the clustering the bootstrap must respect)."""
    y, p, s = [], [], []
    for c in range(n_classes):
        for j in range(per_class):
            u = rng.normal(0, patient_sd, n_classes)
            logits = rng.normal(0, 1, (images, n_classes)) + u
            logits[:, c] += signal
            prob = np.exp(logits)
            y += [c] * images
            p.append(np.round(prob / prob.sum(1, keepdims=True), 3))  # ties, as real scores
            s += [f"{prefix}{c}-{j}"] * images
    prob = np.vstack(p)
    return np.array(y), prob / prob.sum(1, keepdims=True), s


def in_unit_range(iv) -> bool:
    return iv.low is None or 0.0 <= iv.low <= iv.high <= 1.0


# ---- exactness: the vectorised resample == classification_metrics on the copies ------------


@pytest.mark.parametrize("n_classes", [2, 8])
def test_weighted_metrics_equal_classification_metrics_on_materialised_resamples(
    n_classes: int,
) -> None:
    rng = np.random.default_rng(n_classes)
    y, p, s = clustered(rng, per_class=4, images=7, n_classes=n_classes, signal=0.7)
    # Units as the seeds protocol makes them: two "repetitions" tested some patients twice.
    units = [f"{i % 2}:{slide}" for i, slide in enumerate(s)]
    names = (BINARY_METRICS if n_classes == 2 else MULTICLASS_METRICS) + PATIENT_METRICS
    table = ClusterTable(y, p, s, units, positive=1)
    counts = resample_counts(table.strata, 25, np.random.default_rng(0))
    got = weighted_metrics(table, counts, names)
    for b in range(len(counts)):
        yy, pp, ss = materialise(y, p, s, counts[b], units)
        want = classification_metrics(yy, pp, slides=ss)
        for n in names:
            if math.isnan(want[n]):
                assert math.isnan(got[n][b]), (n, b)
            else:
                assert got[n][b] == pytest.approx(want[n], abs=1e-9), (n, b)
    # One draw of every patient is the data itself.
    ones = weighted_metrics(table, np.ones((1, len(table.ids)), dtype=np.int64), names)
    pooled = classification_metrics(y, p, slides=units)
    for n in names:
        assert ones[n][0] == pytest.approx(pooled[n], abs=1e-9), n


def test_a_patient_drawn_twice_counts_as_two_patients() -> None:
    # Benign A right, benign B wrong, malignant C and D right (two images each).
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    right, wrong = [0.9, 0.1], [0.2, 0.8]
    p = np.array([right, right, wrong, wrong, wrong, wrong, wrong, wrong])
    s = ["A", "A", "B", "B", "C", "C", "D", "D"]
    counts = np.array([2, 0, 1, 1])  # A twice, B never (stratified: 2 benign, 2 malignant)
    yy, pp, ss = materialise(y, p, s, counts)
    assert sorted(set(ss)) == ["A#0", "A#1", "C#0", "D#0"]
    # Four patients, all right; merging A's copies would score three patients.
    assert classification_metrics(yy, pp, slides=ss)["patient_accuracy"] == 1.0
    table = ClusterTable(y, p, s, None, positive=1)
    got = weighted_metrics(table, counts[None, :], ["patient_accuracy", "accuracy"])
    assert got["patient_accuracy"][0] == 1.0 and got["accuracy"][0] == 1.0
    # B drawn twice instead: 2 of 4 patients right (B#0, B#1 wrong), not 1 of 3.
    got = weighted_metrics(table, np.array([[0, 2, 1, 1]]), ["patient_accuracy"])
    assert got["patient_accuracy"][0] == 0.5


def test_resamples_are_stratified_by_patient_class() -> None:
    strata = np.array([0, 0, 0, 1, 1])
    counts = resample_counts(strata, 500, np.random.default_rng(1))
    assert (counts[:, :3].sum(1) == 3).all() and (counts[:, 3:].sum(1) == 2).all()
    assert counts[:, 0].max() >= 2  # with replacement


# ---- range, degenerate folds, tiny data, seeds --------------------------------------------


def fold(y, p, s) -> FoldOutcome:
    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    return FoldOutcome(test=classification_metrics(y, p, slides=s), y_true=y, y_prob=p, slides=s)


def test_two_folds_stay_in_range_where_the_t_interval_does_not() -> None:
    rng = np.random.default_rng(3)
    folds = []
    for k, signal in enumerate((0.2, 2.5)):  # a poor and a good fold: far-apart values
        y, p, s = clustered(rng, per_class=5, images=6, signal=signal, prefix=f"F{k}")
        folds.append(fold(y, p, s))
    summary = summarise(folds, EVAL_METRICS, seed=0)
    for name, m in summary.items():
        assert m.ci_low is not None, name
        assert 0.0 <= m.ci_low <= m.ci_high <= 1.0, name
        assert len(m.values) == 2 and m.sd is not None
    ba = summary["balanced_accuracy"]
    # The dropped K = 2 t-interval (t = 12.7) on the same fold values leaves [0, 1].
    half = stats.t.ppf(0.975, 1) * ba.sd / math.sqrt(2)
    assert ba.mean - half < 0 or ba.mean + half > 1
    pooled = classification_metrics(
        np.concatenate([f.y_true for f in folds]),
        np.concatenate([f.y_prob for f in folds]),
        slides=[f"{i}:{s}" for i, f in enumerate(folds) for s in f.slides],
    )
    assert ba.estimate == pytest.approx(pooled["balanced_accuracy"])
    assert ba.mean == pytest.approx(np.mean(ba.values))


def test_degenerate_folds_single_class_predicted_and_metric_undefined_in_a_fold() -> None:
    rng = np.random.default_rng(4)
    y1, p1, s1 = clustered(rng, per_class=4, images=5, prefix="a")
    p1 = np.tile([0.3, 0.7], (len(y1), 1))  # fold 1: the model says "malignant" for all
    y2, p2, s2 = clustered(rng, per_class=4, images=5, prefix="b")
    keep = y2 == 1  # fold 2: its test part holds one class (ROC AUC undefined there)
    folds = [
        fold(y1, p1, s1),
        fold(y2[keep], p2[keep], [s for s, k in zip(s2, keep, strict=True) if k]),
    ]
    summary = summarise(folds, EVAL_METRICS, seed=1)
    assert summary["roc_auc"].values[1] is None  # undefined in fold 2 ...
    assert summary["roc_auc"].estimate is not None  # ... defined on the pooled predictions
    assert summary["accuracy"].values[0] == 0.5
    for name, m in summary.items():
        assert m.ci_low is not None, name
        assert 0.0 <= m.ci_low <= m.ci_high <= 1.0, name


def test_tiny_patient_counts_stay_in_range() -> None:
    rng = np.random.default_rng(5)
    for per_class in (1, 2):
        y, p, s = clustered(rng, per_class=per_class, images=3)
        ivs = cluster_bootstrap(y, p, s, EVAL_METRICS, seed=0, n_resamples=500)
        for name, iv in ivs.items():
            assert in_unit_range(iv), name
        if per_class == 1:  # each class's only patient is always drawn: no spread
            assert ivs["accuracy"].low == ivs["accuracy"].high == ivs["accuracy"].estimate


def test_too_many_undefined_resamples_give_no_interval_and_say_why() -> None:
    # The only malignant images are a minority of one benign-majority patient: resamples
    # without that patient have no positive image, and ROC AUC is undefined there.
    y = np.array([0, 0, 0, 1] + [0] * 12)
    p = np.tile([0.6, 0.4], (16, 1))
    p[3] = [0.2, 0.8]
    s = ["X"] * 4 + [f"B{i // 3}" for i in range(12)]
    iv = cluster_bootstrap(y, p, s, ["roc_auc", "accuracy"], seed=0, n_resamples=1000)
    auc = iv["roc_auc"]
    assert auc.estimate == 1.0 and auc.low is None and auc.high is None
    assert auc.n_undefined > 100 and "undefined in" in auc.reason
    assert iv["accuracy"].low is not None and iv["accuracy"].n_undefined == 0


def test_same_seed_same_interval() -> None:
    y, p, s = clustered(np.random.default_rng(6), per_class=6, images=4)
    a = cluster_bootstrap(y, p, s, EVAL_METRICS, seed=11, n_resamples=300)
    b = cluster_bootstrap(y, p, s, EVAL_METRICS, seed=11, n_resamples=300)
    c = cluster_bootstrap(y, p, s, EVAL_METRICS, seed=12, n_resamples=300)
    assert a == b
    assert a["accuracy"] != c["accuracy"]


def test_unknown_metric_is_refused() -> None:
    y, p, s = clustered(np.random.default_rng(7), per_class=2, images=2)
    with pytest.raises(ValueError, match="no bootstrap for metric"):
        cluster_bootstrap(y, p, s, ["accuracy", "kappa"])


# ---- coverage: clustering matters ------------------------------------------------------------


def test_patient_bootstrap_covers_and_an_image_bootstrap_does_not() -> None:
    """Binary scores ``±a + u + e`` (u: the patient's effect, e: the image's), threshold 0:
    the true accuracy is Phi(a / sqrt(sd_u^2 + sd_e^2)) for both classes. 200 simulated
    evaluations of 20 + 20 patients x 15 images. Measured when written: the patient-level
    interval covered the truth 188 times, the image-level one 107 times (of 200)."""
    a, sd_u, sd_e, per_class, images, sims = 0.8, 1.2, 1.0, 20, 15, 200
    truth = stats.norm.cdf(a / math.hypot(sd_u, sd_e))
    rng = np.random.default_rng(2026)
    covered = {"patient": 0, "image": 0}
    for i in range(sims):
        labels = np.repeat([0, 1], per_class)
        u = rng.normal(0, sd_u, 2 * per_class)
        score = (
            (2 * labels - 1)[:, None] * a
            + u[:, None]
            + rng.normal(0, sd_e, (2 * per_class, images))
        )
        pos = 1 / (1 + np.exp(-score.ravel()))
        y = np.repeat(labels, images)
        p = np.column_stack([1 - pos, pos])
        patients = [f"P{j}" for j in range(2 * per_class) for _ in range(images)]
        for kind, clusters in (("patient", patients), ("image", [str(k) for k in range(len(y))])):
            iv = cluster_bootstrap(y, p, clusters, ["accuracy"], seed=i, n_resamples=1000)
            covered[kind] += iv["accuracy"].low <= truth <= iv["accuracy"].high
    assert 0.88 * sims <= covered["patient"] <= 0.99 * sims, covered
    assert covered["image"] < 0.75 * sims, covered
