"""A cross-validated trial: K folds in lockstep, fold means reported, an ensemble tested."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dala_search.config import TrialConfig
from dala_search.data.splits import inner_folds
from dala_search.errors import DataError
from dala_search.metrics import classification_metrics
from dala_search.model.ensemble import ProbabilityEnsemble
from dala_search.train import _Batches, prepare_data, train_trial
from dala_search.train_cv import combine_folds, train_cv_trial
from dala_search.train_steps import predict

TINY = dict(pretrained="none", image_size=32, batch_size=16, device="cpu", num_threads=1)


class SmallNet(nn.Module):
    """A conv, a BatchNorm (so precise BatchNorm runs) and a linear head: fast on the CPU."""

    def __init__(self, config: TrialConfig | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        return [{"params": list(self.parameters()), "weight_decay": weight_decay}]


def _same(a: float, b: float) -> bool:
    """Equal, or both NaN (a metric undefined on a fold makes the mean undefined)."""
    return a == b or (math.isnan(a) and math.isnan(b))


@pytest.fixture(scope="module")
def data32(demo_root, cache_dir):
    return prepare_data(demo_root, "40X", image_size=32, seed=0, cache_dir=cache_dir)


def test_reported_value_is_the_exact_mean_of_the_folds(data32) -> None:
    folds = inner_folds(data32.records, data32.split, 3, seed=0)
    config = TrialConfig(epochs=2, lr=0.05, **TINY)
    seen: list[tuple[int, dict]] = []
    result = train_cv_trial(
        config, data32, folds, lambda e, m: seen.append((e, dict(m))), build_model=SmallNet
    )
    assert [e for e, _ in seen] == [1, 2]
    for _, m in seen:
        assert m["cv_folds"] == 3
        names = [k[len("cv_fold_1_") :] for k in m if k.startswith("cv_fold_1_val_")]
        assert "val_balanced_accuracy" in names and "val_roc_auc" in names
        for name in names:
            values = [m[f"cv_fold_{k}_{name}"] for k in (1, 2, 3)]
            assert _same(m[name], float(np.mean(values))), name
            assert _same(m[f"{name}_std"], float(np.std(values))), name
        assert m["train_loss"] == float(np.mean([m[f"cv_fold_{k}_train_loss"] for k in (1, 2, 3)]))
    # the best epoch is the epoch of the best mean
    means = [m["val_balanced_accuracy"] for _, m in seen]
    assert result.best_epoch == 1 + int(np.argmax(means))
    assert result.best == seen[result.best_epoch - 1][1]
    assert len(result.test_scores["y_true"]) == len(data32.split.test)


def test_one_fold_is_train_trial(data32) -> None:
    """K = 1 over the trial's own split: the same numbers as ``train_trial``."""
    config = TrialConfig(epochs=2, lr=0.05, **TINY)
    single = train_trial(config, data32, build_model=SmallNet)
    cv = train_cv_trial(config, data32, [data32.split], build_model=SmallNet)
    for a, b in zip(single.history, cv.history, strict=True):
        for key, value in a.items():
            if key.startswith("val_") or key in ("train_loss", "lr", "epoch"):
                assert _same(b[key], value), key
    assert cv.best_epoch == single.best_epoch
    assert cv.test == pytest.approx(single.test, nan_ok=True, rel=0, abs=0)
    assert cv.test_scores == single.test_scores


def test_the_test_figures_are_the_ensemble_of_the_fold_models(data32) -> None:
    folds = inner_folds(data32.records, data32.split, 2, seed=1)
    config = TrialConfig(epochs=1, lr=0.05, **TINY)
    result = train_cv_trial(config, data32, folds, keep_model=True, build_model=SmallNet)
    ensemble = result.model
    assert isinstance(ensemble, ProbabilityEnsemble) and len(ensemble.members) == 2
    test_b = _Batches(data32, data32.split.test, torch.device("cpu"))
    n = len(data32.split.test)
    members = [
        predict(m, test_b, n, config=config, device=torch.device("cpu")) for m in ensemble.members
    ]
    mean = np.mean(members, axis=0)
    assert np.asarray(result.test_scores["y_prob"]) == pytest.approx(mean, abs=1e-7)
    # the registered model's softmax is the averaged probabilities
    whole = predict(ensemble, test_b, n, config=config, device=torch.device("cpu"))
    assert whole == pytest.approx(mean, abs=1e-6)
    y_true = data32.labels("binary")[list(data32.split.test)]
    expected = classification_metrics(y_true, mean, slides=data32.slides(data32.split.test))
    assert result.test == pytest.approx(expected, nan_ok=True)


def test_ensemble_forward_is_the_log_of_the_mean_probability() -> None:
    torch.manual_seed(0)
    members = [nn.Linear(5, 3) for _ in range(3)]
    x = torch.randn(4, 5)
    mean = torch.stack([torch.softmax(m(x), dim=1) for m in members]).mean(0)
    ensemble = ProbabilityEnsemble(members)
    assert torch.allclose(torch.softmax(ensemble(x), dim=1), mean, atol=1e-6)
    assert torch.allclose(ensemble.probabilities(x), mean, atol=1e-7)
    with pytest.raises(ValueError, match="at least one"):
        ProbabilityEnsemble([])


def test_folds_must_share_the_test_side(data32) -> None:
    folds = inner_folds(data32.records, data32.split, 2, seed=1)
    other = type(folds[1])(folds[1].train, folds[1].val, folds[1].test[1:], "changed")
    with pytest.raises(DataError, match="test side"):
        train_cv_trial(TrialConfig(epochs=1, **TINY), data32, [folds[0], other])


def test_combine_folds_names_and_means() -> None:
    per_fold = [
        {
            "val_f1": 0.5,
            "train_loss": 1.0,
            "lr": 0.1,
            "precise_bn_s": 1.0,
            "train_images_per_s": 10,
        },
        {
            "val_f1": 0.7,
            "train_loss": 3.0,
            "lr": 0.1,
            "precise_bn_s": 2.0,
            "train_images_per_s": 30,
        },
    ]
    out = combine_folds(per_fold)
    assert out["cv_fold_1_val_f1"] == 0.5 and out["cv_fold_2_val_f1"] == 0.7
    assert out["val_f1"] == pytest.approx(0.6) and out["val_f1_std"] == pytest.approx(0.1)
    assert out["train_loss"] == 2.0 and out["precise_bn_s"] == 3.0 and out["lr"] == 0.1


def test_the_folds_share_one_copy_of_the_non_test_images(data32, monkeypatch) -> None:
    """One batch server over train+val for all folds (views per fold), one over the test."""
    from dala_search import trial_data

    made: list[int] = []
    real = trial_data._Batches.__init__

    def counted(self, data, idx, device) -> None:  # noqa: ANN001
        real(self, data, idx, device)
        made.append(len(idx))

    monkeypatch.setattr(trial_data._Batches, "__init__", counted)
    folds = inner_folds(data32.records, data32.split, 3, seed=0)
    train_cv_trial(TrialConfig(epochs=1, **TINY), data32, folds, build_model=SmallNet)
    split = data32.split
    assert made == [len(split.train) + len(split.val), len(split.test)]
