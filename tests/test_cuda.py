"""The CUDA path of a trial, on a real GPU. Skipped where torch sees no CUDA (CI has none);
``bash bench/gpu.sh OUTDIR`` runs this file first on a lent GPU machine.

What only a GPU can show: inputs really channels_last under bf16 autocast, the split held
in device memory, no host-device synchronisation per batch, seeded augmentation on the
device, predictions that agree with the CPU's, and data parallel over NCCL.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dala_search import train, train_steps
from dala_search.config import TrialConfig
from dala_search.data.augment import AugmentSpec, augment_normalized
from dala_search.model.dalaresnet import build_dalaresnet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def _config(**kw: object) -> TrialConfig:
    base: dict[str, object] = dict(
        pretrained="none", image_size=64, batch_size=8, epochs=2, fc1=32, fc2=16, device="cuda"
    )
    return TrialConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def data(demo_root: Path, cache_dir: Path) -> train.TrialData:
    return train.prepare_data(demo_root, "40X", image_size=64, cache_dir=cache_dir)


def test_trial_trains_in_bf16_on_channels_last_inputs(data: train.TrialData) -> None:
    seen: list[tuple[str, object]] = []

    def build(config: TrialConfig) -> torch.nn.Module:
        model = build_dalaresnet(config)
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))

        def on_input(module: torch.nn.Module, args: tuple) -> None:
            x = args[0]
            seen.append(
                (
                    "input",
                    (
                        x.device.type,
                        x.is_contiguous(memory_format=torch.channels_last),
                        torch.is_autocast_enabled("cuda"),
                    ),
                )
            )

        model.register_forward_pre_hook(on_input)
        conv.register_forward_hook(lambda m, a, out: seen.append(("conv", out.dtype)))
        return model

    result = train.train_trial(_config(), data, build_model=build)
    inputs = {v for k, v in seen if k == "input"}
    assert inputs == {("cuda", True, True)}, inputs  # training and evaluation alike
    assert {v for k, v in seen if k == "conv"} == {torch.bfloat16}
    assert result.epochs_run == 2
    assert all(np.isfinite(h["train_loss"]) for h in result.history)
    assert 0.0 <= result.test["accuracy"] <= 1.0


def test_split_is_resident_on_the_gpu_and_equals_the_cache(data: train.TrialData) -> None:
    on_gpu = train._Batches(data, data.split.train, CUDA)
    on_cpu = train._Batches(data, data.split.train, CPU)
    assert on_gpu.resident is not None and on_gpu.resident.device.type == "cuda"
    assert on_gpu.resident.shape[0] == len(data.split.train)
    pos = np.array([3, 0, 5, 1, len(data.split.train) - 1])
    got = on_gpu.get(pos)
    assert got.device.type == "cuda" and got.dtype == torch.uint8
    assert torch.equal(got.cpu(), on_cpu.get(pos))


def test_training_epoch_synchronises_once_whatever_the_batch_count(
    data: train.TrialData, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's sync debug mode warns at each synchronising call: after the first epoch
    (one-off constants), an epoch reads its loss once, at its end, and nothing per batch."""
    per_epoch: list[list[str]] = []
    original = train.train_one_epoch

    def counted(*args: object, **kwargs: object) -> dict[str, float]:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = original(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        per_epoch.append(
            [
                f"{Path(w.filename).name}:{w.lineno}"
                for w in caught
                if "synchroniz" in str(w.message)
            ]
        )
        return out

    monkeypatch.setattr(train, "train_one_epoch", counted)
    batches = len(data.split.train) // 8
    assert batches >= 5  # enough batches that a per-batch sync would show
    train.train_trial(_config(epochs=3), data)
    assert len(per_epoch) == 3
    assert all(len(calls) <= 1 for calls in per_epoch[1:]), per_epoch


def test_gpu_augmentation_is_seeded_finite_and_on_the_device(data: train.TrialData) -> None:
    batch = train._Batches(data, data.split.train, CUDA).get(np.arange(8))
    spec = AugmentSpec(
        flip=True, rotate90=True, crop_scale=0.6, color_jitter=0.2, stain_jitter=0.05
    )
    outs = [
        augment_normalized(batch, spec, torch.Generator(device="cuda").manual_seed(3))
        for _ in range(2)
    ]
    other = augment_normalized(batch, spec, torch.Generator(device="cuda").manual_seed(4))
    assert outs[0].device.type == "cuda" and outs[0].shape == (8, 3, 64, 64)
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1])  # same seed, same draws
    assert not torch.equal(outs[0], other)


def test_gpu_bf16_predictions_agree_with_cpu_fp32(data: train.TrialData) -> None:
    config = _config(epochs=1)
    model = train.train_trial(config, data, keep_model=True).model
    assert model is not None
    n = len(data.split.val)
    p_cpu = train_steps.predict(
        model.cpu(),
        train._Batches(data, data.split.val, CPU),
        n,
        config=config.replace(device="cpu"),
        device=CPU,
    )
    gpu_model = model.to(CUDA).to(memory_format=torch.channels_last)
    p_gpu = train_steps.predict(
        gpu_model, train._Batches(data, data.split.val, CUDA), n, config=config, device=CUDA
    )
    diff = np.abs(p_cpu - p_gpu)
    assert p_gpu.shape == p_cpu.shape == (n, 2)
    assert diff.max() < 0.1 and diff.mean() < 0.02, (diff.max(), diff.mean())


def test_data_parallel_trial_over_nccl(data: train.TrialData, tmp_path: Path) -> None:
    """One rank over NCCL: the DDP wrapping, SyncBatchNorm and device ids of the GPU path
    (two or more GPUs are needed to check the gradient all-reduce itself)."""
    import torch.distributed as dist

    torch.cuda.set_device(0)
    dist.init_process_group(
        "nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        result = train.train_trial(_config(epochs=1), data, distributed=True)
    finally:
        dist.destroy_process_group()
    assert result.epochs_run == 1
    assert np.isfinite(result.history[0]["train_loss"])
    assert 0.0 <= result.test["accuracy"] <= 1.0


def test_cv_folds_share_one_resident_copy_and_report_peak_memory(
    data: train.TrialData, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--cv``: the K fold models share the device and one copy of the non-test images."""
    from dala_search import trial_data
    from dala_search.data.splits import inner_folds
    from dala_search.train_cv import train_cv_trial

    copies: list[int] = []
    real = trial_data._Batches.__init__

    def counted(self, data, idx, device) -> None:  # noqa: ANN001
        real(self, data, idx, device)
        copies.append(len(idx))

    monkeypatch.setattr(trial_data._Batches, "__init__", counted)
    folds = inner_folds(data.records, data.split, 2, seed=0)
    reports: list[dict] = []
    train_cv_trial(_config(), data, folds, lambda e, m: reports.append(m))
    non_test = len(data.split.train) + len(data.split.val)
    # one copy of the non-test images for both folds, one of the test images
    assert copies == [non_test, len(data.split.test)], copies
    assert all(m["cv_folds"] == 2 and m["cuda_peak_memory_gb"] > 0 for m in reports)
