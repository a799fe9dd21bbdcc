"""Reading and checking a search space file: ``load_space`` (a shipped name or a path).

Every error is a ConfigError naming the file and the key (and the bad value); every bound
and every choice is checked by building a real TrialConfig from it.
"""

from __future__ import annotations

import difflib
import graphlib
import math
import re
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from dala_search.config import SELECT_METRICS, TRIAL_KEYS, TrialConfig
from dala_search.data.breakhis import MAGNIFICATIONS, check_magnification
from dala_search.errors import ConfigError, DataError
from dala_search.runs.plan import check_name
from dala_search.space import (
    PARAM_TYPES,
    PRUNERS,
    SAMPLERS,
    ParamSpec,
    SearchSettings,
    SearchSpace,
    encode_choice,
    show_value,
)


def _shipped_spaces_dir() -> Path:
    """Where the shipped spaces are: ``dala_search/search_spaces/`` in an installed wheel
    (pyproject maps the top-level folder there), the repository's top-level
    ``search_spaces/`` in a checkout (editable install or PYTHONPATH)."""
    here = Path(__file__).resolve().parent
    installed = here / "search_spaces"
    return installed if installed.is_dir() else here.parent / "search_spaces"


SPACES_DIR: Path = _shipped_spaces_dir()

# TrialConfig fields holding a tuple (attention_stages): YAML gives lists, Optuna needs
# scalars, so such choices are encoded as "3,4" for Optuna and decoded back.
_TUPLE_FIELDS: frozenset[str] = frozenset(
    f.name for f in fields(TrialConfig) if str(f.type).startswith("tuple")
)
# Each field's declared type ("int", "float", ...; config.py uses postponed annotations).
_FIELD_TYPES: dict[str, str] = {f.name: str(f.type) for f in fields(TrialConfig)}

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
PARAM_FIELDS: tuple[str, ...] = ("type", "low", "high", "step", "log", "choices", "condition")
# Fields each type accepts besides ``type`` and ``condition``.
_TYPE_FIELDS: dict[str, tuple[str, ...]] = {
    "float": ("low", "high", "step", "log"),
    "int": ("low", "high", "step", "log"),
    "categorical": ("choices",),
}
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
    _refuse_unknown(path, "top level", raw, TOP_LEVEL_KEYS)
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

    specs = {k: _parse_param(path, k, v, fixed) for k, v in params_raw.items()}
    _check_conditions(path, specs, fixed)
    return SearchSpace(
        name=name,
        path=path,
        description=description.strip(),
        settings=settings,
        fixed=dict(fixed),
        params={k: specs[k] for k in _dependency_order(path, specs)},
    )


def _section(path: Path, raw: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key)
    if value is None:  # absent or written as an empty "params:"
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: key {key!r} must be a mapping, got {value!r}")
    return value


def _refuse_unknown(path: Path, where: str, raw: Mapping[str, Any], valid: tuple[str, ...]) -> None:
    unknown = [k for k in raw if k not in valid]
    if unknown:
        raise ConfigError(
            f"{path}: unknown key {unknown[0]!r} in {where}; valid: {', '.join(valid)}"
        )


def _check_trial_key(path: Path, key_path: str, key: Any) -> None:
    if key in TRIAL_KEYS:
        return
    close = difflib.get_close_matches(str(key), TRIAL_KEYS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(
        f"{path}: {key_path}: {key!r} is not a TrialConfig key{hint}; "
        f"valid: {', '.join(TRIAL_KEYS)}"
    )


def _choice(path: Path, key_path: str, value: Any, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise ConfigError(f"{path}: {key_path}: unknown value {value!r}; valid: {', '.join(valid)}")
    return value


def _count(path: Path, key_path: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{path}: {key_path}: must be an integer >= {minimum}, got {value!r}")
    return value


def _parse_search(path: Path, raw: dict[str, Any]) -> SearchSettings:
    _refuse_unknown(path, "'search'", raw, SEARCH_KEYS)
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
        metric=_choice(path, "search.metric", raw.get("metric", d.metric), SELECT_METRICS),
        trials=_count(path, "search.trials", raw.get("trials", d.trials), 1),
        magnifications=tuple(normalised),
        sampler=_choice(path, "search.sampler", raw.get("sampler", d.sampler), SAMPLERS),
        pruner=_choice(path, "search.pruner", raw.get("pruner", d.pruner), PRUNERS),
        prune_on=None
        if raw.get("prune_on") is None
        else _choice(path, "search.prune_on", raw["prune_on"], SELECT_METRICS),
        max_concurrent=_count(
            path, "search.max_concurrent", raw.get("max_concurrent", d.max_concurrent), 0
        ),
        cv=_count(path, "search.cv", raw.get("cv", d.cv), 1),
    )


def _parse_param(path: Path, name: str, raw: Any, fixed: Mapping[str, Any]) -> ParamSpec:
    where = f"params.{name}"
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: {where}: expected a mapping like {{type: float, low: 0.1, high: 1.0}}, "
            f"got {raw!r}"
        )
    _refuse_unknown(path, where, raw, PARAM_FIELDS)
    if "type" not in raw:
        raise ConfigError(f"{path}: {where}: missing 'type'; valid: {', '.join(PARAM_TYPES)}")
    kind = _choice(path, f"{where}.type", raw["type"], PARAM_TYPES)
    if kind == "float" and _FIELD_TYPES[name] == "int":
        # TrialConfig would refuse the first non-integral sample, mid-search.
        raise ConfigError(f"{path}: {where}.type: {name!r} is an integer key; use type: int")
    allowed = _TYPE_FIELDS[kind]
    stray = [k for k in raw if k not in (*allowed, "type", "condition")]
    if stray:
        raise ConfigError(
            f"{path}: {where}.{stray[0]}: not a field of a `type: {kind}` parameter; "
            f"valid: type, {', '.join(allowed)}, condition"
        )
    condition = _parse_condition(path, where, raw.get("condition"))
    if kind == "categorical":
        spec = ParamSpec(
            name, kind, choices=_parse_choices(path, where, name, raw), condition=condition
        )
        values = spec.choices or ()
    else:
        spec = _parse_range(path, where, name, kind, raw, condition)
        values = (spec.low, spec.high)
    # Every choice and both bounds must make a TrialConfig on their own: catches unknown
    # attention names, out-of-range dropout, etc. before the search starts.
    for value in values:
        try:
            TrialConfig.from_dict({**fixed, name: value}, source="config")
        except ConfigError as e:
            message = str(e).removeprefix("config: ")
            raise ConfigError(
                f"{path}: {where}: value {_quote(value)} is refused: {message}"
            ) from None
    return spec


def _parse_range(
    path: Path, where: str, name: str, kind: str, raw: Mapping[str, Any], condition: Any
) -> ParamSpec:
    def number(key: str) -> float | int | None:
        value = raw.get(key)
        if value is None and key in ("low", "high"):
            raise ConfigError(f"{path}: {where}: missing {key!r} (a {kind} parameter needs both)")
        if value is None:
            return None
        if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{path}: {where}.{key}: must be an integer, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: {where}.{key}: must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: {where}.{key}: must be finite, got {value!r}")
        return value if kind == "int" else float(value)

    low, high, step = number("low"), number("high"), number("step")
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{path}: {where}.log: must be true or false, got {log!r}")
    if low >= high:  # type: ignore[operator]
        raise ConfigError(f"{path}: {where}: low {low!r} must be below high {high!r}")
    if log and low <= 0:  # type: ignore[operator]
        raise ConfigError(f"{path}: {where}.low: a log-scale range needs low > 0, got {low!r}")
    if step is not None:
        if log:
            raise ConfigError(f"{path}: {where}.step: cannot be combined with log: true")
        if step <= 0:
            raise ConfigError(f"{path}: {where}.step: must be > 0, got {step!r}")
        # Optuna would silently lower `high` to the last reachable value; say so instead.
        steps = (high - low) / step  # type: ignore[operator]
        if abs(steps - round(steps)) > 1e-9 * max(1.0, abs(steps)):
            raise ConfigError(
                f"{path}: {where}.step: high - low ({high!r} - {low!r}) is not a multiple "
                f"of step {step!r}"
            )
    return ParamSpec(name, kind, low=low, high=high, step=step, log=log, condition=condition)


def _parse_choices(path: Path, where: str, name: str, raw: Mapping[str, Any]) -> tuple:
    choices = raw.get("choices")
    if not isinstance(choices, list) or not choices:
        raise ConfigError(f"{path}: {where}.choices: expected a non-empty list, got {choices!r}")
    normalised = tuple(_normalise(name, c) for c in choices)
    encoded = [encode_choice(c) for c in normalised]
    for i, e in enumerate(encoded):
        if encoded.index(e) != i:
            raise ConfigError(f"{path}: {where}.choices: {choices[i]!r} is listed twice")
    return normalised


def _parse_condition(path: Path, where: str, raw: Any) -> dict[str, tuple] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(
            f"{path}: {where}.condition: expected a mapping like {{loss_weighting: focal}}, "
            f"got {raw!r}"
        )
    parsed = {}
    for other, values in raw.items():
        # A list means "any of these"; a list-valued choice (attention_stages) is wrapped:
        # {attention_stages: [[3, 4]]}.
        items = values if isinstance(values, list) else [values]
        if not items:
            raise ConfigError(f"{path}: {where}.condition.{other}: the list of values is empty")
        parsed[other] = tuple(_normalise(str(other), v) for v in items)
    return parsed


def _check_conditions(path: Path, specs: Mapping[str, ParamSpec], fixed: Mapping[str, Any]) -> None:
    for spec in specs.values():
        for other, allowed in (spec.condition or {}).items():
            key = f"params.{spec.name}.condition.{other}"
            if other in fixed:
                raise ConfigError(
                    f"{path}: {key}: {other!r} is fixed to {fixed[other]!r}, not searched; a "
                    "condition can only refer to a searched parameter (it would always or "
                    "never hold): drop the condition or search the parameter"
                )
            if other not in specs:
                raise ConfigError(
                    f"{path}: {key}: {other!r} is not a searched parameter; searched: "
                    f"{', '.join(specs) or '(none)'}"
                )
            parent = specs[other]
            if parent.type != "categorical":
                raise ConfigError(
                    f"{path}: {key}: {other!r} is a {parent.type} parameter; a condition "
                    "can only refer to a categorical one"
                )
            for value in allowed:
                if value not in (parent.choices or ()):
                    raise ConfigError(
                        f"{path}: {key}: value {_quote(value)} is not among the choices of "
                        f"{other!r}: {', '.join(show_value(c) for c in parent.choices or ())}"
                    )


def _dependency_order(path: Path, specs: Mapping[str, ParamSpec]) -> list[str]:
    """Parents before the params conditioned on them; file order otherwise."""
    sorter = graphlib.TopologicalSorter({n: set(s.condition or ()) for n, s in specs.items()})
    try:
        sorter.prepare()
    except graphlib.CycleError as e:
        cycle = " -> ".join(e.args[1])
        raise ConfigError(f"{path}: params: cyclic conditions: {cycle}") from None
    # Take the earliest ready param one at a time, so a file already in a valid order
    # keeps it (describe() then reads like the file).
    position = {n: i for i, n in enumerate(specs)}
    order: list[str] = []
    ready: set[str] = set()
    while sorter.is_active():
        ready.update(sorter.get_ready())
        first = min(ready, key=position.__getitem__)
        ready.discard(first)
        order.append(first)
        sorter.done(first)
    return order


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


# --- reading -------------------------------------------------------------------------------


def _space_files() -> list[Path]:
    return sorted(SPACES_DIR.glob("*.yaml")) if SPACES_DIR.is_dir() else []


def _is_bare_name(text: str) -> bool:
    return "/" not in text and "\\" not in text and not text.endswith((".yaml", ".yml"))


# --- values ---------------------------------------------------------------------------------


def _normalise(name: str, value: Any) -> Any:
    """Tuple fields take a list (or one int) in YAML; keep them as tuples, hashable."""
    if name in _TUPLE_FIELDS:
        if isinstance(value, int) and not isinstance(value, bool):
            return (value,)
        if isinstance(value, list):
            return tuple(value)
    return value


def _quote(value: Any) -> str:
    """A value in an error message: repr, with tuples shown as the YAML list they came from."""
    return repr(list(value)) if isinstance(value, tuple) else repr(value)
