"""The epoch loop of a trial, whatever it trains (one fold, or K in lockstep with
``--cv``): best-epoch selection, early stopping, the reporter and the progress bar.
``train.train_trial`` and ``train_cv.train_cv_trial`` hand it a ``step(epoch)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dala_search.config import TrialConfig

# Called once per epoch with the epoch number (1-based) and that epoch's metrics.
Reporter = Callable[[int, dict[str, float]], None]


@dataclass
class BestEpoch:
    """Best-epoch selection and early stopping on one metric of the reported dicts."""

    key: str  # e.g. "val_balanced_accuracy"
    patience: int  # 0: never stop early
    value: float = -math.inf
    epoch: int = 0  # 0: no finite value yet
    metrics: dict[str, float] = field(default_factory=dict)
    since: int = 0

    def update(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Record epoch ``epoch``; True when it is the best so far (the caller snapshots)."""
        value = metrics.get(self.key, float("nan"))
        if math.isfinite(value) and value > self.value:
            self.value, self.epoch, self.metrics, self.since = value, epoch, metrics, 0
            return True
        self.since += 1
        return False

    @property
    def stop(self) -> bool:
        return bool(self.patience) and self.since >= self.patience


def progress_bar(config: TrialConfig, desc: str, enabled: bool) -> Any:
    """A tqdm bar over the epochs, or None."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.epochs, desc=desc, unit="epoch")


def _tick(bar: Any, metrics: dict[str, float], key: str) -> None:
    if bar is not None:
        value = metrics.get(key, float("nan"))
        bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", **{key: f"{value:.3f}"})
        bar.update(1)


def run_epochs(
    config: TrialConfig,
    step: Callable[[int], dict[str, float]],
    snapshot: Callable[[], None],
    restore: Callable[[], None],
    reporter: Reporter | None,
    bar: Any,
) -> tuple[BestEpoch, list[dict[str, float]]]:
    """The epoch loop of a trial, one fold or K in lockstep: ``step(epoch)`` trains and
    validates, ``snapshot()`` keeps the weights of a new best epoch, the reporter hears
    every epoch, patience stops early, and ``restore()`` puts the best weights back (unless
    no validation value was finite: the last weights are tested then)."""
    best = BestEpoch(f"val_{config.select_metric}", config.early_stop_patience)
    history: list[dict[str, float]] = []
    for epoch in range(1, config.epochs + 1):
        metrics = step(epoch)
        history.append(metrics)
        if best.update(epoch, metrics):
            snapshot()
        _tick(bar, metrics, best.key)
        if reporter is not None:
            reporter(epoch, metrics)
        if best.stop:
            break
    if bar is not None:
        bar.close()
    if best.epoch:
        restore()
    return best, history
