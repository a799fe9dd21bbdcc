"""Frozen timm backbones (pathology foundation models) and the heads searched on them.

``backbone: timm:<name>`` in a trial config names any timm model, including Hugging Face
hub models (``timm:hf-hub:MahmoodLab/UNI2-h``, ``timm:hf-hub:paige-ai/Virchow2``,
``timm:hf-hub:bioptimus/H-optimus-0``). The backbone is frozen (eval mode, no gradients):
its pooled features (timm's ``num_classes=0`` output) are computed once per image and
cached (``data/embeddings.py``); only a head trains (``train_head.py``).

Preprocessing is the backbone's own, from timm's pretrained config
(``timm.data.resolve_data_config``): input size, mean and std. The cached images (the
search's ``image_size``) are resized to that input size inside ``FrozenBackbone.forward``;
``embed_size`` overrides it (a convolutional net or a ViT built with ``dynamic_img_size``
takes other sizes; the tests' tiny space embeds 32 px images at 32 px).

Weights (the ``pretrained`` key), as for the DINOv2 baseline (``timm_backbones.py``): ``none``
is timm's random init (tests; an ``hf-hub:`` name still needs its config.json from the hub
or its cache); ``imagenet`` means the model's published weights (hub or its cache;
``HF_HUB_OFFLINE=1`` reads the cache only); a ``.pth``/``.pt``/``.safetensors``/``.bin``
path is a local copy loaded strictly. Weights that cannot be had raise a ConfigError naming
the model, ``HF_TOKEN`` and how to place them offline; never a silent random init.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dala_search.config import TIMM_PREFIX
from dala_search.errors import ConfigError

if TYPE_CHECKING:
    from dala_search.config import TrialConfig

# Model arguments that the hub's config.json of these models does not hold, from their
# model cards (timm cannot build them without): layer types are named, built lazily.
KNOWN_KWARGS: dict[str, dict[str, Any]] = {
    "hf-hub:MahmoodLab/UNI2-h": {
        "img_size": 224,
        "patch_size": 14,
        "depth": 24,
        "num_heads": 24,
        "init_values": 1e-5,
        "embed_dim": 1536,
        "mlp_ratio": 2.66667 * 2,
        "no_embed_class": True,
        "mlp_layer": "SwiGLUPacked",
        "act_layer": "silu",
        "reg_tokens": 8,
        "dynamic_img_size": True,
    },
    "hf-hub:paige-ai/Virchow2": {"mlp_layer": "SwiGLUPacked", "act_layer": "silu"},
}


def timm_name(backbone: str) -> str:
    """``timm:<name>`` -> ``<name>`` (a ConfigError for anything else)."""
    if not backbone.startswith(TIMM_PREFIX) or not backbone[len(TIMM_PREFIX) :].strip():
        raise ConfigError(f"key 'backbone': {backbone!r} is not timm:<model name>")
    return backbone[len(TIMM_PREFIX) :].strip()


def is_foundation(config: TrialConfig) -> bool:
    """True when the trial trains a head on a frozen timm backbone's cached embeddings."""
    return config.backbone.startswith(TIMM_PREFIX)


def _model_kwargs(name: str) -> dict[str, Any]:
    kwargs = dict(KNOWN_KWARGS.get(name, {}))
    if kwargs.get("mlp_layer") == "SwiGLUPacked":
        from timm.layers import SwiGLUPacked

        kwargs["mlp_layer"] = SwiGLUPacked
    return kwargs


class FrozenBackbone(nn.Module):
    """A timm model without classifier, frozen; ``forward`` takes normalised images of
    any size and resizes them to the model's input size (bilinear, antialiased)."""

    def __init__(self, net: nn.Module, backbone: str, weights: str) -> None:
        super().__init__()
        import timm.data

        self.net = net.eval().requires_grad_(False)
        self.backbone, self.weights = backbone, weights
        cfg = timm.data.resolve_data_config({}, model=net)
        self.input_size = int(cfg["input_size"][-1])
        self.mean = [float(v) for v in cfg["mean"]]
        self.std = [float(v) for v in cfg["std"]]
        self.num_features = int(net.num_features)

    def train(self, mode: bool = True) -> FrozenBackbone:
        super().train(mode)
        self.net.eval()  # frozen: its BatchNorm / dropout never switch to training
        return self

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            size = (self.input_size, self.input_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return self.net(x)

    def identity(self) -> str:
        """What the embeddings depend on: model name, weights (a file by its size and
        mtime), input size, mean and std; part of the embedding cache's key."""
        w = self.weights
        if w not in ("imagenet", "none"):
            st = os.stat(w)
            w = f"{os.path.abspath(w)}:{st.st_size}:{st.st_mtime_ns}"
        return f"{self.backbone}|{w}|{self.input_size}|{self.mean}|{self.std}"

    def key(self) -> str:
        return hashlib.sha256(self.identity().encode()).hexdigest()[:16]


# The last backbone this process loaded: a Ray trial process runs trial after trial
# (reuse_actors), and loading UNI2-h's 2.5 GB of weights per trial would cost more than
# the head trial itself. Frozen, so sharing it between trials changes nothing.
_LAST: dict[tuple, FrozenBackbone] = {}


def load_backbone(config: TrialConfig) -> FrozenBackbone:
    """The frozen backbone of ``config`` (``backbone: timm:<name>``, weights ``pretrained``);
    the same object again while the arguments (and a weights file's mtime) are unchanged."""
    stamp = None
    if config.pretrained not in ("imagenet", "none") and os.path.isfile(config.pretrained):
        stamp = os.stat(config.pretrained).st_mtime_ns
    key = (config.backbone, config.pretrained, config.embed_size, stamp)
    if key not in _LAST:
        _LAST.clear()
        _LAST[key] = _load_backbone(config)
    return _LAST[key]


def _load_backbone(config: TrialConfig) -> FrozenBackbone:
    import timm

    name = timm_name(config.backbone)
    kwargs = {"num_classes": 0, **_model_kwargs(name)}
    weights = config.pretrained
    try:
        if config.embed_size:  # the size timm's data config reports (convnets, dynamic ViTs)
            size = config.embed_size
            kwargs["pretrained_cfg_overlay"] = {"input_size": (3, size, size)}
        net = timm.create_model(name, pretrained=weights == "imagenet", **kwargs)
    except Exception as e:  # gated (401/403), offline without cache, unknown name, bad args
        raise ConfigError(weights_message(config.backbone, weights, e)) from None
    if weights not in ("imagenet", "none"):
        path = Path(weights)
        if not path.is_file():
            raise ConfigError(f"backbone {config.backbone!r}: pretrained={weights!r} is not a file")
        try:
            timm.models.load_checkpoint(net, str(path), strict=True)
        except Exception as e:
            raise ConfigError(
                f"backbone {config.backbone!r}: pretrained={weights!r} is not a state dict "
                f"of this model ({type(e).__name__}: {_first_line(e)[:300]})"
            ) from None
    return FrozenBackbone(net, config.backbone, weights)


def weights_message(backbone: str, weights: str, error: BaseException) -> str:
    """Why a timm backbone could not be built, and what to do (token, offline copy)."""
    from huggingface_hub import constants

    name = timm_name(backbone)
    repo = name[len("hf-hub:") :] if name.startswith("hf-hub:") else f"timm/{name}"
    cache = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    offline = " (HF_HUB_OFFLINE is set: the cache only)" if constants.HF_HUB_OFFLINE else ""
    what = {"imagenet": "its published weights", "none": "its architecture (config.json)"}.get(
        weights, "its architecture (config.json)"
    )
    return (
        f"backbone {backbone!r}: {what} could not be loaded from the Hugging Face hub or its "
        f"cache{offline} ({type(error).__name__}: {_first_line(error)[:300]}). Gated models "
        f"(UNI2-h, Virchow2, H-optimus-0, ...): accept the terms on https://huggingface.co/"
        f"{repo}, then set HF_TOKEN to a token of that account (or `hf auth login`). "
        f"Offline: on a machine with internet run `hf download {repo}`, copy its cache folder "
        f"{cache} here (HF_HOME / HF_HUB_CACHE choose where) and set HF_HUB_OFFLINE=1; a "
        "weights file of your own goes in as pretrained: /path/to/model.safetensors (the "
        "space's or config's key; an hf-hub: name still needs its config.json in the cache)"
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def build_head(config: TrialConfig, features: int, n_classes: int) -> nn.Sequential:
    """The DALAResNet50 head without its pooling (``head: dala``) or a linear probe."""
    if config.head == "linear":
        return nn.Sequential(OrderedDict(fc=nn.Linear(features, n_classes)))
    return nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(features, config.fc1),
            act1=nn.LeakyReLU(config.leaky_slope),
            drop1=nn.Dropout(config.dropout),
            fc2=nn.Linear(config.fc1, config.fc2),
            act2=nn.ReLU(inplace=True),
            drop2=nn.Dropout(config.dropout),
            fc3=nn.Linear(config.fc2, n_classes),
        )
    )


def head_parameter_groups(head: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay on weight matrices only, as ``DALAResNet50.parameter_groups``."""
    params = [p for p in head.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]


class FoundationClassifier(nn.Module):
    """What a foundation-model trial logs and registers: frozen backbone + trained head,
    over IMAGES. ``preprocess``: squash an RGB image to ``size`` px, scale to [0, 1],
    normalise with ``mean``/``std``, NCHW; ``forward`` returns logits (the backbone
    resizes to its own input size inside, as during training)."""

    def __init__(self, backbone: FrozenBackbone, head: nn.Module, image_size: int) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        self.preprocess = {"size": int(image_size), "mean": backbone.mean, "std": backbone.std}

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            features = self.backbone(x)
        return self.head(features.float())

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        return head_parameter_groups(self.head, weight_decay)


def check_weights(backbone: str, weights: str) -> None:
    """Before a search starts: the files a trial of ``backbone`` with ``weights`` will load
    are here (hub or cache; downloaded now if need be) or a ConfigError says how to get
    them. An ``hf-hub:`` model's files are fetched, not built (UNI2-h is 2.5 GB in memory);
    a timm name with ``imagenet`` weights is built once with them."""
    import timm
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    name = timm_name(backbone)
    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        raise ConfigError(f"backbone {backbone!r}: pretrained={weights!r} is not a file")
    try:
        if not name.startswith("hf-hub:"):
            if not timm.is_model(name):
                raise ConfigError(
                    f"key 'backbone': {backbone!r}: timm has no model {name!r} "
                    "(`python -c 'import timm; print(timm.list_models())'` lists them)"
                )
            if weights == "imagenet":
                timm.create_model(name, pretrained=True, num_classes=0)
            return
        repo = name[len("hf-hub:") :]
        hf_hub_download(repo, "config.json")
        if weights != "imagenet":
            return
        for i, filename in enumerate(("model.safetensors", "pytorch_model.bin")):
            try:
                hf_hub_download(repo, filename)
                return
            except EntryNotFoundError:
                if i == 1:
                    raise
    except ConfigError:
        raise
    except Exception as e:  # gated (401/403), offline without cache, no such repo or file
        raise ConfigError(weights_message(backbone, weights, e)) from None


def search_backbones(fixed: dict[str, Any], params: dict[str, Any]) -> tuple[str, ...]:
    """Every ``backbone`` value a search's trials can get (fixed, or a searched choice)."""
    from dala_search.config import DEFAULT_BACKBONE

    spec = params.get("backbone")
    if spec is not None:
        return tuple(dict.fromkeys(str(v) for v in spec.choices))
    return (str(fixed.get("backbone", DEFAULT_BACKBONE)),)


class LinearProbe:
    """The ``baselines`` row of a foundation model (``--models timm:<name>``): a linear
    probe on its frozen embeddings, as the eva leaderboard, trained with the search's best
    recipe (loss weighting, sampling, optimiser, lr, weight decay, epochs) on the same folds.
    ``evaluate.train_folds`` trains it with ``train_head.train_head_trial``; calling it
    builds the backbone (the baselines command does so up front: missing weights fail then).
    Weights: the search's ``none`` stays ``none``; anything else means the model's
    published weights (a ResNet50 .pth means nothing to a timm model)."""

    def __init__(self, backbone: str) -> None:
        timm_name(backbone)
        self.backbone = backbone

    def config_for(self, config: TrialConfig) -> TrialConfig:
        weights = "none" if config.pretrained == "none" else "imagenet"
        return config.replace(
            backbone=self.backbone, head="linear", embed_views=0, embed_size=0, pretrained=weights
        )

    def __call__(self, config: TrialConfig) -> FrozenBackbone:
        return load_backbone(self.config_for(config))
