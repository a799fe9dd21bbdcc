"""One trial, start to finish: plain PyTorch functions that return numbers.

``train_trial(config, data, reporter)`` is all a search needs: it knows nothing of Ray,
Optuna or MLflow (``search/`` adapts it). The data path reads the decoded-image cache
(uint8, decoded once) and augments whole batches on the trial's device, so no DataLoader
workers are started per trial and no PNG is decoded per epoch.

``FoldRun`` is one model on one split, stepped an epoch at a time; ``train_trial`` loops
over one, ``train_cv.train_cv_trial`` over K in lockstep (``--cv``). The data-serving
pieces (``TrialData``, ``prepare_data``, ``_Batches``) live in ``trial_data.py``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from dala_search import faults
from dala_search.config import TrialConfig
from dala_search.data.augment import AugmentSpec, augment_normalized, to_normalized
from dala_search.data.sampling import epoch_indices
from dala_search.data.splits import Split
from dala_search.errors import ConfigError
from dala_search.losses import create_loss
from dala_search.metrics import classification_metrics, confusion
from dala_search.model.dalaresnet import NUM_CLASSES, build_dalaresnet

# Re-exported: the data-serving pieces moved to trial_data.py, their importers still use these.
from dala_search.trial_data import (  # noqa: F401
    Batches,
    TrialData,
    _Batches,
    _BatchView,
    device_positions,
    prepare_data,
)

# (metrics, y_true, y_prob) of one split side
Tested = tuple[dict[str, float], np.ndarray, np.ndarray]

# Called once per epoch with the epoch number (1-based) and that epoch's metrics.
Reporter = Callable[[int, dict[str, float]], None]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: the trial stops instead of burning epochs."""


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
    whole batches. ``labels``, the training split's (what ``train_trial`` passes), draws the
    pass's images with ``config.sampling``, the class mix of the training batches; without
    them, a plain shuffle of the split. Returns the number of images passed on this rank
    (0: off, or nothing to recalibrate).
    """
    if labels is not None and len(labels) != n:
        raise ValueError(f"recalibrate_batchnorm: {len(labels)} labels for n={n} images")
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
    batches: Batches,
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


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def check_image_size(config: TrialConfig, data: TrialData) -> None:
    """ConfigError when the config's image size is not the cache's."""
    if config.image_size != data.cache.image_size:
        raise ConfigError(
            f"key 'image_size': the config asks for {config.image_size} px but the data "
            f"cache holds {data.cache.image_size} px images"
        )


def _rank_and_world(distributed: bool) -> tuple[int, int]:
    """This process's rank and the group size (0, 1 unless data parallel)."""
    if not distributed:
        return 0, 1
    if not torch.distributed.is_initialized():
        raise RuntimeError("train_trial(distributed=True) needs an initialised process group")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _from_rank0(obj: Any, world: int) -> Any:
    """Rank 0's ``obj`` on every rank (a small picklable value: metrics, test scores).

    Every rank then reports, selects the best epoch and stops early on the same numbers.
    """
    if world == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


class FoldRun:
    """One model on one split, trained an epoch at a time.

    ``train_trial`` loops over one; ``train_cv.train_cv_trial`` steps K of them in lockstep
    (one per inner fold). The constructor does the whole setup in the order that fixes the
    random draws (seed, model, loss, optimiser, augmentation generator), so a run is
    repeatable on the CPU. ``sides`` hands in (train, val) batch servers made elsewhere
    (views of one shared copy of the images); by default each side gets its own.
    Data parallel (``distributed``): see ``train_trial``.
    """

    def __init__(
        self,
        config: TrialConfig,
        data: TrialData,
        split: Split | None = None,
        *,
        build_model: Callable[[TrialConfig], nn.Module] = build_dalaresnet,
        distributed: bool = False,
        sides: tuple[Batches, Batches | None] | None = None,
    ) -> None:
        check_image_size(config, data)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        _seed_everything(config.seed)
        self.config, self.data = config, data
        self.split = data.split if split is None else split
        self.device = device = resolve_device(config.device)
        model = build_model(config).to(device)
        if device.type == "cuda" and config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.rank, self.world = _rank_and_world(distributed)
        if distributed and device.type == "cuda":  # batch statistics of the global batch
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        # evaluation (rank 0 only) runs the unwrapped model
        self.run_model: nn.Module = torch.compile(model) if config.compile else model
        self.train_model = self.run_model
        if distributed:
            ids = [torch.cuda.current_device()] if device.type == "cuda" else None
            ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
            self.train_model = torch.compile(ddp) if config.compile else ddp

        self.train_idx = np.asarray(self.split.train, dtype=np.int64)
        self.train_labels_np = data.labels(config.task)[self.train_idx]
        self.n_classes = NUM_CLASSES[config.task]
        class_counts = np.bincount(self.train_labels_np, minlength=self.n_classes).tolist()
        loss_fn = create_loss(
            config.loss_weighting,
            class_counts,
            beta=config.effective_beta,
            gamma=config.focal_gamma,
            label_smoothing=config.label_smoothing,
        ).to(device)
        self.loss_fn = faults.wrap_loss(loss_fn)  # no-op unless a reliability test injects a NaN
        self.optimizer = _make_optimizer(config, model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda e: _lr_factor(config, e)
        )
        # Each rank its own augmentation draws (rank 0 keeps the single-process stream).
        self.generator = torch.Generator(device=device).manual_seed(config.seed + 7919 * self.rank)
        if sides is None:
            train_b = _Batches(data, self.split.train, device)
            val_b = _Batches(data, self.split.val, device) if self.rank == 0 else None
            sides = (train_b, val_b)
        self.train_b, self.val_b = sides
        self.train_labels = torch.from_numpy(self.train_labels_np).to(device)
        self.best_state: dict[str, torch.Tensor] | None = None

    def epoch(self, epoch: int) -> dict[str, float]:
        """Train epoch ``epoch`` (1-based), recompute BatchNorm statistics, validate.

        Returns ``val_*`` metrics (rank 0's on every rank), ``train_loss``, ``lr`` and timing.
        """
        config, device = self.config, self.device
        start = time.perf_counter()
        order = epoch_indices(
            self.train_labels_np, config.sampling, seed=config.seed * 1000 + epoch
        )
        stats = train_one_epoch(
            self.train_model,
            self.train_b,
            self.train_labels,
            order,
            config=config,
            loss_fn=self.loss_fn,
            optimizer=self.optimizer,
            generator=self.generator,
            device=device,
            rank=self.rank,
            world_size=self.world,
        )
        self.scheduler.step()
        bn_start = time.perf_counter()
        passed = recalibrate_batchnorm(
            self.model,
            self.train_b,
            len(self.train_idx),
            config=config,
            device=device,
            rank=self.rank,
            world_size=self.world,
            labels=self.train_labels_np,
        )
        if passed and device.type == "cuda":  # one wait per epoch: the time is the pass's
            torch.cuda.synchronize(device)
        bn_s = time.perf_counter() - bn_start
        val = None
        if self.val_b is not None:
            val, _, _ = evaluate(
                self.run_model, self.data, self.val_b, self.split.val, config=config, device=device
            )
        val = _from_rank0(val, self.world)
        metrics = {f"val_{k}": v for k, v in val.items()}
        metrics.update(stats)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["epoch_time_s"] = time.perf_counter() - start
        metrics["precise_bn_s"] = bn_s
        metrics["epoch"] = float(epoch)
        return metrics

    def snapshot(self) -> None:
        """Keep the current weights (on the host) as the best so far; rank 0 only tests."""
        if self.rank == 0:
            state = self.model.state_dict()
            self.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in state.items()})

    def restore_best(self) -> None:
        """Load the weights of the last `snapshot` (none taken: keep the current ones)."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)

    def test(
        self, batches: Batches | None = None
    ) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
        """(metrics, y_true, y_prob) of the current weights on the split's test side.

        Rank 0 computes them, every rank returns them. ``batches`` serves the test side when
        several runs share one copy of it.
        """
        tested = None
        if self.rank == 0:
            if batches is None:
                batches = _Batches(self.data, self.split.test, self.device)
            tested = evaluate(
                self.model,
                self.data,
                batches,
                self.split.test,
                config=self.config,
                device=self.device,
            )
        return _from_rank0(tested, self.world)

    def kept_model(self) -> nn.Module | None:
        """The model on the host for the caller to keep (rank 0 only)."""
        return self.model.cpu() if self.rank == 0 else None


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


def trial_result(
    best: BestEpoch,
    history: list[dict[str, float]],
    tested: Tested,
    n_classes: int,
    model: nn.Module | None,
) -> TrialResult:
    """The TrialResult of a finished run (``best.epoch`` 0: no finite value, the last epoch)."""
    test, y_true, y_prob = tested
    y_pred = y_prob.argmax(axis=1) if len(y_prob) else np.zeros(0, dtype=np.int64)
    return TrialResult(
        best_epoch=best.epoch,
        epochs_run=len(history),
        best=best.metrics if best.epoch else history[-1],
        final=history[-1],
        test=test,
        history=history,
        test_confusion=confusion(y_true, y_pred, n_classes).tolist(),
        test_scores={"y_true": y_true.tolist(), "y_prob": y_prob.tolist()},
        model=model,
    )


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
    run = FoldRun(config, data, build_model=build_model, distributed=distributed)
    bar = progress_bar(config, f"train {data.magnification}", progress)
    best, history = run_epochs(config, run.epoch, run.snapshot, run.restore_best, reporter, bar)
    tested = run.test()
    return trial_result(
        best, history, tested, run.n_classes, run.kept_model() if keep_model else None
    )
