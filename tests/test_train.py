"""One trial end to end on synthetic data: repeatable, reports every epoch, beats chance."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from dala_search.config import TrialConfig
from dala_search.errors import ConfigError
from dala_search.train import prepare_data, train_trial
from dala_search.train_steps import NonFiniteLossError

TINY = dict(pretrained="none", image_size=32, batch_size=16, fc1=32, fc2=16, num_threads=2)


@pytest.fixture(scope="module")
def data32(demo_root, cache_dir):
    return prepare_data(demo_root, "40X", image_size=32, seed=0, cache_dir=cache_dir)


def test_core_modules_import_no_framework() -> None:
    code = (
        "import sys, dala_search.train, dala_search.cli, dala_search.data.synthetic;"
        "bad=[m for m in ('ray','optuna','mlflow') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_prepare_data_is_patient_disjoint_and_synthetic(data32) -> None:
    sides = [set(data32.slides(getattr(data32.split, s))) for s in ("train", "val", "test")]
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    assert data32.synthetic is True
    assert data32.describe()["n_train"] == len(data32.split.train) > 0
    assert data32.cache.images.shape[1:] == (32, 32, 3)


def test_reports_every_epoch_and_repeats_with_a_seed(data32) -> None:
    config = TrialConfig(epochs=2, **TINY)
    seen: list[tuple[int, dict]] = []
    a = train_trial(config, data32, lambda e, m: seen.append((e, m)))
    assert [e for e, _ in seen] == [1, 2]
    assert {"val_balanced_accuracy", "val_f1", "val_iba", "train_loss"} <= set(seen[0][1])
    assert a.epochs_run == 2 and 1 <= a.best_epoch <= 2
    assert {"accuracy", "balanced_accuracy", "roc_auc", "patient_accuracy"} <= set(a.test)
    b = train_trial(config, data32)
    assert a.history[-1]["train_loss"] == pytest.approx(b.history[-1]["train_loss"], rel=1e-5)
    assert a.test == pytest.approx(b.test, nan_ok=True)
    cm = np.asarray(a.test_confusion)
    assert cm.shape == (2, 2) and cm.sum() == len(data32.split.test)


def test_subtype_task_has_eight_outputs(data32) -> None:
    result = train_trial(TrialConfig(epochs=1, task="subtype", **TINY), data32)
    assert len(result.test_scores["y_prob"][0]) == 8


def test_image_size_must_match_the_cache(data32) -> None:
    with pytest.raises(ConfigError, match="image_size"):
        train_trial(TrialConfig(epochs=1, **{**TINY, "image_size": 64}), data32)


def test_nan_loss_stops_the_trial(data32, monkeypatch) -> None:
    import torch

    import dala_search.train as train_mod

    class NanLoss(torch.nn.Module):
        def forward(self, logits, target):  # noqa: ANN001, ANN202
            return torch.nn.functional.cross_entropy(logits, target) * float("nan")

    monkeypatch.setattr(train_mod, "create_loss", lambda *a, **k: NanLoss())
    seen: list[int] = []
    with pytest.raises(NonFiniteLossError, match="nan"):
        train_trial(TrialConfig(epochs=3, **TINY), data32, lambda e, m: seen.append(e))
    assert seen == []  # stopped in the first epoch, before burning the budget


@pytest.mark.slow
def test_training_beats_chance_on_held_out_patients(demo_root, cache_dir) -> None:
    data = prepare_data(demo_root, "all", image_size=48, seed=1, cache_dir=cache_dir)
    config = TrialConfig(
        epochs=8,
        lr=1e-3,
        attention="eca",
        loss_weighting="inverse_frequency",
        sampling="oversample",  # ~31/69 classes: without it a tiny net settles on "malignant"
        freeze_stages=0,
        **{**TINY, "image_size": 48, "batch_size": 32, "num_threads": 1},
    )
    result = train_trial(config, data)
    # Chance is 0.5 balanced accuracy (and ROC AUC); the test patients were never seen in
    # training. 0.75 / 0.85 here (data seeds 0 and 2: 0.73 / 0.75 and 0.91 / 0.98); 0.5 (every
    # test image "benign", ROC AUC 0.79) while precise BatchNorm drew its images in the natural
    # class mix rather than the oversampled one the weights were trained under.
    assert result.test["balanced_accuracy"] > 0.6, result.test
    # Not enough alone: an untrained net (lr 1e-9) ranks these synthetic tiles at ROC AUC
    # 0.76 but predicts one class (balanced accuracy 0.5), which the line above refuses.
    assert result.test["roc_auc"] > 0.6, result.test
