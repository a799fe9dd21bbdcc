"""Search spaces: a YAML file -> a validated ``SearchSpace`` -> Optuna define-by-run.

A space file names the TrialConfig values every trial shares (``fixed``), the ones Optuna
searches (``params``, optionally conditional on another searched parameter) and the
defaults of ``dala-search start`` (``search``). The format is documented in
``search_spaces/README.md``.

Everything is checked when the file is loaded, before any cluster starts: every error is a
ConfigError naming the file and the key (and the bad value). Every bound and every choice
is checked by building a real TrialConfig from it, so a space never proposes a trial that
``train_trial`` would refuse an hour into a search.

Optuna is imported lazily inside ``suggest``: the CLI lists spaces without paying for it.
Reading a space file (``load_space``) is ``space_file.py``; this module holds what it builds.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dala_search import start_options
from dala_search.config import TrialConfig
from dala_search.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import optuna

# Re-exported: the names of the samplers and pruners live with the options of ``start``.
SAMPLERS = start_options.SAMPLERS
PRUNERS = start_options.PRUNERS
PARAM_TYPES: tuple[str, ...] = ("float", "int", "categorical")


@dataclass(frozen=True)
class ParamSpec:
    """One searched TrialConfig key. Built by ``load_space``; used by ``SearchSpace.suggest``.

    ``choices`` keeps the values as TrialConfig takes them (tuples for attention_stages);
    ``optuna_choices`` is what Optuna sees. ``condition`` maps another searched categorical
    parameter to the values under which this one exists (all entries must hold).
    """

    name: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None
    condition: dict[str, tuple[Any, ...]] | None = None

    @property
    def optuna_choices(self) -> tuple[Any, ...]:
        """The choices as Optuna accepts them (None/bool/int/float/str); tuples become "3,4"."""
        return tuple(encode_choice(c) for c in self.choices or ())

    def decode(self, value: Any) -> Any:
        """Map a value Optuna returned ("3,4") back to the TrialConfig value ((3, 4))."""
        if self.choices is None:
            return value
        for choice in self.choices:
            if encode_choice(choice) == value and type(encode_choice(choice)) is type(value):
                return choice
        return value  # already decoded (a list from a caller): TrialConfig coerces it

    def is_active(self, sampled: Mapping[str, Any]) -> bool:
        """True when every condition holds for the (decoded) values sampled so far."""
        if not self.condition:
            return True
        return all(k in sampled and sampled[k] in allowed for k, allowed in self.condition.items())

    def suggest(self, trial: optuna.Trial) -> Any:
        """Ask ``trial`` for this parameter; returns the decoded value."""
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)
        if self.type == "int":
            return trial.suggest_int(
                self.name, self.low, self.high, step=self.step or 1, log=self.log
            )
        return self.decode(trial.suggest_categorical(self.name, self.optuna_choices))

    def describe(self) -> str:
        """The range / choices part of a ``describe`` line."""
        if self.type == "categorical":
            text = "{" + ", ".join(show_value(c) for c in self.choices or ()) + "}"
        else:
            text = f"[{self.low!r}, {self.high!r}]"
            if self.log:
                text += " log"
            if self.step is not None:
                text += f" step {self.step!r}"
        for k, allowed in (self.condition or {}).items():
            text += f"  if {k} in {{{', '.join(show_value(v) for v in allowed)}}}"
        return text


# Defaults of ``dala-search start`` from a space's ``search`` section (flags win): one field
# per start option marked ``space_key`` (start_options.py), its default the row's. Fields:
# metric, magnifications, trials, sampler, pruner, prune_on (None: the searched metric),
# max_concurrent (0: as the resources allow), cv (1: one validation split).
SearchSettings = dataclasses.make_dataclass(
    "SearchSettings",
    [
        (o.name, Any, dataclasses.field(default=o.default))
        for o in sorted(start_options.SPACE_OPTIONS, key=lambda o: o.name != "metric")
    ],
    frozen=True,
)
SearchSettings.__module__ = __name__  # pickled with a space into every trial process


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space. ``params`` is in dependency order (parents first)."""

    name: str
    path: Path
    description: str
    settings: SearchSettings
    fixed: dict[str, Any] = field(default_factory=dict)
    params: dict[str, ParamSpec] = field(default_factory=dict)

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Define-by-run: sample the active params on ``trial``; return the fixed values.

        Ray's ``OptunaSearch(space=space.suggest)`` calls this once per trial and merges
        the returned dict (constants) with what was suggested. A conditional parameter is
        only suggested when its condition holds, so Optuna never sees a value that
        training would ignore.
        """
        sampled: dict[str, Any] = {}
        for spec in self.params.values():  # dependency order: parents already sampled
            if spec.is_active(sampled):
                sampled[spec.name] = spec.suggest(trial)
        return copy.deepcopy(self.fixed)

    def trial_config(self, sampled: Mapping[str, Any], **overrides: Any) -> TrialConfig:
        """Fixed + sampled + non-None overrides -> TrialConfig. Called inside each trial.

        ``sampled`` is what Optuna / Ray handed the trial (searched params, possibly with
        the fixed values merged in); encoded choices ("3,4") are decoded. A searched param
        that was inactive keeps TrialConfig's default. ``select_metric`` follows the
        space's ``search.metric`` unless the space or an override sets it, so a trial
        keeps its best epoch by the metric the search maximises.
        """
        foreign = sorted(set(sampled) - set(self.params) - set(self.fixed))
        if foreign:
            raise ConfigError(
                f"{self.path}: sampled key(s) {', '.join(map(repr, foreign))} are not part of "
                f"space {self.name!r}; pass other TrialConfig keys as overrides"
            )
        values: dict[str, Any] = {"select_metric": self.settings.metric, **self.fixed}
        for key, value in sampled.items():
            values[key] = self.params[key].decode(value) if key in self.params else value
        values.update({k: v for k, v in overrides.items() if v is not None})
        return TrialConfig.from_dict(values, source=str(self.path))

    def describe(self) -> list[str]:
        """Human lines for ``dala-search spaces``: searched params, then fixed values."""
        names = [*self.params, *self.fixed]
        width = max((len(n) for n in names), default=0)
        lines = [f"{p.name:<{width}}  {p.type:<11}  {p.describe()}" for p in self.params.values()]
        lines += [f"{k:<{width}}  {'fixed':<11}  {show_value(v)}" for k, v in self.fixed.items()]
        return lines


# --- values --------------------------------------------------------------------------------


def encode_choice(value: Any) -> Any:
    """Optuna's categorical choices must be None/bool/int/float/str: (3, 4) -> "3,4"."""
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value)
    return value


def show_value(value: Any) -> str:
    if isinstance(value, tuple | list):
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    return str(value)
