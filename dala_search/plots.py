"""Figures for trackers and reports (matplotlib, headless; scikit-learn's displays)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and workers

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dala_search.data.breakhis import CLASSES, SUBTYPE_CODES  # noqa: E402


def _labels(n: int) -> Sequence[str]:
    return CLASSES if n == 2 else SUBTYPE_CODES[:n]


def confusion_figure(matrix: Sequence[Sequence[int]], title: str = "test patients") -> Any:
    """Confusion matrix of the best epoch's weights; None when there is nothing to draw."""
    from sklearn.metrics import ConfusionMatrixDisplay

    cm = np.asarray(matrix)
    if cm.size == 0:
        return None
    fig, ax = plt.subplots(figsize=(4, 4))
    ConfusionMatrixDisplay(cm, display_labels=_labels(len(cm))).plot(ax=ax, colorbar=False)
    ax.set_title(f"Confusion matrix ({title})")
    fig.tight_layout()
    return fig


def roc_figure(scores: Mapping[str, Sequence], title: str = "test patients") -> Any:
    """ROC curve (binary: malignant positive); None for multiclass or a single-class side."""
    from sklearn.metrics import RocCurveDisplay

    y_true = np.asarray(scores.get("y_true", []))
    y_prob = np.asarray(scores.get("y_prob", []))
    if y_prob.ndim != 2 or y_prob.shape[1] != 2 or len(np.unique(y_true)) < 2:
        return None
    fig, ax = plt.subplots(figsize=(4, 4))
    RocCurveDisplay.from_predictions(y_true, y_prob[:, 1], pos_label=1, ax=ax, name="malignant")
    ax.set_title(f"ROC ({title})")
    fig.tight_layout()
    return fig


def learning_curves_figure(history: Sequence[Mapping[str, float]]) -> Any:
    """Training loss and validation balanced accuracy per epoch."""
    if not history:
        return None
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3))
    a.plot(epochs, [h["train_loss"] for h in history], marker="o")
    a.set(xlabel="epoch", ylabel="train loss")
    for key in ("val_balanced_accuracy", "val_accuracy", "val_f1"):
        if key in history[0]:
            b.plot(epochs, [h[key] for h in history], marker="o", label=key[4:])
    b.set(xlabel="epoch", ylabel="validation", ylim=(0, 1))
    b.legend()
    fig.tight_layout()
    return fig
