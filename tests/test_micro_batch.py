"""Out of memory is not the end of a trial (micro_batch.py): halve, accumulate, go on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from dala_search import faults
from dala_search.config import TrialConfig
from dala_search.micro_batch import MicroBatch, MicroBatchFloorError
from dala_search.train import _Batches, prepare_data, train_trial
from dala_search.train_steps import train_one_epoch

TINY = dict(pretrained="none", image_size=32, batch_size=16, fc1=32, fc2=16, num_threads=2)


@pytest.fixture(scope="module")
def data32(demo_root, cache_dir):
    return prepare_data(demo_root, "40X", image_size=32, seed=0, cache_dir=cache_dir)


def _room_for(monkeypatch: pytest.MonkeyPatch, images: int) -> None:
    """A 'GPU' with room for ``images`` images per forward pass (the oom_batch fault)."""
    monkeypatch.setenv(faults.ENV_VAR, json.dumps([{"kind": "oom_batch", "above": images}]))


def test_injected_fault_is_torch_out_of_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    _room_for(monkeypatch, 8)
    faults.before_forward(8)
    with pytest.raises(torch.OutOfMemoryError, match="16 images"):
        faults.before_forward(16)


def test_out_of_memory_halves_the_micro_batch_and_the_trial_goes_on(
    data32, monkeypatch: pytest.MonkeyPatch
) -> None:
    _room_for(monkeypatch, 8)  # the first attempt at 16 images fails, 8 succeed
    seen: list[dict] = []
    result = train_trial(TrialConfig(epochs=2, **TINY), data32, lambda e, m: seen.append(m))
    assert [m["micro_batch"] for m in seen] == [8.0, 8.0]  # kept after the first halving
    assert result.epochs_run == 2 and np.isfinite(result.history[-1]["train_loss"])
    # every training image was trained on, in the same number of optimiser steps
    assert seen[0]["train_images_per_s"] > 0


def test_below_the_floor_the_trial_fails_with_the_message(
    data32, monkeypatch: pytest.MonkeyPatch
) -> None:
    _room_for(monkeypatch, 3)  # 16 -> 8 -> 4 still too many; 2 is below the floor of 4
    with pytest.raises(MicroBatchFloorError, match=r"micro-batch of 4 .* min_micro_batch 4"):
        train_trial(TrialConfig(epochs=1, **TINY), data32)
    _room_for(monkeypatch, 1)  # a lower floor tries 2 images a pass before it gives up
    with pytest.raises(MicroBatchFloorError, match=r"micro-batch of 2 .* min_micro_batch 2"):
        train_trial(TrialConfig(epochs=1, min_micro_batch=2, **TINY), data32)


def test_accumulated_micro_batches_step_like_the_whole_batch(data32) -> None:
    """Without BatchNorm (and without random augmentation) the micro-batches' summed
    gradients are the whole batch's: the same weights after an epoch."""
    config = TrialConfig(
        epochs=1,
        flip=False,
        rotate90=False,
        crop_scale=1.0,
        color_jitter=0.0,
        stain_jitter=0.0,
        **TINY,
    )
    device = torch.device("cpu")
    batches = _Batches(data32, data32.split.train, device)
    labels = torch.from_numpy(data32.labels("binary")[np.asarray(data32.split.train)])
    order = np.arange(len(data32.split.train))
    weights = []
    for size in (16, 4):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        train_one_epoch(
            model,
            batches,
            labels,
            order,
            config=config,
            loss_fn=nn.CrossEntropyLoss(),
            optimizer=optimizer,
            generator=torch.Generator().manual_seed(0),
            device=device,
            micro=MicroBatch(size, 4),
        )
        weights.append(model[1].weight.detach().clone())
    assert torch.allclose(weights[0], weights[1], atol=1e-5)


def test_the_trial_run_records_the_micro_batch() -> None:
    from dala_search.runs import schema
    from dala_search.search.trainable import _EpochReport

    class Tracker:
        tags: dict[str, str] = {}

        def log_metrics(self, metrics: dict, step: int) -> None:
            pass

        def set_tag(self, key: str, value: str) -> None:
            self.tags[key] = value

    tracker = Tracker()
    report = _EpochReport("val_balanced_accuracy", 2, tracker, lambda m: None)  # type: ignore[arg-type]
    report(1, {"val_balanced_accuracy": 0.5, "micro_batch": 8.0})
    assert tracker.tags == {schema.TAG_MICRO_BATCH: "8"}
