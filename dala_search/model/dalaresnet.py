"""DALAResNet50: torchvision ResNet50 + lightweight attention + a two-layer head.

``train.py`` builds the model of a trial with ``build_dalaresnet(config)``. The paper says
"a lightweight attention module in the fourth stage" and "two FC layers, LeakyReLU then
ReLU" and publishes no exact form, so every one of these is a search dimension and the
defaults are OUR CHOICES, not the paper's:

* attention ``eca`` on the OUTPUT of the LAST bottleneck of stage 4 (``attention_stages=(4,)``,
  ``attention_blocks="last"``, ``attention_position="post"``), i.e. just before global pooling;
* ``attention_position="residual"`` is the SE-ResNet placement instead: attention on the
  residual branch (after ``bn3``), before ``out += identity``;
* head: pool -> Linear(2048, fc1) -> LeakyReLU -> Dropout -> Linear(fc1, fc2) -> ReLU ->
  Dropout -> Linear(fc2, classes), fc1=512, fc2=256, slope 0.01, dropout 0.3.

Pretrained weights are loaded into the plain torchvision ResNet50 first; attention modules
and the head are then added freshly initialised (they do not exist in ImageNet weights).
Random initialisation follows torch's global RNG: the caller seeds it (``train.py``).
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import ResNet50_Weights

from dala_search.errors import ConfigError
from dala_search.model.attention import create_attention

if TYPE_CHECKING:
    from dala_search.config import TrialConfig

NUM_CLASSES: dict[str, int] = {"binary": 2, "subtype": 8}
# Output channels of the bottlenecks of stage k (= torchvision's layer{k}), for reference.
STAGE_CHANNELS: dict[int, int] = {1: 256, 2: 512, 3: 1024, 4: 2048}
IMAGENET_WEIGHTS = ResNet50_Weights.IMAGENET1K_V2

_STEM = ("conv1", "bn1", "relu", "maxpool")
_STAGES = ("layer1", "layer2", "layer3", "layer4")


def num_classes(task: str) -> int:
    """Classes of ``task``; unknown task -> ConfigError listing the valid ones."""
    return _lookup(NUM_CLASSES, "task", task)


def build_dalaresnet(config: TrialConfig) -> DALAResNet50:
    """The model of one trial; ``train.py`` calls it (seed torch's RNG before)."""
    return DALAResNet50(
        num_classes(config.task),
        pretrained=config.pretrained,
        freeze_stages=config.freeze_stages,
        attention=config.attention,
        attention_stages=config.attention_stages,
        attention_blocks=config.attention_blocks,
        attention_position=config.attention_position,
        attention_reduction=config.attention_reduction,
        fc1=config.fc1,
        fc2=config.fc2,
        leaky_slope=config.leaky_slope,
        dropout=config.dropout,
    )


class DALAResNet50(nn.Module):
    """ResNet50 backbone (torchvision layers, attention inserted) and a two-layer FC head.

    ``backbone`` is an ``nn.Sequential`` of torchvision's stem and ``layer1``..``layer4`` under
    their torchvision names; ``head`` pools and classifies; ``forward(x)`` returns logits.
    ``pretrained`` has no default on purpose: random init must be asked for (``"none"``).
    """

    def __init__(
        self,
        n_classes: int = 2,
        *,
        pretrained: str,
        freeze_stages: int = 0,
        attention: str = "eca",
        attention_stages: Iterable[int] = (4,),
        attention_blocks: str = "last",
        attention_position: str = "post",
        attention_reduction: int = 16,
        fc1: int = 512,
        fc2: int = 256,
        leaky_slope: float = 0.01,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        resnet = torchvision.models.resnet50()  # torchvision's init; weights replace it below
        features = resnet.fc.in_features
        # Our head replaces fc: dropping it lets a state dict load strictly minus 'fc.' keys.
        resnet.fc = nn.Identity()
        load_backbone_weights(resnet, pretrained)
        # Freeze before inserting attention, so the new modules stay trainable everywhere.
        freeze_backbone(resnet, freeze_stages)
        self.backbone = nn.Sequential(OrderedDict((n, getattr(resnet, n)) for n in _STEM + _STAGES))
        inserted = insert_attention(
            self.backbone,
            attention,
            stages=attention_stages,
            blocks=attention_blocks,
            position=attention_position,
            reduction=attention_reduction,
        )
        # Qualified names (as in named_modules) of the inserted attention modules.
        self.attention_names: tuple[str, ...] = tuple(f"backbone.{n}" for n in inserted)
        self.head = nn.Sequential(
            OrderedDict(
                pool=nn.AdaptiveAvgPool2d(1),
                flatten=nn.Flatten(),
                fc1=nn.Linear(features, fc1),
                act1=nn.LeakyReLU(leaky_slope),
                drop1=nn.Dropout(dropout),
                fc2=nn.Linear(fc1, fc2),
                act2=nn.ReLU(),
                drop2=nn.Dropout(dropout),
                out=nn.Linear(fc2, n_classes),
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def train(self, mode: bool = True) -> DALAResNet50:
        """Like ``nn.Module.train``, but frozen BatchNorms stay in eval mode.

        A frozen stage must be a fixed function: in train mode its BatchNorms would still
        normalise with batch statistics and overwrite the pretrained running statistics.
        """
        super().train(mode)
        if mode:
            for m in self.modules():
                if isinstance(m, _BATCH_NORMS) and _is_frozen(m):
                    m.eval()
        return self

    def attention_modules(self) -> dict[str, nn.Module]:
        """The inserted attention modules by qualified name (empty for ``"none"``)."""
        return {name: self.get_submodule(name) for name in self.attention_names}

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Trainable parameters for an optimizer: decay on weights, none on biases and norms.

        For ``train.py``'s optimizer; frozen parameters are left out. Decaying BN scales and
        biases only pulls them to zero without regularising anything (the usual practice).
        """
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for p in self.parameters():
            if p.requires_grad:
                (decay if p.ndim > 1 else no_decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]


_BATCH_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)


def _is_frozen(module: nn.Module) -> bool:
    own = list(module.parameters(recurse=False))
    return bool(own) and not any(p.requires_grad for p in own)


# ---- attention placement ---------------------------------------------------------------


class PostAttention(nn.Module):
    """A bottleneck followed by attention on its output (after the residual add and ReLU)."""

    def __init__(self, block: nn.Module, attn: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.attn = attn

    def forward(self, x: Tensor) -> Tensor:
        return self.attn(self.block(x))


def _place_post(stage: nn.Sequential, index: int, attn: nn.Module) -> str:
    stage[index] = PostAttention(stage[index], attn)
    return f"{index}.attn"


def _place_residual(stage: nn.Sequential, index: int, attn: nn.Module) -> str:
    # Bottleneck.forward does bn3(conv3(.)) then `out += identity`: wrapping bn3 puts the
    # attention exactly on the residual branch before the add, without copying forward().
    block = stage[index]
    block.bn3 = nn.Sequential(block.bn3, attn)
    return f"{index}.bn3.1"


# position -> how to insert attention into block `index` of a stage; returns its local name.
_POSITIONS: dict[str, Callable[[nn.Sequential, int, nn.Module], str]] = {
    "post": _place_post,
    "residual": _place_residual,
}
# blocks -> which block indices of a stage with n blocks get attention.
_BLOCKS: dict[str, Callable[[int], range]] = {
    "last": lambda n: range(n - 1, n),
    "all": lambda n: range(n),
}


def insert_attention(
    backbone: nn.Module,
    name: str,
    *,
    stages: Iterable[int],
    blocks: str,
    position: str,
    reduction: int,
) -> list[str]:
    """Insert attention ``name`` into ``backbone.layer{k}`` for k in ``stages``, in place.

    Returns the inserted modules' names relative to ``backbone``. ``"none"`` inserts
    nothing (the plain ResNet50).
    """
    place = _lookup(_POSITIONS, "attention_position", position)
    choose = _lookup(_BLOCKS, "attention_blocks", blocks)
    stages = tuple(stages)
    bad = [s for s in stages if s not in STAGE_CHANNELS]
    if bad:
        raise ConfigError(f"key 'attention_stages': {list(stages)!r} must name stages 1-4")
    create_attention(name, 1, reduction=reduction)  # validates name and reduction up front
    if name == "none":
        return []
    names = []
    for k in sorted(stages):
        stage = getattr(backbone, f"layer{k}")
        for i in choose(len(stage)):
            channels = stage[i].bn3.num_features
            attn = create_attention(name, channels, reduction=reduction)
            names.append(f"layer{k}.{place(stage, i, attn)}")
    return names


# ---- freezing ----------------------------------------------------------------------------


def freeze_backbone(resnet: nn.Module, stages: int) -> None:
    """Stop gradients to the stem and ``layer1``..``layer{stages}`` (0: nothing frozen).

    Runs before attention is inserted. BatchNorms frozen here are kept in eval mode by
    ``DALAResNet50.train``.
    """
    if not 0 <= stages <= len(_STAGES):
        raise ConfigError(f"key 'freeze_stages': {stages!r} is outside [0, 4]")
    if stages == 0:
        return
    for part in ("conv1", "bn1", *_STAGES[:stages]):
        getattr(resnet, part).requires_grad_(False)


# ---- pretrained weights ------------------------------------------------------------------


def load_backbone_weights(resnet: nn.Module, pretrained: str) -> None:
    """Load ``pretrained`` ("imagenet", "none" or a .pth/.pt path) into a torchvision ResNet50.

    ``resnet.fc`` must already be replaced (its keys are ignored). Every failure is a
    ConfigError that says how to fix it, never a silent fallback to random weights.
    """
    source = _WEIGHT_SOURCES.get(pretrained, _file_state_dict)
    state = source(pretrained)
    if state is None:  # "none": keep torchvision's random init, as asked
        return
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    where = f"pretrained={pretrained!r}"
    try:
        result = resnet.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even with strict=False
        raise ConfigError(f"{where}: not a ResNet50 state dict: {e}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(
            f"{where}: not a torchvision ResNet50 state dict; missing keys "
            f"{_few(result.missing_keys)}, unexpected keys {_few(result.unexpected_keys)}"
        )


def check_backbone_weights(pretrained: str) -> None:
    """Resolve ``pretrained`` as a trial's model build will (download, read, match the
    ResNet50's keys), so a search can refuse weights it cannot get before it starts.

    ConfigError (``load_backbone_weights``'s) when they cannot be had; ``"none"`` costs
    nothing.
    """
    if pretrained == "none":
        return
    resnet = torchvision.models.resnet50()
    resnet.fc = nn.Identity()  # as DALAResNet50 does before loading
    load_backbone_weights(resnet, pretrained)


def _no_weights(pretrained: str) -> None:
    return None


def _imagenet_state_dict(pretrained: str) -> Mapping[str, Tensor]:
    # torch.hub looks in $TORCH_HOME/hub/checkpoints/<file name of the URL> first, and only
    # downloads when the file is missing (it fails within seconds without a network).
    url = IMAGENET_WEIGHTS.url
    filename = os.path.basename(url)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    had_cache = cached.is_file()
    try:
        return IMAGENET_WEIGHTS.get_state_dict(
            progress=False, check_hash=True, map_location="cpu", weights_only=True
        )
    except Exception as e:  # URLError without network; anything from a bad cached file
        torch_home = os.environ.get("TORCH_HOME")
        home = f"TORCH_HOME={torch_home}" if torch_home else "TORCH_HOME is unset"
        problem = (
            f"the cached file {cached} cannot be loaded ({_brief(e)}); delete it to download "
            "again, or"
            if had_cache
            else f"they could not be downloaded from {url} ({_brief(e)}). Without internet here,"
        )
        raise ConfigError(
            f"pretrained='imagenet': no torchvision ResNet50 ImageNet weights (IMAGENET1K_V2): "
            f"{problem} download {filename} elsewhere and put it at {cached} (torchvision "
            f"looks for $TORCH_HOME/hub/checkpoints/{filename}; {home}), or set "
            "'pretrained: /path/to/resnet50.pth' to a ResNet50 state dict, or "
            "'pretrained: none' to train from random weights"
        ) from e


def _file_state_dict(pretrained: str) -> Mapping[str, Tensor]:
    path = Path(pretrained)
    if not pretrained.endswith((".pth", ".pt")):
        raise ConfigError(
            f"key 'pretrained': {pretrained!r} is neither {', '.join(map(repr, _WEIGHT_SOURCES))}"
            " nor a path to a .pth/.pt ResNet50 state dict"
        )
    if not path.is_file():
        raise ConfigError(f"pretrained={pretrained!r}: no such file {path}")
    try:
        # weights_only: a weights file is data, never code to run.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch.load on a malformed file raises almost anything (RuntimeError, EOFError,
        # UnpicklingError, IndexError from the weights-only unpickler): name the file.
        raise ConfigError(
            f"pretrained={pretrained!r}: cannot load {path} as weights: {_brief(e)}"
        ) from e
    if not isinstance(state, Mapping):
        raise ConfigError(
            f"pretrained={pretrained!r}: {path} holds a {type(state).__name__}, "
            "not a ResNet50 state dict (a mapping of parameter names to tensors)"
        )
    return state


# pretrained value -> state dict (None: random init); any other value is a file path.
_WEIGHT_SOURCES: dict[str, Callable[[str], Mapping[str, Tensor] | None]] = {
    "imagenet": _imagenet_state_dict,
    "none": _no_weights,
}


def _brief(error: Exception) -> str:
    # torch.load's weights-only errors run to a page whose first line suggests
    # weights_only=False (unsafe): keep only the reason; the full error stays as __cause__.
    text = str(error).strip()
    refused = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    if refused:
        return f"the weights-only loader refused it: {refused.group(1).strip()}"
    lines = text.splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _few(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n]) or "none"
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)})"


def _lookup(registry: Mapping[str, Any], key: str, value: str) -> Any:
    if value not in registry:
        raise ConfigError(f"key {key!r}: unknown value {value!r}; valid: {', '.join(registry)}")
    return registry[value]
