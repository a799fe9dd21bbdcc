"""Precise BatchNorm (``precise_bn``): statistics recomputed from training images before each
validation, as torch's ``update_bn`` computes them, frozen stages left alone."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from dala_search.config import TrialConfig
from dala_search.data.augment import to_normalized
from dala_search.data.sampling import epoch_indices
from dala_search.errors import ConfigError
from dala_search.model.dalaresnet import build_dalaresnet
from dala_search.precise_bn import recalibrate_batchnorm
from dala_search.train import _Batches, prepare_data, train_trial

TINY = dict(pretrained="none", image_size=32, batch_size=16, fc1=32, fc2=16, num_threads=2)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data32(demo_root, cache_dir):
    return prepare_data(demo_root, "40X", image_size=32, seed=0, cache_dir=cache_dir)


def _norms(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {
        k: m for k, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }


def _stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{k}.{b}": getattr(m, b).clone()
        for k, m in _norms(model).items()
        for b in ("running_mean", "running_var")
    }


def _drifted(config: TrialConfig) -> nn.Module:
    """A model whose running statistics are far from anything the data would give."""
    torch.manual_seed(0)
    model = build_dalaresnet(config)
    for m in _norms(model).values():
        m.running_mean.fill_(3.0)
        m.running_var.fill_(9.0)
    return model


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys=None) -> bool:  # noqa: ANN001
    return all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in keys or a)


def test_statistics_are_torch_update_bn_over_the_training_images(data32) -> None:
    config = TrialConfig(**TINY)
    batches = _Batches(data32, data32.split.train, CPU)
    n = len(data32.split.train)
    ours, reference = _drifted(config), _drifted(config)
    ours.eval()

    passed = recalibrate_batchnorm(ours, batches, n, config=config, device=CPU)

    # the same images, in the same batches (a seeded shuffle), through the library's code
    order = np.random.default_rng(config.seed).permutation(n)
    loader = [to_normalized(batches.get(order[lo : lo + 16])) for lo in range(0, n, 16)]
    loader = [x for x in loader if len(x) >= 2]
    update_bn(loader, reference)
    assert passed == sum(len(x) for x in loader) > 0
    got, want = _stats(ours), _stats(reference)
    assert all(torch.equal(got[k], want[k]) for k in want)  # bit for bit, on the CPU
    assert not torch.allclose(got["backbone.bn1.running_mean"], torch.full((64,), 3.0))
    assert not ours.training  # the mode it was called in
    assert all(m.momentum == 0.1 for m in _norms(ours).values())


def test_variance_is_the_training_images_not_one_patients(data32) -> None:
    """The first BatchNorm's recomputed variance is its input's variance over the training
    images. Batches in file order (one patient and class each) would miss the differences
    between patients and classes, which shuffled training batches carry."""
    config = TrialConfig(**TINY)
    batches = _Batches(data32, data32.split.train, CPU)
    n = len(data32.split.train)
    model = _drifted(config)
    recalibrate_batchnorm(model, batches, n, config=config, device=CPU)
    with torch.no_grad():
        x = to_normalized(batches.get(np.arange(n)))
        conv1 = model.backbone.conv1(x)  # what bn1 normalises
    population = conv1.var(dim=(0, 2, 3))
    ratio = (model.backbone.bn1.running_var / population).mean().item()
    assert 0.95 < ratio < 1.05, ratio  # 0.98 here; 0.88 with batches in file order


def test_frozen_stages_keep_their_statistics(data32) -> None:
    config = TrialConfig(freeze_stages=2, **TINY)
    model = _drifted(config)
    before = _stats(model)
    batches = _Batches(data32, data32.split.train, CPU)
    recalibrate_batchnorm(model, batches, len(data32.split.train), config=config, device=CPU)
    after = _stats(model)
    frozen = [
        k for k in after if k.startswith(("backbone.bn1.", "backbone.layer1.", "backbone.layer2."))
    ]
    trained = [k for k in after if k.startswith("backbone.layer4.")]
    assert frozen and trained
    assert _same(after, before, frozen)  # update_bn would have reset these to 0 and 1
    assert not any(torch.allclose(after[k], before[k]) for k in trained)


def test_off_or_too_few_images_leaves_statistics_alone(data32) -> None:
    batches = _Batches(data32, data32.split.train, CPU)
    for config, n in ((TrialConfig(precise_bn=0, **TINY), 64), (TrialConfig(**TINY), 1)):
        model = _drifted(config)
        before = _stats(model)
        assert recalibrate_batchnorm(model, batches, n, config=config, device=CPU) == 0
        assert _same(_stats(model), before)


def test_a_subset_is_seeded_and_capped(data32) -> None:
    config = TrialConfig(precise_bn=40, **TINY)
    batches = _Batches(data32, data32.split.train, CPU)
    n = len(data32.split.train)
    assert n > 40
    a, b = _drifted(config), _drifted(config)
    assert recalibrate_batchnorm(a, batches, n, config=config, device=CPU) == 40
    recalibrate_batchnorm(b, batches, n, config=config, device=CPU)
    assert _same(_stats(a), _stats(b))


def test_trials_validate_with_recalibrated_statistics(data32) -> None:
    """The kept model's statistics are those of a pass over its own training images; with
    ``precise_bn: 0`` they are training's running averages, and another pass moves them."""
    batches = _Batches(data32, data32.split.train, CPU)
    n = len(data32.split.train)
    for precise, settled in ((512, True), (0, False)):
        config = TrialConfig(epochs=1, precise_bn=precise, **TINY)
        model = train_trial(config, data32, keep_model=True).model
        again = copy.deepcopy(model)
        recalibrate_batchnorm(again, batches, n, config=config.replace(precise_bn=512), device=CPU)
        assert _same(_stats(again), _stats(model)) is settled, precise


def test_a_negative_count_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="precise_bn"):
        TrialConfig.from_dict({"precise_bn": -1})


def test_the_pass_draws_its_images_with_the_trials_sampling(data32) -> None:
    """With the training labels the pass has the class mix of the training batches (here
    oversampled to ~50/50), not the split's natural ~30/70: weights learned under balanced
    batch statistics, recalibrated on the natural mix, saw every feature shifted towards the
    majority's mean and predicted one class on the held-out patients (val ROC AUC ~0.9)."""
    config = TrialConfig(sampling="oversample", **TINY)
    batches = _Batches(data32, data32.split.train, CPU)
    labels = data32.labels(config.task)[np.asarray(data32.split.train)]
    n = len(labels)
    assert 0.2 < labels.mean() < 0.8 and abs(labels.mean() - 0.5) > 0.1  # imbalanced split
    ours, natural = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    recalibrate_batchnorm(ours, batches, n, config=config, device=CPU, labels=labels)
    recalibrate_batchnorm(natural, batches, n, config=config, device=CPU)

    order = epoch_indices(labels, "oversample", seed=config.seed)[: config.precise_bn]
    assert abs(labels[order].mean() - 0.5) < 0.05
    loader = [to_normalized(batches.get(order[lo : lo + 16])) for lo in range(0, len(order), 16)]
    reference = nn.BatchNorm2d(3)
    update_bn([x for x in loader if len(x) >= 2], reference)
    assert torch.allclose(ours.running_mean, reference.running_mean, atol=1e-5)
    assert torch.allclose(ours.running_var, reference.running_var, rtol=1e-4)
    assert not torch.allclose(ours.running_mean, natural.running_mean, atol=1e-3)
    with pytest.raises(ValueError, match="labels"):
        recalibrate_batchnorm(ours, batches, n - 1, config=config, device=CPU, labels=labels)
