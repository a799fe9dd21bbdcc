"""Batched, per-sample augmentation on the trial's device.

Images arrive as uint8 NHWC straight from the decoded-image cache; everything below is a
few tensor ops over the whole batch, so a GPU does it in microseconds and no DataLoader
workers are needed. Histology has no canonical orientation, so flips and 90-degree turns
are label-preserving; stain jitter follows Tellez et al. 2018 (perturb in HED space).
"""

from __future__ import annotations

import functools
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


_GRAY = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32)  # luma weights, sum to 1


@functools.lru_cache(maxsize=16)
def _constants(device: torch.device) -> dict[str, torch.Tensor]:
    """The fixed tensors of the fused path, copied to ``device`` once.

    Building them per batch (``torch.tensor(..., device="cuda")``) is a host-to-device
    copy from pageable memory, which synchronises the stream on every batch.
    """
    cpu = {
        "mean": torch.tensor(IMAGENET_MEAN, dtype=torch.float32),
        "std": torch.tensor(IMAGENET_STD, dtype=torch.float32),
        "hed_from_rgb": _HED_FROM_RGB,
        "rgb_from_hed": _RGB_FROM_HED,
        "gray": _GRAY,
        "eye": torch.eye(3),
    }
    return {k: v.to(device) for k, v in cpu.items()}


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


# ----- the training path: uint8 in, augmented and normalised float out, in few passes ------
#
# ``normalize(augment(to_float(u8)))`` above is the readable definition; it makes ~20 passes
# over the batch. The functions below compute the same thing (same random draws in the same
# order, equal to ~1e-5; ``tests/test_augment.py`` checks it) in ~8, which is what a CPU
# trial can afford: stain jitter is one 3x3 matrix per sample in optical-density space,
# colour jitter and normalisation are one affine map per sample plus a per-channel clamp,
# the affine grid is built by broadcasting, and everything stays channels_last (one
# contiguous RGB triple per pixel), where ``grid_sample`` and the 3x3 products are fastest.


def to_normalized(batch_u8: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> ImageNet-normalised float NCHW (channels_last strides), no augmentation.

    Called by ``train.predict`` for validation and test batches.
    """
    c = _constants(batch_u8.device)
    x = batch_u8.float().div_(255.0).sub_(c["mean"]).div_(c["std"])  # NHWC: channel is last
    return x.permute(0, 3, 1, 2)


def augment_normalized(
    batch_u8: torch.Tensor, spec: AugmentSpec, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``normalize(augment(to_float(batch_u8), spec, generator))`` in a few fused passes.

    Called by ``train.train_one_epoch`` for every training batch. Input uint8 NHWC on the
    trial's device; output float NCHW with channels_last strides. ``generator`` must live on
    the same device (no host-device copies, so no synchronisation on a GPU).
    """
    n, h, w, _ = batch_u8.shape
    dev = batch_u8.device
    c = _constants(dev)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=dev)

    x = batch_u8.permute(0, 3, 1, 2).float()  # 0..255, channels_last strides
    if spec.geometric:
        x = _geometric_fast(x, spec, rand)
    pix = x.permute(0, 2, 3, 1).reshape(n, h * w, 3)  # a view when x is channels_last
    scale = 1.0 / 255.0  # folded into the first linear step below
    if spec.stain_jitter > 0:
        s = spec.stain_jitter
        alpha = 1 + (rand(n, 3) * 2 - 1) * s
        beta = (rand(n, 3) * 2 - 1) * s
        # od' = od @ (H diag(alpha) R) + beta @ R with od = -log(x): one 3x3 per sample.
        mix = (c["hed_from_rgb"].unsqueeze(0) * alpha.unsqueeze(1)) @ c["rgb_from_hed"]
        shift = (beta @ c["rgb_from_hed"]).unsqueeze(1)
        log_x = pix.mul(scale).clamp_(min=1e-6).log_()
        pix = torch.baddbmm(-shift, log_x, mix).exp_()  # exp(-od')
        scale = 1.0
    std = c["std"]
    if spec.color_jitter > 0:
        a = spec.color_jitter
        fb, fc, fs = ((1 + (rand(n) * 2 - 1) * a) for _ in range(3))  # same order as above
        # brightness, contrast (about the image mean), saturation (about the luma) are one
        # affine map: x @ A + (1 - fc) * mean(fb * x), A = fc fb (fs I + (1 - fs) gray 1^T).
        mean = pix.mean(dim=(1, 2)) * scale * fb
        sat = fs.view(n, 1, 1) * c["eye"] + (1 - fs).view(n, 1, 1) * c["gray"].view(1, 3, 1)
        mat = sat * (fc * fb * scale).view(n, 1, 1)
        offset = ((1 - fc) * mean).view(n, 1, 1).expand(n, 1, 3)
        pix = torch.baddbmm(offset, pix, mat)
    elif scale != 1.0:
        pix = pix.mul(scale)
    # clamp to [0, 1] then normalise == normalise then clamp to the normalised bounds
    lo, hi = (0 - c["mean"]) / std, (1 - c["mean"]) / std
    pix = pix.sub_(c["mean"]).div_(std).clamp_(min=lo, max=hi)  # pix is our own buffer
    return pix.view(n, h, w, 3).permute(0, 3, 1, 2)


def _geometric_fast(x: torch.Tensor, spec: AugmentSpec, rand) -> torch.Tensor:  # noqa: ANN001
    """``_geometric`` with the grid built by broadcasting (``affine_grid`` is a batched
    matmul over a (N, H*W, 3) base grid, slower than the sampling itself on a CPU)."""
    n, _, h, w = x.shape
    dev = x.device
    k = (rand(n) * 4).floor() if spec.rotate90 else torch.zeros(n, device=dev)
    angle = k * (torch.pi / 2)
    cos, sin = torch.cos(angle).round(), torch.sin(angle).round()  # exact quarter turns
    flip = torch.where(rand(n) < 0.5, -1.0, 1.0) if spec.flip else torch.ones(n, device=dev)
    area = spec.crop_scale + (1.0 - spec.crop_scale) * rand(n)
    side = area.sqrt()
    tx = (rand(n) * 2 - 1) * (1 - side)
    ty = (rand(n) * 2 - 1) * (1 - side)
    # pixel centres in [-1, 1] (align_corners=False), as affine_grid places them
    u = ((torch.arange(w, device=dev, dtype=torch.float32) * 2 + 1) / w - 1).view(1, 1, w)
    v = ((torch.arange(h, device=dev, dtype=torch.float32) * 2 + 1) / h - 1).view(1, h, 1)

    def col(t: torch.Tensor) -> torch.Tensor:
        return t.view(n, 1, 1)

    grid = torch.empty(n, h, w, 2, device=dev)
    grid[..., 0] = col(side * cos * flip) * u + col(-side * sin) * v + col(tx)
    grid[..., 1] = col(side * sin * flip) * u + col(side * cos) * v + col(ty)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
