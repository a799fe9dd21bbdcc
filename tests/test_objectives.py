"""Objectives and constraints as the start options read them, the costs a trial measures,
and the primary-objective pruning bridge on a plain Optuna study (no Ray)."""

from __future__ import annotations

import optuna
import pytest
import torch
from torch import nn

from dala_search.costs import measure_costs
from dala_search.errors import ConfigError
from dala_search.objectives import (
    check_constraints,
    check_objectives,
    parse_constraint,
    plan_objectives,
)
from dala_search.search.multiobjective import judge_primary
from dala_search.search.optuna_study import PRIMARY_INTERMEDIATE_ATTR


def test_objectives_parse_and_the_primary_is_checked() -> None:
    assert check_objectives(["val_f1:max", " latency_ms : min"]) == ("val_f1:max", "latency_ms:min")
    for bad, words in [
        (["latency_ms:min", "val_f1:max"], "primary"),
        (["val_f1:min"], "primary"),
        (["val_f1:up"], "max or min"),
        (["speed:min"], "unknown metric 'speed'"),
        (["val_f1:max", "val_f1:max"], "more than once"),
        ("val_f1:max", "list"),
    ]:
        with pytest.raises(ConfigError, match=words):
            check_objectives(bad)


def test_constraints_parse() -> None:
    assert check_constraints(("params_m<=25", "gflops >= 0.5")) == ("params_m<=25", "gflops>=0.5")
    c = parse_constraint("params_m<=25")
    assert (c.violation(20.0), c.violation(30.0)) == (-5.0, 5.0)
    for bad in ("params_m<25", "foo<=1", "params_m<=x"):
        with pytest.raises(ConfigError):
            parse_constraint(bad)


def _values(**kw: object) -> dict:
    base = {"objectives": (), "constraints": (), "metric": "balanced_accuracy"}
    return {**base, "sampler": "tpe", "pruner": "median", "gpus_per_trial": None, **kw}


def test_one_objective_is_todays_search_and_several_default_to_nsga2() -> None:
    one = plan_objectives(_values(objectives=("val_f1:max",)), False, "tpe")
    assert one == {"metric": "f1", "objectives": (), "constraints": (), "sampler": "tpe"}
    two = plan_objectives(_values(objectives=("val_f1:max", "params_m:min")), False, "tpe")
    assert two["sampler"] == "nsga2" and two["objectives"] == ("val_f1:max", "params_m:min")
    given = plan_objectives(_values(objectives=("val_f1:max", "params_m:min")), True, "tpe")
    assert given["sampler"] == "tpe"
    with pytest.raises(ConfigError, match="cmaes"):
        plan_objectives(_values(objectives=("val_f1:max", "gflops:min"), sampler="cmaes"), 1, "")
    with pytest.raises(ConfigError, match="hyperband"):
        plan_objectives(_values(constraints=("gflops<=1",), pruner="hyperband"), False, "tpe")
    with pytest.raises(ConfigError, match="CUDA"):
        plan_objectives(_values(constraints=("peak_mem_mb<=1",), gpus_per_trial=0), 0, "", True)


def test_costs_of_a_small_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import dala_search.costs

    monkeypatch.setattr(dala_search.costs, "MIN_SECONDS", 0.0)  # MIN_REPEATS passes only
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 8, 8))  # materialise the lazy layer
    costs = measure_costs(
        model,
        image_size=8,
        batch_size=4,
        device=torch.device("cpu"),
        metrics=("params_m", "gflops", "latency_ms"),
    )
    params = 3 * 4 * 9 + 4 + 4 * 36 * 2 + 2
    assert costs["params_m"] == pytest.approx(params / 1e6)
    # conv: 2 FLOPs per MAC, 36 outputs x 4 channels x 27 MACs; linear: 144 x 2 MACs
    assert costs["gflops"] == pytest.approx((2 * 36 * 4 * 27 + 2 * 144 * 2) / 1e9)
    assert costs["latency_ms"] > 0 and costs["latency_ms_batch"] > 0
    with pytest.raises(ConfigError, match="CUDA only"):
        measure_costs(model, image_size=8, batch_size=2, device=torch.device("cpu"),
                      metrics=("peak_mem_mb",))  # fmt: skip


def _trial(study: optuna.Study, values: dict[int, float], tell: list[float] | None) -> int:
    trial = study.ask()
    trial.set_user_attr(PRIMARY_INTERMEDIATE_ATTR, {str(k): v for k, v in values.items()})
    if tell is not None:
        study.tell(trial, tell)
    return trial.number


def test_the_pruner_judges_the_primarys_values_in_a_two_direction_study() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    with pytest.raises(NotImplementedError):  # what Optuna itself does: no pruning here
        study.ask().should_prune()
    for v in (0.8, 0.9):
        _trial(study, {1: v, 2: v}, [v, 5.0])
    # median at step 1 is 0.85: 0.5 is pruned, 0.95 is not
    assert judge_primary(study, _trial(study, {1: 0.5}, None), "maximize")
    assert not judge_primary(study, _trial(study, {1: 0.95}, None), "maximize")
    # the same values in the other direction (a primary to minimise) flip the answer
    assert not judge_primary(study, _trial(study, {1: 0.5}, None), "minimize")


def test_successive_halving_rungs_are_written_back_to_the_study() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)
    number = _trial(study, {1: 0.7}, None)
    judge_primary(study, number, "maximize")
    attrs = study.trials[number].system_attrs
    assert attrs["completed_rung_0"] == 0.7


def test_every_sampler_survives_rays_pickling() -> None:
    """Ray pickles the searcher, sampler included (Optuna 5.1's NSGA-II holds a lock)."""
    import pickle

    from ray import cloudpickle

    from dala_search.search.pruning import SAMPLERS, make_sampler

    for name in SAMPLERS:
        again = pickle.loads(cloudpickle.dumps(make_sampler(name, seed=1)))
        assert isinstance(again, optuna.samplers.BaseSampler)
    assert again.sample_independent  # a working sampler object, lock or not


@pytest.mark.parametrize("name", ["nsga2", "tpe", "gp", "random"])
def test_the_samplers_offered_for_several_objectives_take_two_directions(name: str) -> None:
    from dala_search.search.pruning import make_sampler

    sampler = make_sampler(name, seed=0)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    for _ in range(3):
        trial = study.ask()
        x = trial.suggest_float("x", 0.0, 1.0)
        study.tell(trial, [x, x * x])
    assert study.best_trials  # a front, read through Optuna's own API
