"""The paper's comparison models, built so the same training loop trains them.

``comparison.run_baselines`` calls
``train_trial(config, data, build_model=baseline_builder(name))``: the data, folds, loss,
sampling, optimiser, lr schedule, epochs and augmentation are those of the search's best
DALAResNet50 configuration; only the architecture changes. Every model returned here has
``forward(x) -> logits`` and ``parameter_groups(weight_decay)`` (what ``train.py``'s optimiser
asks of a model).

The registry (name -> factory, in the paper's order):

* ``resnet50``: our builder with ``attention: none`` (same two-layer head as DALAResNet50,
  so the comparison isolates the attention module);
* ``seresnet50``: our builder with SE (``attention: se``, reduction 16 as in Hu et al.) on
  the residual branch of EVERY bottleneck of all four stages, i.e. SE-ResNet50;
* ``densenet121``, ``vgg16``, ``vit_b_16``, ``swin_t``: torchvision's models with their last
  classifier layer replaced by a fresh ``Linear(features, 2 or 8)``;
* ``dinov2_vitb14``: DINOv2 ViT-B/14 through timm (``timm_backbones.py``: built for the
  nearest multiple of 14 px to the image size, batches resized to it, weights from the
  Hugging Face hub/cache or a local file);
* ``vgg16_inception``: torchvision VGG16 blocks 1-4 + a naive Inception module + VGGIN-Net's
  head (``vgg_inception.py``, our reading of the paper's VGG16Inception).

Choices, stated: the torchvision families train all their layers (``freeze_stages`` refers
to ResNet stages and applies to the two ResNet-based models only). ViT-B/16 is built for the
data's image size instead of resizing every batch to 224 px: the size must be a multiple of
its 16 px patch (32, 48, ..., 224; otherwise a ConfigError names the model and the size), and
ImageNet weights get their position embeddings interpolated to the new patch grid with
torchvision's own ``interpolate_embeddings`` (the usual fine-tuning-at-another-resolution
practice); at 224 px it is exactly the pretrained model. Swin-T pads its windows and
DenseNet121/VGG16 pool adaptively, so they take any size from 32 px up; VGG16Inception's
head is sized for the image size (from 16 px up).

Weights: ``pretrained: none`` is random init; ``imagenet`` loads torchvision's ImageNet
weights (from ``$TORCH_HOME/hub/checkpoints`` when cached, downloaded otherwise) and, when
they cannot be had, raises a ConfigError saying where to put the file, never falling back
to random weights. A ``.pth`` path is a ResNet50 state dict (see ``dalaresnet.py``): the
ResNet-based models take it, ``dinov2_vitb14`` reads it as a DINOv2 checkpoint (loaded
strictly), the others refuse it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from dala_search.errors import ConfigError
from dala_search.model.dalaresnet import build_dalaresnet, num_classes
from dala_search.model.timm_backbones import build_dinov2_vitb14
from dala_search.model.vgg_inception import VGG16_BLOCK4_END, VGG16Inception

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

    from dala_search.config import TrialConfig

BaselineFactory = Callable[["TrialConfig"], nn.Module]

_REGISTRY: dict[str, BaselineFactory] = {}

VIT_PATCH = 16


def register_baseline(name: str) -> Callable[[BaselineFactory], BaselineFactory]:
    """Decorator adding a factory ``(config: TrialConfig) -> nn.Module`` under ``name``."""

    def decorate(factory: BaselineFactory) -> BaselineFactory:
        if name in _REGISTRY:
            raise ValueError(f"baseline {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorate


def available_baselines() -> tuple[str, ...]:
    """Registered names in the paper's order; the CLI's default ``--models``."""
    return tuple(_REGISTRY)


def check_baseline(name: str) -> str:
    """``name`` if registered (or ``timm:<name>``: a foundation model's linear probe,
    ``foundation.LinearProbe``), else a ConfigError listing the valid names."""
    if name.startswith("timm:") and name[len("timm:") :].strip():
        return name
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown baseline model {name!r}; valid: {', '.join(available_baselines())}, "
            "or timm:<model> (a foundation model's linear probe)"
        )
    return name


def build_baseline(name: str, config: TrialConfig) -> nn.Module:
    """Build baseline ``name`` for ``config`` (task, image size, weights); seed torch first."""
    return _REGISTRY[check_baseline(name)](config)


def baseline_builder(name: str) -> BaselineFactory:
    """A ``build_model`` for ``train.train_trial``; the name is checked now, not mid-run."""
    return partial(build_baseline, check_baseline(name))


class TorchvisionClassifier(nn.Module):
    """A torchvision model (classifier already replaced) with ``parameter_groups``."""

    def __init__(self, net: nn.Module, name: str) -> None:
        super().__init__()
        self.net = net
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Decay on weight matrices and kernels only, as ``DALAResNet50.parameter_groups``.

        Biases, norm scales, ViT's class token and position embeddings are not decayed
        (embeddings have ndim 3 but are not weights of a layer: named explicitly).
        """
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for pname, p in self.named_parameters():
            if not p.requires_grad:
                continue
            embedding = pname.endswith(("class_token", "pos_embedding"))
            (decay if p.ndim > 1 and not embedding else no_decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


# ---- ResNet-based: our builder ----------------------------------------------------------


@register_baseline("resnet50")
def _resnet50(config: TrialConfig) -> nn.Module:
    """Plain ResNet50: DALAResNet50 without attention (same head, weights, freezing)."""
    return build_dalaresnet(config.replace(attention="none"))


@register_baseline("seresnet50")
def _seresnet50(config: TrialConfig) -> nn.Module:
    """SE-ResNet50: SE (r=16) on the residual branch of every bottleneck, stages 1-4."""
    return build_dalaresnet(
        config.replace(
            attention="se",
            attention_stages=[1, 2, 3, 4],
            attention_blocks="all",
            attention_position="residual",
            attention_reduction=16,
        )
    )


# ---- torchvision families -----------------------------------------------------------------


def _torchvision_net(
    name: str, builder: Callable[..., nn.Module], weights: WeightsEnum, pretrained: str
) -> nn.Module:
    """torchvision's ``builder`` with ImageNet ``weights`` or random init, as asked."""
    if pretrained == "none":
        return builder(weights=None)
    if pretrained != "imagenet":
        raise ConfigError(
            f"baseline {name!r}: pretrained={pretrained!r} is a state dict file (a ResNet50's "
            "for DALAResNet50, resnet50 and seresnet50, a DINOv2's for dinov2_vitb14); "
            f"{name} takes 'imagenet' or 'none'"
        )
    filename = os.path.basename(weights.url)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    had_cache = cached.is_file()
    try:
        return builder(weights=weights, progress=False)
    except Exception as e:  # URLError offline; anything from a bad cached file
        problem = (
            f"the cached file {cached} cannot be loaded ({type(e).__name__}: {e}); delete it to "
            "download again, or"
            if had_cache
            else f"they could not be downloaded from {weights.url} ({type(e).__name__}: {e}). "
            "Without internet here,"
        )
        raise ConfigError(
            f"baseline {name!r}, pretrained='imagenet': no torchvision ImageNet weights "
            f"({type(weights).__name__}.{weights.name}): {problem} download {filename} "
            f"elsewhere and put it at {cached} (torchvision looks for "
            f"$TORCH_HOME/hub/checkpoints/{filename}), or use 'pretrained: none' "
            "(baselines --pretrained none) to train from random weights"
        ) from e


@register_baseline("densenet121")
def _densenet121(config: TrialConfig) -> nn.Module:
    from torchvision.models import DenseNet121_Weights, densenet121

    net = _torchvision_net(
        "densenet121", densenet121, DenseNet121_Weights.IMAGENET1K_V1, config.pretrained
    )
    net.classifier = nn.Linear(net.classifier.in_features, num_classes(config.task))
    return TorchvisionClassifier(net, "densenet121")


@register_baseline("vgg16")
def _vgg16(config: TrialConfig) -> nn.Module:
    from torchvision.models import VGG16_Weights, vgg16

    net = _torchvision_net("vgg16", vgg16, VGG16_Weights.IMAGENET1K_V1, config.pretrained)
    net.classifier[-1] = nn.Linear(net.classifier[-1].in_features, num_classes(config.task))
    return TorchvisionClassifier(net, "vgg16")


@register_baseline("vit_b_16")
def _vit_b_16(config: TrialConfig) -> nn.Module:
    from torchvision.models import ViT_B_16_Weights, vit_b_16
    from torchvision.models.vision_transformer import interpolate_embeddings

    size = config.image_size
    if size % VIT_PATCH:
        raise ConfigError(
            f"baseline 'vit_b_16' needs an image size that is a multiple of its {VIT_PATCH} px "
            f"patches; the search's images are {size} px (use image_size 32, 48, ..., 224)"
        )
    if config.pretrained == "none":
        net = vit_b_16(weights=None, image_size=size)
    else:
        # torchvision builds pretrained ViTs at 224 px only: rebuild for our size and
        # resample the pretrained position embeddings to its patch grid.
        weights = ViT_B_16_Weights.IMAGENET1K_V1
        net = _torchvision_net("vit_b_16", vit_b_16, weights, config.pretrained)
        if net.image_size != size:
            state = net.state_dict()
            net = vit_b_16(weights=None, image_size=size)
            net.load_state_dict(interpolate_embeddings(size, VIT_PATCH, state))
    net.heads.head = nn.Linear(net.heads.head.in_features, num_classes(config.task))
    return TorchvisionClassifier(net, "vit_b_16")


@register_baseline("swin_t")
def _swin_t(config: TrialConfig) -> nn.Module:
    from torchvision.models import Swin_T_Weights, swin_t

    net = _torchvision_net("swin_t", swin_t, Swin_T_Weights.IMAGENET1K_V1, config.pretrained)
    net.head = nn.Linear(net.head.in_features, num_classes(config.task))
    return TorchvisionClassifier(net, "swin_t")


# ---- the paper's two others: timm's DINOv2 and VGG16 + Inception ---------------------------

register_baseline("dinov2_vitb14")(build_dinov2_vitb14)


@register_baseline("vgg16_inception")
def _vgg16_inception(config: TrialConfig) -> nn.Module:
    """VGGIN-Net: VGG16 blocks 1-4 (torchvision, ImageNet or random) + naive Inception."""
    from torchvision.models import VGG16_Weights, vgg16

    weights = VGG16_Weights.IMAGENET1K_V1
    net = _torchvision_net("vgg16_inception", vgg16, weights, config.pretrained)
    features = net.features[:VGG16_BLOCK4_END]
    return VGG16Inception(features, config.image_size, num_classes(config.task))
