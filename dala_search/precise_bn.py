"""Precise BatchNorm: recompute the training BatchNorms' statistics before a validation.

In eval mode a BatchNorm normalises with running averages (momentum 0.1) of batch
statistics that the weights kept changing under; after the few optimiser steps of an
epoch on a small split they lag the current weights, and a trial's validation can predict
one class where its batch statistics would not (Wu & Johnson, "Rethinking 'Batch' in
BatchNorm", 2021). ``recalibrate_batchnorm`` recomputes the statistics of every BatchNorm
that trains as the plain average over a pass of up to ``config.precise_bn`` training
images (the same seeded shuffle each epoch, un-augmented like validation, in batches of
the training batch size): what torch's ``swa_utils.update_bn`` does, except that
BatchNorms of frozen stages, which ``DALAResNet50.train`` keeps in eval mode, keep their
statistics (``update_bn`` would reset them and then never update them).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dala_search.config import TrialConfig
from dala_search.data.sampling import epoch_indices
from dala_search.train_steps import cuda_modes, plain_batch
from dala_search.trial_data import Batches

_BatchNorm = nn.modules.batchnorm._BatchNorm


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    batches: Batches,
    n: int,
    *,
    config: TrialConfig,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    labels: np.ndarray | None = None,
) -> int:
    """Recompute the statistics of ``model``'s training BatchNorms (see the module docstring).

    Data parallel: with ``SyncBatchNorm`` (CUDA) every rank passes its share of each batch,
    otherwise whole batches. ``labels``, the training split's (what ``train_trial``
    passes), draws the pass's images with ``config.sampling``, the class mix of the
    training batches; without them, a plain shuffle of the split. Returns the number of
    images passed on this rank (0: off, or nothing to recalibrate).
    """
    if labels is not None and len(labels) != n:
        raise ValueError(f"recalibrate_batchnorm: {len(labels)} labels for n={n} images")
    if config.precise_bn == 0 or n == 0:
        return 0
    was_training = model.training
    model.train()
    try:
        norms = [
            m
            for m in model.modules()
            if isinstance(m, _BatchNorm) and m.training and m.track_running_stats
        ]
        chunks = _pass_batches(n, config, world_size, labels) if norms else []
        if not chunks:  # keep the running averages rather than reset them to nothing
            return 0
        return _recompute(model, norms, chunks, batches, config, device, rank, world_size)
    finally:
        model.train(was_training)


def _pass_batches(
    n: int, config: TrialConfig, world_size: int, labels: np.ndarray | None
) -> list[np.ndarray]:
    """The positions of the pass, in batches of the training batch size."""
    # a seeded shuffle, the same every epoch: batches in file order would each hold one
    # patient and class, and the average of their variances would miss the differences
    # between patients and classes that the shuffled training batches carried
    # With ``labels`` (the training split's), the pass draws its images with the trial's
    # ``sampling`` strategy, so its class mix is the one the training batches had: the
    # weights learned under balanced batch statistics (oversample: ~50/50), and statistics
    # of the natural ~30/70 mix shift every feature towards the majority class's mean,
    # which can tip a model that ranks well (val ROC AUC 0.9) into predicting one class.
    if labels is not None:
        drawn = epoch_indices(labels, config.sampling, seed=config.seed)
    else:
        drawn = np.random.default_rng(config.seed).permutation(n)
    positions = drawn[: config.precise_bn]
    bs = config.batch_size
    # as in training: no batch statistics of a single image (per rank)
    chunks = np.split(positions, range(bs, len(positions), bs))
    return [c for c in chunks if len(c) >= 2 * world_size]


def _recompute(
    model: nn.Module,
    norms: list[_BatchNorm],
    chunks: list[np.ndarray],
    batches: Batches,
    config: TrialConfig,
    device: torch.device,
    rank: int,
    world_size: int,
) -> int:
    """Reset ``norms`` and average their batch statistics over ``chunks``; on an error
    the statistics are put back as they were, not left half recomputed."""
    # SyncBatchNorm (data parallel on CUDA) averages each batch over the ranks' shares;
    # plain BatchNorms (gloo on the CPU) keep per-rank statistics, so each rank passes whole
    # batches and rank 0, which validates, gets the statistics one process would
    shared = any(isinstance(m, nn.SyncBatchNorm) for m in norms)
    momenta = [m.momentum for m in norms]
    kept = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]
    use_amp, memory_format = cuda_modes(config, device)
    passed = 0
    try:
        for m in norms:
            m.reset_running_stats()
        for k, chunk in enumerate(chunks, start=1):
            # momentum 1/k makes the running statistics the plain average of the k batches'
            # (what momentum None does, without its per-layer host read of the batch count)
            for m in norms:
                m.momentum = 1.0 / k
            pos = chunk[rank::world_size] if shared else chunk
            x = plain_batch(batches, pos, device, memory_format)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                model(x)
            passed += len(pos)
    except BaseException:
        for m, (mean, var) in zip(norms, kept, strict=True):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
        raise
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
    return passed
