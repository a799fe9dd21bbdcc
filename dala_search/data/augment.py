"""Batched, per-sample augmentation on the trial's device.

Images arrive as uint8 NHWC straight from the decoded-image cache; everything below is a
few tensor ops over the whole batch, so a GPU does it in microseconds and no DataLoader
workers are needed. Histology has no canonical orientation, so flips and 90-degree turns
are label-preserving; stain jitter follows Tellez et al. 2018 (perturb in HED space).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Ruifrok & Johnston stain vectors (as in scikit-image's rgb_from_hed).
_RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float32
)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


@dataclass(frozen=True)
class AugmentSpec:
    """What ``augment`` does; built from a TrialConfig by ``train.py``."""

    flip: bool = True
    rotate90: bool = True
    crop_scale: float = 1.0  # smallest area fraction kept by a random crop
    color_jitter: float = 0.0
    stain_jitter: float = 0.0

    @property
    def geometric(self) -> bool:
        return self.flip or self.rotate90 or self.crop_scale < 1.0


def to_float(batch_u8: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1]."""
    return batch_u8.permute(0, 3, 1, 2).float().div_(255.0)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation (the backbone's pretraining statistics)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def augment(
    x: torch.Tensor, spec: AugmentSpec, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Augment a float NCHW batch in [0, 1]; every sample draws its own parameters.

    ``generator`` must live on ``x``'s device: drawing there keeps the GPU loop free of
    host-device copies (and so of synchronisation).
    """
    dev = x.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=dev)

    if spec.geometric:
        x = _geometric(x, spec, rand)
    if spec.stain_jitter > 0:
        x = _stain_jitter(x, spec.stain_jitter, rand)
    if spec.color_jitter > 0:
        x = _color_jitter(x, spec.color_jitter, rand)
    return x.clamp_(0.0, 1.0)


def _geometric(x: torch.Tensor, spec: AugmentSpec, rand) -> torch.Tensor:  # noqa: ANN001
    """Flip, quarter turn and random crop folded into one affine grid per sample."""
    n = x.shape[0]
    dev, dt = x.device, x.dtype
    k = (rand(n) * 4).floor() if spec.rotate90 else torch.zeros(n, device=dev)
    angle = k * (torch.pi / 2)
    cos, sin = torch.cos(angle).round(), torch.sin(angle).round()  # exact quarter turns
    flip = torch.where(rand(n) < 0.5, -1.0, 1.0) if spec.flip else torch.ones(n, device=dev)
    area = spec.crop_scale + (1.0 - spec.crop_scale) * rand(n)
    side = area.sqrt()  # fraction of the side kept
    tx = (rand(n) * 2 - 1) * (1 - side)
    ty = (rand(n) * 2 - 1) * (1 - side)
    theta = torch.zeros(n, 2, 3, device=dev, dtype=dt)
    theta[:, 0, 0] = side * cos * flip
    theta[:, 0, 1] = -side * sin
    theta[:, 1, 0] = side * sin * flip
    theta[:, 1, 1] = side * cos
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _stain_jitter(x: torch.Tensor, sigma: float, rand) -> torch.Tensor:  # noqa: ANN001
    """Scale and shift each stain's optical density (haematoxylin, eosin, DAB)."""
    n = x.shape[0]
    dev, dt = x.device, x.dtype
    od = -torch.log(x.clamp(min=1e-6))  # optical density, NCHW
    hed = torch.einsum("nchw,cd->ndhw", od, _HED_FROM_RGB.to(dev, dt))
    alpha = 1 + (rand(n, 3) * 2 - 1) * sigma
    beta = (rand(n, 3) * 2 - 1) * sigma
    hed = hed * alpha.view(n, 3, 1, 1).to(dt) + beta.view(n, 3, 1, 1).to(dt)
    od = torch.einsum("ndhw,dc->nchw", hed, _RGB_FROM_HED.to(dev, dt))
    return torch.exp(-od)


def _color_jitter(x: torch.Tensor, amount: float, rand) -> torch.Tensor:  # noqa: ANN001
    """Brightness, contrast and saturation, one factor each per sample."""
    n = x.shape[0]
    dt = x.dtype

    def factor() -> torch.Tensor:
        return (1 + (rand(n) * 2 - 1) * amount).view(n, 1, 1, 1).to(dt)

    x = x * factor()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * factor() + mean
    gray = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    return (x - gray) * factor() + gray
