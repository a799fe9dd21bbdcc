"""One trial, start to finish: plain PyTorch functions that return numbers.

``train_trial(config, data, reporter)`` is all a search needs: it knows nothing of Ray,
Optuna or MLflow (``search/`` adapts it). The data path reads the decoded-image cache
(uint8, decoded once) and augments whole batches on the trial's device, so no DataLoader
workers are started per trial and no PNG is decoded per epoch.

``FoldRun`` is one model on one split, stepped an epoch at a time; ``train_trial`` loops
over one, ``train_cv.train_cv_trial`` over K in lockstep (``--cv``). The pieces live
beside it: the steps of an epoch in ``train_steps.py``, precise BatchNorm in
``precise_bn.py``, the epoch loop in ``epoch_loop.py``, the data-parallel helpers in
``parallel.py`` and the data-serving pieces (``TrialData``, ``prepare_data``,
``_Batches``) in ``trial_data.py``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from dala_search import faults
from dala_search.config import TrialConfig
from dala_search.data.sampling import epoch_indices
from dala_search.data.splits import Split
from dala_search.epoch_loop import BestEpoch, Reporter, progress_bar, run_epochs
from dala_search.errors import ConfigError
from dala_search.losses import create_loss
from dala_search.metrics import confusion
from dala_search.micro_batch import MicroBatch
from dala_search.model.dalaresnet import NUM_CLASSES, build_dalaresnet
from dala_search.parallel import from_rank0, rank_and_world
from dala_search.precise_bn import recalibrate_batchnorm
from dala_search.train_steps import evaluate, train_one_epoch

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


def _make_loss(
    config: TrialConfig, train_labels: np.ndarray, n_classes: int, device: torch.device
) -> nn.Module:
    """The config's loss, weighted by the training side's class counts; wrapped by
    ``faults`` (a no-op unless a reliability test injects a NaN). Head trials share it."""
    counts = np.bincount(train_labels, minlength=n_classes).tolist()
    loss_fn = create_loss(
        config.loss_weighting,
        counts,
        beta=config.effective_beta,
        gamma=config.focal_gamma,
        label_smoothing=config.label_smoothing,
    ).to(device)
    return faults.wrap_loss(loss_fn)


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
        if build_model is build_dalaresnet and config.backbone != "dalaresnet50":
            raise ConfigError(  # never DALAResNet50 silently in place of the named backbone
                f"key 'backbone': {config.backbone!r} trains a head on cached embeddings "
                "(train_head.train_head_trial), not with train_trial / --cv"
            )
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        _seed_everything(config.seed)
        self.config, self.data = config, data
        self.split = data.split if split is None else split
        self.device = device = resolve_device(config.device)
        model = build_model(config).to(device)
        if device.type == "cuda" and config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.rank, self.world = rank_and_world(distributed)
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
        self.loss_fn = _make_loss(config, self.train_labels_np, self.n_classes, device)
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
        # Halved on out-of-memory and kept for the rest of the run (micro_batch.py).
        self.micro = MicroBatch(config.batch_size, config.min_micro_batch)

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
            micro=self.micro,
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
        val = from_rank0(val, self.world)
        metrics = {f"val_{k}": v for k, v in val.items()}
        metrics.update(stats)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["epoch_time_s"] = time.perf_counter() - start
        metrics["precise_bn_s"] = bn_s
        metrics["micro_batch"] = float(self.micro.size)  # < batch_size after an out-of-memory
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
        return from_rank0(tested, self.world)

    def kept_model(self) -> nn.Module | None:
        """The model on the host for the caller to keep (rank 0 only)."""
        return self.model.cpu() if self.rank == 0 else None


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
