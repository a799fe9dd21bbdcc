"""The CPU training path of ``augment_normalized``: OpenCV, one image at a time.

Split from ``augment.py`` (which holds the readable definition, the draws, the colour maps
and the GPU path); ``augment_normalized`` calls ``augment_cpu`` for a batch on the CPU.
Also here: the worker threads that share a batch's images out, and the huge-page output
buffer.
"""

from __future__ import annotations

import functools
import itertools
import math
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from dala_search.data.augment_maps import (
    MIN_INTENSITY,
    NORMALIZED_HI,
    NORMALIZED_LO,
    ColourMaps,
    Geometry,
)

# log of each uint8 value as ``augment._colour_normalize`` computes it (clamped, float32):
# the lookup table of the stain step
_LOG_U8 = torch.arange(256, dtype=torch.float32).clamp_(min=255.0 * MIN_INTENSITY).log_().numpy()
_FLOAT_U8 = torch.arange(256, dtype=torch.float32).numpy()  # uint8 -> the same float


def augment_cpu(batch_u8: torch.Tensor, geo: Geometry | None, maps: ColourMaps) -> torch.Tensor:
    """One image at a time in OpenCV, geometry in uint8: the CPU path.

    Returns float (n, 3, H, W) with channels_last strides (NHWC memory: OpenCV works on
    interleaved channels, and CPU convolutions take that layout as fast as NCHW or faster).
    With ``torch.get_num_threads() > 1`` that many worker threads (``_cpu_workers``) take
    images in turn until none is left, so a worker that the OS holds back (a busy, shared
    machine) just does fewer of them; each OpenCV call runs on its caller's thread.
    """
    cv2 = _opencv()
    n, h, w, _ = batch_u8.shape
    out = _empty_float_cpu((n, h, w, 3))
    src, dst = batch_u8.contiguous().numpy(), out.numpy()
    geo_lists = [t.tolist() for t in geo] if geo is not None else None
    stained = maps.stain_mix is not None
    # per sample (3, 4) float32 matrices for cv2.transform: [3x3 map | offset]
    stain = torch.cat([maps.stain_mix, maps.stain_bias], 2).numpy() if stained else None
    colour = torch.cat([maps.colour, maps.offset], 2).numpy()
    mean_gain = maps.mean_gain.numpy()[:, :, 0] if maps.mean_gain is not None else None
    lo, hi = (*NORMALIZED_LO, 0.0), (*NORMALIZED_HI, 0.0)
    claims = itertools.count()  # each worker claims the next image (next() holds the GIL)

    def work() -> None:
        x = np.empty((h, w, 3), np.float32)  # this worker's scratch, reused per image
        while (i := next(claims)) < n:
            img = src[i]
            if geo_lists is not None:
                img = _geometry_cv2(cv2, img, geo_lists, i)
            if stained:  # log of uint8 looked up, the 3x3 stain map plus bias, exp
                cv2.LUT(img, _LOG_U8, dst=x)
                cv2.transform(x, stain[i], dst=x)
                cv2.exp(x, dst=x)
            else:
                cv2.LUT(img, _FLOAT_U8, dst=x)
            m = colour[i]
            if mean_gain is not None:  # contrast pivots about the image's mean
                m = m.copy()
                m[:, 3] += sum(cv2.mean(x)[:3]) / 3.0 * mean_gain[i]
            y = dst[i]
            cv2.transform(x, m, dst=y)
            cv2.min(y, hi, dst=y)
            cv2.max(y, lo, dst=y)

    threads = min(torch.get_num_threads(), n)
    if threads <= 1:
        work()
    else:
        pool = _cpu_workers(torch.get_num_threads())
        for f in [pool.submit(work) for _ in range(threads)]:
            f.result()
    return out.permute(0, 3, 1, 2)


@functools.cache
def _opencv():  # noqa: ANN202 (the cv2 module)
    """OpenCV, imported on first use, set to run each call on its caller's thread.

    Why one thread: the CPU path already runs images on ``torch.get_num_threads()`` worker
    threads; OpenCV's own pool on top of them made a batch slower, and alone it did not beat
    one thread (figures: bench/README.md). This sets OpenCV's thread count for the whole
    process (``cv2.setNumThreads(1)``).
    """
    import cv2

    cv2.setNumThreads(1)
    return cv2


_HUGE_PAGE = 2 << 20
_HUGE_PAGES_FROM = 8 << 20  # bytes; smaller outputs come from malloc's reused heap anyway


def _empty_float_cpu(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised float32 CPU tensor, in transparent huge pages when it is large.

    Why: a training batch (64 x 224 px: 38.5 MB) is a fresh allocation every step, which
    glibc maps anew, and the first write to each of its 9,400 4 KB pages faults: a large
    share of this whole path (bench/README.md), which huge pages (2 MB) mostly remove.
    torch only asks for them when THP_MEM_ALLOC_ENABLE=1 is set before it starts; this asks
    for this one buffer (a private anonymous map, advised MADV_HUGEPAGE, 2 MB-aligned; the
    tensor keeps the map alive and it is unmapped with the tensor). Where the platform has
    no MADV_HUGEPAGE, or the kernel's THP setting is ``never``, it is ordinary memory.
    """
    nbytes = math.prod(shape) * 4
    if nbytes < _HUGE_PAGES_FROM or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape)
    buf = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE)
    buf.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(buf, dtype=torch.uint8)
    start = -raw.data_ptr() % _HUGE_PAGE
    return raw[start : start + nbytes].view(torch.float32).view(shape)


_WORKERS: tuple[int, ThreadPoolExecutor] | None = None  # (threads, pool) of this process
_WORKERS_LOCK = threading.Lock()


def _forget_workers() -> None:
    """In a forked child: the parent's threads do not exist here (and its lock may be held)."""
    global _WORKERS, _WORKERS_LOCK
    _WORKERS, _WORKERS_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forget_workers)


def _cpu_workers(threads: int) -> ThreadPoolExecutor:
    """``threads`` worker threads of the CPU path, made once per process.

    Why not a pool inside each call (OpenCV's, or torch's intra-op threads): per image the
    path is ~10 calls of a fraction of a millisecond, and a pool inside each call forks and
    joins per call; on a shared machine a descheduled thread stalls every join (figures:
    bench/README.md). Whole images per thread join
    once per batch instead. A new count (``torch.set_num_threads``) makes a new pool.
    """
    global _WORKERS
    with _WORKERS_LOCK:
        if _WORKERS is not None and _WORKERS[0] == threads:
            return _WORKERS[1]
        if _WORKERS is not None:  # torch.set_num_threads changed: a pool of the new size
            _WORKERS[1].shutdown(wait=False)
        ready = threading.Barrier(threads)
        pool = ThreadPoolExecutor(threads, thread_name_prefix="dala-augment")
        # the pool starts a thread per submit while none is idle: hold each until all exist
        for f in [pool.submit(ready.wait) for _ in range(threads)]:
            f.result()
        _WORKERS = (threads, pool)
        return pool


# cv2.flip codes by (flip rows, flip columns)
_FLIP_CODE = {(True, True): -1, (True, False): 0, (False, True): 1}


def _geometry_cv2(cv2, img: np.ndarray, geo: list[list[int]], i: int) -> np.ndarray:  # noqa: ANN001
    """Sample ``i``'s crop, resize, mirror and turns on one uint8 HWC image (CPU path).

    The crop box is a view; ``cv2.resize`` (bilinear, uint8 in and out) brings it back to
    the image size: for the upscaling a crop needs this is ``interpolate``'s bilinear
    (half-pixel centres, edge pixels repeated), rounded to uint8 (within one 8-bit step of
    the float result; tests check it). Every mirror/turn is ``transpose^t . flip_rows^a .
    flip_columns^b``: at most one ``cv2.flip`` and one ``cv2.transpose``.
    """
    k, f, top, left, ch, cw = (g[i] for g in geo)
    h, w, _ = img.shape
    img = img[top : top + ch, left : left + cw]
    if (ch, cw) != (h, w):
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    # rot90^k . mirror^f: k=0 -> (a, b, t) = (0, f, 0); k=1 -> (0, 1-f, 1); k=2 -> (1, 1-f, 0);
    # k=3 -> (1, f, 1) (torch.rot90: k=1 is transpose(flip W), k=3 transpose(flip H)).
    flip_rows, transpose = k in (2, 3), k in (1, 3)
    flip_cols = bool(f) != (k in (1, 2))
    if flip_rows or flip_cols:
        img = cv2.flip(img, _FLIP_CODE[(flip_rows, flip_cols)])
    return cv2.transpose(img) if transpose else img
