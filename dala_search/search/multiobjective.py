"""Several objectives in one Optuna study, with pruning on the primary one.

Optuna refuses ``Trial.report`` and ``Trial.should_prune`` on a multi-objective study (RFC
#3450) and Ray's schedulers take one metric. The bridge here:

* keeps the primary objective's per-epoch values (the pruned-on metric, ``--prune-on``,
  by default the primary itself) in the study, as the trial's user attribute
  ``primary_intermediate`` ({"epoch": value}), so a resume and optuna-dashboard see them;
* asks the configured pruner on a *single-objective view* of the study (``primary_view``):
  an in-memory copy with the primary's direction in which every trial carries those values
  as its intermediate values and a completed trial its primary value. Median, percentile
  and successive-halving pruners read exactly that (``trial.intermediate_values``,
  ``study.direction``, the other trials' states and values); what successive halving
  writes on the judged trial (its rung values) is copied back to the real study;
* tells a completed trial all its objectives (secondary validation metrics at the epoch
  its primary was best, costs as measured) and its constraints (``Trial.set_constraint``,
  which Optuna 5's samplers and ``Study.best_trials`` read); a pruned trial is told PRUNED
  with no values, so it never enters the Pareto front.

Ray's own ``OptunaSearch`` accepts ``metric=[...]``, ``mode=[...]`` (Ray 2.60 then reports
no intermediate values and tells the list at completion) but no Ray scheduler takes a list:
the searcher here keeps one metric for Ray (the primary) and the list for Optuna.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from dala_search.errors import ConfigError
from dala_search.objectives import constraints_of, objectives_of
from dala_search.search import ray_internals
from dala_search.search.optuna_search import PruningOptunaSearch
from dala_search.search.optuna_study import OBJECTIVES, PRIMARY_INTERMEDIATE_ATTR

logger = logging.getLogger(__name__)

#: User attribute: False when a completed trial violates a constraint (also in Optuna's
#: own system attributes as ``constraints:<name>``).
FEASIBLE_ATTR = "feasible"


def primary_intermediate(frozen: optuna.trial.FrozenTrial) -> dict[int, float]:
    """A trial's primary values per step, read back from its user attribute."""
    raw = frozen.user_attrs.get(PRIMARY_INTERMEDIATE_ATTR) or {}
    return {int(step): float(value) for step, value in raw.items()}


def primary_view(
    study: optuna.Study, direction: str, pruner: optuna.pruners.BasePruner
) -> optuna.Study:
    """An in-memory single-objective copy of ``study`` for ``pruner`` to judge.

    Trial numbers and order are kept (trial ``n`` of the view is trial ``n`` of the study);
    intermediate values come from ``primary_intermediate``; a completed trial's value is its
    first (primary) value; a pruned one is added as PRUNED with its last primary value.
    """
    view = optuna.create_study(
        storage=optuna.storages.InMemoryStorage(),
        study_name=study.study_name,
        direction=direction,
        pruner=pruner,
    )
    for frozen in study.get_trials(deepcopy=False):
        inter = primary_intermediate(frozen)
        value = None
        if frozen.state == TrialState.COMPLETE:
            value = frozen.values[0]
        elif frozen.state == TrialState.PRUNED and inter:
            last = inter[max(inter)]
            value = last if math.isfinite(last) else None
        view.add_trial(
            optuna.trial.create_trial(
                state=frozen.state,
                value=value,
                params=frozen.params,
                distributions=frozen.distributions,
                user_attrs=frozen.user_attrs,
                system_attrs=frozen.system_attrs,
                intermediate_values=inter,
            )
        )
    return view


def judge_primary(study: optuna.Study, number: int, direction: str) -> bool:
    """Ask ``study.pruner`` whether trial ``number`` should stop, on the primary's values.

    System attributes the pruner sets on the judged trial (successive halving's rungs) are
    written back to ``study``, so its next decision sees them as Optuna's would.
    """
    pruner = study.pruner
    view = primary_view(study, direction, pruner)
    judged = view.trials[number]
    decision = pruner.prune(view, judged)
    view_storage = ray_internals.study_storage(view)
    after = view_storage.get_trial(ray_internals.trial_id(judged)).system_attrs
    real = study.trials[number]
    storage = ray_internals.study_storage(study)
    for key, value in after.items():
        if real.system_attrs.get(key) != value:
            storage.set_trial_system_attr(ray_internals.trial_id(real), key, value)
    return bool(decision)


class MultiObjectiveMixin:
    """Turns a ``PruningOptunaSearch`` into the multi-objective bridge (module docstring).

    Extra keyword arguments: ``objectives`` ("metric:max|min" texts, the first the
    primary, whose metric must be the searcher's ``metric``) and ``constraints``
    ("metric<=N" texts). Ray sees one metric, the primary; the study has one direction per
    objective.
    """

    def __init__(
        self,
        *args: Any,
        objectives: tuple[str, ...] = (),
        constraints: tuple[str, ...] = (),
        **kwargs: Any,
    ) -> None:
        self._objective_list = objectives_of(objectives)
        self._constraint_list = constraints_of(constraints)
        if not self._objective_list:
            raise ConfigError("a multi-objective search needs at least one objective")
        self._epoch_rows: dict[str, dict[int, dict[str, float]]] = {}
        super().__init__(*args, **kwargs)
        if self.metric != self._objective_list[0].metric:
            raise ConfigError(
                f"the searcher's metric {self.metric!r} is not the primary objective "
                f"{self._objective_list[0]}"
            )

    def _setup_study(self, mode: str | list) -> None:
        # Ray's set-up with a list of modes creates the study with one direction each.
        OptunaSearch._setup_study(self, [o.direction for o in self._objective_list])
        wanted = [o.optuna_direction for o in self._objective_list]
        actual = [d.name.lower() for d in self.study.directions]
        if actual != wanted:
            raise ConfigError(
                f"Optuna study {ray_internals.study_name(self)!r} already exists with "
                f"directions {actual}, but the objectives ask for {wanted}"
            )
        self.study.set_user_attr("prune_metric", self.prune_metric)
        self.study.set_user_attr("objectives", [str(o) for o in self._objective_list])
        self.study.set_user_attr("constraints", [str(c) for c in self._constraint_list])
        with warnings.catch_warnings():  # "experimental" since Optuna 3.2, still in 5.1
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.study.set_metric_names([o.metric for o in self._objective_list])

    def _record(self, trial_id: str, result: Mapping[str, Any]) -> None:
        super()._record(trial_id, result)
        step = result.get(self.step_key)
        if step is None or trial_id not in ray_internals.trials(self):
            return
        keys = {o.metric for o in self._objective_list} | {c.metric for c in self._constraint_list}
        row = {k: float(result[k]) for k in keys if k in result}
        self._epoch_rows.setdefault(trial_id, {})[int(step)] = row

    def _report_intermediate(self, trial_id: str, value: float, step: int) -> None:
        # A finished trial's attributes cannot change: Optuna raises
        # UpdateFinishedTrialError here as `report` would (the caller's rule for reruns).
        trial = ray_internals.trials(self)[trial_id]
        values = dict(trial.user_attrs.get(PRIMARY_INTERMEDIATE_ATTR) or {})
        values.setdefault(str(step), value)  # first report of a step wins, as in Optuna
        trial.set_user_attr(PRIMARY_INTERMEDIATE_ATTR, values)

    def _ask_pruner(self, trial_id: str) -> bool:
        number = ray_internals.trials(self)[trial_id].number
        return judge_primary(self.study, number, self._objective_list[0].optuna_direction)

    def _completed_value(self, trial_id: str, values: list[float]) -> float | list[float]:
        """Every objective at the epoch the primary chose; constraints set on the trial."""
        primary = OBJECTIVES[self._objective](values, ray_internals.mode(self))
        rows = self._epoch_rows.pop(trial_id, {})
        steps = sorted(rows)
        chosen = next(
            (s for s in steps if rows[s].get(self.metric) == primary), steps[-1] if steps else None
        )
        row = rows.get(chosen, {}) if chosen is not None else {}
        missing = [o.metric for o in self._objective_list if o.metric not in row]
        if missing or math.isnan(primary):
            logger.warning("trial %s reported no %s: told FAIL", trial_id, missing or "primary")
            return [math.nan] * len(self._objective_list)  # Optuna records FAIL
        out = [primary, *(row[o.metric] for o in self._objective_list[1:])]
        self._set_constraints(trial_id, row)
        return out

    def _set_constraints(self, trial_id: str, row: Mapping[str, float]) -> None:
        if not self._constraint_list:
            return
        trial = ray_internals.trials(self)[trial_id]
        feasible = True
        for constraint in self._constraint_list:
            value = row.get(constraint.metric, math.nan)
            # A metric the trial never reported cannot show the constraint holds.
            violation = math.inf if math.isnan(value) else constraint.violation(value)
            trial.set_constraint(str(constraint), violation)
            feasible = feasible and violation <= 0
        trial.set_user_attr(FEASIBLE_ATTR, feasible)


class MultiObjectiveOptunaSearch(MultiObjectiveMixin, PruningOptunaSearch):
    """``PruningOptunaSearch`` with several objectives (see the module docstring)."""
