"""The attention registry: every entry keeps shapes, passes gradients, and gates in (0, 1)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from dala_search.errors import ConfigError
from dala_search.model import attention
from dala_search.model.attention import (
    available_attention,
    create_attention,
    eca_kernel_size,
    register_attention,
)

NAMES = available_attention()
GATES = [n for n in NAMES if n != "none"]  # every real module scales x by a sigmoid gate


def test_registry_lists_the_documented_modules_sorted() -> None:
    assert NAMES == ("cbam", "eca", "none", "se", "simam")


@pytest.mark.parametrize("channels", [1, 8, 64, 256])
@pytest.mark.parametrize("name", NAMES)
def test_shape_kept_and_gradients_flow(name: str, channels: int) -> None:
    torch.manual_seed(0)
    module = create_attention(name, channels, reduction=4)
    x = torch.randn(3, channels, 5, 7, requires_grad=True)
    y = module(x)
    assert y.shape == x.shape
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for pname, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", GATES)
def test_gate_scales_each_value_into_0_1(name: str) -> None:
    # SE, ECA, CBAM and SimAM all multiply x by sigmoid gates: y/x lies strictly in (0, 1).
    torch.manual_seed(1)
    x = torch.randn(2, 32, 6, 6) + 0.1
    ratio = create_attention(name, 32)(x) / x
    assert ratio.min() > 0 and ratio.max() < 1


def test_none_is_identity() -> None:
    x = torch.randn(2, 16, 4, 4)
    module = create_attention("none", 16)
    assert isinstance(module, nn.Identity)
    assert torch.equal(module(x), x)
    assert list(module.parameters()) == []


def test_simam_matches_hand_computed_energy() -> None:
    # One 2x2 map [[0, 0], [0, 2]]: mu = 0.5, d = (x - mu)^2 = [.25, .25, .25, 2.25],
    # n = 3, sum(d) / n = 1, so 1/e* = d / (4 * (1 + 1e-4)) + 0.5.
    x = torch.tensor([[[[0.0, 0.0], [0.0, 2.0]]]])
    y = create_attention("simam", 1)(x)
    expected_last = 2.0 / (1 + math.exp(-(2.25 / (4 * 1.0001) + 0.5)))
    assert y[0, 0, 1, 1].item() == pytest.approx(expected_last, rel=1e-6)
    assert y[0, 0, 0, 0].item() == 0.0
    assert list(create_attention("simam", 1).parameters()) == []


def test_simam_on_a_1x1_map_is_finite() -> None:
    # Stage 4 of a 32 px image is 1x1: H*W - 1 = 0 must not divide by zero (gate = sigmoid(.5)).
    x = torch.randn(2, 8, 1, 1)
    y = create_attention("simam", 8)(x)
    assert torch.allclose(y, x * torch.sigmoid(torch.tensor(0.5)))


@pytest.mark.parametrize(
    ("channels", "k"), [(1, 1), (8, 3), (64, 3), (256, 5), (512, 5), (1024, 5), (2048, 7)]
)
def test_eca_kernel_size_follows_the_paper(channels: int, k: int) -> None:
    # k = |(log2 C + 1) / 2|_odd, e.g. C=2048: (11 + 1) / 2 = 6 -> 7; C=256: 4.5 -> 4 -> 5.
    assert eca_kernel_size(channels) == k
    module = create_attention("eca", channels)
    assert module.conv.kernel_size == (k,)
    assert sum(p.numel() for p in module.parameters()) == k


def test_eca_is_a_conv_across_channels() -> None:
    # With the conv weight set to [0, 1, 0] each channel's gate is sigmoid(its own mean).
    module = create_attention("eca", 8)
    with torch.no_grad():
        module.conv.weight.copy_(torch.tensor([[[0.0, 1.0, 0.0]]]))
    x = torch.randn(2, 8, 3, 3)
    expected = x * torch.sigmoid(x.mean(dim=(2, 3), keepdim=True))
    assert torch.allclose(module(x), expected, atol=1e-6)


def test_se_and_cbam_squeeze_by_reduction() -> None:
    se = create_attention("se", 256, reduction=16)
    assert (se.fc1.in_channels, se.fc1.out_channels, se.fc2.out_channels) == (256, 16, 256)
    cbam = create_attention("cbam", 256, reduction=8)
    assert cbam.mlp[0].out_channels == 32
    assert cbam.spatial.kernel_size == (7, 7) and cbam.spatial.in_channels == 2
    # Fewer channels than the reduction still leaves one hidden unit.
    assert create_attention("se", 8, reduction=16).fc1.out_channels == 1


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="'nope'.*cbam, eca, none, se, simam"):
        create_attention("nope", 64)


def test_bad_sizes_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="attention_reduction"):
        create_attention("se", 64, reduction=0)
    with pytest.raises(ConfigError, match="channels"):
        create_attention("eca", 0)


def test_register_adds_a_factory_and_refuses_duplicates(monkeypatch: pytest.MonkeyPatch) -> None:
    # A private copy of the registry, so other tests never see the test entry.
    monkeypatch.setattr(attention, "_REGISTRY", dict(attention._REGISTRY))

    @register_attention("half")
    def _half(channels: int, *, reduction: int = 16) -> nn.Module:
        return nn.Conv2d(channels, channels, 1)

    assert "half" in available_attention()
    assert create_attention("half", 4).in_channels == 4
    with pytest.raises(ValueError, match="already registered"):
        register_attention("eca")(_half)


def test_import_is_light_and_framework_free() -> None:
    # config.py imports the registry on every validation: no torchvision, no config (cycle),
    # and no ray/optuna/mlflow anywhere in the model package.
    code = (
        "import sys, dala_search.model.attention\n"
        "heavy = [m for m in ('torchvision', 'dala_search.config', 'ray', 'optuna', 'mlflow')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "import dala_search.model.dalaresnet\n"
        "bad = [m for m in ('ray', 'optuna', 'mlflow') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
