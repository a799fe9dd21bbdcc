"""One trial, start to finish: plain PyTorch functions that return numbers.

``train_trial(config, data, reporter)`` is all a search needs: it knows nothing of Ray,
Optuna or MLflow (``search/`` adapts it). The data path reads the decoded-image cache
(uint8, decoded once) and augments whole batches on the trial's device, so no DataLoader
workers are started per trial and no PNG is decoded per epoch.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dala_search import faults
from dala_search.config import TrialConfig
from dala_search.data.augment import AugmentSpec, augment_normalized, to_normalized
from dala_search.data.breakhis import (
    BreakHisIndex,
    ImageRecord,
    check_magnification,
    index_breakhis,
)
from dala_search.data.cache import ImageCache, build_cache
from dala_search.data.sampling import epoch_indices
from dala_search.data.splits import Split, official_fold_split, patient_split
from dala_search.errors import ConfigError, DataError
from dala_search.losses import create_loss
from dala_search.metrics import classification_metrics, confusion
from dala_search.model.dalaresnet import NUM_CLASSES, build_dalaresnet

# Called once per epoch with the epoch number (1-based) and that epoch's metrics.
Reporter = Callable[[int, dict[str, float]], None]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: the trial stops instead of burning epochs."""


@dataclass
class TrialData:
    """One magnification's images (rows of the shared cache), labels and split.

    Pickles small: the cache re-opens its memory map by path, so Ray can ship this to a
    trial process without copying the images.
    """

    cache: ImageCache
    records: list[ImageRecord]  # the records with a cache row, in split-index order
    rows: np.ndarray  # cache row of each record
    split: Split
    magnification: str  # "40X" .. or "all"
    synthetic: bool
    root: str

    def labels(self, task: str) -> np.ndarray:
        """Integer targets for ``task`` ("binary": malignant=1, "subtype": 8 classes)."""
        if task == "binary":
            return np.array([r.label_index for r in self.records], dtype=np.int64)
        return np.array([r.subtype_index for r in self.records], dtype=np.int64)

    def slides(self, idx: Sequence[int]) -> list[str]:
        return [self.records[i].slide for i in idx]

    def describe(self) -> dict[str, Any]:
        """What a tracker records about the data: where from, how split, synthetic or real."""
        return {
            "data_root": self.root,
            "magnification": self.magnification,
            "synthetic": self.synthetic,
            "split": self.split.description,
            "n_train": len(self.split.train),
            "n_val": len(self.split.val),
            "n_test": len(self.split.test),
            "image_size": self.cache.image_size,
        }


def prepare_data(
    data_dir: str | Path | BreakHisIndex,
    magnification: str,
    *,
    image_size: int,
    seed: int = 0,
    fold: int | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> TrialData:
    """Index, cache (decode once) and split one magnification ("all" pools the four).

    ``data_dir`` may be an index already built, so a search indexes its folder once.
    """
    if isinstance(data_dir, BreakHisIndex):
        index = data_dir
    else:
        index = index_breakhis(data_dir, progress=progress)
    mag = "all" if str(magnification).lower() == "all" else check_magnification(magnification)
    records = index.select(None if mag == "all" else mag)
    if not records:
        raise DataError(f"{index.root}: no images at magnification {mag}")
    cache = build_cache(records, image_size, cache_dir, progress=progress)
    rows = cache.rows_for(records)
    kept = [r for r, row in zip(records, rows, strict=True) if row >= 0]
    if not kept:
        raise DataError(
            f"{index.root}: none of the {len(records)} images at {mag} could be decoded"
        )
    if fold is not None:
        split = official_fold_split(index, kept, fold, seed=seed, val_fraction=val_fraction)
    else:
        split = patient_split(
            kept, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction
        )
    return TrialData(
        cache=cache,
        records=kept,
        rows=rows[rows >= 0].astype(np.int64),
        split=split,
        magnification=mag,
        synthetic=index.synthetic,
        root=str(index.root),
    )


@dataclass
class TrialResult:
    """What ``train_trial`` returns: numbers, plus the best model when asked for."""

    best_epoch: int
    epochs_run: int
    best: dict[str, float]  # validation metrics of the best epoch
    final: dict[str, float]  # metrics of the last epoch
    test: dict[str, float]  # test metrics of the best epoch's weights
    history: list[dict[str, float]] = field(default_factory=list)
    test_confusion: list[list[int]] = field(default_factory=list)
    test_scores: dict[str, list] = field(default_factory=dict)  # y_true / y_prob for ROC curves
    model: nn.Module | None = None

    def summary(self) -> dict[str, float]:
        """Flat metrics for trackers: best_val_*, final_val_*, test_*."""
        out: dict[str, float] = {"best_epoch": float(self.best_epoch)}
        out.update({f"best_{k}": v for k, v in self.best.items()})
        out.update({f"final_{k}": v for k, v in self.final.items()})
        out.update({f"test_{k}": v for k, v in self.test.items()})
        return out


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; an unavailable CUDA request is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"key 'device': {name!r} requested but CUDA is not available here")
    return torch.device(name)


class _Batches:
    """Serves uint8 batches of one split side from the cache, on the trial's device.

    On CUDA the whole side is copied to device memory once (a magnification at 224 px is a
    few hundred MB); on the CPU rows are gathered from the memory map per batch, so
    concurrent trials share the page cache instead of holding a copy each.
    """

    def __init__(self, data: TrialData, idx: Sequence[int], device: torch.device) -> None:
        self.rows = data.rows[np.asarray(idx, dtype=np.int64)]
        self.device = device
        self.resident: torch.Tensor | None = None
        if device.type == "cuda":
            host = np.ascontiguousarray(data.cache.images[self.rows])
            self.resident = torch.from_numpy(host).to(device)
        self.images = data.cache.images

    def get(self, positions: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 NHWC batch at ``positions`` (numpy, or a tensor from `device_positions`)."""
        if self.resident is not None:
            if isinstance(positions, np.ndarray):
                positions = device_positions(positions, self.device)
            return self.resident[positions]
        if isinstance(positions, torch.Tensor):
            positions = positions.cpu().numpy()
        rows = self.rows[positions]
        batch = np.empty((len(rows), *self.images.shape[1:]), dtype=np.uint8)
        # row by row, in file order (kinder to the page cache): one copy, where fancy
        # indexing gathers into a temporary first (64 x 224 px: 1.9 ms vs 4.9 ms here)
        for j in np.argsort(rows):
            batch[j] = self.images[rows[j]]
        return torch.from_numpy(batch)


def device_positions(positions: np.ndarray, device: torch.device) -> torch.Tensor:
    """Batch positions as an int64 tensor on ``device``, without stalling a GPU.

    A copy from pageable host memory synchronises the CUDA stream (the host waits for all
    queued kernels) on every batch; from pinned memory with ``non_blocking`` it is queued like
    a kernel. PyTorch's caching host allocator makes ``pin_memory`` cheap after warm-up.
    """
    t = torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _cuda_modes(
    config: TrialConfig, device: torch.device
) -> tuple[bool, torch.memory_format | None]:
    """bf16 autocast and a channels_last model apply on CUDA only.

    On the CPU bf16 autocast slows training down; the CPU augmentation hands the model
    channels_last inputs anyway (no slower than NCHW here, faster at 128 px).
    """
    on_cuda = device.type == "cuda"
    fmt = torch.channels_last if (on_cuda and config.channels_last) else None
    return on_cuda and config.amp, fmt


def _make_optimizer(config: TrialConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Weight decay on weights only (``parameter_groups``); frozen parameters left out."""
    groups = model.parameter_groups(config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr)


def _lr_factor(config: TrialConfig, epoch: int) -> float:
    """Multiplier of the base lr for 0-based ``epoch``: linear warmup, then cosine or flat."""
    if epoch < config.warmup_epochs:
        return (epoch + 1) / (config.warmup_epochs + 1)
    if config.lr_schedule == "constant":
        return 1.0
    span = max(1, config.epochs - config.warmup_epochs)
    return 0.5 * (1 + math.cos(math.pi * (epoch - config.warmup_epochs) / span))


def train_one_epoch(
    model: nn.Module,
    batches: _Batches,
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
) -> dict[str, float]:
    """One pass over ``order`` (positions into the train side); returns loss and speed.

    Data parallel (``world_size`` > 1; ``train_trial(distributed=True)`` calls it on every
    rank with a DDP-wrapped model): every rank walks the same ``order`` in global batches
    of ``batch_size`` and trains on its strided share of each, so the global batch (and the
    lr that suits it) does not depend on the number of workers.
    """
    model.train()
    spec = AugmentSpec(
        flip=config.flip,
        rotate90=config.rotate90,
        crop_scale=config.crop_scale,
        color_jitter=config.color_jitter,
        stain_jitter=config.stain_jitter,
    )
    use_amp, memory_format = _cuda_modes(config, device)
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
        pos = pos[rank::world_size]
        idx = device_positions(pos, device)  # images and labels both index with it
        x = augment_normalized(batches.get(idx).to(device, non_blocking=True), spec, generator)
        if memory_format is not None:
            x = x.contiguous(memory_format=memory_format)
        y = labels[idx]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        if world_size > 1:
            # DDP averages gradients over ranks; weighting each rank's mean loss by its share
            # makes that the gradient of the global batch's mean loss when shares differ.
            (loss * (len(pos) * world_size / n_global)).backward()
        else:
            loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(pos)
        seen += len(pos)
    if world_size > 1:  # the epoch's loss and image count over all ranks
        totals = torch.stack([loss_sum, torch.tensor(float(seen), device=device)])
        torch.distributed.all_reduce(totals)
        loss_sum, seen = totals[0], int(totals[1].item())
    mean_loss = float(loss_sum.item()) / max(seen, 1)
    if not math.isfinite(mean_loss):
        raise NonFiniteLossError(f"training loss became {mean_loss} (lr {config.lr:g})")
    elapsed = time.perf_counter() - start
    return {"train_loss": mean_loss, "train_images_per_s": seen / max(elapsed, 1e-9)}


def _plain_batch(
    batches: _Batches,
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
def recalibrate_batchnorm(
    model: nn.Module,
    batches: _Batches,
    n: int,
    *,
    config: TrialConfig,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> int:
    """Precise BatchNorm: recompute the training BatchNorms' statistics before a validation.

    In eval mode a BatchNorm normalises with running averages (momentum 0.1) of batch
    statistics that the weights kept changing under; after the few optimiser steps of an
    epoch on a small split they lag the current weights, and a trial's validation can
    predict one class where its batch statistics would not (Wu & Johnson, "Rethinking
    'Batch' in BatchNorm", 2021). Here every BatchNorm that trains gets its statistics
    recomputed as the plain average over a pass of up to ``config.precise_bn`` training
    images (the same seeded shuffle each epoch, un-augmented like validation, in batches of
    the training batch size): what torch's ``swa_utils.update_bn`` does, except that
    BatchNorms of frozen stages, which ``DALAResNet50.train`` keeps in eval mode, keep their
    statistics (``update_bn`` would reset them and then never update them). Data parallel:
    with ``SyncBatchNorm`` (CUDA) every rank passes its share of each batch, otherwise
    whole batches. Returns the number of images passed on this rank (0: off, or nothing to
    recalibrate).
    """
    if config.precise_bn == 0 or n == 0:
        return 0
    was_training = model.training
    model.train()
    norms = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    if not norms:
        model.train(was_training)
        return 0
    # a seeded shuffle, the same every epoch: batches in file order would each hold one
    # patient and class, and the average of their variances would miss the differences
    # between patients and classes that the shuffled training batches carried
    positions = np.random.default_rng(config.seed).permutation(n)[: config.precise_bn]
    bs = config.batch_size
    # as in training: no batch statistics of a single image (per rank)
    chunks = np.split(positions, range(bs, len(positions), bs))
    chunks = [c for c in chunks if len(c) >= 2 * world_size]
    if not chunks:  # keep the running averages rather than reset them to nothing
        model.train(was_training)
        return 0
    # SyncBatchNorm (data parallel on CUDA) averages each batch over the ranks' shares;
    # plain BatchNorms (gloo on the CPU) keep per-rank statistics, so each rank passes whole
    # batches and rank 0, which validates, gets the statistics one process would
    shared = any(isinstance(m, nn.SyncBatchNorm) for m in norms)
    momenta = [m.momentum for m in norms]
    kept = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]
    use_amp, memory_format = _cuda_modes(config, device)
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
            x = _plain_batch(batches, pos, device, memory_format)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                model(x)
            passed += len(pos)
    except BaseException:  # leave the statistics as they were, not half recomputed
        for m, (mean, var) in zip(norms, kept, strict=True):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
        raise
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return passed


@torch.no_grad()
def predict(
    model: nn.Module,
    batches: _Batches,
    n: int,
    *,
    config: TrialConfig,
    device: torch.device,
) -> np.ndarray:
    """Softmax probabilities for positions 0..n-1 of a split side (no augmentation)."""
    model.eval()
    use_amp, memory_format = _cuda_modes(config, device)
    out = []
    bs = max(config.batch_size, 64)
    for lo in range(0, n, bs):
        pos = np.arange(lo, min(lo + bs, n))
        x = _plain_batch(batches, pos, device, memory_format)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(x)
        out.append(torch.softmax(logits.float(), dim=1))
    return torch.cat(out).cpu().numpy() if out else np.zeros((0, NUM_CLASSES[config.task]))


def evaluate(
    model: nn.Module,
    data: TrialData,
    batches: _Batches,
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


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def _rank_and_world(distributed: bool) -> tuple[int, int]:
    """This process's rank and the group size (0, 1 unless data parallel)."""
    if not distributed:
        return 0, 1
    if not torch.distributed.is_initialized():
        raise RuntimeError("train_trial(distributed=True) needs an initialised process group")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a small picklable value: metrics, test scores)."""
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def train_trial(
    config: TrialConfig,
    data: TrialData,
    reporter: Reporter | None = None,
    *,
    keep_model: bool = False,
    progress: bool = False,
    build_model: Callable[[TrialConfig], nn.Module] = build_dalaresnet,
    distributed: bool = False,
) -> TrialResult:
    """Train one configuration; report validation metrics every epoch; test the best epoch.

    ``reporter(epoch, metrics)`` receives ``val_*`` metrics plus ``train_loss`` and timing.
    Seeded and repeatable on the CPU. Raises NonFiniteLossError on a NaN/inf loss.
    ``build_model`` swaps the architecture and nothing else (``comparison.py`` passes the
    paper's baselines from ``model/baselines.py``); the model must offer
    ``parameter_groups(weight_decay)``.

    ``distributed``: called on every rank of an initialised ``torch.distributed`` group
    (``search/distributed.py`` does so in Ray Train workers). The model is wrapped in
    ``DistributedDataParallel`` and each rank trains its share of every global batch; rank
    0 evaluates whole splits with its weights and shares the numbers, so every rank
    reports, stops early and returns the metrics one process would compute (the model
    only on rank 0). BatchNorm statistics are per rank on the CPU, synchronised on CUDA.
    """
    if config.image_size != data.cache.image_size:
        raise ConfigError(
            f"key 'image_size': the config asks for {config.image_size} px but the data "
            f"cache holds {data.cache.image_size} px images"
        )
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    _seed_everything(config.seed)
    device = resolve_device(config.device)
    model = build_model(config).to(device)
    if device.type == "cuda" and config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    rank, world = _rank_and_world(distributed)
    if distributed and device.type == "cuda":  # batch statistics of the global batch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    run_model: nn.Module = torch.compile(model) if config.compile else model
    train_model = run_model  # evaluation (rank 0 only) runs the unwrapped model
    if distributed:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None
        )
        train_model = torch.compile(ddp) if config.compile else ddp

    all_labels = data.labels(config.task)
    train_idx = np.asarray(data.split.train, dtype=np.int64)
    train_labels_np = all_labels[train_idx]
    n_classes = NUM_CLASSES[config.task]
    class_counts = np.bincount(train_labels_np, minlength=n_classes).tolist()
    loss_fn = create_loss(
        config.loss_weighting,
        class_counts,
        beta=config.effective_beta,
        gamma=config.focal_gamma,
        label_smoothing=config.label_smoothing,
    ).to(device)
    loss_fn = faults.wrap_loss(loss_fn)  # no-op unless a reliability test injects a NaN
    optimizer = _make_optimizer(config, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: _lr_factor(config, e))
    # Each rank its own augmentation draws (rank 0 keeps the single-process stream).
    generator = torch.Generator(device=device).manual_seed(config.seed + 7919 * rank)

    train_b = _Batches(data, data.split.train, device)
    val_b = _Batches(data, data.split.val, device) if rank == 0 else None
    train_labels = torch.from_numpy(train_labels_np).to(device)

    key = f"val_{config.select_metric}"
    best_value, best_epoch, best_state = -math.inf, 0, None
    best_metrics: dict[str, float] = {}
    history: list[dict[str, float]] = []
    since_best = 0
    epochs = range(1, config.epochs + 1)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.epochs, desc=f"train {data.magnification}", unit="epoch")
    for epoch in epochs:
        start = time.perf_counter()
        order = epoch_indices(train_labels_np, config.sampling, seed=config.seed * 1000 + epoch)
        stats = train_one_epoch(
            train_model,
            train_b,
            train_labels,
            order,
            config=config,
            loss_fn=loss_fn,
            optimizer=optimizer,
            generator=generator,
            device=device,
            rank=rank,
            world_size=world,
        )
        scheduler.step()
        bn_start = time.perf_counter()
        passed = recalibrate_batchnorm(
            model,
            train_b,
            len(train_idx),
            config=config,
            device=device,
            rank=rank,
            world_size=world,
        )
        if passed and device.type == "cuda":  # one wait per epoch: the time is the pass's
            torch.cuda.synchronize(device)
        bn_s = time.perf_counter() - bn_start
        val = None
        if val_b is not None:
            val, _, _ = evaluate(
                run_model, data, val_b, data.split.val, config=config, device=device
            )
        if world > 1:  # rank 0's numbers everywhere: one best epoch, one early stop
            val = _from_rank0(val)
        metrics = {f"val_{k}": v for k, v in val.items()}
        metrics.update(stats)
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        metrics["epoch_time_s"] = time.perf_counter() - start
        metrics["precise_bn_s"] = bn_s
        metrics["epoch"] = float(epoch)
        history.append(metrics)
        value = metrics.get(key, float("nan"))
        if math.isfinite(value) and value > best_value:
            best_value, best_epoch, best_metrics = value, epoch, metrics
            if rank == 0:  # the only rank that tests the weights
                state = model.state_dict()
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in state.items()})
            since_best = 0
        else:
            since_best += 1
        if bar is not None:
            bar.set_postfix(loss=f"{stats['train_loss']:.3f}", **{key: f"{value:.3f}"})
            bar.update(1)
        if reporter is not None:
            reporter(epoch, metrics)
        if config.early_stop_patience and since_best >= config.early_stop_patience:
            break
    if bar is not None:
        bar.close()

    if best_epoch == 0:  # no finite validation value at all: test the last weights, say so
        best_metrics = history[-1]
    elif best_state is not None:
        model.load_state_dict(best_state)
    tested = None
    if rank == 0:
        test_b = _Batches(data, data.split.test, device)
        tested = evaluate(model, data, test_b, data.split.test, config=config, device=device)
    test, y_true, y_prob = _from_rank0(tested) if world > 1 else tested
    y_pred = y_prob.argmax(axis=1) if len(y_prob) else np.zeros(0, dtype=np.int64)
    return TrialResult(
        best_epoch=best_epoch,
        epochs_run=len(history),
        best=best_metrics,
        final=history[-1],
        test=test,
        history=history,
        test_confusion=confusion(y_true, y_pred, n_classes).tolist(),
        test_scores={"y_true": y_true.tolist(), "y_prob": y_prob.tolist()},
        model=model.cpu() if keep_model and rank == 0 else None,
    )
