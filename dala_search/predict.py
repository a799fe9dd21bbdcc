"""Apply a trained model to new images: decode, resize, normalise, softmax (optionally TTA).

Used by the MLflow pyfunc (``pyfunc_model.py``: what ``mlflow models serve`` answers with)
and by ``dala-search predict`` (``cli/predict.py``), so both give the same numbers. Every
step is the one training and evaluation use: ``data.cache.decode_image`` (the cache's
decode and Lanczos squash to S x S), ``data.augment.to_normalized`` (the ImageNet
normalisation of the validation and test batches) and bf16 autocast on CUDA when the
training config had ``amp`` (``train_steps.predict``).

Preprocessing contract: a model whose ``nn.Module`` (or, for a cross-validated ensemble, its
first member) has an attribute ``preprocess = {"size": int, "mean": [3], "std": [3]}``
(a foundation-model backbone with its own statistics) is fed that; any other model gets the
training config's ``image_size`` and the ImageNet statistics DALAResNet50 trains with.

No MLflow here (the pyfunc wrapper imports it) and no Ray.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

from dala_search.data.augment import to_normalized
from dala_search.data.augment_maps import IMAGENET_MEAN, IMAGENET_STD
from dala_search.data.breakhis import CLASSES, SUBTYPE_CODES
from dala_search.data.cache import decode_image
from dala_search.errors import DalaError

# Test-time augmentation: the 8 symmetries of the square (4 quarter turns, each also
# mirrored). Tissue under the microscope has no up or left, and training draws flips and
# quarter turns (config ``flip``/``rotate90``), so each view is an image the model has seen.
TTA_VIEWS = 8


@dataclass(frozen=True)
class Preprocess:
    """What a model's input must be: S x S RGB, ``(x / 255 - mean) / std``."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "preprocess") -> Preprocess:
        try:
            size, mean, std = int(d["size"]), d["mean"], d["std"]
            mean_t = tuple(float(v) for v in mean)
            std_t = tuple(float(v) for v in std)
        except (KeyError, TypeError, ValueError) as e:
            raise DalaError(
                f"{source}: expected {{'size': int, 'mean': [3 floats], 'std': [3 floats]}}, "
                f"got {dict(d)!r} ({type(e).__name__}: {e})"
            ) from None
        if len(mean_t) != 3 or len(std_t) != 3 or size < 1 or min(std_t) <= 0:
            raise DalaError(f"{source}: size >= 1, 3 means and 3 positive stds; got {dict(d)!r}")
        return cls(size, mean_t, std_t)  # type: ignore[arg-type]


def preprocessing_of(model: nn.Module, image_size: int) -> Preprocess:
    """The model's own ``preprocess`` attribute (see the module docstring), else DALAResNet50's
    training preprocessing at the config's ``image_size``."""
    members = getattr(model, "members", None)
    owner = members[0] if members is not None and len(members) else model
    own = getattr(model, "preprocess", None) or getattr(owner, "preprocess", None)
    if own is not None:
        return Preprocess.from_dict(own, f"{type(owner).__name__}.preprocess")
    return Preprocess(int(image_size), IMAGENET_MEAN, IMAGENET_STD)  # type: ignore[arg-type]


def class_names(task: str) -> tuple[str, ...]:
    """The model's outputs in order: benign/malignant, or the 8 subtype codes."""
    names = {"binary": CLASSES, "subtype": SUBTYPE_CODES}
    if task not in names:
        raise DalaError(f"task {task!r} has no class names; valid: {', '.join(names)}")
    return names[task]


def decode(source: str | Path | bytes | BinaryIO, pre: Preprocess) -> np.ndarray:
    """One image (path, file or PNG/JPEG bytes) as the cache stores it: uint8 (S, S, 3)."""
    if isinstance(source, bytes | bytearray):
        source = io.BytesIO(source)
    return decode_image(source, pre.size)


def normalized(batch_u8: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 NHWC -> normalised float NCHW: evaluation's ``to_normalized`` for the ImageNet
    statistics, the same arithmetic with the model's own statistics otherwise."""
    if pre.mean == tuple(IMAGENET_MEAN) and pre.std == tuple(IMAGENET_STD):
        return to_normalized(batch_u8)
    mean = torch.tensor(pre.mean, device=batch_u8.device)
    std = torch.tensor(pre.std, device=batch_u8.device)
    return batch_u8.float().div_(255.0).sub_(mean).div_(std).permute(0, 3, 1, 2)


def tta_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The ``TTA_VIEWS`` dihedral views of an NCHW batch (identity first)."""
    turns = [torch.rot90(x, k, dims=(2, 3)) for k in range(4)]
    return turns + [torch.flip(t, dims=(3,)) for t in turns]


@torch.no_grad()
def probabilities(
    model: nn.Module,
    images: np.ndarray,
    pre: Preprocess,
    *,
    device: torch.device,
    batch_size: int = 64,
    tta: bool = False,
    amp: bool = False,
) -> np.ndarray:
    """Softmax probabilities (N, classes) of uint8 ``images`` (N, S, S, 3); with ``tta`` the
    mean over the ``TTA_VIEWS`` views. ``amp``: bf16 autocast on CUDA, as evaluation runs a
    model trained with ``amp``. ``model`` must already be on ``device``."""
    if images.ndim != 4 or images.shape[1:] != (pre.size, pre.size, 3):
        raise DalaError(f"images of shape {images.shape}; the model takes (N, {pre.size}, ...)")
    model.eval()
    use_amp = amp and device.type == "cuda"
    out = []
    for lo in range(0, len(images), max(1, batch_size)):
        u8 = torch.from_numpy(np.ascontiguousarray(images[lo : lo + batch_size])).to(device)
        x = normalized(u8, pre)
        total = None
        for view in tta_views(x) if tta else [x]:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = model(view.contiguous())
            p = torch.softmax(logits.float(), dim=1)
            total = p if total is None else total + p
        out.append(total / (TTA_VIEWS if tta else 1))
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(out).cpu().numpy()


def prediction_rows(probs: np.ndarray, names: Sequence[str]) -> dict[str, list[Any]]:
    """Columns ``prob_<class>`` per class and ``predicted`` (the argmax's name)."""
    if probs.ndim != 2 or probs.shape[1] != len(names):
        raise DalaError(f"{probs.shape} probabilities for the {len(names)} classes {names}")
    cols: dict[str, list[Any]] = {f"prob_{n}": probs[:, i].tolist() for i, n in enumerate(names)}
    cols["predicted"] = [names[i] for i in probs.argmax(axis=1)]
    return cols
