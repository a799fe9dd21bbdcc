"""The DALAResNet50 model (``dalaresnet.py``) and its attention registry (``attention.py``).

Names are re-exported lazily: config validation imports ``dala_search.model.attention``,
which runs this file first, and an eager ``from .dalaresnet import ...`` here would pull in
torchvision (~1.5 s) for every config that is merely validated.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "available_attention": "attention",
    "create_attention": "attention",
    "register_attention": "attention",
    "DALAResNet50": "dalaresnet",
    "ProbabilityEnsemble": "ensemble",
    "NUM_CLASSES": "dalaresnet",
    "build_dalaresnet": "dalaresnet",
    "num_classes": "dalaresnet",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
