"""The report's best configuration split in two: what the search chose, and what it held.

A best configuration is the whole ``TrialConfig`` (~45 keys); the few the search varied are
what a reader came for. ``split_config`` puts the space's searched parameters first (in
the space's order) and the fixed rest apart (the page folds them away). A conditional
parameter whose condition did not hold for the best trial was not sampled there: it is
listed with the searched ones, marked, with the value it kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dala_search.errors import DalaError
from dala_search.space_file import load_space


@dataclass
class ConfigRows:
    """(name, value, note) rows: searched first; the fixed ones; why not split, if not."""

    searched: list[tuple[str, str, str]] = field(default_factory=list)
    fixed: list[tuple[str, str]] = field(default_factory=list)
    note: str = ""  # the space could not be read: every key in ``fixed``, the page says why


def _holds(condition: dict[str, tuple[Any, ...]], config: dict[str, Any]) -> bool:
    """The condition on the best trial's values (MLflow params: strings)."""
    return all(str(config.get(k)) in {str(a) for a in allowed} for k, allowed in condition.items())


def split_config(config: dict[str, Any], space: str) -> ConfigRows:
    """``config`` (a best table row's) split by the search space ``space`` (name or path,
    as ``search.json`` records it)."""
    try:
        params = load_space(space).params
    except DalaError as e:
        return ConfigRows(
            fixed=sorted((k, str(v)) for k, v in config.items()),
            note=f"the search space {space} cannot be read ({e}), so the searched "
            "parameters are not told apart from the fixed ones",
        )
    rows = ConfigRows()
    for name, spec in params.items():
        if name not in config:
            continue
        note = ""
        if spec.condition and not _holds(spec.condition, config):
            when = ", ".join(f"{k} in {list(v)}" for k, v in spec.condition.items())
            note = f"not sampled for this trial (only when {when})"
        rows.searched.append((name, str(config[name]), note))
    rows.fixed = sorted((k, str(v)) for k, v in config.items() if k not in params)
    return rows
