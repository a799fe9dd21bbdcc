"""Loss registry: hand-computed weights and focal values, and every entry parametrized."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dala_search.config import LOSS_WEIGHTINGS
from dala_search.errors import ConfigError, DataError
from dala_search.losses import (
    FocalLoss,
    available_losses,
    available_weightings,
    class_weights,
    create_loss,
)


def _close(t: torch.Tensor | None, expected: list[float], tol: float = 1e-4) -> None:
    assert t is not None
    assert t.dtype == torch.float32
    assert t.tolist() == pytest.approx(expected, abs=tol)


# ---------------------------------------------------------------------------
# class weights worked out by hand
# ---------------------------------------------------------------------------


def test_inverse_frequency_by_hand() -> None:
    # n_total / (n_classes * n_c): 100 / (2 * 30) = 1.6667, 100 / (2 * 70) = 0.7143
    _close(class_weights("inverse_frequency", [30, 70]), [1.666667, 0.714286])


def test_effective_number_by_hand_beta_09() -> None:
    # raw w_c = (1 - 0.9) / (1 - 0.9**n_c):
    #   0.9**30 = 0.042391158 -> 0.1 / 0.957608842 = 0.104426782
    #   0.9**70 = 0.000626579 -> 0.1 / 0.999373421 = 0.100062697
    # normalised to sum 2: 2 * 0.104426782 / 0.204489479 = 1.021341, the rest 0.978659
    w = class_weights("effective_number", [30, 70], beta=0.9)
    _close(w, [1.021341, 0.978659])
    assert float(w.sum()) == pytest.approx(2.0)


def test_effective_number_exact_fractions() -> None:
    # beta = 0.5, counts [2, 8]: raw (0.5 / 0.75, 0.5 / (1 - 1/256)) = (2/3, 128/255);
    # sum 894/765; scaled to sum 2: (2/3) * 2 * 765/894 = 510/447, (128/255) * ... = 384/447
    _close(class_weights("effective_number", [2, 8], beta=0.5), [510 / 447, 384 / 447], 1e-6)


def test_effective_number_limits_of_beta() -> None:
    # Cui et al.: beta = 0 is no re-weighting; beta -> 1 approaches inverse frequency.
    _close(class_weights("effective_number", [30, 70], beta=0.0), [1.0, 1.0], 1e-6)
    w = class_weights("effective_number", [30, 70], beta=0.99999)
    assert float(w[0] / w[1]) == pytest.approx(70 / 30, rel=1e-3)


def test_none_has_no_weights() -> None:
    assert class_weights("none", [30, 70]) is None


@pytest.mark.parametrize("strategy", ["inverse_frequency", "effective_number"])
def test_empty_class_counts_as_one_image(strategy: str) -> None:
    # Decision: a class with no images is weighted as if it had one: finite, and the largest.
    w = class_weights(strategy, [0, 10, 30], beta=0.9)
    assert torch.isfinite(w).all()
    assert w.tolist() == pytest.approx(class_weights(strategy, [1, 10, 30], beta=0.9).tolist())
    assert w[0] > w[1] > w[2]
    if strategy == "inverse_frequency":
        # 41 images counted (one for the empty class): 41/(3*1), 41/(3*10), 41/(3*30)
        _close(w, [13.666667, 1.366667, 0.455556])


def test_bad_counts_and_names() -> None:
    with pytest.raises(DataError, match="no images"):
        class_weights("inverse_frequency", [0, 0])
    with pytest.raises(ValueError, match="non-negative"):
        class_weights("inverse_frequency", [3, -1])
    with pytest.raises(ValueError, match="at least two"):
        class_weights("inverse_frequency", [5])
    with pytest.raises(ConfigError, match="'effective_beta'.*1.0"):
        class_weights("effective_number", [3, 4], beta=1.0)
    with pytest.raises(ConfigError, match="valid: none, inverse_frequency, effective_number"):
        class_weights("sqrt_frequency", [3, 4])
    assert available_weightings() == ("none", "inverse_frequency", "effective_number")


def test_unknown_loss_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        create_loss("dice", [3, 4])
    message = str(info.value)
    assert "'dice'" in message and "loss_weighting" in message
    for name in available_losses():
        assert name in message


def test_registry_matches_config_choices() -> None:
    assert set(available_losses()) == set(LOSS_WEIGHTINGS)


# ---------------------------------------------------------------------------
# focal loss worked out by hand
# ---------------------------------------------------------------------------


def test_focal_by_hand_binary() -> None:
    # logits (0, ln 3) -> p = (1/4, 3/4); target 1: p_t = 3/4, easy
    #   -(1 - 3/4)**2 * ln(3/4) = 0.0625 * 0.287682 = 0.017980
    # logits (ln 3, 0) -> p = (3/4, 1/4); target 1: p_t = 1/4, hard
    #   -(1 - 1/4)**2 * ln(1/4) = 0.5625 * 1.386294 = 0.779791
    # mean = (0.017980 + 0.779791) / 2 = 0.398885
    logits = torch.tensor([[0.0, math.log(3)], [math.log(3), 0.0]])
    loss = create_loss("focal", [10, 10], gamma=2.0)(logits, torch.tensor([1, 1]))
    assert loss.item() == pytest.approx(0.398885, abs=1e-6)


def test_focal_by_hand_three_classes() -> None:
    # logits (0, 0, ln 2) -> p = (1/4, 1/4, 1/2); target 2, gamma 1:
    #   -(1 - 1/2) * ln(1/2) = 0.5 * 0.693147 = 0.346574
    loss = FocalLoss(gamma=1.0)(torch.tensor([[0.0, 0.0, math.log(2)]]), torch.tensor([2]))
    assert loss.item() == pytest.approx(0.346574, abs=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_focal_gamma_zero_is_cross_entropy(smoothing: float, weighted: bool) -> None:
    torch.manual_seed(0)
    logits = torch.randn(16, 8, dtype=torch.float64) * 3
    target = torch.randint(0, 8, (16,))
    weight = torch.rand(8, dtype=torch.float64) + 0.1 if weighted else None
    focal = FocalLoss(gamma=0.0, weight=weight, label_smoothing=smoothing)(logits, target)
    ce = F.cross_entropy(logits, target, weight=weight, label_smoothing=smoothing)
    # float64 end to end except FocalLoss's .float() cast: agree to float32 precision.
    assert focal.item() == pytest.approx(ce.item(), rel=1e-6)


def test_focal_is_finite_for_confident_logits_and_small_gamma() -> None:
    # p_t rounds to 1.0 in float32; (1 - p)**0.5 has an infinite slope there.
    logits = torch.tensor([[0.0, 40.0], [40.0, 0.0]], requires_grad=True)
    loss = FocalLoss(gamma=0.5)(logits, torch.tensor([1, 1]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------------------
# every registry entry
# ---------------------------------------------------------------------------

# An imbalanced batch: 8 majority (class 1) samples classified well, 2 minority (class 0)
# samples classified badly, like a model that has learnt the frequent class only.
_COUNTS = [20, 80]
_TARGET = torch.tensor([0, 0] + [1] * 8)
_LOGITS = torch.tensor([[0.0, 1.0]] * 2 + [[0.0, 2.5]] * 8)


def _minority_gradient_share(loss_fn: nn.Module) -> float:
    logits = _LOGITS.clone().requires_grad_(True)
    loss_fn(logits, _TARGET).backward()
    per_sample = logits.grad.abs().sum(dim=1)
    return float(per_sample[:2].sum() / per_sample.sum())


@pytest.mark.parametrize("name", available_losses())
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_every_loss_is_finite_and_trains(name: str, smoothing: float) -> None:
    loss_fn = create_loss(name, [3, 0, 40, 7], label_smoothing=smoothing)
    assert isinstance(loss_fn, nn.Module)
    torch.manual_seed(0)
    layer = nn.Linear(5, 4)
    x, y = torch.randn(12, 5), torch.tensor([0, 1, 2, 3] * 3)
    loss = loss_fn(layer(x), y)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", available_losses())
def test_every_loss_keeps_weights_as_buffers(name: str) -> None:
    # train.py moves the loss with .to(device); weights must travel with it.
    loss_fn = create_loss(name, _COUNTS)
    weight = dict(loss_fn.named_buffers()).get("weight")
    if name in ("inverse_frequency", "effective_number"):
        assert weight is not None and weight[0] > weight[1]  # the rare class weighs more
    else:
        assert weight is None


@pytest.mark.parametrize("name", [n for n in available_losses() if n != "none"])
def test_imbalance_losses_shift_emphasis_to_the_minority(name: str) -> None:
    baseline = _minority_gradient_share(create_loss("none", _COUNTS))
    share = _minority_gradient_share(create_loss(name, _COUNTS))
    assert share > baseline + 0.05, (name, share, baseline)


def test_weighted_loss_value_moves_towards_the_minority_loss() -> None:
    # Weighted mean sum(w_y * l) / sum(w_y) with w = (2.5, 0.625) for counts (20, 80):
    # per-sample CE: minority -ln(1/(1+e)) = 1.313262, majority -ln(1/(1+e**-2.5)) = 0.078889
    # plain: (2 * 1.313262 + 8 * 0.078889) / 10 = 0.325764
    # weighted: (2 * 2.5 * 1.313262 + 8 * 0.625 * 0.078889) / (5 + 5) = 0.696076
    plain = create_loss("none", _COUNTS)(_LOGITS, _TARGET).item()
    weighted = create_loss("inverse_frequency", _COUNTS)(_LOGITS, _TARGET).item()
    assert plain == pytest.approx(0.325764, abs=1e-5)
    assert weighted == pytest.approx(0.696076, abs=1e-5)


def test_losses_import_no_framework() -> None:
    code = (
        "import sys, dala_search.losses, dala_search.metrics\n"
        "bad = {'ray', 'optuna', 'mlflow'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
