"""TrialConfig: every knob of one trial, frozen, typed and validated.

Unknown keys are refused, never ignored, and every error names the key (and the file,
when the config came from one). The search space (``space.py``) samples values for these
fields; ``train_trial`` reads nothing else.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from dala_search.errors import ConfigError

TASKS = ("binary", "subtype")
ATTENTION_BLOCKS = ("last", "all")
ATTENTION_POSITIONS = ("post", "residual")
LOSS_WEIGHTINGS = ("none", "inverse_frequency", "effective_number", "focal")
SAMPLINGS = ("none", "oversample", "undersample", "weighted")
OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULES = ("cosine", "constant")
SELECT_METRICS = ("balanced_accuracy", "accuracy", "f1", "gmean", "iba", "roc_auc")
# ``backbone``: our DALAResNet50, or a frozen timm model (``timm:<name>``, e.g.
# ``timm:hf-hub:MahmoodLab/UNI2-h``) whose cached embeddings feed a searched head.
DEFAULT_BACKBONE = "dalaresnet50"
TIMM_PREFIX = "timm:"
HEADS = ("dala", "linear")  # the DALAResNet50 head (FC-LeakyReLU-dropout-FC-ReLU-dropout-FC)


@dataclass(frozen=True)
class TrialConfig:
    """One trial's configuration. Defaults are our documented choices (the paper gives none).

    The attention default (ECA after the last bottleneck of stage 4) follows the paper's
    "lightweight attention in the fourth stage"; the exact module is a search dimension.
    """

    # task and backbone
    task: str = "binary"
    # "dalaresnet50", or "timm:<name>": a frozen timm backbone (foundation model) whose
    # embeddings are computed once (data/embeddings.py) and a head trained on them
    # (train_head.py); ``pretrained`` then names its weights (imagenet = the published ones)
    backbone: str = DEFAULT_BACKBONE
    head: str = "dala"  # timm backbones: "dala" (our two-layer head) or "linear" (a probe)
    embed_views: int = 0  # timm backbones: augmented views per training image (0: plain only)
    embed_size: int = 0  # timm backbones: input px; 0: the size of timm's pretrained config
    pretrained: str = "imagenet"  # "imagenet" | "none" | path to a torchvision ResNet50 state dict
    freeze_stages: int = 0  # 0 trains everything; k freezes the stem and stages 1..k
    # attention
    attention: str = "eca"
    attention_stages: tuple[int, ...] = (4,)
    attention_blocks: str = "last"  # "last" bottleneck of each chosen stage, or "all"
    attention_position: str = "post"  # "post": on the block output; "residual": before the add
    attention_reduction: int = 16  # channel reduction of SE / CBAM
    # head: pool -> FC(fc1) -> LeakyReLU(slope) -> dropout -> FC(fc2) -> ReLU -> dropout -> FC
    fc1: int = 512
    fc2: int = 256
    leaky_slope: float = 0.01
    dropout: float = 0.3
    # imbalance
    loss_weighting: str = "inverse_frequency"
    effective_beta: float = 0.999
    focal_gamma: float = 2.0
    sampling: str = "none"
    # optimisation
    optimizer: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 1e-4
    momentum: float = 0.9
    lr_schedule: str = "cosine"
    warmup_epochs: int = 0
    batch_size: int = 32
    # Out of memory: the batch is trained in halved micro-batches (gradient accumulation,
    # micro_batch.py) down to this many images; below it the trial fails.
    min_micro_batch: int = 4
    epochs: int = 10
    label_smoothing: float = 0.0
    select_metric: str = "balanced_accuracy"
    early_stop_patience: int = 0  # 0: off
    # Precise BatchNorm: before each validation, recompute the BatchNorm statistics from up to
    # this many training images (un-augmented); 0 keeps the running averages of training.
    precise_bn: int = 512
    # data and augmentation (histology has no canonical orientation)
    image_size: int = 224
    flip: bool = True
    rotate90: bool = True
    crop_scale: float = 0.8  # smallest area fraction of a random crop; 1.0: no crop
    color_jitter: float = 0.1  # brightness / contrast / saturation amplitude
    stain_jitter: float = 0.05  # HED stain perturbation amplitude
    # runtime
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    channels_last: bool = True  # on CUDA
    compile: bool = False
    num_threads: int = 0  # CPU intra-op threads for this trial; 0 leaves torch's default

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "config") -> TrialConfig:
        """Build from a mapping; unknown keys and bad values raise ConfigError naming them."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: expected a mapping of keys to values, got {values!r}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(
                f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; "
                f"valid keys: {', '.join(sorted(known))}"
            )
        coerced = {k: _coerce(known[k], v, source) for k, v in values.items()}
        try:
            return cls(**coerced)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def replace(self, **changes: Any) -> TrialConfig:
        """A copy with ``changes`` applied (validated like any other config)."""
        return TrialConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (tuples become lists), ready for YAML, JSON or MLflow params."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def load_trial_config(path: str | Path, **overrides: Any) -> TrialConfig:
    """Read a YAML trial config (safe_load) and apply non-None overrides."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping of keys to values at the top level")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return TrialConfig.from_dict(raw, source=str(p))


def _coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    """Accept what YAML and Optuna produce (lists, ints for floats), refuse the rest."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    name = f.name
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: key {name!r} must be true or false, got {value!r}")
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
            raise ConfigError(f"{source}: key {name!r} must be an integer, got {value!r}")
        return int(value)
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{source}: key {name!r} must be a number, got {value!r}")
        return float(value)
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{source}: key {name!r} must be a string, got {value!r}")
        return value
    if kind.startswith("tuple"):
        items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(items, list | tuple) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in items
        ):
            raise ConfigError(f"{source}: key {name!r} must be a list of integers, got {value!r}")
        return tuple(items)
    return value


def _choice(name: str, value: str, valid: tuple[str, ...] | list[str]) -> None:
    if value not in valid:
        raise ConfigError(f"key {name!r}: unknown value {value!r}; valid: {', '.join(valid)}")


def _range(name: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> None:
    ok = (lo < value if lo_open else lo <= value) and value <= hi and not math.isnan(value)
    if not ok:
        bracket = "(" if lo_open else "["
        raise ConfigError(f"key {name!r}: {value!r} is outside {bracket}{lo}, {hi}]")


def _validate(c: TrialConfig) -> None:
    # Registries live in the model and loss modules; import here to keep config import-light.
    from dala_search.model.attention import available_attention

    _choice("task", c.task, TASKS)
    _check_backbone(c)
    if c.backbone.startswith(TIMM_PREFIX):
        pass  # a weights file of a timm backbone may also be .safetensors / .bin
    elif c.pretrained not in ("imagenet", "none") and not c.pretrained.endswith((".pth", ".pt")):
        raise ConfigError(
            f"key 'pretrained': {c.pretrained!r} is neither 'imagenet', 'none' "
            "nor a path to a .pth/.pt ResNet50 state dict"
        )
    _range("freeze_stages", c.freeze_stages, 0, 4)
    _choice("attention", c.attention, available_attention())
    if not c.attention_stages or any(s not in (1, 2, 3, 4) for s in c.attention_stages):
        raise ConfigError(
            f"key 'attention_stages': {list(c.attention_stages)!r} must name stages 1-4"
        )
    if len(set(c.attention_stages)) != len(c.attention_stages):
        raise ConfigError(f"key 'attention_stages': {list(c.attention_stages)!r} repeats a stage")
    _choice("attention_blocks", c.attention_blocks, ATTENTION_BLOCKS)
    _choice("attention_position", c.attention_position, ATTENTION_POSITIONS)
    _range("attention_reduction", c.attention_reduction, 1, 256)
    _range("fc1", c.fc1, 1, 16384)
    _range("fc2", c.fc2, 1, 16384)
    _range("leaky_slope", c.leaky_slope, 0.0, 1.0, lo_open=True)
    _range("dropout", c.dropout, 0.0, 0.95)
    _choice("loss_weighting", c.loss_weighting, LOSS_WEIGHTINGS)
    _range("effective_beta", c.effective_beta, 0.0, 0.99999)
    _range("focal_gamma", c.focal_gamma, 0.0, 10.0)
    _choice("sampling", c.sampling, SAMPLINGS)
    _choice("optimizer", c.optimizer, OPTIMIZERS)
    _range("lr", c.lr, 0.0, 10.0, lo_open=True)
    _range("weight_decay", c.weight_decay, 0.0, 1.0)
    _range("momentum", c.momentum, 0.0, 1.0)
    _choice("lr_schedule", c.lr_schedule, LR_SCHEDULES)
    _range("epochs", c.epochs, 1, 10000)
    _range("warmup_epochs", c.warmup_epochs, 0, c.epochs - 1)
    _range("batch_size", c.batch_size, 2, 4096)
    _range("min_micro_batch", c.min_micro_batch, 2, 4096)
    _range("label_smoothing", c.label_smoothing, 0.0, 0.5)
    _choice("select_metric", c.select_metric, SELECT_METRICS)
    _range("early_stop_patience", c.early_stop_patience, 0, 10000)
    _range("precise_bn", c.precise_bn, 0, 10**7)
    _range("image_size", c.image_size, 32, 1024)
    _range("crop_scale", c.crop_scale, 0.1, 1.0)
    _range("color_jitter", c.color_jitter, 0.0, 1.0)
    _range("stain_jitter", c.stain_jitter, 0.0, 1.0)
    _range("seed", c.seed, 0, 2**31 - 1)
    if c.device not in ("auto", "cpu", "cuda") and not c.device.startswith("cuda:"):
        raise ConfigError(f"key 'device': {c.device!r}; valid: auto, cpu, cuda, cuda:N")
    _range("num_threads", c.num_threads, 0, 1024)


def _check_backbone(c: TrialConfig) -> None:
    if c.backbone != DEFAULT_BACKBONE and not (
        c.backbone.startswith(TIMM_PREFIX) and c.backbone[len(TIMM_PREFIX) :].strip()
    ):
        raise ConfigError(
            f"key 'backbone': {c.backbone!r}; valid: {DEFAULT_BACKBONE}, or timm:<model name> "
            "(e.g. timm:hf-hub:MahmoodLab/UNI2-h)"
        )
    _choice("head", c.head, HEADS)
    _range("embed_views", c.embed_views, 0, 64)
    if c.embed_size:
        _range("embed_size", c.embed_size, 16, 4096)
    weights_file = c.pretrained.endswith((".pth", ".pt", ".safetensors", ".bin"))
    named = c.pretrained in ("imagenet", "none")
    if c.backbone.startswith(TIMM_PREFIX) and not named and not weights_file:
        raise ConfigError(
            f"key 'pretrained': {c.pretrained!r} is neither 'imagenet' (the model's "
            "published weights), 'none' nor a .pth/.pt/.safetensors/.bin weights file"
        )


# Keep a field list handy for the search-space validator and the CLI.
TRIAL_KEYS: tuple[str, ...] = tuple(f.name for f in fields(TrialConfig))

# How data is split (data/protocols.py): patient-disjoint (the default), image-level
# (LEAKY: a patient's images on several sides) and kaiko-ai/eva's BreakHis task.
PROTOCOLS: tuple[str, ...] = ("patient", "image", "eva")
