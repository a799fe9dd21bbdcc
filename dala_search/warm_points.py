"""The command line's side of warm starts (``--enqueue``, ``--warm-start``): checked while
the options are parsed, before anything starts. Framework-free (the start options' table
imports it); ``search/warm_start.py`` turns them into enqueued Optuna trials.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dala_search.data.breakhis import check_magnification
from dala_search.errors import ConfigError, DataError
from dala_search.runs.plan import NAME_RULE, is_valid_name


def check_enqueue(value: Any) -> tuple[str, ...]:
    """``paper`` or YAML files (made absolute; each read and checked to be a list of
    mappings). () passes."""
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ConfigError(f"expected a list of 'paper' or FILE.yaml, got {value!r}")
    out = []
    for item in value:
        if item == "paper":
            out.append(item)
            continue
        path = Path(str(item)).expanduser()
        if not path.is_file():
            raise ConfigError(f"{item!r} is neither 'paper' nor a YAML file")
        points_in_file(path)
        out.append(str(path.resolve()))
    return tuple(out)


def points_in_file(path: Path) -> list[dict[str, Any]]:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not YAML: {err}") from None
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not raw or not all(isinstance(p, dict) for p in raw):
        raise ConfigError(f"{path}: expected a list of points (mappings of parameters)")
    return raw


def check_warm_start(value: Any) -> str:
    """``SEARCH`` or ``SEARCH:MAG`` (a search name, a magnification)."""
    if not isinstance(value, str):
        raise ConfigError(f"expected SEARCH or SEARCH:MAG, got {value!r}")
    name, _, mag = value.partition(":")
    if not is_valid_name(name):
        raise ConfigError(f"{value!r}: search name {name!r}: {NAME_RULE}")
    if not mag:
        return name
    try:
        return f"{name}:{check_magnification(mag)}"
    except DataError as err:
        raise ConfigError(f"{value!r}: {err}") from None
