"""Loss functions for class imbalance: a registry of name -> factory.

BreakHis is imbalanced (2,480 benign vs 5,429 malignant images; the eight subtypes range
from ~100 to ~3,450 images), so how the loss treats the rare classes is a search
dimension (``TrialConfig.loss_weighting``). Each entry is built from the training
split's per-class image counts:

- ``none``: plain cross-entropy.
- ``inverse_frequency``: cross-entropy weighted by ``n_total / (n_classes * n_c)``
  (scikit-learn's ``compute_class_weight("balanced")``).
- ``effective_number``: cross-entropy weighted by Cui et al. 2019, "Class-Balanced Loss
  Based on Effective Number of Samples": ``w_c = (1 - beta) / (1 - beta**n_c)``,
  normalised so the weights sum to ``n_classes``. ``beta = 0`` means no reweighting;
  ``beta -> 1`` approaches inverse frequency.
- ``focal``: multi-class softmax focal loss (Lin et al. 2017), ``-(1 - p_t)**gamma log p_t``,
  WITHOUT class weights (alpha). Choice: the search then compares re-weighting by class
  (the two entries above) against focusing on hard examples, instead of mixing both in one
  entry; Lin et al. also found that once gamma focuses on hard examples the balancing
  alpha matters little (their best alpha even favoured the frequent class). ``FocalLoss``
  itself accepts a ``weight`` for callers who want both.

A class with no training images gets a finite weight: it counts as one image (the
largest weight any count can get), so no weight is ever inf/NaN. Such a class has no
training targets, so its weight only matters for a loss computed on another split.

Every loss takes logits ``(N, C)`` and integer targets ``(N,)`` and returns the batch mean.
Class weights are registered buffers: ``loss.to(device)`` moves them with the module.
Core module: no ray, optuna or mlflow (tests/test_architecture.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from dala_search.errors import ConfigError, DataError

# ---------------------------------------------------------------------------
# class weights: strategy name -> function(counts, beta) -> weights or None
# ---------------------------------------------------------------------------

WeightFn = Callable[[np.ndarray, float], np.ndarray | None]


def _no_weights(counts: np.ndarray, beta: float) -> None:
    return None


def _inverse_frequency(counts: np.ndarray, beta: float) -> np.ndarray:
    # scikit-learn's "balanced" weights are exactly n_total / (n_classes * n_c); it wants
    # the label vector, which for a few thousand images is cheap to spell out.
    classes = np.arange(len(counts))
    return compute_class_weight("balanced", classes=classes, y=np.repeat(classes, counts))


def _effective_number(counts: np.ndarray, beta: float) -> np.ndarray:
    if not 0.0 <= beta < 1.0:
        raise ConfigError(f"key 'effective_beta': {beta!r} must be in [0, 1) (Cui et al. 2019)")
    # (1 - beta) / (1 - beta**n) is 1 / (effective number of samples) up to a constant.
    raw = (1.0 - beta) / (1.0 - np.power(beta, counts.astype(np.float64)))
    return raw * (len(counts) / raw.sum())


_WEIGHTS: dict[str, WeightFn] = {
    "none": _no_weights,
    "inverse_frequency": _inverse_frequency,
    "effective_number": _effective_number,
}


def _checked_counts(class_counts: Sequence[int]) -> np.ndarray:
    """Counts as int64, empty classes counted as one image (see the module docstring)."""
    counts = np.asarray(class_counts)
    if counts.ndim != 1 or len(counts) < 2:
        raise ValueError(f"class_counts must list at least two classes, got {class_counts!r}")
    if not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
        raise ValueError(f"class_counts must be non-negative integers, got {class_counts!r}")
    if counts.sum() == 0:
        raise DataError("the training split has no images: cannot weight the loss by class")
    # Why clamp: 0 images would give an infinite weight (n / 0) under both strategies.
    return np.maximum(counts.astype(np.int64), 1)


def class_weights(
    strategy: str, class_counts: Sequence[int], *, beta: float = 0.999
) -> torch.Tensor | None:
    """Per-class loss weights (float32, index = class) for ``strategy``; None means unweighted.

    Also what a caller logs as the weights a trial used. ``strategy`` is one of
    ``available_weightings()``;
    ``class_counts[c]`` is the number of training images of class ``c``.
    """
    fn = _WEIGHTS.get(strategy)
    if fn is None:
        raise ConfigError(
            f"unknown class weighting {strategy!r}; valid: {', '.join(available_weightings())}"
        )
    weights = fn(_checked_counts(class_counts), beta)
    return None if weights is None else torch.as_tensor(weights, dtype=torch.float32)


def available_weightings() -> tuple[str, ...]:
    """Names ``class_weights`` accepts."""
    return tuple(_WEIGHTS)


# ---------------------------------------------------------------------------
# focal loss
# ---------------------------------------------------------------------------


class FocalLoss(nn.Module):
    """Multi-class softmax focal loss (Lin et al. 2017), mean over the batch.

    Per sample: ``-sum_c q_c * w_c * (1 - p_c)**gamma * log p_c`` with ``q`` the (optionally
    label-smoothed) one-hot target and ``w`` the optional class weights (alpha); the batch
    sum is divided by ``sum_i w[y_i]`` (by N without weights). This is exactly how
    ``nn.CrossEntropyLoss`` combines weights and label smoothing, so ``gamma = 0`` gives
    cross-entropy, weights and smoothing included.
    """

    def __init__(
        self,
        gamma: float = 2.0,
        weight: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if gamma < 0:
            raise ConfigError(f"key 'focal_gamma': {gamma!r} must be >= 0")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ConfigError(f"key 'label_smoothing': {label_smoothing!r} must be in [0, 1]")
        self.gamma = float(gamma)
        self.label_smoothing = float(label_smoothing)
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of logits ``(N, C)`` against integer targets ``(N,)``."""
        # Why float32: bf16 logits (autocast) lose the precision log_softmax needs near p=1.
        log_p = F.log_softmax(logits.float(), dim=1)
        n_classes = log_p.shape[1]
        q = F.one_hot(target, n_classes).to(log_p.dtype)
        if self.label_smoothing:
            q = q * (1.0 - self.label_smoothing) + self.label_smoothing / n_classes
        # Why the clamp: d/dp (1-p)**gamma is infinite at p == 1 for gamma < 1, and p rounds
        # to 1 for confident logits; clamped entries get zero gradient instead of NaN.
        focus = (1.0 - log_p.exp()).clamp_min(torch.finfo(log_p.dtype).tiny).pow(self.gamma)
        w = self.weight if self.weight is not None else log_p.new_ones(n_classes)
        per_sample = -(q * w * focus * log_p).sum(dim=1)
        return per_sample.sum() / w[target].sum()

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, label_smoothing={self.label_smoothing}"


# ---------------------------------------------------------------------------
# loss registry: name -> factory(class_counts, beta=, gamma=, label_smoothing=)
# ---------------------------------------------------------------------------

LossFactory = Callable[..., nn.Module]
_LOSSES: dict[str, LossFactory] = {}


def register_loss(name: str) -> Callable[[LossFactory], LossFactory]:
    """Decorator adding a factory to the registry under ``name`` (names must be unique)."""

    def add(factory: LossFactory) -> LossFactory:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        _LOSSES[name] = factory
        return factory

    return add


def _weighted_ce(strategy: str) -> LossFactory:
    def factory(
        class_counts: Sequence[int], *, beta: float, gamma: float, label_smoothing: float
    ) -> nn.Module:
        weight = class_weights(strategy, class_counts, beta=beta)
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)

    return factory


for _name in ("none", "inverse_frequency", "effective_number"):
    register_loss(_name)(_weighted_ce(_name))


@register_loss("focal")
def _focal(
    class_counts: Sequence[int], *, beta: float, gamma: float, label_smoothing: float
) -> nn.Module:
    _checked_counts(class_counts)  # same input errors as the weighted entries
    return FocalLoss(gamma=gamma, label_smoothing=label_smoothing)


def available_losses() -> tuple[str, ...]:
    """Registered loss names (the valid values of ``TrialConfig.loss_weighting``)."""
    return tuple(_LOSSES)


def create_loss(
    name: str,
    class_counts: Sequence[int],
    *,
    beta: float = 0.999,
    gamma: float = 2.0,
    label_smoothing: float = 0.0,
) -> nn.Module:
    """Build the loss ``name`` for a training split with ``class_counts`` images per class.

    Called once per trial by ``train.train_trial`` with ``config.loss_weighting``,
    ``effective_beta``, ``focal_gamma`` and ``label_smoothing``. ``beta`` is used by
    ``effective_number`` only, ``gamma`` by ``focal`` only. An unknown name raises
    ConfigError listing the valid ones.
    """
    factory = _LOSSES.get(name)
    if factory is None:
        raise ConfigError(
            f"key 'loss_weighting': unknown loss {name!r}; valid: {', '.join(available_losses())}"
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise ConfigError(f"key 'label_smoothing': {label_smoothing!r} must be in [0, 1]")
    return factory(class_counts, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
