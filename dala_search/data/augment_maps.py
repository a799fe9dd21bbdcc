"""What one batch's augmentation draws, handed from ``augment`` (which draws them) to
either execution path (the batched tensor path in ``augment``, OpenCV in ``augment_cpu``):
the geometry per sample, the colour maps per sample, and the constants both paths share.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_INTENSITY = 1e-6  # optical density is -log(intensity): keep black pixels finite
# clamping to [0, 1] and then normalising == normalising then clamping to these bounds
NORMALIZED_LO = [(0.0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
NORMALIZED_HI = [(1.0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]


class Geometry(NamedTuple):
    """Per-sample geometric draws, int64 tensors of shape (n,) on the batch's device."""

    turns: torch.Tensor  # quarter turns 0..3 (``torch.rot90`` over H, W), after the mirror
    flip: torch.Tensor  # 1: mirror left-right first
    top: torch.Tensor  # crop box: rows top..top+height-1, columns left..left+width-1
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor


class ColourMaps(NamedTuple):
    """Per-sample maps of the colour step, (n, ...) tensors on the batch's device."""

    stain_mix: torch.Tensor | None  # (n, 3, 3): log-intensity in -> stained log-intensity
    stain_bias: torch.Tensor | None  # (n, 3, 1)
    colour: torch.Tensor  # (n, 3, 3): intensity -> normalised value (planar, out = M @ in)
    offset: torch.Tensor  # (n, 3, 1): -mean / std, the normalisation's shift
    mean_gain: torch.Tensor | None  # (n, 3, 1): (1 - fc) fb / std, times the image's mean
