"""A foundation-model trial: a head trained on a frozen backbone's cached embeddings.

``train_head_trial`` is ``train.train_trial`` for ``backbone: timm:<name>``: the same
TrialConfig keys mean the same things (loss weighting, sampling, optimiser, lr schedule
and warmup, weight decay, epochs, label smoothing, best-epoch selection, early stopping),
the reporter hears the same ``val_*`` metrics every epoch (so pruning, MLflow and the
registry treat it like any trial), and it returns the same ``TrialResult``. What differs:
the backbone is frozen and runs once per image (``data/embeddings.py``), so an epoch is a
few matrix products over features already on the device, no image decoding and no
augmentation per epoch (``embed_views`` > 0: each training image takes one of its fixed
augmented views, drawn per epoch). The kept model is backbone + head over images
(``model/foundation.FoundationClassifier``), which ``predict`` can run.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch

from dala_search.config import TrialConfig
from dala_search.data.embeddings import embedding_views
from dala_search.data.sampling import epoch_indices
from dala_search.data.splits import Split
from dala_search.epoch_loop import Reporter, progress_bar, run_epochs
from dala_search.errors import ConfigError
from dala_search.metrics import classification_metrics
from dala_search.model.dalaresnet import NUM_CLASSES
from dala_search.model.foundation import FoundationClassifier, build_head, load_backbone
from dala_search.train import (
    TrialResult,
    _lr_factor,
    _make_loss,
    _make_optimizer,
    _seed_everything,
    check_image_size,
    resolve_device,
    trial_result,
)
from dala_search.train_steps import NonFiniteLossError
from dala_search.trial_data import TrialData


class HeadRun:
    """One head on one split: the features of each side on the device, trained per epoch."""

    def __init__(
        self, config: TrialConfig, data: TrialData, split: Split | None = None, *, progress: bool
    ) -> None:
        check_image_size(config, data)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        _seed_everything(config.seed)
        self.config, self.data = config, data
        self.split = data.split if split is None else split
        self.device = device = resolve_device(config.device)
        backbone = load_backbone(config)
        views = embedding_views(data.cache, backbone, config, device, progress=progress)
        self.n_classes = NUM_CLASSES[config.task]
        head = build_head(config, backbone.num_features, self.n_classes)
        self.model = FoundationClassifier(backbone.cpu(), head, data.cache.image_size)
        self.head = head.to(device)
        labels = data.labels(config.task)
        self.train_idx = np.asarray(self.split.train, dtype=np.int64)
        self.train_labels_np = labels[self.train_idx]
        # (views, n_train, D): every view of the training images; val/test: the plain view
        self.train_x = self._features(views, self.split.train)
        self.val_x = self._features(views[:1], self.split.val)[0]
        self.test_x = self._features(views[:1], self.split.test)[0]
        self.train_y = torch.from_numpy(self.train_labels_np).to(device)
        self.loss_fn = _make_loss(config, self.train_labels_np, self.n_classes, device)
        self.optimizer = _make_optimizer(config, self.model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda e: _lr_factor(config, e)
        )
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        self.best_state: dict[str, torch.Tensor] | None = None

    def _features(self, views: list[np.ndarray], idx: object) -> torch.Tensor:
        rows = self.data.rows[np.asarray(idx, dtype=np.int64)]
        order = np.argsort(rows)  # gather in file order, then put back
        stacked = np.empty((len(views), len(rows), views[0].shape[1]), dtype=np.float32)
        for v, arr in enumerate(views):
            stacked[v, order] = arr[rows[order]]
        return torch.from_numpy(stacked).to(self.device)

    def epoch(self, epoch: int) -> dict[str, float]:
        """Train one epoch on the embeddings, validate; the metrics ``train_trial`` reports."""
        config, device = self.config, self.device
        start = time.perf_counter()
        order = epoch_indices(
            self.train_labels_np, config.sampling, seed=config.seed * 1000 + epoch
        )
        self.head.train()
        loss_sum, seen = torch.zeros((), device=device), 0
        n_views = self.train_x.shape[0]
        for lo in range(0, len(order), config.batch_size):
            pos = order[lo : lo + config.batch_size]
            if len(pos) < 2:  # as train_one_epoch: no single-sample batches
                continue
            idx = torch.from_numpy(pos).to(device)
            if n_views > 1:
                view = torch.randint(n_views, (len(pos),), generator=self.generator, device=device)
                x = self.train_x[view, idx]
            else:
                x = self.train_x[0, idx]
            loss = self.loss_fn(self.head(x), self.train_y[idx])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            loss_sum += loss.detach() * len(pos)
            seen += len(pos)
        mean_loss = float(loss_sum.item()) / max(seen, 1)
        if not math.isfinite(mean_loss):
            raise NonFiniteLossError(f"training loss became {mean_loss} (lr {config.lr:g})")
        train_s = time.perf_counter() - start
        self.scheduler.step()
        val, _, _ = self._score(self.val_x, self.split.val)
        metrics = {f"val_{k}": v for k, v in val.items()}
        metrics.update(
            train_loss=mean_loss,
            train_images_per_s=seen / max(train_s, 1e-9),
            lr=self.optimizer.param_groups[0]["lr"],
            epoch_time_s=time.perf_counter() - start,
            precise_bn_s=0.0,  # no BatchNorm in a head
            epoch=float(epoch),
        )
        return metrics

    @torch.no_grad()
    def _score(
        self, x: torch.Tensor, idx: object
    ) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
        self.head.eval()
        positions = np.asarray(idx, dtype=np.int64)
        y_true = self.data.labels(self.config.task)[positions]
        if len(positions):
            y_prob = torch.softmax(self.head(x).float(), dim=1).cpu().numpy()
        else:
            y_prob = np.zeros((0, self.n_classes))
        metrics = classification_metrics(y_true, y_prob, slides=self.data.slides(positions))
        return metrics, y_true, y_prob

    def snapshot(self) -> None:
        state = self.head.state_dict()
        self.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in state.items()})

    def restore_best(self) -> None:
        if self.best_state is not None:
            self.head.load_state_dict(self.best_state)

    def test(self) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
        return self._score(self.test_x, self.split.test)

    def kept_model(self) -> FoundationClassifier:
        """Backbone + head on the host, in eval mode (what is logged and registered)."""
        self.head.cpu()
        return self.model.eval()


def train_head_trial(
    config: TrialConfig,
    data: TrialData,
    reporter: Reporter | None = None,
    *,
    keep_model: bool = False,
    progress: bool = False,
    distributed: bool = False,
) -> TrialResult:
    """Train a head on ``config.backbone``'s cached embeddings; as ``train.train_trial``."""
    if distributed:
        raise ConfigError(
            f"key 'backbone': {config.backbone!r} trains a head on cached embeddings, which "
            "is not data parallel: search it with --workers-per-trial 1"
        )
    run = HeadRun(config, data, progress=progress)
    bar = progress_bar(config, f"head {data.magnification}", progress)
    best, history = run_epochs(config, run.epoch, run.snapshot, run.restore_best, reporter, bar)
    tested = run.test()
    return trial_result(
        best, history, tested, run.n_classes, run.kept_model() if keep_model else None
    )
