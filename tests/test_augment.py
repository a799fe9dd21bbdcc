"""Batched augmentation: label-preserving geometry, bounded colour changes, repeatable."""

from __future__ import annotations

import pytest
import torch

from dala_search.data.augment import (
    AugmentSpec,
    augment,
    augment_normalized,
    normalize,
    to_float,
    to_normalized,
)


def _batch(n: int = 6, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return to_float(torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8))


def test_to_float_layout_and_range() -> None:
    u8 = torch.zeros(2, 4, 5, 3, dtype=torch.uint8)
    u8[0, 1, 2] = torch.tensor([255, 0, 51], dtype=torch.uint8)
    x = to_float(u8)
    assert x.shape == (2, 3, 4, 5)
    assert x[0, :, 1, 2].tolist() == pytest.approx([1.0, 0.0, 0.2])


def test_quarter_turns_and_flips_are_exact_pixel_permutations() -> None:
    x = _batch()
    y = augment(x.clone(), AugmentSpec(flip=True, rotate90=True), torch.Generator().manual_seed(0))
    for i in range(len(x)):
        candidates = []
        for k in range(4):
            r = torch.rot90(x[i], k, (1, 2))
            candidates += [r, torch.flip(r, (2,))]
        assert any(torch.allclose(y[i], c, atol=1e-5) for c in candidates), i


def test_samples_draw_their_own_parameters() -> None:
    x = _batch(n=1).repeat(32, 1, 1, 1)
    y = augment(x, AugmentSpec(flip=True, rotate90=True), torch.Generator().manual_seed(0))
    distinct = {tuple(y[i].flatten()[:32].tolist()) for i in range(32)}
    assert len(distinct) >= 4  # 8 possible outcomes, 32 draws


def test_identity_spec_changes_nothing_and_seed_repeats() -> None:
    x = _batch()
    same = augment(x.clone(), AugmentSpec(flip=False, rotate90=False))
    assert torch.equal(same, x)
    spec = AugmentSpec(crop_scale=0.5, color_jitter=0.3, stain_jitter=0.1)
    a = augment(x.clone(), spec, torch.Generator().manual_seed(3))
    b = augment(x.clone(), spec, torch.Generator().manual_seed(3))
    c = augment(x.clone(), spec, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1


def test_stain_jitter_is_small_for_small_sigma() -> None:
    x = _batch().clamp(0.05, 1)
    y = augment(x.clone(), AugmentSpec(flip=False, rotate90=False, stain_jitter=0.01))
    assert 0 < (y - x).abs().mean() < 0.05


def test_normalize_uses_imagenet_statistics() -> None:
    x = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    assert torch.allclose(normalize(x), torch.zeros(1, 3, 1, 1), atol=1e-6)


@pytest.mark.parametrize(
    "spec",
    [
        AugmentSpec(crop_scale=0.8, color_jitter=0.1, stain_jitter=0.05),
        AugmentSpec(crop_scale=0.5, stain_jitter=0.3),
        AugmentSpec(flip=False, rotate90=False, color_jitter=0.4),
        AugmentSpec(flip=False, rotate90=False),
        AugmentSpec(),
    ],
)
def test_fused_training_path_equals_the_reference(spec: AugmentSpec) -> None:
    # train.py uses the fused path; the readable composition above is its definition.
    u8 = torch.randint(0, 256, (6, 20, 20, 3), generator=torch.Generator().manual_seed(2)).to(
        torch.uint8
    )
    fused = augment_normalized(u8, spec, torch.Generator().manual_seed(5))
    ref = normalize(augment(to_float(u8), spec, torch.Generator().manual_seed(5)))
    assert fused.shape == ref.shape == (6, 3, 20, 20)
    assert torch.allclose(fused, ref, atol=1e-4)
    assert torch.allclose(to_normalized(u8), normalize(to_float(u8)), atol=1e-6)
