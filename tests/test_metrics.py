"""Metrics against values worked out by hand on small examples."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from imblearn.metrics import geometric_mean_score, make_index_balanced_accuracy
from sklearn.metrics import roc_auc_score

from dala_search.config import SELECT_METRICS
from dala_search.metrics import (
    BINARY_METRICS,
    METRIC_DIRECTIONS,
    MULTICLASS_METRICS,
    PATIENT_METRICS,
    classification_metrics,
    confusion,
)

# Ten images, 3 benign (0) and 7 malignant (1); positive probabilities chosen so that
# argmax gives y_pred = [0, 1, 1 | 1, 1, 1, 1, 1, 1, 0].
Y_TRUE = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
P_POS = np.array([0.2, 0.6, 0.7, 0.9, 0.8, 0.75, 0.65, 0.55, 0.52, 0.4])
Y_PROB = np.stack([1 - P_POS, P_POS], axis=1)
Y_PRED = np.array([0, 1, 1, 1, 1, 1, 1, 1, 1, 0])


def _binary_probs(p_pos: list[float]) -> np.ndarray:
    p = np.asarray(p_pos)
    return np.stack([1 - p, p], axis=1)


def test_confusion_by_hand() -> None:
    #            pred 0  pred 1
    # true 0:  TN = 1   FP = 2
    # true 1:  FN = 1   TP = 6
    assert confusion(Y_TRUE, Y_PRED, 2).tolist() == [[1, 2], [1, 6]]
    # an absent class still gets its row and column
    assert confusion([0, 1], [1, 1], 3).tolist() == [[0, 1, 0], [0, 1, 0], [0, 0, 0]]
    # an empty split (train.py tests an empty test side too) gives zeros, not an error
    assert confusion(np.zeros(0, int), np.zeros(0, int), 2).tolist() == [[0, 0], [0, 0]]


def test_binary_metrics_by_hand() -> None:
    m = classification_metrics(Y_TRUE, Y_PROB)
    assert list(m) == list(BINARY_METRICS)
    assert all(type(v) is float for v in m.values())
    sens, spec = 6 / 7, 1 / 3  # TP/(TP+FN) = 6/7, TN/(TN+FP) = 1/3
    expected = {
        "accuracy": 0.7,  # (TN + TP) / 10 = 7/10
        "balanced_accuracy": 0.595238,  # (6/7 + 1/3) / 2 = 25/42
        "f1": 0.8,  # 2TP / (2TP + FP + FN) = 12 / 15
        "f1_macro": 0.6,  # (0.8 + F1 of class 0 = 2*1 / (2 + 2 + 1) = 0.4) / 2
        "precision": 0.75,  # TP / (TP + FP) = 6/8
        "sensitivity": 0.857143,  # 6/7
        "specificity": 0.333333,  # 1/3
        "gmean": 0.534522,  # sqrt(6/7 * 1/3) = sqrt(2/7)
        "iba": 0.300680,  # (1 + 0.1 * (6/7 - 1/3)) * 2/7 = (1 + 1.1/21) * 2/7 = 221/735
        # pairs (pos, neg) ranked right: neg 0.2 < all 7; neg 0.6 < 0.9, 0.8, 0.75, 0.65;
        # neg 0.7 < 0.9, 0.8, 0.75: (7 + 4 + 3) / 21 = 2/3
        "roc_auc": 0.666667,
    }
    assert m == pytest.approx(expected, abs=1e-6)
    assert m["gmean"] == pytest.approx(math.sqrt(sens * spec))


def test_iba_trap_default_averaging_collapses_to_gmean_squared() -> None:
    # DESIGN.md: with imblearn's default averaging the dominance of the two classes averages
    # to 0 on binary labels, so the "IBA" is just G-mean**2 = 2/7 = 0.285714.
    default_iba = make_index_balanced_accuracy(alpha=0.1, squared=True)(geometric_mean_score)
    trap = default_iba(Y_TRUE, Y_PRED)
    gmean_default = geometric_mean_score(Y_TRUE, Y_PRED)
    assert trap == pytest.approx(gmean_default**2)
    assert trap == pytest.approx(2 / 7)
    # Ours uses average="binary": the dominance sens - spec = 11/21 counts.
    ours = classification_metrics(Y_TRUE, Y_PROB)["iba"]
    assert ours == pytest.approx(221 / 735)
    assert abs(ours - trap) > 0.01


def test_positive_class_can_be_zero() -> None:
    # Calling benign positive is the same as flipping labels and probability columns.
    flipped = classification_metrics(1 - Y_TRUE, Y_PROB[:, ::-1])
    as_zero = classification_metrics(Y_TRUE, Y_PROB, positive=0)
    assert as_zero["sensitivity"] == pytest.approx(1 / 3)  # recall of benign
    assert as_zero["specificity"] == pytest.approx(6 / 7)
    assert as_zero["f1"] == pytest.approx(0.4)
    assert as_zero == pytest.approx(flipped)


def test_patient_level_by_hand() -> None:
    # Slide A: benign, p_pos (0.1, 0.3, 0.8): mean 0.4 -> benign (right); images 2/3 right
    # Slide B: malignant, p_pos (0.9, 0.4, 0.45, 0.7): mean 0.6125 -> malignant (right),
    #          though a vote of images would tie 2:2; images 2/4 right
    # Slide C: malignant, p_pos (0.3, 0.2): mean 0.25 -> benign (wrong); images 0/2 right
    # Images interleaved so that grouping, not order, is tested.
    slides = ["B", "A", "C", "B", "A", "B", "C", "A", "B"]
    p_pos = [0.9, 0.1, 0.3, 0.4, 0.3, 0.45, 0.2, 0.8, 0.7]
    y_true = np.array([1, 0, 1, 1, 0, 1, 1, 0, 1])
    m = classification_metrics(y_true, _binary_probs(p_pos), slides=slides)
    assert list(m) == list(BINARY_METRICS + PATIENT_METRICS)
    assert m["patient_accuracy"] == pytest.approx(2 / 3)  # A, B right; C wrong
    # slide labels (0, 1, 1), predictions (0, 1, 0): (recall 1/1 + recall 1/2) / 2
    assert m["patient_balanced_accuracy"] == pytest.approx(0.75)
    # mean over patients of image accuracy: (2/3 + 2/4 + 0/2) / 3 = 7/18
    assert m["patient_recognition_rate"] == pytest.approx(7 / 18)
    assert m["accuracy"] == pytest.approx(4 / 9)  # image level differs: 4 of 9 images


def test_patient_label_is_majority_and_multiclass_votes() -> None:
    # 3 classes. Slide S (like slide 14-13412: two subtypes in one patient): true labels
    # (0, 0, 1) -> label 0; predictions (0, 1, 1) -> vote 1 (wrong).
    # Slide T: true (2, 2); predictions (2, 0) tie 1:1, broken by mean probability:
    #   class 2 mean (0.7 + 0.3) / 2 = 0.5 > class 0 mean (0.2 + 0.6) / 2 = 0.4 -> 2 (right)
    slides = ["S", "S", "S", "T", "T"]
    y_true = np.array([0, 0, 1, 2, 2])
    y_prob = np.array(
        [
            [0.8, 0.1, 0.1],
            [0.3, 0.6, 0.1],
            [0.1, 0.8, 0.1],
            [0.2, 0.1, 0.7],
            [0.6, 0.1, 0.3],
        ]
    )
    m = classification_metrics(y_true, y_prob, slides=slides)
    assert list(m) == list(MULTICLASS_METRICS + PATIENT_METRICS)
    assert m["patient_accuracy"] == pytest.approx(0.5)
    # slide classes present: 0 (recall 0) and 2 (recall 1) -> 0.5
    assert m["patient_balanced_accuracy"] == pytest.approx(0.5)
    # S: images 2/3 right, T: 1/2 right -> (2/3 + 1/2) / 2 = 7/12
    assert m["patient_recognition_rate"] == pytest.approx(7 / 12)


def test_multiclass_metrics_by_hand() -> None:
    # y_true (0, 0, 1, 1, 2, 2), y_pred (0, 1, 1, 1, 2, 0): recalls (1/2, 2/2, 1/2)
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = [0, 1, 1, 1, 2, 0]
    y_prob = np.full((6, 3), 0.1)
    y_prob[np.arange(6), y_pred] = 0.8
    m = classification_metrics(y_true, y_prob)
    assert list(m) == list(MULTICLASS_METRICS)
    expected = {
        "accuracy": 4 / 6,
        "balanced_accuracy": 2 / 3,  # (1/2 + 1 + 1/2) / 3
        # per-class F1 = 2TP / (2TP + FP + FN): 2/4, 4/5, 2/3 -> mean 0.655556
        "f1_macro": 0.655556,
        "f1": 0.655556,
        "gmean": 0.629961,  # (1/2 * 1 * 1/2) ** (1/3) = 0.25 ** (1/3)
        # one-vs-rest: sens (1/2, 1, 1/2) -> S = 2/3; spec (3/4, 3/4, 4/4) -> P = 5/6;
        # (1 + 0.1 * (2/3 - 5/6)) * 2/3 * 5/6 = (59/60) * (5/9) = 59/108
        "iba": 0.546296,
    }
    assert {k: m[k] for k in expected} == pytest.approx(expected, abs=1e-6)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y_true, y_prob, multi_class="ovr"))


def test_multiclass_eight_subtypes_with_missing_classes() -> None:
    # Patient-disjoint splits often miss a subtype: 8 columns, classes 3 and 6 absent.
    # The true class always gets 0.65 and the others 0.05: every present class is ranked
    # perfectly one-vs-rest, so AUC 1.0 (sklearn's multi_class="ovr" would refuse this).
    y_true = np.array([0, 1, 2, 4, 5, 7, 0, 1, 2, 4, 5, 7])
    y_prob = np.full((12, 8), 0.05)
    y_prob[np.arange(12), y_true] = 0.65
    m = classification_metrics(y_true, y_prob, slides=[str(i // 2) for i in range(12)])
    assert m["roc_auc"] == 1.0
    assert m["accuracy"] == m["balanced_accuracy"] == m["gmean"] == m["f1"] == 1.0
    # all recalls 1 and all specificities 1 -> IBA (1 + 0) * 1 * 1
    assert m["iba"] == pytest.approx(1.0)
    assert m["patient_accuracy"] == m["patient_recognition_rate"] == 1.0
    # Predicting an absent class does not zero G-mean: one of class 0's two images goes to
    # absent class 3 -> recalls over the present classes (1/2, 1, 1, 1, 1, 1) ->
    # (1/2) ** (1/6) = 0.890899 (counting class 3, recall 0/0 taken as 0, would give 0).
    y_prob[0] = 0.05
    y_prob[0, 3] = 0.65
    m = classification_metrics(y_true, y_prob)
    assert m["gmean"] == pytest.approx(0.890899, abs=1e-6)


def test_degenerate_single_class_is_nan_not_a_crash() -> None:
    # A validation side with malignant images only: AUC, specificity, G-mean and IBA are
    # undefined (NaN); the rest is defined. No library warning leaks out.
    y_true = np.array([1, 1, 1, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics(y_true, _binary_probs([0.9, 0.8, 0.6, 0.3]), slides=list("aabb"))
    for key in ("roc_auc", "specificity", "gmean", "iba"):
        assert math.isnan(m[key]), key
    assert m["accuracy"] == m["sensitivity"] == 0.75  # 3 of 4 predicted malignant
    assert m["precision"] == 1.0
    assert m["patient_accuracy"] == 0.5  # slide b: mean p_pos (0.6 + 0.3) / 2 < 0.5: benign


def test_multiclass_single_class_is_nan() -> None:
    y_prob = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1]])
    m = classification_metrics(np.array([0, 0]), y_prob)
    assert math.isnan(m["roc_auc"]) and math.isnan(m["gmean"]) and math.isnan(m["iba"])
    assert m["accuracy"] == 0.5


def test_empty_input_gives_nan_for_every_key() -> None:
    m = classification_metrics(np.zeros(0, dtype=np.int64), np.zeros((0, 8)), slides=[])
    assert list(m) == list(MULTICLASS_METRICS + PATIENT_METRICS)
    assert all(math.isnan(v) for v in m.values())


@pytest.mark.parametrize(
    ("y_true", "y_prob", "match"),
    [
        ([0, 1], np.array([0.3, 0.7]), "shape"),
        ([0, 1, 1], _binary_probs([0.3, 0.7]), "rows"),
        ([0, 2], _binary_probs([0.3, 0.7]), r"\[0, 2\)"),
        ([0.0, 1.0], _binary_probs([0.3, 0.7]), "integer"),
    ],
)
def test_bad_inputs_say_what_is_wrong(y_true: list, y_prob: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        classification_metrics(np.asarray(y_true), y_prob)


def test_slides_must_match_images() -> None:
    with pytest.raises(ValueError, match="3 slides for 2 images"):
        classification_metrics(np.array([0, 1]), _binary_probs([0.3, 0.7]), slides=list("abc"))


def test_metric_directions_cover_every_key_and_select_metric() -> None:
    keys = set(BINARY_METRICS + MULTICLASS_METRICS + PATIENT_METRICS)
    assert set(METRIC_DIRECTIONS) == keys
    assert set(METRIC_DIRECTIONS.values()) == {"max"}
    assert set(SELECT_METRICS) <= keys
