"""Batched augmentation: label-preserving geometry, bounded colour changes, repeatable."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dala_search.data.augment_cpu as cpu_module
from dala_search.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentSpec,
    Geometry,
    _augment_batched,
    _colour_maps,
    _geometry_grid,
    augment,
    augment_normalized,
    draw_geometry,
    normalize,
    to_float,
    to_normalized,
)
from dala_search.data.augment_cpu import augment_cpu


def _u8(n: int, size: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)


def _batch(n: int = 6, size: int = 16) -> torch.Tensor:
    return to_float(_u8(n, size, seed=1))


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
        AugmentSpec(color_jitter=0.1, stain_jitter=0.05),
        AugmentSpec(stain_jitter=0.3),
        AugmentSpec(flip=False, rotate90=False, color_jitter=0.4),
        AugmentSpec(flip=False, rotate90=False),
        AugmentSpec(),
    ],
)
def test_fused_training_path_equals_the_reference(spec: AugmentSpec) -> None:
    # train.py uses the fused path; the readable composition above is its definition.
    # Without a crop the geometry is an exact pixel permutation, so both agree to rounding.
    u8 = _u8(6, 20)
    fused = augment_normalized(u8, spec, torch.Generator().manual_seed(5))
    ref = normalize(augment(to_float(u8), spec, torch.Generator().manual_seed(5)))
    assert fused.shape == ref.shape == (6, 3, 20, 20)
    assert torch.allclose(fused, ref, atol=1e-4)
    assert torch.allclose(to_normalized(u8), normalize(to_float(u8)), atol=1e-6)


@pytest.mark.parametrize(
    "spec",
    [
        AugmentSpec(crop_scale=0.8, color_jitter=0.1, stain_jitter=0.05),  # TrialConfig's
        AugmentSpec(crop_scale=0.5, stain_jitter=0.3, color_jitter=0.3),
    ],
)
def test_fused_path_with_a_crop_is_the_reference_up_to_uint8_rounding(spec: AugmentSpec) -> None:
    # The CPU path resizes in uint8, the reference in float (the next tests pin the uint8
    # geometry down exactly). Given the uint8 geometry, the colour maps equal the reference's
    # to float rounding: rerun the reference's colour steps on the geometry-only output,
    # with the generator advanced past the geometry draws.
    u8 = _u8(6, 24)
    fused = augment_normalized(u8, spec, torch.Generator().manual_seed(7))
    geo_only = AugmentSpec(flip=spec.flip, rotate90=spec.rotate90, crop_scale=spec.crop_scale)
    geo_u8 = _unnormalize_255(augment_normalized(u8, geo_only, torch.Generator().manual_seed(7)))
    assert (geo_u8 - geo_u8.round()).abs().max() < 1e-3  # whole 8-bit values
    g = torch.Generator().manual_seed(7)
    draw_geometry(6, 24, 24, spec, lambda *s: torch.rand(*s, generator=g), torch.device("cpu"))
    colour_only = AugmentSpec(
        flip=False, rotate90=False, color_jitter=spec.color_jitter, stain_jitter=spec.stain_jitter
    )
    ref = normalize(augment(geo_u8.round() / 255, colour_only, g))
    assert torch.allclose(fused, ref, atol=1e-4)
    # and against the all-float reference: one 8-bit step (0.017 normalised) through the
    # jitter's gains, for a few pixels; on average far less
    full_ref = normalize(augment(to_float(u8), spec, torch.Generator().manual_seed(7)))
    assert (fused - full_ref).abs().mean() < 0.01


def _unnormalize_255(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x * std + mean) * 255


def _draws(n: int, size: int, spec: AugmentSpec, seed: int) -> Geometry:
    g = torch.Generator().manual_seed(seed)
    return draw_geometry(
        n, size, size, spec, lambda *s: torch.rand(*s, generator=g), torch.device("cpu")
    )


def test_cpu_geometry_is_the_crop_box_resized_in_uint8_then_mirror_and_turns() -> None:
    spec = AugmentSpec(crop_scale=0.5)  # geometry only: output = normalised geometry
    u8 = _u8(40, 24)
    out = _unnormalize_255(augment_normalized(u8, spec, torch.Generator().manual_seed(11)))
    assert (out - out.round()).abs().max() < 1e-3  # whole 8-bit values (resized in uint8)
    geo = _draws(40, 24, spec, seed=11)  # the same draws, made again
    assert (geo.height < 24).any() and (geo.height == 24).any()
    assert len(set(zip(geo.turns.tolist(), geo.flip.tolist(), strict=True))) == 8  # all of D4
    for i, (k, f, top, left, ch, cw) in enumerate(zip(*(t.tolist() for t in geo), strict=True)):
        # the float definition: interpolate the box, mirror, turn; OpenCV's uint8 bilinear
        # is within one 8-bit step of it (a wrong box, mirror or turn is off by ~100 here)
        crop = u8[i, top : top + ch, left : left + cw].permute(2, 0, 1).unsqueeze(0).float()
        img = F.interpolate(crop, size=(24, 24), mode="bilinear", antialias=True)
        img = torch.rot90(img.flip(-1) if f else img, k, (-2, -1))[0]
        assert (out[i] - img).abs().max() <= 1.0 + 1e-3, i
        if (ch, cw) == (24, 24):  # no resize: an exact pixel permutation
            assert torch.allclose(out[i], img, atol=1e-3), i


def test_crop_boxes_lie_inside_the_image_and_keep_the_area_range() -> None:
    for size, scale in [(37, 0.5), (224, 0.8), (8, 0.08)]:
        geo = _draws(4000, size, AugmentSpec(crop_scale=scale), seed=size)
        assert (geo.top >= 0).all() and (geo.left >= 0).all()
        assert (geo.top + geo.height <= size).all() and (geo.left + geo.width <= size).all()
        assert torch.equal(geo.height, geo.width)  # square images get square boxes
        area = (geo.height * geo.width).double() / size**2
        assert area.min() >= scale and area.max() <= 1
        # the whole range is used: boxes near the smallest allowed and full-size ones
        assert area.min() < scale + 4 / size and (area == 1).any()
        assert set(geo.turns.tolist()) == {0, 1, 2, 3} and set(geo.flip.tolist()) == {0, 1}
        # positions spread over the slack: both edges are reached
        assert (geo.top == 0).any() and (geo.top == size - geo.height)[geo.height < size].any()


def test_no_crop_draws_the_full_image_and_turns_need_square_images() -> None:
    geo = _draws(5, 16, AugmentSpec(), seed=0)
    assert (geo.height == 16).all() and (geo.top == 0).all()
    with pytest.raises(ValueError, match="square"):
        augment_normalized(_u8(2, 16)[:, :, :12], AugmentSpec(rotate90=True))
    # mirror and crop alone work on any shape, on both paths
    spec = AugmentSpec(rotate90=False, crop_scale=0.7)
    u8 = _u8(3, 16)[:, :10]
    fused = augment_normalized(u8, spec, torch.Generator().manual_seed(1))
    ref = normalize(augment(to_float(u8), spec, torch.Generator().manual_seed(1)))
    assert fused.shape == (3, 3, 10, 16) and (fused - ref).abs().max() < 0.02


@pytest.mark.parametrize("spec", [AugmentSpec(crop_scale=0.5), AugmentSpec(crop_scale=0.9)])
def test_gpu_geometry_grid_agrees_with_the_cpu_geometry(spec: AugmentSpec) -> None:
    # The batched grid_sample path (used on a GPU: no host reads) run here on the CPU, on
    # the same draws: equal to the float reference to float rounding, and to the CPU
    # training path within one 8-bit step.
    u8 = _u8(8, 24)
    geo = _draws(8, 24, spec, seed=3)
    grid = _geometry_grid(u8, geo)
    ref = augment(to_float(u8), spec, torch.Generator().manual_seed(3)) * 255
    assert (grid - ref).abs().max() < 0.01
    cpu = _unnormalize_255(augment_normalized(u8, spec, torch.Generator().manual_seed(3)))
    assert (grid - cpu).abs().max() <= 1.0 + 1e-3


def test_gpu_batched_path_equals_the_cpu_path() -> None:
    # the whole GPU branch (grid geometry + colour maps over the whole batch), on the CPU
    spec = AugmentSpec(crop_scale=0.8, color_jitter=0.2, stain_jitter=0.1)
    u8 = _u8(6, 24)

    def run(path) -> torch.Tensor:  # noqa: ANN001
        g = torch.Generator().manual_seed(9)
        rand = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
        geo = draw_geometry(6, 24, 24, spec, rand, torch.device("cpu"))
        return path(u8, geo, _colour_maps(6, spec, rand, torch.device("cpu")))

    batched, cpu = run(_augment_batched), run(augment_cpu)
    # the GPU path writes NCHW; the CPU path (OpenCV) NHWC memory, i.e. channels_last strides
    assert batched.is_contiguous() and cpu.is_contiguous(memory_format=torch.channels_last)
    assert (batched - cpu).abs().max() < 0.05
    assert torch.equal(cpu, augment_normalized(u8, spec, torch.Generator().manual_seed(9)))


@pytest.mark.parametrize("shape", [(2, 8, 8, 4), (2, 8, 8, 1), (2, 8, 8)])
def test_the_fused_path_refuses_what_is_not_uint8_rgb(shape: tuple[int, ...]) -> None:
    # OpenCV would silently leave its scratch as it was for a 1- or 4-channel image
    spec = AugmentSpec(flip=False, rotate90=False, stain_jitter=0.1)
    with pytest.raises(ValueError, match="3 channels"):
        augment_normalized(torch.zeros(shape, dtype=torch.uint8), spec)
    with pytest.raises(ValueError, match="uint8"):
        augment_normalized(torch.zeros(2, 8, 8, 3), spec)


def test_fused_path_repeats_with_a_seed_and_stays_in_bounds() -> None:
    spec = AugmentSpec(crop_scale=0.5, color_jitter=0.4, stain_jitter=0.2)
    u8 = _u8(5, 20)
    a = augment_normalized(u8, spec, torch.Generator().manual_seed(3))
    b = augment_normalized(u8, spec, torch.Generator().manual_seed(3))
    c = augment_normalized(u8, spec, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    x = _unnormalize_255(a) / 255
    assert x.min() >= -1e-5 and x.max() <= 1 + 1e-5
    assert augment_normalized(u8[:0], spec).shape == (0, 3, 20, 20)


def test_cpu_worker_threads_give_the_same_result_as_one_thread() -> None:
    # with torch threads > 1 the CPU path shares its images out to worker threads
    spec = AugmentSpec(crop_scale=0.8, color_jitter=0.2, stain_jitter=0.1)
    u8 = _u8(9, 32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = augment_normalized(u8, spec, torch.Generator().manual_seed(2))
        torch.set_num_threads(2)
        two = augment_normalized(u8, spec, torch.Generator().manual_seed(2))
        assert torch.get_num_threads() == 2  # the caller's setting survives the workers
        assert cpu_module._WORKERS is not None and cpu_module._WORKERS[0] == 2
        # OpenCV's own pool stays out of it: each call runs on its worker's thread
        assert cpu_module._opencv().getNumThreads() == 1
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_large_cpu_outputs_come_from_huge_page_memory(monkeypatch) -> None:
    # a 224 px training batch is ~38 MB: its buffer is a 2 MB-aligned huge-page map
    monkeypatch.setattr(cpu_module, "_HUGE_PAGES_FROM", 0)
    spec = AugmentSpec(crop_scale=0.8, color_jitter=0.2, stain_jitter=0.1)
    u8 = _u8(5, 24)
    mapped = augment_normalized(u8, spec, torch.Generator().manual_seed(1))
    assert mapped.data_ptr() % (2 << 20) == 0
    assert mapped.is_contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(cpu_module, "_HUGE_PAGES_FROM", 1 << 62)
    plain = augment_normalized(u8, spec, torch.Generator().manual_seed(1))
    assert torch.equal(mapped, plain)
    mapped.add_(1.0).sum()  # writable, usable like any tensor


def test_a_forked_child_makes_its_own_workers() -> None:
    # the parent's pool threads do not survive a fork: the child must not wait on them
    import multiprocessing

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        u8 = _u8(4, 224)  # 4 images on 2 threads: the workers run
        parent = augment_normalized(u8, AugmentSpec(), torch.Generator().manual_seed(0))
        assert cpu_module._WORKERS is not None
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(1) as pool:
            child = pool.apply_async(_augment_in_child, (u8.numpy(),)).get(timeout=60)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(parent, torch.from_numpy(child))


def _augment_in_child(u8: np.ndarray) -> np.ndarray:
    # numpy in and out: torch's own tensor pickling shares memory through file descriptors
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    return augment_normalized(torch.from_numpy(u8), AugmentSpec(), gen).numpy()
