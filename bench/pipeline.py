"""Benchmark 1: data-path capacity, ours vs a naive torchvision pipeline (images/s).

Ours: PNGs decoded once into the uint8 cache (timed separately, a one-off per data set),
then per batch: rows from the memory map (or device memory on a GPU) and the fused batched
augmentation (`augment_normalized`) on the device. Naive: torchvision ``ImageFolder`` + PIL +
``DataLoader`` with one worker per core, decoding every PNG every epoch, the same
augmentations (squash to 224, random square crop of >= crop_scale area, flip, quarter turns,
HED stain jitter, colour jitter, ImageNet normalisation). Cached naive, the control that
shows the two gains apart: the same decoded, squashed uint8 images held in memory (decoded
once, as ours), augmented image by image with torchvision ``transforms.v2`` on tensors in a
``DataLoader`` (one worker per core): naive -> cached naive is the gain from caching,
cached naive -> ours the gain from the fused batched augmentation.

Every side gets the same cores (a DataLoader worker per core, or ``--threads`` torch threads
for ours: the core count here, not the other benchmarks' 1; both recorded), an untimed
warm-up, and the same rule: whole epochs are repeated until a measurement lasts
``min_s``. A DataLoader epoch has several batches per worker (``BATCHES_PER_WORKER``; the
workers are persistent), so every worker is busy, and the pipeline's fill at an epoch's
start is counted as a training epoch pays it. The sides are measured alternately.
Goal: ours >= 10x naive and >= 3,000 img/s.

    python bench/pipeline.py [--quick] [--device cpu|cuda] [--threads N] [--record]
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

SIZES = {  # images per magnification (x 24 patients at 40X), source w x h, px, batch, reps
    "tiny": dict(per_mag=2, width=96, height=64, px=32, batch=16, reps=1),
    "quick": dict(per_mag=4, width=700, height=460, px=224, batch=64, reps=2),
    "full": dict(per_mag=8, width=700, height=460, px=224, batch=64, reps=3),
}
CROP_SCALE, COLOR, STAIN = 0.8, 0.1, 0.05  # TrialConfig's defaults
# Batches per worker in one DataLoader epoch: DataLoader hands whole batches to its workers
# in turn, so an epoch of fewer batches than workers leaves workers idle.
BATCHES_PER_WORKER = 4


def _is_40x(path: str) -> bool:
    return path.endswith(".png") and "-40-" in os.path.basename(path)


class _QuarterTurn:
    """PIL rotation by 0/90/180/270 degrees (a picklable transform for the workers)."""

    def __call__(self, img):  # noqa: ANN001, ANN204
        from PIL import Image

        turns = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180)
        k = random.randrange(4)
        return img.transpose((*turns, Image.Transpose.ROTATE_270)[k]) if k else img


class _StainJitter:
    """Per-image HED jitter on a [0, 1] CHW tensor, as one writes it for a Dataset."""

    def __init__(self, sigma: float) -> None:
        self.sigma = sigma

    def __call__(self, x):  # noqa: ANN001, ANN204
        import torch

        from dala_search.data.augment import _HED_FROM_RGB, _RGB_FROM_HED

        od = -torch.log(x.clamp(min=1e-6))
        hed = torch.einsum("chw,cd->dhw", od, _HED_FROM_RGB)
        alpha = 1 + (torch.rand(3) * 2 - 1) * self.sigma
        beta = (torch.rand(3) * 2 - 1) * self.sigma
        hed = hed * alpha.view(3, 1, 1) + beta.view(3, 1, 1)
        return torch.exp(-torch.einsum("dhw,dc->chw", hed, _RGB_FROM_HED)).clamp(0, 1)


def _epoch_sampler(n: int, batch: int, workers: int):  # noqa: ANN202
    """Random indices for one DataLoader epoch of ``BATCHES_PER_WORKER`` batches per worker
    (drawn without replacement, cycling over the ``n`` images as often as it takes)."""
    from torch.utils.data import RandomSampler

    return RandomSampler(range(n), num_samples=BATCHES_PER_WORKER * max(workers, 1) * batch)


def naive_loader(root: Path, px: int, batch: int, workers: int):  # noqa: ANN201
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision import transforms as T

    from dala_search.data.augment import IMAGENET_MEAN, IMAGENET_STD

    tf = T.Compose(
        [
            T.Resize((px, px)),  # squash the whole field, as the cache does
            T.RandomResizedCrop(px, scale=(CROP_SCALE, 1.0), ratio=(1.0, 1.0)),
            T.RandomHorizontalFlip(),
            _QuarterTurn(),
            T.ToTensor(),
            _StainJitter(STAIN),
            T.ColorJitter(brightness=COLOR, contrast=COLOR, saturation=COLOR),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    breast = next(root.rglob("breast"))
    ds = datasets.ImageFolder(str(breast), transform=tf, is_valid_file=_is_40x)
    return DataLoader(
        ds,
        batch_size=batch,
        sampler=_epoch_sampler(len(ds), batch, workers),
        num_workers=workers,
        persistent_workers=workers > 0,
    )


class _QuarterTurnTensor:
    """0/90/180/270 degrees on a CHW tensor (a picklable transform for the workers)."""

    def __call__(self, x):  # noqa: ANN001, ANN204
        import torch

        return torch.rot90(x, random.randrange(4), dims=(-2, -1))


class _CachedImages:
    """The cache's decoded, squashed uint8 images as CHW tensors in memory, each augmented
    on its own by ``transforms.v2``: a DataLoader dataset one writes once decoding is done
    (fork-started workers share the tensor's pages)."""

    def __init__(self, images, transform) -> None:  # noqa: ANN001
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):  # noqa: ANN204
        return self.transform(self.images[i]), 0


def cached_naive_loader(images, px: int, batch: int, workers: int):  # noqa: ANN001, ANN201
    """``images``: uint8 NHWC (the cache's rows). The same augmentations as the naive side."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision.transforms import v2

    from dala_search.data.augment import IMAGENET_MEAN, IMAGENET_STD

    tf = v2.Compose(
        [
            v2.RandomResizedCrop(px, scale=(CROP_SCALE, 1.0), ratio=(1.0, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            _QuarterTurnTensor(),
            v2.ToDtype(torch.float32, scale=True),
            _StainJitter(STAIN),
            v2.ColorJitter(brightness=COLOR, contrast=COLOR, saturation=COLOR),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    chw = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return DataLoader(
        _CachedImages(chw, tf),
        batch_size=batch,
        sampler=_epoch_sampler(len(chw), batch, workers),
        num_workers=workers,
        persistent_workers=workers > 0,
    )


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="where our augmentation runs: cpu | cuda")
    p.set_defaults(threads=None)  # None: one per core, matching the naive side's workers
    args = p.parse_args()
    load0 = c.load_start()
    size = SIZES[c.size_of(args)]
    cores = c.machine()["cores"]
    threads = cores if args.threads is None else args.threads
    if threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {threads}")

    import numpy as np
    import torch

    from dala_search.data.augment import AugmentSpec, augment_normalized
    from dala_search.train import TrialData, _Batches, device_positions, prepare_data

    device = torch.device(args.device)
    torch.set_num_threads(threads)
    base = c.work_dir(args)
    root = c.demo_data(
        base, images_per_mag=size["per_mag"], width=size["width"], height=size["height"]
    )

    with tempfile.TemporaryDirectory(dir=base) as cache_dir:
        t0 = time.perf_counter()
        data: TrialData = prepare_data(root, "40X", image_size=size["px"], cache_dir=cache_dir)
        build_s = time.perf_counter() - t0
        n = len(data.records)
        c.log(f"cache of {n} images at {size['px']} px built in {build_s:.1f} s")
        everything = np.arange(n)
        batches = _Batches(data, everything, device)
        spec = AugmentSpec(crop_scale=CROP_SCALE, color_jitter=COLOR, stain_jitter=STAIN)
        gen = torch.Generator(device=device).manual_seed(0)
        rng = np.random.default_rng(0)
        bs = size["batch"]

        # One rule for every side: repeat whole epochs until a measurement lasts min_s
        # (our side goes through this small set in tens of milliseconds, a GPU in a few).
        min_s = 0.2 if c.size_of(args) == "tiny" else 2.0

        def ours(augmented: bool = True) -> float:
            seen, start = 0, time.perf_counter()
            while True:
                order = rng.permutation(n)
                for lo in range(0, n, bs):
                    x = batches.get(device_positions(order[lo : lo + bs], device))
                    if augmented:
                        x = augment_normalized(x.to(device), spec, gen)
                seen += n
                if device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
                if elapsed >= min_s:
                    return seen / elapsed

        loader = naive_loader(root, size["px"], bs, workers=cores)
        assert len(loader.dataset) == n, (len(loader.dataset), n)
        cached = cached_naive_loader(
            np.ascontiguousarray(data.cache.images[data.rows]), size["px"], bs, workers=cores
        )

        def timed_epochs(dl) -> float:  # noqa: ANN001
            seen, start = 0, time.perf_counter()
            while True:
                seen += sum(len(y) for _, y in dl)
                elapsed = time.perf_counter() - start
                if elapsed >= min_s:
                    return seen / elapsed

        # warm-up, untimed: workers started, first decodes, allocator, page cache
        ours()
        for dl in (loader, cached):
            sum(len(y) for _, y in dl)
        runs = c.interleave(
            {
                "ours": ours,
                "naive": lambda: timed_epochs(loader),
                "naive_cached": lambda: timed_epochs(cached),
                "serve": lambda: ours(augmented=False),
            },
            size["reps"],
        )

    ours_s, naive_s, cached_s, serve_s = (
        c.median(runs[k]) for k in ("ours", "naive", "naive_cached", "serve")
    )
    result = {
        "ours_img_s": round(ours_s, 1),
        "naive_img_s": round(naive_s, 1),
        "ratio": round(ours_s / naive_s, 2),
        "naive_cached_img_s": round(cached_s, 1),
        "caching_gain": round(cached_s / naive_s, 2),  # naive -> cached naive
        "fused_gain": round(ours_s / cached_s, 2),  # cached naive -> ours
        "serve_only_img_s": round(serve_s, 1),
        "cache_build_s": round(build_s, 2),
        "images": n,
        "image_size": size["px"],
        "source": f"{size['width']}x{size['height']} PNG",
        "batch_size": bs,
        "device": str(device),
        "naive_workers": cores,
        "naive_batches_per_epoch": len(loader),
        "ours_threads": threads,
        "min_s": min_s,
        "reps": size["reps"],
        "runs_img_s": {k: [round(v, 1) for v in vs] for k, vs in runs.items()},
        "goal": "ratio >= 10 and ours_img_s >= 3000",
        "meets_ratio": ours_s / naive_s >= 10,
        "meets_3000": ours_s >= 3000,
        "_load_start": load0,
    }
    c.finite_positive(
        result, ["ours_img_s", "naive_img_s", "ratio", "naive_cached_img_s", "serve_only_img_s"]
    )
    summary = (
        f"{n} images, {size['width']}x{size['height']} PNG sources -> {size['px']} px, "
        f"batch {bs}, median of {size['reps']} interleaved measurements of >= {min_s:g} s "
        f"each (whole epochs; DataLoader epochs of {len(loader)} batches, "
        f"{BATCHES_PER_WORKER} per worker; warm-up untimed)\n"
        f"ours  ({device}, {threads} threads, cache + fused augmentation): {ours_s:9.1f} img/s\n"
        f"naive (ImageFolder + PIL + DataLoader, {cores} workers): {naive_s:9.1f} img/s\n"
        f"cached naive (decoded once, transforms.v2 on tensors, DataLoader, {cores} workers): "
        f"{cached_s:.1f} img/s\n"
        f"gain from caching (cached naive/naive): {cached_s / naive_s:.1f}x; from the fused "
        f"batched augmentation (ours/cached naive): {ours_s / cached_s:.1f}x\n"
        f"ratio ours/naive: {ours_s / naive_s:.1f}x (goal >= 10x)   "
        f"ours >= 3000 img/s: {'yes' if ours_s >= 3000 else 'no'}\n"
        f"serving uint8 batches alone (the host's share when augmenting on a GPU): "
        f"{serve_s:.0f} img/s\n"
        f"one-off cache build (decode + resize): {build_s:.1f} s"
    )
    c.finish("pipeline", args, result, summary, device=str(device))


if __name__ == "__main__":
    main()
