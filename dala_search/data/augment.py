"""Batched, per-sample augmentation on the trial's device.

Images arrive as uint8 NHWC straight from the decoded-image cache; augmentation is a few
tensor ops per batch (a GPU) or a few OpenCV calls per image on worker threads (a CPU), so
no DataLoader workers are needed. Histology has no canonical orientation, so flips and
90-degree turns are label-preserving; stain jitter follows Tellez et al. 2018 (perturb in
HED space).

Geometry, per sample: a random crop box (its side a fraction ``sqrt(a)`` of the image's,
``a`` uniform in ``[crop_scale, 1]``, placed uniformly inside the image) resized back to the
image size by bilinear interpolation (``F.interpolate``, ``antialias=True``), then a left-right
mirror and ``k`` quarter turns (``torch.rot90``). ``augment`` is the readable definition;
``augment_normalized`` (the training path) computes the same thing fast.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dala_search.data.augment_maps import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MIN_INTENSITY,
    NORMALIZED_HI,
    NORMALIZED_LO,
    ColourMaps,
    Geometry,
)

# Ruifrok & Johnston stain vectors (as in scikit-image's rgb_from_hed).
_RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float32
)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)

Rand = Callable[..., torch.Tensor]


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

    @classmethod
    def from_config(cls, config: Any) -> AugmentSpec:
        """The training augmentation a ``TrialConfig``'s keys ask for (training and the
        embedding cache's augmented views both build it here)."""
        return cls(
            flip=config.flip,
            rotate90=config.rotate90,
            crop_scale=config.crop_scale,
            color_jitter=config.color_jitter,
            stain_jitter=config.stain_jitter,
        )


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


def draw_geometry(
    n: int, h: int, w: int, spec: AugmentSpec, rand: Rand, device: torch.device
) -> Geometry:
    """Draw every sample's mirror, quarter turns and crop box (in this order).

    ``augment`` and ``augment_normalized`` draw with the same ``rand`` stream, so both
    paths see identical boxes. The box keeps an area fraction of at least ``crop_scale``
    (its sides are rounded up) and lies inside the image.
    """
    if spec.rotate90 and h != w:
        raise ValueError(f"quarter turns need square images, got {h}x{w}")
    zeros = torch.zeros(n, dtype=torch.int64, device=device)
    turns = (rand(n) * 4).floor().long().clamp_(max=3) if spec.rotate90 else zeros
    flip = (rand(n) < 0.5).long() if spec.flip else zeros
    if spec.crop_scale >= 1.0:
        full = torch.ones_like(zeros)
        return Geometry(turns, flip, zeros, zeros, full * h, full * w)
    side = (spec.crop_scale + (1.0 - spec.crop_scale) * rand(n)).sqrt()
    height = (side * h).ceil().long().clamp_(1, h)
    width = (side * w).ceil().long().clamp_(1, w)
    # rand() < 1, but rand() * (slack + 1) can round up to slack + 1 in float32
    top = torch.minimum((rand(n) * (h - height + 1)).floor().long(), h - height)
    left = torch.minimum((rand(n) * (w - width + 1)).floor().long(), w - width)
    return Geometry(turns, flip, top, left, height, width)


def augment(
    x: torch.Tensor, spec: AugmentSpec, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Augment a float NCHW batch in [0, 1]; every sample draws its own parameters.

    The readable definition of the augmentation (``augment_normalized`` must equal
    ``normalize(augment(to_float(u8)))``; tests check it). ``generator`` must live on ``x``'s
    device.
    """
    dev = x.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=dev)

    if spec.geometric:
        x = _geometric(x, draw_geometry(x.shape[0], x.shape[2], x.shape[3], spec, rand, dev))
    if spec.stain_jitter > 0:
        x = _stain_jitter(x, spec.stain_jitter, rand)
    if spec.color_jitter > 0:
        x = _color_jitter(x, spec.color_jitter, rand)
    return x.clamp_(0.0, 1.0)


def _geometric(x: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """Crop, resize back, mirror, turn: one sample at a time, as written in the module doc."""
    h, w = x.shape[2:]
    out = torch.empty_like(x)
    for i, (k, f, top, left, ch, cw) in enumerate(zip(*(t.tolist() for t in geo), strict=True)):
        img = x[i : i + 1, :, top : top + ch, left : left + cw]
        if (ch, cw) != (h, w):
            img = F.interpolate(img, size=(h, w), mode="bilinear", antialias=True)
        if f:
            img = img.flip(-1)
        out[i] = torch.rot90(img, k, (-2, -1))[0]
    return out


def _stain_jitter(x: torch.Tensor, sigma: float, rand: Rand) -> torch.Tensor:
    """Scale and shift each stain's optical density (haematoxylin, eosin, DAB)."""
    n = x.shape[0]
    dev, dt = x.device, x.dtype
    od = -torch.log(x.clamp(min=MIN_INTENSITY))  # optical density, NCHW
    hed = torch.einsum("nchw,cd->ndhw", od, _HED_FROM_RGB.to(dev, dt))
    alpha = 1 + (rand(n, 3) * 2 - 1) * sigma
    beta = (rand(n, 3) * 2 - 1) * sigma
    hed = hed * alpha.view(n, 3, 1, 1).to(dt) + beta.view(n, 3, 1, 1).to(dt)
    od = torch.einsum("ndhw,dc->nchw", hed, _RGB_FROM_HED.to(dev, dt))
    return torch.exp(-od)


def _color_jitter(x: torch.Tensor, amount: float, rand: Rand) -> torch.Tensor:
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
# over the batch. ``augment_normalized`` draws the same numbers in the same order and makes
#   on a GPU  one batched ``grid_sample`` for the geometry, then the colour step in planar
#             float (C, H*W): stain jitter is log, one 3x3 product per sample, exp
#             (od' = od @ H diag(alpha) R + beta @ R); colour jitter AND the ImageNet
#             normalisation are one more 3x3 product plus offset per sample; one clamp;
#   on a CPU  the same maps, one image at a time in OpenCV on uint8/float HWC: crop box view,
#             ``cv2.resize`` (bilinear, uint8), one ``flip`` and maybe one ``transpose``
#             for the mirror and turns, ``LUT`` (uint8 -> log, or -> float), ``transform``
#             (the 3x3 stain map plus bias), ``exp``, ``mean``, ``transform`` (colour and
#             normalisation) straight into the output, ``min``/``max`` (the clamp). Each is
#             one SIMD pass over a 224 px image that stays in the core's cache; worker
#             threads take images in turn, and the output is NHWC memory (channels_last
#             strides) in huge pages (all in ``augment_cpu.py``).
# What this gains over the torch-op CPU path: bench/README.md (`pipeline`).

_LOG_255 = math.log(255.0)


def to_normalized(batch_u8: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> ImageNet-normalised float NCHW (channels_last strides), no augmentation
    (validation and test batches)."""
    c = _constants(batch_u8.device)
    x = batch_u8.float().div_(255.0).sub_(c["mean"]).div_(c["std"])  # NHWC: channel is last
    return x.permute(0, 3, 1, 2)


def augment_normalized(
    batch_u8: torch.Tensor, spec: AugmentSpec, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``normalize(augment(to_float(batch_u8), spec, generator))``, fast.

    Every training batch. Input uint8 NHWC on the
    trial's device; output float (n, 3, H, W): on a GPU contiguous (``train`` converts it to
    channels_last where the model wants that), on a CPU with channels_last strides (OpenCV's
    interleaved layout; CPU convolutions take it as fast as NCHW or faster).
    ``generator`` must live on the same device: on a GPU nothing here copies to the host,
    so nothing synchronises. Equal to the readable definition up to float rounding (~1e-5),
    except that the CPU resize rounds to uint8 (within one 8-bit step, 1/255, before the
    colour maps) and the GPU resize interpolates in float (within float rounding).
    """
    if batch_u8.dtype != torch.uint8 or batch_u8.dim() != 4 or batch_u8.shape[-1] != 3:
        raise ValueError(
            "augment_normalized takes uint8 RGB images, NHWC with 3 channels; got "
            f"{batch_u8.dtype} of shape {tuple(batch_u8.shape)}"
        )
    n, h, w, _ = batch_u8.shape
    dev = batch_u8.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=dev)

    geo = draw_geometry(n, h, w, spec, rand, dev) if spec.geometric else None
    maps = _colour_maps(n, spec, rand, dev)
    if dev.type == "cpu":
        from dala_search.data.augment_cpu import augment_cpu  # OpenCV, imported on first use

        return augment_cpu(batch_u8, geo, maps)
    return _augment_batched(batch_u8, geo, maps)


def _augment_batched(
    batch_u8: torch.Tensor, geo: Geometry | None, maps: ColourMaps
) -> torch.Tensor:
    """The whole batch at once, nothing read back to the host: the GPU path."""
    n, h, w, _ = batch_u8.shape
    out = torch.empty(n, 3, h, w, device=batch_u8.device)
    if geo is not None:
        x = _geometry_grid(batch_u8, geo).reshape(n, 3, h * w)
    else:
        x = batch_u8.permute(0, 3, 1, 2).reshape(n, 3, h * w).float()
    scratch = torch.empty_like(x) if maps.stain_mix is not None else x
    _colour_normalize(x, maps, out.view(n, 3, h * w), scratch)
    return out


def _geometry_grid(batch_u8: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """The same crop, resize, mirror and turns as one ``grid_sample`` (the GPU path).

    Float NCHW out, values 0..255. The CPU path needs the boxes on the host (Python ints for
    slicing); on a GPU that read would synchronise the stream on every batch, so here the
    boxes stay device tensors and each output pixel's source position is computed directly:
    undo the turns, then the mirror, then map the resized crop's pixel centre into the crop
    (``align_corners=False``, clamped to the crop's edge pixels as ``interpolate`` does).
    For upscaling, ``antialias=True`` bilinear is plain bilinear, so the two paths agree to
    float rounding (plus the CPU path's rounding to uint8); tests check it on the CPU.
    """
    n, h, w, _ = batch_u8.shape
    dev = batch_u8.device
    i = torch.arange(h, device=dev, dtype=torch.float32).view(1, h, 1)
    j = torch.arange(w, device=dev, dtype=torch.float32).view(1, 1, w)
    k = geo.turns.view(n, 1, 1)
    # rot90 by k: out[i, j] = in[j, w-1-i] (k=1), in[h-1-i, w-1-j] (k=2), in[h-1-j, i] (k=3)
    a = torch.where(k == 0, i, torch.where(k == 1, j, torch.where(k == 2, h - 1 - i, h - 1 - j)))
    b = torch.where(k == 0, j, torch.where(k == 1, w - 1 - i, torch.where(k == 2, w - 1 - j, i)))
    b = torch.where(geo.flip.view(n, 1, 1) == 1, w - 1 - b, b)

    def source(pos: torch.Tensor, start: torch.Tensor, size: torch.Tensor, out: int):
        size = size.view(n, 1, 1).float()
        p = ((pos + 0.5) * size / out - 0.5).clamp(min=0.0)
        return torch.minimum(p, size - 1) + start.view(n, 1, 1).float()

    sy = source(a, geo.top, geo.height, h)
    sx = source(b, geo.left, geo.width, w)
    grid = torch.stack(((sx + 0.5) * (2.0 / w) - 1, (sy + 0.5) * (2.0 / h) - 1), dim=-1)
    x = batch_u8.permute(0, 3, 1, 2).float()
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _colour_maps(n: int, spec: AugmentSpec, rand: Rand, dev: torch.device) -> ColourMaps:
    """Draw stain then colour factors (the readable path's order) and fold them into maps."""
    c = _constants(dev)
    std = c["std"]
    mix = bias = mean_gain = None
    scale = 1.0 / 255.0  # the input's 0..255 scale, folded into the first linear map
    if spec.stain_jitter > 0:
        s = spec.stain_jitter
        alpha = 1 + (rand(n, 3) * 2 - 1) * s
        beta = (rand(n, 3) * 2 - 1) * s
        # od = -log(x / 255); od' = od @ M + beta @ R with M = H diag(alpha) R (one 3x3);
        # log of the output: -od' = log(x) @ M - (log(255) 1 @ M + beta @ R).
        rows = (c["hed_from_rgb"].unsqueeze(0) * alpha.unsqueeze(1)) @ c["rgb_from_hed"]
        bias = -(_LOG_255 * rows.sum(dim=1) + beta @ c["rgb_from_hed"]).unsqueeze(2)
        mix = rows.transpose(1, 2).contiguous()  # planar: out = mix @ in
        scale = 1.0
    if spec.color_jitter > 0:
        a = spec.color_jitter
        fb, fc, fs = ((1 + (rand(n) * 2 - 1) * a) for _ in range(3))  # same order as above
        # brightness, contrast (about the image mean), saturation (about the luma) are one
        # affine map: x @ A + (1 - fc) * mean(fb * x), A = fc fb (fs I + (1 - fs) gray 1^T).
        sat = fs.view(n, 1, 1) * c["eye"] + (1 - fs).view(n, 1, 1) * c["gray"].view(1, 3, 1)
        rows = sat * (fc * fb * scale).view(n, 1, 1)
        mean_gain = ((1 - fc) * fb * scale).view(n, 1, 1) / std.view(1, 3, 1)
    else:
        rows = (c["eye"] * scale).expand(n, 3, 3)
    colour = (rows / std).transpose(1, 2).contiguous()  # normalised: column c divided by std_c
    offset = (-c["mean"] / std).view(1, 3, 1).expand(n, 3, 1)
    return ColourMaps(mix, bias, colour, offset, mean_gain)


def _colour_normalize(
    x: torch.Tensor, maps: ColourMaps, out: torch.Tensor, scratch: torch.Tensor
) -> torch.Tensor:
    """Stain and colour jitter, normalisation and clamp of planar (n, 3, H*W) 0..255 floats.

    ``x`` is overwritten; ``scratch`` (x's shape) takes the stained image; the result is
    written to ``out``.
    """
    if maps.stain_mix is not None:
        log_x = x.clamp_(min=255.0 * MIN_INTENSITY).log_()
        x = torch.baddbmm(maps.stain_bias, maps.stain_mix, log_x, out=scratch).exp_()
    offset = maps.offset
    if maps.mean_gain is not None:  # contrast pivots about the image's mean
        offset = torch.addcmul(offset, x.mean(dim=(1, 2)).view(-1, 1, 1), maps.mean_gain)
    torch.baddbmm(offset, maps.colour, x, out=out)
    for ch in range(3):  # scalar bounds per plane: ~10x cheaper than tensor bounds
        out[:, ch].clamp_(NORMALIZED_LO[ch], NORMALIZED_HI[ch])
    return out
