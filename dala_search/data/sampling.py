"""Per-epoch sampling strategies for the imbalanced training split.

BreakHis is ~31% benign / ~69% malignant. The search varies how the training split is
drawn each epoch (the config value ``sampling``); the loss weighting is a separate knob
in ``losses.py``. Each strategy returns *positions* into the training labels, so the
caller keeps one decoded-image cache and only changes which rows it reads.

Call with ``seed = base_seed * 1000 + epoch`` so epochs differ but a run repeats exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from imblearn.over_sampling import RandomOverSampler
from imblearn.under_sampling import RandomUnderSampler

from dala_search.errors import ConfigError, DataError

SamplingFn = Callable[[np.ndarray, int], np.ndarray]


def _none(labels: np.ndarray, seed: int) -> np.ndarray:
    # Every example exactly once, in a fresh order each epoch.
    return np.random.default_rng(seed).permutation(len(labels))


def _resample_index(
    sampler_cls: type[RandomOverSampler] | type[RandomUnderSampler], labels: np.ndarray, seed: int
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if len(np.unique(labels)) < 2:
        # Nothing to balance (imbalanced-learn refuses a single class): plain shuffle.
        return rng.permutation(len(labels))
    # imbalanced-learn wants a seed below 2**32; derive one so any int seed works.
    sampler = sampler_cls(random_state=int(rng.integers(2**32)))
    # It resamples rows of X; resampling the column of positions gives the positions
    # themselves, so no image is touched here.
    positions = np.arange(len(labels)).reshape(-1, 1)
    picked, _ = sampler.fit_resample(positions, labels)
    # fit_resample groups its output by class; shuffle so batches mix classes.
    return rng.permutation(picked.ravel())


def _oversample(labels: np.ndarray, seed: int) -> np.ndarray:
    # Minority classes are repeated at random up to the majority count.
    return _resample_index(RandomOverSampler, labels, seed)


def _undersample(labels: np.ndarray, seed: int) -> np.ndarray:
    # Majority classes are cut at random down to the minority count (a different
    # subset every epoch, so over a run all majority images are seen).
    return _resample_index(RandomUnderSampler, labels, seed)


def _weighted(labels: np.ndarray, seed: int) -> np.ndarray:
    # Draw n positions with replacement, each with probability proportional to
    # 1 / count(its class): every class is equally likely per draw, the epoch length
    # stays n (torch's WeightedRandomSampler semantics, without importing torch here).
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    weights = 1.0 / counts[inverse]
    rng = np.random.default_rng(seed)
    return rng.choice(len(labels), size=len(labels), replace=True, p=weights / weights.sum())


_REGISTRY: dict[str, SamplingFn] = {
    "none": _none,
    "oversample": _oversample,
    "undersample": _undersample,
    "weighted": _weighted,
}

SAMPLING_STRATEGIES: tuple[str, ...] = tuple(_REGISTRY)


def epoch_indices(labels: np.ndarray, strategy: str, *, seed: int) -> np.ndarray:
    """Positions into ``labels`` to train on for one epoch, already shuffled.

    For the training split's labels, once per epoch (the validation and test splits are
    never resampled). Deterministic for a given seed.
    Raises ConfigError for an unknown strategy (listing the valid ones) and DataError for
    labels that are not a non-empty 1-D array (an empty training split).
    """
    fn = _REGISTRY.get(strategy)
    if fn is None:
        raise ConfigError(
            f"unknown sampling strategy {strategy!r}; valid: {', '.join(SAMPLING_STRATEGIES)}"
        )
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise DataError(
            f"sampling {strategy!r} needs a non-empty 1-D label array, got shape {labels.shape}"
        )
    return np.asarray(fn(labels, seed), dtype=np.int64)
