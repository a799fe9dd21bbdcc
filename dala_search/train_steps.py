"""The steps of one epoch, plain PyTorch: train one pass over the training side
(``train_one_epoch``), predict a split side (``predict``) and score it (``evaluate``).

``train.FoldRun`` calls them; so does ``precise_bn.recalibrate_batchnorm`` for its plain
(un-augmented) batches. Data parallel, every rank runs ``train_one_epoch`` on its share of
each global batch; the sums over ranks are ``parallel.py``'s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from dala_search import faults
from dala_search.config import TrialConfig
from dala_search.data.augment import AugmentSpec, augment_normalized, to_normalized
from dala_search.metrics import classification_metrics
from dala_search.micro_batch import MicroBatch, train_batch
from dala_search.model.dalaresnet import NUM_CLASSES
from dala_search.parallel import sum_across_processes
from dala_search.trial_data import Batches, TrialData, device_positions


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: the trial stops instead of burning epochs."""


def cuda_modes(
    config: TrialConfig, device: torch.device
) -> tuple[bool, torch.memory_format | None]:
    """bf16 autocast and a channels_last model apply on CUDA only.

    On the CPU bf16 autocast slows training down; the CPU augmentation hands the model
    channels_last inputs anyway (no slower than NCHW here, faster at 128 px).
    """
    on_cuda = device.type == "cuda"
    fmt = torch.channels_last if (on_cuda and config.channels_last) else None
    return on_cuda and config.amp, fmt


def train_one_epoch(
    model: nn.Module,
    batches: Batches,
    labels: torch.Tensor,
    order: np.ndarray,
    *,
    config: TrialConfig,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    micro: MicroBatch | None = None,
) -> dict[str, float]:
    """One pass over ``order`` (positions into the train side); returns loss and speed.

    Data parallel (``world_size`` > 1; ``train_trial(distributed=True)`` calls it on every
    rank with a DDP-wrapped model): every rank walks the same ``order`` in global batches
    of ``batch_size`` and trains on its strided share of each, so the global batch (and the
    lr that suits it) does not depend on the number of workers.

    ``micro`` (``micro_batch.py``): each batch is trained in micro-batches of at most
    ``micro.size`` images, halved on out-of-memory down to ``min_micro_batch``; ``micro``
    keeps the size it reached for the caller's next epoch.
    """
    model.train()
    spec = AugmentSpec.from_config(config)
    use_amp, memory_format = cuda_modes(config, device)
    if micro is None:
        micro = MicroBatch(config.batch_size, config.min_micro_batch)

    def step(pieces: list[np.ndarray], n_global: int) -> tuple[torch.Tensor, int]:
        """One optimiser step on the batch ``pieces`` make up (gradients accumulated)."""
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for pos in pieces:
            faults.before_forward(len(pos))  # no-op unless a test injects an out-of-memory
            idx = device_positions(pos, device)  # images and labels both index with it
            x = augment_normalized(batches.get(idx).to(device, non_blocking=True), spec, generator)
            if memory_format is not None:
                x = x.contiguous(memory_format=memory_format)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = model(x)
            loss = loss_fn(logits.float(), labels[idx])
            # Each piece's mean loss weighted by its share of the global batch: the gradient
            # of the global batch's mean loss (DDP averages over ranks, hence world_size).
            (loss * (len(pos) * world_size / n_global)).backward()
            total += loss.detach() * len(pos)
        optimizer.step()
        return total, sum(len(pos) for pos in pieces)

    # Accumulate on the device; read once at the end (no host sync in the inner loop).
    loss_sum = torch.zeros((), device=device)
    seen = 0
    start = time.perf_counter()
    bs = config.batch_size
    for lo in range(0, len(order), bs):
        pos = order[lo : lo + bs]
        if len(pos) < 2 * world_size:  # BatchNorm cannot train on a single sample (per rank)
            continue
        n_global = len(pos)
        total, n = train_batch(
            lambda pieces, n_global=n_global: step(pieces, n_global),
            pos[rank::world_size],
            micro,
            device,
            world_size,
        )
        loss_sum += total
        seen += n
    loss_sum, seen = sum_across_processes(loss_sum, seen, world_size)  # the epoch's, all ranks
    mean_loss = float(loss_sum.item()) / max(seen, 1)
    if not math.isfinite(mean_loss):
        raise NonFiniteLossError(f"training loss became {mean_loss} (lr {config.lr:g})")
    elapsed = time.perf_counter() - start
    return {"train_loss": mean_loss, "train_images_per_s": seen / max(elapsed, 1e-9)}


def plain_batch(
    batches: Batches,
    positions: np.ndarray,
    device: torch.device,
    memory_format: torch.memory_format | None,
) -> torch.Tensor:
    """The model input for ``positions`` without augmentation (validation, precise BN)."""
    x = to_normalized(
        batches.get(device_positions(positions, device)).to(device, non_blocking=True)
    )
    return x if memory_format is None else x.contiguous(memory_format=memory_format)


@torch.no_grad()
def predict(
    model: nn.Module,
    batches: Batches,
    n: int,
    *,
    config: TrialConfig,
    device: torch.device,
) -> np.ndarray:
    """Softmax probabilities for positions 0..n-1 of a split side (no augmentation)."""
    model.eval()
    use_amp, memory_format = cuda_modes(config, device)
    out = []
    bs = max(config.batch_size, 64)
    for lo in range(0, n, bs):
        pos = np.arange(lo, min(lo + bs, n))
        x = plain_batch(batches, pos, device, memory_format)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(x)
        out.append(torch.softmax(logits.float(), dim=1))
    return torch.cat(out).cpu().numpy() if out else np.zeros((0, NUM_CLASSES[config.task]))


def evaluate(
    model: nn.Module,
    data: TrialData,
    batches: Batches,
    idx: Sequence[int],
    *,
    config: TrialConfig,
    device: torch.device,
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Metrics of one split side: (metrics, y_true, y_prob)."""
    y_true = data.labels(config.task)[np.asarray(idx, dtype=np.int64)]
    y_prob = predict(model, batches, len(idx), config=config, device=device)
    metrics = classification_metrics(y_true, y_prob, slides=data.slides(idx))
    return metrics, y_true, y_prob
