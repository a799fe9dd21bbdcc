"""What a search optimises: ``--objective METRIC:max|min`` (repeated) and ``--constraint``.

The first objective is the *primary*: trials are pruned on its per-epoch values, the best
epoch of a trial is chosen by it and ``best`` marks the front's point that is best by it.
It must be a validation metric (``val_<metric>``) to be maximised: a cost (latency,
size) is the same at every epoch, so there would be nothing to prune on. The others may be
validation metrics or the costs that ``costs.py`` measures once per trial.

A constraint (``params_m<=25``) keeps a trial out of the Pareto front when violated; Optuna
receives ``value - bound`` (``<= 0`` is feasible, Optuna's convention).

Framework-free (the space reader and the start options' table import it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from dala_search.config import SELECT_METRICS
from dala_search.errors import ConfigError

#: Costs measured per trial (``costs.measure_costs``) and what each one is.
COST_METRICS: dict[str, str] = {
    "params_m": "parameters, millions",
    "gflops": "GFLOPs of one forward pass per image (torch's FlopCounterMode, 2 per MAC)",
    "latency_ms": "inference ms per image (median of repeats; batch 1 and the search batch)",
    "peak_mem_mb": "peak CUDA memory of one inference batch, MB (CUDA only)",
}
VALIDATION_METRICS: tuple[str, ...] = tuple(f"val_{m}" for m in SELECT_METRICS)
DIRECTIONS: dict[str, str] = {"max": "maximize", "min": "minimize"}
_CONSTRAINT = re.compile(r"^\s*([a-z_0-9]+)\s*(<=|>=)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class Objective:
    """One objective: a result key and whether larger (``max``) or smaller is better."""

    metric: str
    direction: str  # "max" | "min"

    @property
    def optuna_direction(self) -> str:
        return DIRECTIONS[self.direction]

    @property
    def is_cost(self) -> bool:
        return self.metric in COST_METRICS

    def __str__(self) -> str:
        return f"{self.metric}:{self.direction}"


@dataclass(frozen=True)
class Constraint:
    """``metric <= bound`` or ``metric >= bound``; ``violation`` > 0 means infeasible."""

    metric: str
    op: str  # "<=" | ">="
    bound: float

    def violation(self, value: float) -> float:
        """Optuna's constraint value: ``<= 0`` when satisfied."""
        return value - self.bound if self.op == "<=" else self.bound - value

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.bound:g}"


def _known(metric: str) -> bool:
    return metric in COST_METRICS or metric in VALIDATION_METRICS


def _valid_list() -> str:
    return ", ".join((*VALIDATION_METRICS, *COST_METRICS))


def parse_objective(text: Any) -> Objective:
    """``"val_balanced_accuracy:max"`` -> Objective; ConfigError naming the text otherwise."""
    if not isinstance(text, str) or text.count(":") != 1:
        raise ConfigError(f"{text!r} is not METRIC:max or METRIC:min")
    metric, direction = (part.strip() for part in text.split(":"))
    if not _known(metric):
        raise ConfigError(f"{text!r}: unknown metric {metric!r}; valid: {_valid_list()}")
    if direction not in DIRECTIONS:
        raise ConfigError(f"{text!r}: direction must be max or min, got {direction!r}")
    return Objective(metric, direction)


def parse_constraint(text: Any) -> Constraint:
    """``"params_m<=25"`` -> Constraint; ConfigError naming the text otherwise."""
    match = _CONSTRAINT.match(text) if isinstance(text, str) else None
    if match is None:
        raise ConfigError(f"{text!r} is not METRIC<=NUMBER or METRIC>=NUMBER")
    metric, op, bound = match.groups()
    if not _known(metric):
        raise ConfigError(f"{text!r}: unknown metric {metric!r}; valid: {_valid_list()}")
    try:
        value = float(bound)
    except ValueError:
        raise ConfigError(f"{text!r}: {bound!r} is not a number") from None
    return Constraint(metric, op, value)


def _texts(value: Any) -> list[Any]:
    """A list from the command line (click's tuple) or a space file (a YAML list)."""
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ConfigError(f"expected a list of texts, got {value!r}")
    return list(value)


def check_objectives(value: Any) -> tuple[str, ...]:
    """The objectives, normalised (``"metric:dir"``); the primary checked. () passes."""
    objectives = [parse_objective(v) for v in _texts(value)]
    if not objectives:
        return ()
    metrics = [o.metric for o in objectives]
    repeated = sorted({m for m in metrics if metrics.count(m) > 1})
    if repeated:
        raise ConfigError(f"metric(s) {', '.join(repeated)} given more than once")
    primary = objectives[0]
    if primary.metric not in VALIDATION_METRICS or primary.direction != "max":
        raise ConfigError(
            f"the first objective is the primary, which trials are pruned on and their best "
            f"epoch chosen by: it must be a validation metric to maximise ("
            f"{', '.join(f'{m}:max' for m in VALIDATION_METRICS)}), got {primary}"
        )
    return tuple(str(o) for o in objectives)


def check_constraints(value: Any) -> tuple[str, ...]:
    """The constraints, normalised (``"metric<=bound"``). () passes."""
    constraints = [parse_constraint(v) for v in _texts(value)]
    return tuple(str(c) for c in constraints)


def objectives_of(texts: tuple[str, ...] | list[str]) -> tuple[Objective, ...]:
    """Parsed objectives of a plan (already checked when it was made)."""
    return tuple(parse_objective(t) for t in texts)


def constraints_of(texts: tuple[str, ...] | list[str]) -> tuple[Constraint, ...]:
    """Parsed constraints of a plan."""
    return tuple(parse_constraint(t) for t in texts)


def cost_metrics_needed(
    objectives: tuple[str, ...], constraints: tuple[str, ...]
) -> tuple[str, ...]:
    """The costs a trial must measure for these objectives and constraints, in table order."""
    named = {o.metric for o in objectives_of(objectives)} | {
        c.metric for c in constraints_of(constraints)
    }
    return tuple(m for m in COST_METRICS if m in named)


def plan_objectives(
    values: dict[str, Any], sampler_given: bool, default_sampler: str, cuda_here: bool = True
) -> dict[str, Any]:
    """The plan's ``metric``, ``objectives``, ``constraints`` and ``sampler`` from the
    resolved start options.

    One objective and no constraint is today's search: its metric becomes the searched
    metric and no objectives are stored. Otherwise the primary's metric is the searched
    metric (it replaces the space's ``search.metric``) and NSGA-II is the sampler unless
    ``--sampler`` (or a space's ``search.sampler`` other than the default) names another.
    """
    objectives = tuple(values["objectives"] or ())
    constraints = tuple(values["constraints"] or ())
    metric, sampler = values["metric"], values["sampler"]
    if objectives:
        metric = parse_objective(objectives[0]).metric.removeprefix("val_")
    if len(objectives) < 2 and not constraints:
        return {"metric": metric, "objectives": (), "constraints": (), "sampler": sampler}
    if not objectives:  # constraints on the space's metric alone
        objectives = (f"val_{metric}:max",)
    gpus = values.get("gpus_per_trial")
    # Auto GPUs on a Ray of our own (no --address) train where the driver runs.
    on_cpu = gpus == 0 or (gpus is None and values.get("address") is None and not cuda_here)
    if "peak_mem_mb" in cost_metrics_needed(objectives, constraints) and on_cpu:
        raise ConfigError(
            "--objective/--constraint peak_mem_mb: CUDA memory (costs.py), and the trials "
            "would run on CPU (--gpus-per-trial 0, or no CUDA on this machine)"
        )
    if len(objectives) > 1 and not sampler_given and sampler == default_sampler:
        sampler = "nsga2"
    if len(objectives) > 1 and sampler == "cmaes":
        raise ConfigError(
            "--sampler: 'cmaes' optimises one objective; with several --objective use "
            "nsga2 (default), tpe, gp or random"
        )
    if values["pruner"] == "hyperband":
        raise ConfigError(
            "--pruner: 'hyperband' is not supported with several objectives or constraints "
            "(its brackets live in the study it prunes); use median, percentile, sha or asha"
        )
    return {
        "metric": metric,
        "objectives": objectives,
        "constraints": constraints,
        "sampler": sampler,
    }
