"""Out of memory is not the end of a trial: train the same batch in smaller pieces.

A training batch of ``batch_size`` images is split into micro-batches of at most
``MicroBatch.size`` images whose gradients add up (gradient accumulation, each piece's
mean loss weighted by its share of the batch), then one optimiser step: the effective
batch, and so the lr that suits it, stays ``batch_size``. Only BatchNorm differs: it
normalises each micro-batch with that micro-batch's statistics, so a run at a smaller
micro-batch is as close to the full-batch run as the BatchNorm batch allows, not identical.

When a micro-batch runs out of memory (``torch.OutOfMemoryError``), ``train_batch``
frees what it can (``gc.collect``, ``torch.cuda.empty_cache``), halves the micro-batch
and trains the same batch again from zeroed gradients (no optimiser step was taken for
it); the rest of the trial keeps the smaller size. Below ``min_micro_batch`` the trial
ends with ``MicroBatchFloorError``. One process only: in a data-parallel trial the other
ranks wait in a collective for the one that failed, so there the error is raised as is.
Core module: torch and numpy only.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


class MicroBatchFloorError(RuntimeError):
    """Out of memory even at the smallest micro-batch allowed (``min_micro_batch``)."""


@dataclass
class MicroBatch:
    """How many images one forward/backward pass takes; shrinks on out-of-memory."""

    size: int  # images per forward/backward pass (per rank)
    floor: int  # the smallest size tried before the trial fails

    def split(self, positions: np.ndarray) -> list[np.ndarray]:
        """``positions`` in nearly equal pieces of at most ``size`` (never a lone image
        beside a full piece: BatchNorm cannot train on one image)."""
        pieces = max(1, math.ceil(len(positions) / self.size))
        return np.array_split(positions, pieces)

    def halve(self, error: str) -> None:
        """Half the size, or MicroBatchFloorError when that is below the floor."""
        smaller = self.size // 2
        if smaller < self.floor:
            raise MicroBatchFloorError(
                f"out of memory at a micro-batch of {self.size} images, and half of it is "
                f"below min_micro_batch {self.floor}: {error}"
            )
        self.size = smaller


def free_memory(device: torch.device) -> None:
    """Give back what the failed attempt held: its tensors, then the CUDA cache."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def train_batch(
    step: Callable[[list[np.ndarray]], tuple[torch.Tensor, int]],
    positions: np.ndarray,
    micro: MicroBatch,
    device: torch.device,
    world_size: int = 1,
) -> tuple[torch.Tensor, int]:
    """``step(pieces)`` on ``positions`` split by ``micro``; on out-of-memory halve and
    retry the same batch (``step`` zeroes the gradients first) until the floor."""
    while True:
        try:
            return step(micro.split(positions))
        except torch.OutOfMemoryError as e:
            if world_size > 1:
                raise
            error = str(e).splitlines()[0] if str(e) else type(e).__name__
        # Outside the except block: the traceback (and the tensors its frames hold) is gone.
        free_memory(device)
        micro.halve(error)
