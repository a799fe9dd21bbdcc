"""Per-epoch sampling strategies: class counts, determinism, registry errors."""

from __future__ import annotations

import numpy as np
import pytest

from dala_search.data.sampling import SAMPLING_STRATEGIES, epoch_indices
from dala_search.errors import ConfigError, DataError

# 3 benign (0) and 7 malignant (1): the real ~31/69 balance in miniature.
LABELS = np.array([1, 0, 1, 1, 0, 1, 1, 0, 1, 1])


def _counts(idx: np.ndarray, labels: np.ndarray = LABELS) -> dict[int, int]:
    values, counts = np.unique(labels[idx], return_counts=True)
    return dict(zip(values.tolist(), counts.tolist(), strict=True))


def test_registry_names() -> None:
    assert SAMPLING_STRATEGIES == ("none", "oversample", "undersample", "weighted")


def test_none_is_a_permutation_of_all() -> None:
    idx = epoch_indices(LABELS, "none", seed=3)
    assert sorted(idx.tolist()) == list(range(10))
    assert _counts(idx) == {0: 3, 1: 7}


def test_oversample_reaches_majority_count() -> None:
    idx = epoch_indices(LABELS, "oversample", seed=3)
    assert _counts(idx) == {0: 7, 1: 7}
    # Every malignant position exactly once; benign ones repeated to fill up to 7.
    assert sorted(i for i in idx.tolist() if LABELS[i] == 1) == [0, 2, 3, 5, 6, 8, 9]
    assert set(i for i in idx.tolist() if LABELS[i] == 0) <= {1, 4, 7}


def test_undersample_cuts_to_minority_count() -> None:
    idx = epoch_indices(LABELS, "undersample", seed=3)
    assert _counts(idx) == {0: 3, 1: 3}
    # No repeats: a subset of the positions.
    assert len(set(idx.tolist())) == 6
    assert sorted(i for i in idx.tolist() if LABELS[i] == 0) == [1, 4, 7]


def test_weighted_is_roughly_balanced() -> None:
    labels = np.array([0] * 100 + [1] * 900)
    idx = epoch_indices(labels, "weighted", seed=0)
    assert len(idx) == 1000  # epoch length unchanged
    # Each draw is benign with probability 1/2; over 1000 draws, 500 +- ~16 (sd).
    benign = int((labels[idx] == 0).sum())
    assert 430 < benign < 570
    # Drawn with replacement: benign positions repeat (only 100 distinct ones exist).
    assert len(set(idx[labels[idx] == 0].tolist())) <= 100


@pytest.mark.parametrize("strategy", SAMPLING_STRATEGIES)
def test_deterministic_per_seed_and_epochs_differ(strategy: str) -> None:
    a = epoch_indices(LABELS, strategy, seed=7 * 1000 + 1)
    b = epoch_indices(LABELS, strategy, seed=7 * 1000 + 1)
    c = epoch_indices(LABELS, strategy, seed=7 * 1000 + 2)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.int64
    assert not np.array_equal(a, c)
    assert a.min() >= 0 and a.max() < len(LABELS)


@pytest.mark.parametrize("strategy", ["none", "oversample", "undersample"])
def test_single_class_is_a_shuffle(strategy: str) -> None:
    # Nothing to balance: every position exactly once (imbalanced-learn alone would raise).
    labels = np.ones(5, dtype=int)
    idx = epoch_indices(labels, strategy, seed=0)
    assert sorted(idx.tolist()) == [0, 1, 2, 3, 4]


def test_single_class_weighted_draws_uniformly_with_replacement() -> None:
    labels = np.ones(5, dtype=int)
    idx = epoch_indices(labels, "weighted", seed=0)
    assert len(idx) == 5
    assert set(idx.tolist()) <= {0, 1, 2, 3, 4}


@pytest.mark.parametrize("strategy", SAMPLING_STRATEGIES)
def test_large_seed_accepted(strategy: str) -> None:
    # base_seed * 1000 + epoch can exceed 2**32 (imbalanced-learn's limit).
    idx = epoch_indices(LABELS, strategy, seed=2**40 + 5)
    assert len(idx) > 0


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match="'smote'.*none, oversample, undersample, weighted"):
        epoch_indices(LABELS, "smote", seed=0)


def test_empty_labels_is_a_data_error() -> None:
    with pytest.raises(DataError, match="non-empty"):
        epoch_indices(np.array([], dtype=int), "none", seed=0)
