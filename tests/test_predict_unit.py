"""``predict.py`` without a search: normalisation, the preprocessing contract, TTA and the
patient table, on a toy model (fast, no MLflow)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from dala_search.data.augment import to_normalized
from dala_search.data.augment_maps import IMAGENET_MEAN, IMAGENET_STD
from dala_search.errors import DalaError
from dala_search.model.ensemble import ProbabilityEnsemble
from dala_search.predict import (
    TTA_VIEWS,
    Preprocess,
    normalized,
    preprocessing_of,
    probabilities,
)
from dala_search.predict_images import patient_table

CPU = torch.device("cpu")


def _toy(size: int = 8) -> nn.Module:
    torch.manual_seed(0)  # a linear map of the pixels: not invariant to turns or mirrors
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, 2))


def test_default_normalisation_is_the_evaluations_and_own_statistics_apply() -> None:
    u8 = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), np.uint8))
    imagenet = Preprocess(8, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(normalized(u8, imagenet), to_normalized(u8))
    own = Preprocess(8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    expected = (u8.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    assert torch.allclose(normalized(u8, own), expected, atol=1e-6)


def test_preprocessing_contract_own_attribute_else_training_default() -> None:
    plain = _toy()
    assert preprocessing_of(plain, 48) == Preprocess(48, IMAGENET_MEAN, IMAGENET_STD)
    member = _toy()
    member.preprocess = {"size": 224, "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}
    got = preprocessing_of(ProbabilityEnsemble([member, _toy()]), 48)
    assert got == Preprocess(224, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    member.preprocess = {"size": 224, "mean": [0.5]}
    with pytest.raises(DalaError, match="preprocess"):
        preprocessing_of(member, 48)


def test_tta_is_the_mean_over_the_8_turns_and_mirrors() -> None:
    model = _toy()
    pre = Preprocess(8, IMAGENET_MEAN, IMAGENET_STD)
    images = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 3), np.uint8)
    views = [np.rot90(images, k, axes=(1, 2)) for k in range(4)]
    views += [v[:, :, ::-1] for v in views]
    each = np.stack([probabilities(model, np.ascontiguousarray(v), pre, device=CPU) for v in views])
    assert len(views) == TTA_VIEWS and not np.allclose(each[0], each[1])
    got = probabilities(model, images, pre, device=CPU, tta=True, batch_size=2)
    assert np.allclose(got, each.mean(axis=0), atol=1e-6)
    assert np.allclose(got.sum(axis=1), 1, atol=1e-6)


def test_patient_table_calls_as_the_evaluation_and_leaves_out_unnamed_images() -> None:
    preds = pd.DataFrame(
        {
            "path": ["a", "b", "c", "d"],
            "slide": ["s1", "s1", "s2", ""],
            "magnification": ["40X"] * 4,
            "predicted": ["malignant", "benign", "benign", "benign"],
            "prob_benign": [0.1, 0.6, 0.7, 0.9],
            "prob_malignant": [0.9, 0.4, 0.3, 0.1],
        }
    )
    table = patient_table(preds).set_index("slide")
    assert list(table.index) == ["s1", "s2"]
    # s1: one vote each, mean malignant probability 0.65 -> malignant (binary: mean vs 0.5)
    assert table.loc["s1", "predicted"] == "malignant" and table.loc["s1", "n_images"] == 2
    assert table.loc["s1", "mean_prob_malignant"] == pytest.approx(0.65)
    assert table.loc["s2", "predicted"] == "benign"
