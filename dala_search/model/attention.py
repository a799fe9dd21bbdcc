"""Registry of lightweight attention modules, built timm-style by ``create_attention(name, C)``.

Every factory takes the channel count as its first positional argument and a keyword-only
``reduction`` (used by the modules that squeeze channels, ignored by the others), and returns
an ``nn.Module`` that maps ``(N, C, H, W)`` to a tensor of the same shape. ``dalaresnet.py``
inserts them into the ResNet50 stages; ``config.py`` validates the ``attention`` key against
``available_attention()``.

This module is imported by config validation, so it stays import-light: torch only (needed
for the module classes), torchvision is imported inside the SE factory, and it never imports
``dala_search.config`` (that would be a cycle).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from dala_search.errors import ConfigError

AttentionFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, AttentionFactory] = {}


def register_attention(name: str) -> Callable[[AttentionFactory], AttentionFactory]:
    """Decorator adding a factory ``(channels: int, *, reduction: int) -> nn.Module``.

    Called at import time below (and by anyone adding a module); a name registered twice is
    a programming error, not a user error, hence ValueError.
    """

    def decorate(factory: AttentionFactory) -> AttentionFactory:
        if name in _REGISTRY:
            raise ValueError(f"attention {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorate


def available_attention() -> tuple[str, ...]:
    """Sorted registered names (``"none"`` included); config validation and tests call it."""
    return tuple(sorted(_REGISTRY))


def create_attention(name: str, channels: int, *, reduction: int = 16) -> nn.Module:
    """Build attention ``name`` for ``channels`` channels; ``dalaresnet.py`` calls it.

    Raises ConfigError for an unknown name (listing the valid ones) or a bad size.
    """
    if name not in _REGISTRY:
        raise ConfigError(
            f"attention {name!r} is unknown; valid: {', '.join(available_attention())}"
        )
    if channels < 1:
        raise ConfigError(f"attention {name!r}: channels must be >= 1, got {channels}")
    if reduction < 1:
        raise ConfigError(f"key 'attention_reduction': must be >= 1, got {reduction}")
    return _REGISTRY[name](channels, reduction=reduction)


def _squeezed(channels: int, reduction: int) -> int:
    # Hidden width of a squeeze MLP; at least one unit so tiny channel counts still work.
    return max(1, channels // reduction)


@register_attention("none")
def _none(channels: int, *, reduction: int = 16) -> nn.Module:
    """No attention: the plain ResNet50 (the model builder inserts nothing for it)."""
    return nn.Identity()


@register_attention("se")
def _se(channels: int, *, reduction: int = 16) -> nn.Module:
    """Squeeze-and-Excitation (Hu, Shen, Sun, CVPR 2018, arXiv:1709.01507).

    Global average pool -> FC(C/r) -> ReLU -> FC(C) -> sigmoid, scaling each channel.
    torchvision's implementation (1x1 convs as the FCs) is used as is.
    """
    # Imported here: torchvision costs ~1.5 s to import and config validation imports us.
    from torchvision.ops import SqueezeExcitation

    return SqueezeExcitation(channels, _squeezed(channels, reduction))


class ECA(nn.Module):
    """Efficient Channel Attention (Wang et al., CVPR 2020, arXiv:1910.03151).

    Global average pool, then a 1D convolution across the channel axis (no dimensionality
    reduction) with an adaptive odd kernel size k = |(log2(C) + b) / gamma|_odd, gamma=2, b=1
    (the paper's eq. 12 and its reference code), then sigmoid, scaling each channel.
    """

    def __init__(self, channels: int, *, gamma: int = 2, b: int = 1) -> None:
        super().__init__()
        self.kernel_size = eca_kernel_size(channels, gamma=gamma, b=b)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(
            1, 1, self.kernel_size, padding=(self.kernel_size - 1) // 2, bias=False
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.pool(x)  # (N, C, 1, 1)
        # Channels become the 1D sequence: (N, 1, C) -> conv -> back to (N, C, 1, 1).
        y = self.conv(y.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        return x * torch.sigmoid(y)


def eca_kernel_size(channels: int, *, gamma: int = 2, b: int = 1) -> int:
    """ECA's adaptive kernel size: nearest odd number at or above |(log2 C + b) / gamma|."""
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


@register_attention("eca")
def _eca(channels: int, *, reduction: int = 16) -> nn.Module:
    """ECA (no reduction: ``reduction`` is ignored by design of the module)."""
    return ECA(channels)


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al., ECCV 2018, arXiv:1807.06521).

    Channel attention first: a shared MLP (C -> C/r -> C) on the average- and max-pooled
    descriptors, summed, sigmoid. Then spatial attention: a 7x7 convolution over the
    channel-wise average and max maps, sigmoid. We follow the paper's equations (conv with
    bias, no BatchNorm in the spatial branch; the reference code adds a BN there).
    """

    def __init__(self, channels: int, *, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        hidden = _squeezed(channels, reduction)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
        )
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        avg = x.mean(dim=(2, 3), keepdim=True)
        mx = x.amax(dim=(2, 3), keepdim=True)
        x = x * torch.sigmoid(self.mlp(avg) + self.mlp(mx))
        maps = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(maps))


@register_attention("cbam")
def _cbam(channels: int, *, reduction: int = 16) -> nn.Module:
    """CBAM with channel reduction ``reduction`` and a 7x7 spatial kernel (the paper's)."""
    return CBAM(channels, reduction=reduction)


class SimAM(nn.Module):
    """Parameter-free SimAM (Yang, Zhang, Li, Xie, ICML 2021).

    Each neuron's weight is sigmoid of its inverse minimal energy,
    1/e* = (x - mu)^2 / (4 (sigma^2 + lambda)) + 0.5, with mu and sigma^2 = sum (x - mu)^2 / n
    taken per channel over the H x W map, n = H*W - 1 (the reference code), lambda = 1e-4.
    """

    def __init__(self, e_lambda: float = 1e-4) -> None:
        super().__init__()
        self.e_lambda = e_lambda

    def forward(self, x: Tensor) -> Tensor:
        # n = H*W - 1 is 0 on a 1x1 map (stage 4 of a small image): there every d is 0, so
        # clamping n to 1 keeps the gate at sigmoid(0.5) instead of 0/0 = NaN.
        n = max(x.shape[2] * x.shape[3] - 1, 1)
        d = (x - x.mean(dim=(2, 3), keepdim=True)).pow(2)
        inv_energy = d / (4 * (d.sum(dim=(2, 3), keepdim=True) / n + self.e_lambda)) + 0.5
        return x * torch.sigmoid(inv_energy)

    def extra_repr(self) -> str:
        return f"e_lambda={self.e_lambda}"


@register_attention("simam")
def _simam(channels: int, *, reduction: int = 16) -> nn.Module:
    """SimAM (no parameters: ``channels`` and ``reduction`` are not needed)."""
    return SimAM()
