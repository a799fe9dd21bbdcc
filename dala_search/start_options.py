"""The options of ``dala-search start``, in one table.

Each row is one option: its keyword (``plan_search``'s, and the ``search:`` key of a space
file when ``space_key``), its flag, its type and range, its default and its help. The click
command (``cli/search.py``), ``plan_search`` (``search/planning.py``), the keys a space's
``search:`` section accepts and their defaults (``space.SearchSettings``,
``space_file.SEARCH_KEYS``) are all derived from it, and tests/search/test_start_refusals.py
drives every row with a bad value. A new option is one more row (docs/architecture.md).

Ray-, click- and Optuna-free: the space reader (core) and the CLI import it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dala_search.config import PROTOCOLS, SELECT_METRICS
from dala_search.data.breakhis import MAGNIFICATIONS
from dala_search.errors import ConfigError, DalaError
from dala_search.objectives import check_constraints, check_objectives
from dala_search.runs.plan import NAME_RULE, is_valid_name, parse_duration, parse_magnifications
from dala_search.runs.storage import check_storage_url
from dala_search.warm_points import check_enqueue, check_warm_start

# Names only: the search package maps them to Optuna samplers and pruners (its registries
# in search/pruning.py; tests/test_space.py and tests/search/test_pruning.py pin both).
SAMPLERS: tuple[str, ...] = ("tpe", "random", "cmaes", "gp", "nsga2")
PRUNERS: tuple[str, ...] = ("median", "percentile", "sha", "hyperband", "asha", "none")

# The upper bounds are TrialConfig's (config.py): a value let through here must not be
# refused later inside every trial of a running search.
MAX_SEED = 2**31 - 1
MAX_EPOCHS = 10000


@dataclass(frozen=True)
class StartOption:
    """One option of ``start``. ``kind``: int | float | text | path | choice.

    ``default`` applies when neither the command line nor (for a ``space_key``) the space
    sets the value; None means "decided later" (auto GPUs, the demo data, a dated name...).
    ``parse`` checks a text value and returns it normalised; it raises ConfigError or
    DataError with a message that does not repeat the flag (the caller prefixes it).
    """

    name: str
    flag: str | None  # None: a space key with no flag (the searched metric)
    kind: str
    help: str = ""
    default: Any = None
    space_key: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself refused (a positive float)
    choices: tuple[str, ...] = ()
    noun: str = "value"  # "unknown <noun> 'x'; valid: ..."
    parse: Callable[[Any], Any] | None = None
    short: str | None = None
    show_default: bool = False
    multiple: bool = False  # repeatable flag / a YAML list; () (not given) counts as None

    @property
    def label(self) -> str:
        """How messages name the option: its flag, or ``search.<key>`` for a space key."""
        return self.flag or f"search.{self.name}"

    def check(self, value: Any, where: str | None = None) -> Any:
        """``value`` checked against the row's type and range (None passes: not set).

        Returns the value normalised (``parse``'s result); raises ConfigError (or the
        DataError ``parse`` raised) as ``"<where>: ..."``, ``where`` the flag by default.
        """
        if value is None:
            return None
        where = where or self.label
        if self.kind in ("int", "float"):
            return _check_number(self, value, where)
        if self.kind == "choice":
            if value not in self.choices:
                raise ConfigError(
                    f"{where}: unknown {self.noun} {value!r}; valid: {', '.join(self.choices)}"
                )
            return value
        if self.parse is None:
            return value
        try:
            return self.parse(value)
        except DalaError as e:
            raise type(e)(f"{where}: {_without(str(e), self.label)}") from None


def _check_number(option: StartOption, value: Any, where: str) -> int | float:
    integer = option.kind == "int"
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        kind = "an integer" if integer else "a finite number"
        raise ConfigError(f"{where}: {value!r} must be {kind}")
    low, high = option.low, option.high
    below = low is not None and (value <= low if option.low_open else value < low)
    if below or (high is not None and value > high):
        kind = "an integer" if integer else "a number"
        if high is not None:
            rule = f"between {low:g} and {high:g}"
        else:
            rule = f"{'>' if option.low_open else '>='} {low:g}"
        raise ConfigError(f"{where}: {value!r} must be {kind} {rule}")
    return value


def _without(message: str, label: str) -> str:
    """A message from ``parse`` without a leading ``"<flag>: "`` (some helpers add it)."""
    return message.removeprefix(f"{label}: ")


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"expected text, got {value!r}")
    return value


def _space(value: Any) -> str:
    """A shipped space's name or a YAML path (a ``Path`` from a library caller too)."""
    return str(value) if isinstance(value, os.PathLike) else _text(value)


def _name(value: Any) -> str:
    if not is_valid_name(_text(value)):
        raise ConfigError(f"{value!r}: {NAME_RULE}")
    return value


def check_address(value: Any) -> str:
    """``auto``, ``local``, ``ray://HOST:PORT`` (Ray Client) or ``HOST:PORT`` (a GCS)."""
    text = _text(value)
    host, _, port = text.removeprefix("ray://").rpartition(":")
    if text not in ("auto", "local") and not (host and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(
            f"{text!r} is not a Ray cluster address: use auto (a cluster started on this "
            "machine with `ray start`), ray://HOST:10001 or HOST:6379"
        )
    return text


def _duration(value: Any) -> str:
    parse_duration(_text(value))
    return value


# Also the --protocol of data split, train, evaluate and baselines (cli/_base.py).
PROTOCOL_HELP = (
    "Split protocol: patient-disjoint; image-level (LEAKY: inflated figures, only to "
    "measure the leak); eva (kaiko-ai/eva's BreakHis task: 40X, TA/MC/F/DC, its fixed "
    "validation patients as test)."
)

START_OPTIONS: tuple[StartOption, ...] = (
    StartOption(
        "space",
        "--space",
        "text",
        "Space name or YAML path.",
        default="default",
        show_default=True,
        parse=_space,
    ),
    StartOption(
        "data_dir",
        "--data",
        "path",
        "BreakHis folder (default: the synthetic demo set, generated once).",
    ),
    StartOption(
        "magnifications",
        "--magnification",
        "text",
        "Comma list (40X,100X) or 'all'.",
        default=MAGNIFICATIONS,
        space_key=True,
        parse=parse_magnifications,
        short="-m",
    ),
    StartOption("trials", "--trials", "int", "Per magnification.", 20, space_key=True, low=1),
    StartOption("epochs", "--epochs", "int", low=1, high=MAX_EPOCHS),
    StartOption(
        "name", "--name", "text", "Search name (default: <space>-<date>-<time>).", parse=_name
    ),
    StartOption(
        "address", "--address", "text", "Ray cluster: auto | ray://HOST:10001.", parse=check_address
    ),
    StartOption(
        "tracking_uri",
        "--tracking-uri",
        "text",
        "MLflow tracking URI (default: sqlite mlflow.db in the working directory).",
        parse=_text,
    ),
    StartOption(
        "storage",
        "--storage",
        "text",
        "Optuna RDB URL (default: sqlite in the folder).",
        parse=check_storage_url,
    ),
    StartOption(
        "sampler", "--sampler", "choice", "", "tpe", True, choices=SAMPLERS, noun="sampler"
    ),
    StartOption("pruner", "--pruner", "choice", "", "median", True, choices=PRUNERS, noun="pruner"),
    StartOption(
        "prune_on",
        "--prune-on",
        "choice",
        "Validation metric the pruner judges epochs by (default: the searched metric).",
        space_key=True,
        choices=SELECT_METRICS,
        noun="metric",
    ),
    StartOption(
        "gpus_per_trial",
        "--gpus-per-trial",
        "float",
        "GPUs per trial; a fraction packs trials on one GPU (default: 1 if any).",
        low=0,
    ),
    StartOption(
        "cpus_per_trial",
        "--cpus-per-trial",
        "float",
        default=1.0,
        low=0,
        low_open=True,
        show_default=True,
    ),  # fmt: skip
    StartOption(
        "workers_per_trial", "--workers-per-trial", "int", default=1, low=1, show_default=True
    ),
    StartOption(
        "max_concurrent",
        "--max-concurrent",
        "int",
        "Trials at once (0: as resources allow).",
        default=0,
        space_key=True,
        low=0,
    ),
    StartOption(
        "time_budget",
        "--time-budget",
        "text",
        "Wall-clock budget, e.g. 45m or 2h.",
        parse=_duration,
    ),
    StartOption("fold", "--fold", "int", "Official fold (Folds.csv).", low=1, high=5),
    StartOption(
        "max_retries",
        "--max-retries",
        "int",
        "Restarts of a trial whose process or node died (a trial that raised is not retried).",
        default=2,
        low=0,
        show_default=True,
    ),
    StartOption(
        "cv",
        "--cv",
        "int",
        "Inner folds per trial: each trial trains K models on K patient-grouped folds of "
        "the non-test patients and is scored (and pruned) on their mean; about K times the "
        "cost of a trial (default: the space's search.cv, else 1 = one validation split).",
        default=1,
        space_key=True,
        low=1,
    ),
    StartOption(
        "protocol",
        "--protocol",
        "choice",
        PROTOCOL_HELP,
        default="patient",
        choices=PROTOCOLS,
        noun="protocol",
        show_default=True,
    ),
    StartOption("seed", "--seed", "int", "Random seed.", default=0, low=0, high=MAX_SEED),
    StartOption(
        "runs_dir",
        "--runs-dir",
        "path",
        "Where search folders live (default: $DALA_RUNS_DIR or ./dala_runs).",
    ),
    StartOption(
        "objectives",
        "--objective",
        "text",
        "METRIC:max|min, repeatable; the first (a val_* metric, max) is the primary, "
        "pruned on; costs: params_m, gflops, latency_ms, peak_mem_mb (default: the space's "
        "search.metric alone). Several give a Pareto front (NSGA-II unless --sampler).",
        default=(),
        space_key=True,
        parse=check_objectives,
        multiple=True,
    ),
    StartOption(
        "constraints",
        "--constraint",
        "text",
        "METRIC<=N or METRIC>=N, repeatable (e.g. params_m<=25): violating trials are "
        "recorded infeasible and kept out of the front.",
        default=(),
        space_key=True,
        parse=check_constraints,
        multiple=True,
    ),
    StartOption(
        "enqueue",
        "--enqueue",
        "text",
        "Points tried first in every study, repeatable: 'paper' (the paper space's point) "
        "or a YAML file listing points (searched parameter: value).",
        default=(),
        parse=check_enqueue,
        multiple=True,
    ),
    StartOption(
        "warm_start",
        "--warm-start",
        "text",
        "SEARCH[:MAG]: the 3 best configurations of that search's study (of the same "
        "magnification unless MAG) are tried first.",
        parse=check_warm_start,
    ),
    # A space key with no flag: the metric a search maximises belongs to its space.
    StartOption(
        "metric",
        None,
        "choice",
        default="balanced_accuracy",
        space_key=True,
        choices=SELECT_METRICS,
        noun="metric",
    ),
)

OPTIONS: dict[str, StartOption] = {o.name: o for o in START_OPTIONS}
COMMAND_OPTIONS: tuple[StartOption, ...] = tuple(o for o in START_OPTIONS if o.flag)
SPACE_OPTIONS: tuple[StartOption, ...] = tuple(o for o in START_OPTIONS if o.space_key)
# The keys of a space file's ``search:`` section, the searched metric first.
SEARCH_KEYS: tuple[str, ...] = ("metric", *(o.name for o in SPACE_OPTIONS if o.name != "metric"))


def resolve(given: Mapping[str, Any], space_settings: Any) -> dict[str, Any]:
    """Every option's value: given (not None), else the space's (a space key), else the
    row's default; each checked against its row. Unknown names raise TypeError, as an
    unknown keyword would."""
    unknown = sorted(set(given) - {o.name for o in COMMAND_OPTIONS})
    if unknown:
        raise TypeError(f"unknown start option(s): {', '.join(unknown)}")
    values = {}
    for o in START_OPTIONS:
        value = given.get(o.name)
        if o.multiple and not value:  # click's () for a repeatable flag not given
            value = None
        if value is None and o.space_key:
            value = getattr(space_settings, o.name)
        if value is None:
            value = o.default
        values[o.name] = o.check(value)
    return values
