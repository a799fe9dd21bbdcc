"""Reading and checking a search space file: ``load_space`` (a shipped name or a path).

Every error is a ConfigError naming the file and the key (and the bad value); every bound
and every choice is checked by building a real TrialConfig from it. This module reads the
file and checks its top level and ``search:``; ``space_params.py`` checks its ``params:``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from dala_search.config import SELECT_METRICS, TRIAL_KEYS, TrialConfig
from dala_search.data.breakhis import MAGNIFICATIONS, check_magnification
from dala_search.errors import ConfigError, DataError
from dala_search.runs.plan import check_name
from dala_search.space import PRUNERS, SAMPLERS, SearchSettings, SearchSpace
from dala_search.space_params import (
    check_conditions,
    choice,
    dependency_order,
    parse_param,
    refuse_unknown,
)


def _shipped_spaces_dir() -> Path:
    """Where the shipped spaces are: ``dala_search/search_spaces/`` in an installed wheel
    (pyproject maps the top-level folder there), the repository's top-level
    ``search_spaces/`` in a checkout (editable install or PYTHONPATH)."""
    here = Path(__file__).resolve().parent
    installed = here / "search_spaces"
    return installed if installed.is_dir() else here.parent / "search_spaces"


SPACES_DIR: Path = _shipped_spaces_dir()

TOP_LEVEL_KEYS: tuple[str, ...] = ("name", "description", "search", "fixed", "params")
SEARCH_KEYS: tuple[str, ...] = (
    "metric",
    "trials",
    "magnifications",
    "sampler",
    "pruner",
    "prune_on",
    "max_concurrent",
    "cv",
)
# A space must state these itself: silently defaulting to ImageNet weights (which may not
# download on an offline cluster) or to TrialConfig's epoch count hides a real decision.
REQUIRED_KEYS: tuple[str, ...] = ("pretrained", "epochs")


class _SpaceLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` as a float.

    PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent, so ``1e-5``
    and ``1.0e5`` load as strings; everyone writes learning rates that way.
    """


_SpaceLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_space_yaml(path: Path) -> dict[str, Any]:
    """The file's top-level mapping (ConfigError for YAML errors, an empty file, a list)."""
    try:
        raw = yaml.load(path.read_text(), Loader=_SpaceLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: YAML syntax error{where}: {e.problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if raw is None:
        raise ConfigError(f"{path}: the file is empty; expected keys {', '.join(TOP_LEVEL_KEYS)}")
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping with keys {', '.join(TOP_LEVEL_KEYS)}, "
            f"got {type(raw).__name__}"
        )
    return raw


# --- validation ---------------------------------------------------------------------------


def parse_space(path: Path, raw: dict[str, Any]) -> SearchSpace:
    """Check a space file's mapping (from ``read_space_yaml``) and build the SearchSpace."""
    refuse_unknown(path, "top level", raw, TOP_LEVEL_KEYS)
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{path}: key 'name' must be a non-empty string, got {name!r}")
    # The name starts the default search name, which becomes a folder and an MLflow
    # experiment: no '/', '..' or spaces.
    check_name(name, f"{path}: key 'name'")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"{path}: key 'description' must be a string, got {description!r}")
    settings = _parse_search(path, _section(path, raw, "search"))
    fixed = _section(path, raw, "fixed")
    params_raw = _section(path, raw, "params")

    for section, keys in (("fixed", fixed), ("params", params_raw)):
        for key in keys:
            _check_trial_key(path, f"{section}.{key}", key)
    both = sorted(set(fixed) & set(params_raw))
    if both:
        raise ConfigError(
            f"{path}: key(s) {', '.join(map(repr, both))} are both fixed and searched "
            "(in 'fixed' and 'params'); keep one"
        )
    missing = [k for k in REQUIRED_KEYS if k not in fixed and k not in params_raw]
    if missing:
        raise ConfigError(
            f"{path}: key(s) {', '.join(map(repr, missing))} must be stated in 'fixed' or "
            "'params', never left to a default: e.g. 'pretrained: none' offline or "
            "'pretrained: imagenet' where the weights can download, 'epochs: 30'"
        )
    # The fixed values on their own (with TrialConfig defaults for the rest) must be valid.
    TrialConfig.from_dict(fixed, source=f"{path}: fixed")

    specs = {k: parse_param(path, k, v, fixed) for k, v in params_raw.items()}
    check_conditions(path, specs, fixed)
    return SearchSpace(
        name=name,
        path=path,
        description=description.strip(),
        settings=settings,
        fixed=dict(fixed),
        params={k: specs[k] for k in dependency_order(path, specs)},
    )


def _section(path: Path, raw: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key)
    if value is None:  # absent or written as an empty "params:"
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: key {key!r} must be a mapping, got {value!r}")
    return value


def _check_trial_key(path: Path, key_path: str, key: Any) -> None:
    if key in TRIAL_KEYS:
        return
    close = difflib.get_close_matches(str(key), TRIAL_KEYS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(
        f"{path}: {key_path}: {key!r} is not a TrialConfig key{hint}; "
        f"valid: {', '.join(TRIAL_KEYS)}"
    )


def _count(path: Path, key_path: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{path}: {key_path}: must be an integer >= {minimum}, got {value!r}")
    return value


def _parse_search(path: Path, raw: dict[str, Any]) -> SearchSettings:
    refuse_unknown(path, "'search'", raw, SEARCH_KEYS)
    d = SearchSettings()
    mags = raw.get("magnifications", "all")
    if mags == "all":
        mags = MAGNIFICATIONS
    elif not isinstance(mags, list) or not mags:
        raise ConfigError(
            f"{path}: search.magnifications: expected 'all' or a non-empty list like "
            f"[40X, 100X], got {mags!r}"
        )
    normalised = []
    for m in mags:
        try:
            normalised.append(check_magnification(str(m)))
        except DataError as e:
            raise ConfigError(f"{path}: search.magnifications: {e}") from None
    if len(set(normalised)) != len(normalised):
        raise ConfigError(f"{path}: search.magnifications: {mags!r} repeats a magnification")
    return SearchSettings(
        metric=choice(path, "search.metric", raw.get("metric", d.metric), SELECT_METRICS),
        trials=_count(path, "search.trials", raw.get("trials", d.trials), 1),
        magnifications=tuple(normalised),
        sampler=choice(path, "search.sampler", raw.get("sampler", d.sampler), SAMPLERS),
        pruner=choice(path, "search.pruner", raw.get("pruner", d.pruner), PRUNERS),
        prune_on=None
        if raw.get("prune_on") is None
        else choice(path, "search.prune_on", raw["prune_on"], SELECT_METRICS),
        max_concurrent=_count(
            path, "search.max_concurrent", raw.get("max_concurrent", d.max_concurrent), 0
        ),
        cv=_count(path, "search.cv", raw.get("cv", d.cv), 1),
    )


# --- the shipped spaces ------------------------------------------------------------------


def load_space(name_or_path: str | Path) -> SearchSpace:
    """Load and validate a space: a bare name means ``SPACES_DIR/<name>.yaml``.

    Raises ConfigError naming the file and key for anything wrong.
    """
    if isinstance(name_or_path, str) and _is_bare_name(name_or_path):
        path = SPACES_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            names = ", ".join(p.stem for p in _space_files()) or "(none)"
            raise ConfigError(
                f"no search space named {name_or_path!r} in {SPACES_DIR}; available: {names}"
            )
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such search space file")
    return parse_space(path, read_space_yaml(path))


def list_spaces() -> list[SearchSpace]:
    """Every shipped space (``SPACES_DIR/*.yaml``), validated, sorted by file name."""
    return [load_space(p) for p in _space_files()]


def _space_files() -> list[Path]:
    return sorted(SPACES_DIR.glob("*.yaml")) if SPACES_DIR.is_dir() else []


def _is_bare_name(text: str) -> bool:
    return "/" not in text and "\\" not in text and not text.endswith((".yaml", ".yml"))
