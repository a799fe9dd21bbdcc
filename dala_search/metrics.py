"""Classification metrics for imbalanced histopathology: library calls, not hand math.

``classification_metrics(y_true, y_prob, slides=...)`` scores every validation and test
pass; its keys are the metric names the search can select on
(``TrialConfig.select_metric``) and that trackers log. Image-level metrics come from
scikit-learn and imbalanced-learn; patient-level metrics aggregate images by slide (the
BreakHis patient key) with numpy, then score the slides with scikit-learn.

Conventions for undefined values (documented here, so the libraries' warnings, which would
repeat every epoch of every trial, are silenced):

- ``roc_auc``, ``gmean``, ``iba`` (and, binary, ``sensitivity`` / ``specificity``) are NaN
  when ``y_true`` lacks the class they need (a data problem, not a model score).
- ``precision`` and the F1 scores use ``zero_division=0``: a model that never predicts a
  class scores 0 on it.
- ``balanced_accuracy`` is scikit-learn's: the mean recall over the classes present in
  ``y_true``.
- Empty input gives every key as NaN.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from imblearn.metrics import geometric_mean_score, make_index_balanced_accuracy
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)
from sklearn.preprocessing import label_binarize

BINARY_METRICS: tuple[str, ...] = (
    "accuracy",
    "balanced_accuracy",
    "f1",
    "f1_macro",
    "precision",
    "sensitivity",
    "specificity",
    "gmean",
    "iba",
    "roc_auc",
)
MULTICLASS_METRICS: tuple[str, ...] = (
    "accuracy",
    "balanced_accuracy",
    "f1",
    "f1_macro",
    "gmean",
    "iba",
    "roc_auc",
)
PATIENT_METRICS: tuple[str, ...] = (
    "patient_accuracy",
    "patient_balanced_accuracy",
    "patient_recognition_rate",
)

# Every metric name -> the direction a search optimises it in (all are maximised).
METRIC_DIRECTIONS: dict[str, str] = {
    name: "max" for name in dict.fromkeys(BINARY_METRICS + MULTICLASS_METRICS + PATIENT_METRICS)
}

# Index balanced accuracy (García et al. 2012): (1 + alpha * (sens - spec)) * gmean**2.
_IBA = make_index_balanced_accuracy(alpha=0.1, squared=True)(geometric_mean_score)

NAN = float("nan")


def classification_metrics(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    *,
    slides: Sequence[str] | None = None,
    positive: int = 1,
) -> dict[str, float]:
    """Image-level (and, with ``slides``, patient-level) metrics as plain Python floats.

    ``y_true``: ``(n,)`` integer labels; ``y_prob``: ``(n, C)``
    softmax probabilities; the image prediction is their argmax. ``slides[i]``: the patient
    key of image ``i``.

    Binary (C == 2; ``positive`` is the positive class, malignant = 1): ``accuracy``,
    ``balanced_accuracy``, ``f1`` (of the positive class), ``f1_macro``, ``precision``,
    ``sensitivity`` (recall of the positive class), ``specificity`` (recall of the
    negative class), ``gmean`` = sqrt(sens * spec) (imblearn ``average="binary"``),
    ``iba`` = (1 + 0.1 * (sens - spec)) * sens * spec, i.e. imblearn's
    ``make_index_balanced_accuracy(alpha=0.1, squared=True)(geometric_mean_score)`` with
    ``average="binary"``. NOTE: with imblearn's default (multiclass) averaging the IBA
    collapses to G-mean**2 on binary labels (the macro-averaged dominance of the two classes
    is always 0); we report the binary averaging. ``roc_auc`` on the positive probability.

    Multiclass (C > 2; ``positive`` is ignored): ``accuracy``, ``balanced_accuracy``,
    ``f1_macro`` and ``f1`` (the same macro F1), ``gmean`` = the geometric mean of the
    per-class recalls (imblearn ``average="multiclass"``), ``iba`` with
    ``average="macro"``: the binary formula applied to macro-averaged one-vs-rest
    sensitivity S and specificity P, (1 + 0.1 * (S - P)) * S * P. ``gmean`` and ``iba`` use
    the classes present in ``y_true`` (a subtype missing from a patient-disjoint split does
    not zero them). ``roc_auc``: one-vs-rest macro AUC over the classes present in
    ``y_true`` (equal to scikit-learn's ``multi_class="ovr"`` when all are present).

    Patient level (``slides`` given): a slide's label is the majority label of its images
    (ties: the lower class index). Binary: the slide's prediction is its mean positive
    probability thresholded at 0.5 (the argmax of its mean probabilities); multiclass:
    majority vote of its images' predictions, ties to the class with the higher mean
    probability. ``patient_accuracy`` and ``patient_balanced_accuracy`` score slides;
    ``patient_recognition_rate`` is the BreakHis papers' patient score (Spanhol et al.
    2016): the mean over patients of each patient's image accuracy.
    """
    y_true, y_prob = _checked(y_true, y_prob, slides)
    binary = y_prob.shape[1] == 2
    if binary and positive not in (0, 1):
        raise ValueError(f"positive must be 0 or 1 for binary labels, got {positive!r}")
    keys = BINARY_METRICS if binary else MULTICLASS_METRICS
    if slides is not None:
        keys = keys + PATIENT_METRICS
    if len(y_true) == 0:
        return dict.fromkeys(keys, NAN)

    y_pred = y_prob.argmax(axis=1)
    with warnings.catch_warnings():
        # Undefined values follow the conventions in the module docstring.
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        out = (
            _binary(y_true, y_prob, y_pred, positive)
            if binary
            else _multiclass(y_true, y_prob, y_pred)
        )
        if slides is not None:
            out.update(_patient(y_true, y_prob, y_pred, np.asarray(list(slides)), binary))
    return {k: float(out[k]) for k in keys}


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """``(n_classes, n_classes)`` confusion matrix, rows = true class, columns = predicted.

    Every class gets a row and a column even when absent (scikit-learn's ``labels``), so
    matrices of different splits and epochs line up; trackers log it for the test split.
    An empty split gives a zero matrix (scikit-learn refuses empty input).
    """
    if len(y_true) == 0:
        return np.zeros((n_classes, n_classes), dtype=np.int64)
    return confusion_matrix(y_true, y_pred, labels=list(range(n_classes)))


def _checked(
    y_true: np.ndarray, y_prob: np.ndarray, slides: Sequence[str] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Shapes and label range, or a ValueError saying which (a caller bug, not user input)."""
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if y_prob.ndim != 2 or y_prob.shape[1] < 2:
        raise ValueError(f"y_prob must be (n, n_classes >= 2), got shape {y_prob.shape}")
    if y_true.shape != (len(y_prob),):
        raise ValueError(f"y_true has shape {y_true.shape}, y_prob has {len(y_prob)} rows")
    if len(y_true) and (
        not np.issubdtype(y_true.dtype, np.integer)
        or y_true.min() < 0
        or y_true.max() >= y_prob.shape[1]
    ):
        raise ValueError(f"y_true must hold integer labels in [0, {y_prob.shape[1]})")
    if slides is not None and len(slides) != len(y_true):
        raise ValueError(f"{len(slides)} slides for {len(y_true)} images")
    return y_true.astype(np.int64), y_prob


def _binary(
    y_true: np.ndarray, y_prob: np.ndarray, y_pred: np.ndarray, positive: int
) -> dict[str, float]:
    negative = 1 - positive
    has_pos, has_neg = (y_true == positive).any(), (y_true == negative).any()
    both = has_pos and has_neg
    return {
        "accuracy": accuracy_score(y_true, y_pred),
        "balanced_accuracy": balanced_accuracy_score(y_true, y_pred),
        "f1": f1_score(y_true, y_pred, pos_label=positive, zero_division=0),
        "f1_macro": f1_score(y_true, y_pred, average="macro", zero_division=0),
        "precision": precision_score(y_true, y_pred, pos_label=positive, zero_division=0),
        "sensitivity": recall_score(y_true, y_pred, pos_label=positive) if has_pos else NAN,
        "specificity": recall_score(y_true, y_pred, pos_label=negative) if has_neg else NAN,
        "gmean": (
            geometric_mean_score(y_true, y_pred, average="binary", pos_label=positive)
            if both
            else NAN
        ),
        "iba": _IBA(y_true, y_pred, average="binary", pos_label=positive) if both else NAN,
        "roc_auc": roc_auc_score(y_true == positive, y_prob[:, positive]) if both else NAN,
    }


def _multiclass(y_true: np.ndarray, y_prob: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    present = np.unique(y_true)
    f1_macro = f1_score(y_true, y_pred, average="macro", zero_division=0)
    gmean = iba = roc_auc = NAN
    if len(present) >= 2:
        gmean = geometric_mean_score(y_true, y_pred, labels=present, average="multiclass")
        iba = _IBA(y_true, y_pred, labels=present, average="macro")
        # One-vs-rest AUC per class present in y_true, macro-averaged: scikit-learn's
        # multi_class="ovr" refuses a split that lacks a class, and BreakHis subtypes with
        # three to ten patients are often missing from a patient-disjoint split.
        onehot = label_binarize(y_true, classes=list(range(y_prob.shape[1])))
        roc_auc = roc_auc_score(onehot[:, present], y_prob[:, present], average="macro")
    return {
        "accuracy": accuracy_score(y_true, y_pred),
        "balanced_accuracy": balanced_accuracy_score(y_true, y_pred),
        "f1": f1_macro,
        "f1_macro": f1_macro,
        "gmean": gmean,
        "iba": iba,
        "roc_auc": roc_auc,
    }


def _patient(
    y_true: np.ndarray, y_prob: np.ndarray, y_pred: np.ndarray, slides: np.ndarray, binary: bool
) -> dict[str, float]:
    """Aggregate images by slide (patient) and score the slides; see classification_metrics."""
    _, slide_of = np.unique(slides, return_inverse=True)
    n_slides, n_classes = int(slide_of.max()) + 1, y_prob.shape[1]
    n_images = np.bincount(slide_of, minlength=n_slides)

    def per_slide_counts(labels: np.ndarray) -> np.ndarray:
        counts = np.zeros((n_slides, n_classes))
        np.add.at(counts, (slide_of, labels), 1)
        return counts

    mean_prob = np.zeros((n_slides, n_classes))
    np.add.at(mean_prob, slide_of, y_prob)
    mean_prob /= n_images[:, None]
    slide_true = per_slide_counts(y_true).argmax(axis=1)  # majority label, ties -> lower
    if binary:
        slide_pred = mean_prob.argmax(axis=1)  # mean positive probability vs 0.5
    else:
        votes = per_slide_counts(y_pred)
        top = votes == votes.max(axis=1, keepdims=True)
        slide_pred = np.where(top, mean_prob, -1.0).argmax(axis=1)  # tie -> higher mean prob
    image_accuracy = np.bincount(slide_of, weights=(y_pred == y_true).astype(float)) / n_images
    return {
        "patient_accuracy": accuracy_score(slide_true, slide_pred),
        "patient_balanced_accuracy": balanced_accuracy_score(slide_true, slide_pred),
        "patient_recognition_rate": image_accuracy.mean(),
    }
