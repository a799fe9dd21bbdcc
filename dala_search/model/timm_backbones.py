"""Comparison backbones that come from ``timm``: DINOv2 ViT-B/14.

``build_dinov2_vitb14(config)`` is registered as the ``dinov2_vitb14`` baseline in
``baselines.py`` (that module holds the registry; this one only builds).

Image size: DINOv2 has 14 px patches and the search's images are ``image_size`` px, which
need not be a multiple of 14. The model is built by timm for ``vit_input_size(image_size)``,
the NEAREST multiple of 14 (32 -> 28, 40 -> 42, 224 -> 224), and every batch is resized to
it (bilinear, antialiased) inside ``forward``; a model built for its own size keeps the
data pipeline, the cache and the other baselines untouched. ``TimmViT.note`` says so, and
``comparison.run_baselines`` prints it. Pretrained position embeddings (published on a 37x37
grid, 518 px) are resampled by timm to the model's grid when it loads the weights with a
different ``img_size`` (``vision_transformer.checkpoint_filter_fn`` ->
``resample_abs_pos_embed``, bicubic; checked in tests/model/test_baselines.py).

Weights (the ``pretrained`` key; its value ``imagenet`` is the option's existing name and
here means DINOv2's published LVD-142M self-supervised weights, not ImageNet labels):

* ``none``: timm's random init;
* ``imagenet``: ``timm/vit_base_patch14_dinov2.lvd142m`` from the Hugging Face hub, or from
  its cache (``$HF_HOME/hub``; ``HF_HUB_OFFLINE=1`` reads the cache only);
* a ``.pth``/``.pt`` path: a local copy, e.g. Meta's ``dinov2_vitb14_pretrain.pth`` or a
  ``torch.save`` of timm's state dict (timm's filter maps and resamples it the same way).

When the weights cannot be had, a ConfigError says where to put them; never a silent
fallback to random weights. The classifier is timm's: a fresh ``Linear(768, 2 or 8)`` on the
class token (DINOv2's checkpoint has no head), the same "replace the last layer" rule as
the torchvision baselines; all layers train.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.nn.functional as F
from torch import Tensor, nn

from dala_search.errors import ConfigError
from dala_search.model.dalaresnet import num_classes

if TYPE_CHECKING:
    from dala_search.config import TrialConfig

DINOV2_VITB14 = "vit_base_patch14_dinov2.lvd142m"  # timm's name (architecture.pretrained tag)
DINOV2_PATCH = 14
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth"


def vit_input_size(image_size: int, patch: int = DINOV2_PATCH) -> int:
    """The multiple of ``patch`` nearest to ``image_size`` (ties round up; at least one patch)."""
    return max(patch, (image_size + patch // 2) // patch * patch)


class TimmViT(nn.Module):
    """A timm ViT built for ``input_size`` px; resizes ``image_size`` px batches to it."""

    def __init__(
        self, net: nn.Module, name: str, image_size: int, input_size: int, *, pretrained: bool
    ) -> None:
        super().__init__()
        self.net = net
        self.name = name
        self.image_size = image_size
        self.input_size = input_size
        grid = input_size // DINOV2_PATCH
        self.note = (
            f"{name}: {image_size} px images resized to {input_size} px (nearest multiple of "
            f"its {DINOV2_PATCH} px patch), a {grid}x{grid} patch grid"
            + ("; pretrained position embeddings resampled to that grid" if pretrained else "")
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(
                x,
                size=(self.input_size, self.input_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        return self.net(x)

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Decay on weight matrices and kernels only, as the other models.

        Norm scales, biases and LayerScale gammas (ndim 1) are not decayed, nor the tokens
        and position embeddings timm lists in ``no_weight_decay()`` (ndim 3, not layers).
        """
        skip = {f"net.{n}" for n in self.net.no_weight_decay()}
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for pname, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.ndim > 1 and pname not in skip else no_decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, image_size={self.image_size}, input_size={self.input_size}"


def build_dinov2_vitb14(config: TrialConfig) -> TimmViT:
    """DINOv2 ViT-B/14 for ``config.image_size`` (see the module docstring for the rules)."""
    import timm

    size = vit_input_size(config.image_size)
    pretrained = config.pretrained
    if pretrained == "none":
        net = timm.create_model(DINOV2_VITB14, pretrained=False, img_size=size)
    elif pretrained == "imagenet":
        net = _from_hub(img_size=size)
    else:
        net = _from_file(Path(pretrained), img_size=size)
    # Built with the checkpoint's own num_classes (0: no head) so timm loads it strictly: with
    # a different num_classes timm loads non-strictly, and a wrong file would leave a silent
    # random init. The new head comes after, as the torchvision baselines' new last layer.
    net.reset_classifier(num_classes(config.task))
    return TimmViT(net, "dinov2_vitb14", config.image_size, size, pretrained=pretrained != "none")


def _from_hub(**kwargs: Any) -> nn.Module:
    import timm
    from huggingface_hub import constants

    repo = f"timm/{DINOV2_VITB14}"
    cache = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    try:
        return timm.create_model(DINOV2_VITB14, pretrained=True, num_classes=0, **kwargs)
    except Exception as e:  # offline/no cache (LocalEntryNotFoundError), HTTP, bad file
        offline = " (HF_HUB_OFFLINE is set: the cache only)" if constants.HF_HUB_OFFLINE else ""
        raise ConfigError(
            "baseline 'dinov2_vitb14', pretrained='imagenet' (DINOv2's LVD-142M weights): "
            f"they could not be loaded from the Hugging Face hub or its cache{offline} "
            f"({type(e).__name__}: {_first_line(e)}). Where to put them: on a machine with "
            f"internet, `hf download {repo}` (or a first online run) fills the "
            f"cache {cache} (HF_HOME / HF_HUB_CACHE choose it; copy that folder here and set "
            "HF_HUB_OFFLINE=1), or download Meta's dinov2_vitb14_pretrain.pth "
            f"({DINOV2_URL}) and pass its path (--pretrained /path/to/dinov2_vitb14_pretrain.pth)"
            ", or use --pretrained none (pretrained: none) to train from random weights"
        ) from e


def _from_file(path: Path, **kwargs: Any) -> nn.Module:
    import timm

    if not path.is_file():
        raise ConfigError(
            f"baseline 'dinov2_vitb14': pretrained={str(path)!r} is not a file (a DINOv2 "
            f"ViT-B/14 state dict, e.g. Meta's dinov2_vitb14_pretrain.pth from {DINOV2_URL})"
        )
    try:
        # pretrained_cfg_overlay=file: timm's own loading path (filter, pos-embed resampling).
        return timm.create_model(
            DINOV2_VITB14,
            pretrained=True,
            pretrained_cfg_overlay={"file": str(path)},
            num_classes=0,
            **kwargs,
        )
    except Exception as e:  # a ResNet50 .pth, a truncated file, ...
        raise ConfigError(
            f"baseline 'dinov2_vitb14': pretrained={str(path)!r} is not a DINOv2 ViT-B/14 state "
            f"dict ({type(e).__name__}: {_first_line(e)[:300]})"
        ) from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""
