"""The ``params:`` of a search space file, parameter by parameter: type, bounds, step,
choices and conditions, each checked by building a real TrialConfig from it
(``space_file.parse_space`` calls ``parse_param``, ``check_conditions`` and
``dependency_order``). Every error is a ConfigError naming the file and the key.
"""

from __future__ import annotations

import graphlib
import math
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from dala_search.config import TrialConfig
from dala_search.errors import ConfigError
from dala_search.space import PARAM_TYPES, ParamSpec, encode_choice, show_value

# TrialConfig fields holding a tuple (attention_stages): YAML gives lists, Optuna needs
# scalars, so such choices are encoded as "3,4" for Optuna and decoded back.
_TUPLE_FIELDS: frozenset[str] = frozenset(
    f.name for f in fields(TrialConfig) if str(f.type).startswith("tuple")
)
# Each field's declared type ("int", "float", ...; config.py uses postponed annotations).
_FIELD_TYPES: dict[str, str] = {f.name: str(f.type) for f in fields(TrialConfig)}

PARAM_FIELDS: tuple[str, ...] = ("type", "low", "high", "step", "log", "choices", "condition")
# Fields each type accepts besides ``type`` and ``condition``.
_TYPE_FIELDS: dict[str, tuple[str, ...]] = {
    "float": ("low", "high", "step", "log"),
    "int": ("low", "high", "step", "log"),
    "categorical": ("choices",),
}


def refuse_unknown(path: Path, where: str, raw: Mapping[str, Any], valid: tuple[str, ...]) -> None:
    """ConfigError naming the first key of ``raw`` (in ``where``) that is not in ``valid``."""
    unknown = [k for k in raw if k not in valid]
    if unknown:
        raise ConfigError(
            f"{path}: unknown key {unknown[0]!r} in {where}; valid: {', '.join(valid)}"
        )


def choice(path: Path, key_path: str, value: Any, valid: tuple[str, ...]) -> str:
    """``value`` when it is one of ``valid``; ConfigError naming ``key_path`` otherwise."""
    if value not in valid:
        raise ConfigError(f"{path}: {key_path}: unknown value {value!r}; valid: {', '.join(valid)}")
    return value


def parse_param(path: Path, name: str, raw: Any, fixed: Mapping[str, Any]) -> ParamSpec:
    """The ParamSpec of ``params.<name>``; every choice and bound is tried on a TrialConfig."""
    where = f"params.{name}"
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: {where}: expected a mapping like {{type: float, low: 0.1, high: 1.0}}, "
            f"got {raw!r}"
        )
    refuse_unknown(path, where, raw, PARAM_FIELDS)
    if "type" not in raw:
        raise ConfigError(f"{path}: {where}: missing 'type'; valid: {', '.join(PARAM_TYPES)}")
    kind = choice(path, f"{where}.type", raw["type"], PARAM_TYPES)
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


def check_conditions(path: Path, specs: Mapping[str, ParamSpec], fixed: Mapping[str, Any]) -> None:
    """Each condition names a searched categorical parameter and some of its choices."""
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


def dependency_order(path: Path, specs: Mapping[str, ParamSpec]) -> list[str]:
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
