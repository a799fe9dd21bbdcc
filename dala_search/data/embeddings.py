"""The embedding cache: a frozen backbone's features of every cached image, computed once.

A foundation-model trial (``train_head.py``) trains only a head, so the backbone's forward
pass would be all of its cost, the same for every trial: it is done once per (backbone,
weights, image set, size, augmentation view) and stored beside the decoded-image cache
(``cache.py``), with the same rules: one ``float32`` array ``(N, D)`` per key in a ``.npy``
(row ``i`` = row ``i`` of the image cache), memory-mapped read-only by every trial on the
node, a ``.json`` sidecar written last and atomically (its presence means complete), and
concurrent builders of one key serialised on a ``.lock`` (the first trial computes, the
others wait and read). The key hashes the backbone's identity (name, weights file by size
and mtime, input size, mean, std), the image cache's file name (itself a hash of every
image's path, size and mtime and the image size), the view, the augmentation of an
augmented view and the precision: change any of them and a fresh cache is built, never a
stale one read.

View 0 is the plain image; view ``k >= 1`` is the trial's augmentation (flip, rotate90,
crop, colour and stain jitter) drawn with seed ``k``: a fixed set of augmented copies
that a head trial samples from (``embed_views`` in the space), instead of augmenting
every epoch (which would need the backbone every epoch).
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from dala_search.data.augment import AugmentSpec, augment_normalized, to_normalized
from dala_search.data.augment_maps import IMAGENET_MEAN, IMAGENET_STD
from dala_search.data.cache import ImageCache, _fsync, _locked, _write_atomic
from dala_search.errors import DataError

if TYPE_CHECKING:
    from dala_search.config import TrialConfig
    from dala_search.model.foundation import FrozenBackbone

EMBEDDING_FORMAT = 1
# Backbone forward passes (batches) this process ran: tests count them to show reuse.
FORWARD_BATCHES = 0


def _precision(config: TrialConfig, device: torch.device) -> str:
    return "bf16" if device.type == "cuda" and config.amp else "fp32"


def embedding_key(
    backbone: FrozenBackbone,
    cache: ImageCache,
    view: int,
    config: TrialConfig,
    device: torch.device,
) -> str:
    """The file stem of one view's embeddings (see the module docstring for what it hashes)."""
    aug = repr(AugmentSpec.from_config(config)) if view else "plain"
    text = (
        f"dala-search embeddings v{EMBEDDING_FORMAT}\n{backbone.identity()}\n{cache.path.name}\n"
        f"view {view} {aug}\n{_precision(config, device)}"
    )
    return f"embeddings-{hashlib.sha256(text.encode()).hexdigest()[:16]}-v{view}"


def embedding_views(
    cache: ImageCache,
    backbone: FrozenBackbone,
    config: TrialConfig,
    device: torch.device,
    *,
    progress: bool = True,
) -> list[np.ndarray]:
    """Views 0..``config.embed_views`` of every cached image: read-only memmaps ``(N, D)``,
    computed (on ``device``, in batches, with a progress bar) where not cached yet."""
    folder = cache.path.parent
    out = []
    for view in range(config.embed_views + 1):
        npy = folder / f"{embedding_key(backbone, cache, view, config, device)}.npy"
        arr = _open_complete(npy, len(cache), backbone.num_features)
        if arr is None:
            with _locked(npy.with_suffix(".lock")):
                arr = _open_complete(npy, len(cache), backbone.num_features)
                if arr is None:  # nobody built it while we waited: we do
                    for stale in folder.glob(f".{npy.stem}.*.tmp"):
                        stale.unlink(missing_ok=True)
                    _build(npy, cache, backbone, config, device, view, progress)
                    arr = _open_complete(npy, len(cache), backbone.num_features)
        if arr is None:
            raise DataError(f"embedding cache {npy} could not be opened after it was built")
        out.append(arr)
    return out


def _open_complete(npy: Path, rows: int, dim: int) -> np.ndarray | None:
    """The array at ``npy`` when its sidecar says complete and the shape matches, else None."""
    sidecar = npy.with_suffix(".json")
    if not sidecar.is_file():
        return None
    try:
        meta = json.loads(sidecar.read_text())
        arr = np.load(npy, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if meta.get("format") != EMBEDDING_FORMAT or arr.shape != (rows, dim):
        return None
    return arr


@torch.no_grad()
def _build(
    npy: Path,
    cache: ImageCache,
    backbone: FrozenBackbone,
    config: TrialConfig,
    device: torch.device,
    view: int,
    progress: bool,
) -> None:
    """Run the backbone over every cached image in batches; publish atomically."""
    global FORWARD_BATCHES
    images = cache.images
    n, dim = len(cache), backbone.num_features
    model = backbone.to(device).eval()
    bs = 256 if device.type == "cuda" else 32
    use_amp = _precision(config, device) == "bf16"
    spec = AugmentSpec.from_config(config)
    gen = torch.Generator(device=device).manual_seed(view) if view else None
    # ImageNet-normalised batches (the augmentation's output) -> the backbone's own mean/std
    scale, shift = _renormalise(backbone, device)
    tmp = Path(tempfile.mkstemp(prefix=f".{npy.stem}.", suffix=".tmp", dir=npy.parent)[1])
    start = time.perf_counter()
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
        bar = tqdm(
            total=n, disable=not progress, file=sys.stderr, unit="img", desc=_desc(backbone, view)
        )
        with bar:
            for lo in range(0, n, bs):
                u8 = torch.from_numpy(np.array(images[lo : lo + bs])).to(device)  # a copy
                x = augment_normalized(u8, spec, gen) if view else to_normalized(u8)
                x = (x * scale + shift).contiguous()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    feats = model(x)
                FORWARD_BATCHES += 1
                out[lo : lo + len(u8)] = feats.float().cpu().numpy()
                bar.update(len(u8))
        if not np.isfinite(out).all():
            raise DataError(f"backbone {backbone.backbone!r} gave non-finite embeddings")
        out.flush()
        del out
        _fsync(tmp)
        tmp.chmod(0o644)
        tmp.replace(npy)
        meta = {
            "format": EMBEDDING_FORMAT,
            "backbone": backbone.identity(),
            "image_cache": str(cache.path),
            "view": view,
            "augmentation": repr(spec) if view else "none",
            "shape": [n, dim],
            "seconds": round(time.perf_counter() - start, 3),
            "device": str(device),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _write_atomic(npy.with_suffix(".json"), json.dumps(meta, indent=1))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _renormalise(
    backbone: FrozenBackbone, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with ``x * scale + shift`` = ImageNet-normalised -> backbone-normalised."""
    im_mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    im_std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    mean = torch.tensor(backbone.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std, device=device).view(1, 3, 1, 1)
    return im_std / std, (im_mean - mean) / std


def _desc(backbone: FrozenBackbone, view: int) -> str:
    return f"embed {backbone.backbone} " + (f"view {view}" if view else "plain")


def embedding_seconds(cache: ImageCache) -> float:
    """Seconds the embedding builds beside ``cache`` recorded in total (bench/fm_head.py)."""
    total = 0.0
    for sidecar in cache.path.parent.glob("embeddings-*.json"):
        meta = json.loads(sidecar.read_text())
        if meta.get("image_cache") == str(cache.path):
            total += float(meta.get("seconds", 0.0))
    return total
