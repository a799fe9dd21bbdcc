"""Optuna pruning under Ray Tune: real Ray, real Optuna, sqlite studies in tmp_path.

The trainable is a formula, not a model: `climb` reports score = quality * (1 - 0.5**epoch)
for epochs 1..8, so every value below is worked out by hand. Most searches enqueue their
qualities (`points_to_evaluate`) so which trials the median pruner must stop is known:

* concurrency 2 and `n_startup_trials=3`: the first two trials can never be pruned;
* a trial that starts after the fourth trial has started sees at least three COMPLETE
  trials, all with quality >= 0.6, so the median at any step is at least 0.65 * (1-0.5**s)
  and a trial with quality <= 0.4 is pruned at step 2, the first step after the warm-up.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import optuna
import pytest
import ray
from optuna.trial import TrialState
from ray import tune
from ray.tune.search import ConcurrencyLimiter, SearchGenerator

from dala_search.errors import ConfigError
from dala_search.search.optuna_search import (
    RAY_TRIAL_ID_ATTR,
    RETRY_OF_ATTR,
    PruningOptunaSearch,
)
from dala_search.search.pruning import (
    FINAL_EPOCH_KEY,
    PRUNERS,
    SAMPLERS,
    OptunaPruningScheduler,
    PrunedMarkingASHAScheduler,
    find_optuna_searcher,
    make_pruner,
    make_sampler,
)

# Test functions are shipped to Ray workers by value: workers cannot import this file, which
# pytest loads with --import-mode=importlib.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

EPOCHS = 8
QUALITY = {"quality": optuna.distributions.FloatDistribution(0.0, 1.0)}
REPO = Path(__file__).resolve().parents[2]


def score(quality: float, epoch: int) -> float:
    return quality * (1 - 0.5**epoch)


def climb(config: dict) -> None:
    for epoch in range(1, EPOCHS + 1):
        time.sleep(config.get("sleep", 0.02))
        tune.report({"score": score(config["quality"], epoch), "epoch": epoch})


def climb_or_crash(config: dict) -> None:
    for epoch in range(1, EPOCHS + 1):
        # A trial with quality > 0.5 crashes at epoch 3 while the flag file exists.
        if epoch == 3 and config["quality"] > 0.5 and Path(config["crash_flag"]).exists():
            raise RuntimeError("simulated crash")
        tune.report({"score": score(config["quality"], epoch), "epoch": epoch})


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield
    ray.shutdown()


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'study.db'}"


def searcher(tmp_path: Path, points: list[float] | None = None, **kw) -> PruningOptunaSearch:
    """A searcher over quality in [0, 1], maximising "score", study "s" in tmp_path."""
    kw.setdefault("sampler", make_sampler("random", seed=0))
    kw.setdefault("space", QUALITY)
    kw.setdefault("mode", "max")
    return PruningOptunaSearch(
        metric="score",
        storage=sqlite_url(tmp_path),
        study_name="s",
        points_to_evaluate=[{"quality": q} for q in points] if points else None,
        **kw,
    )


def fit(
    tmp_path,
    trainable,
    search_alg,
    scheduler,
    num_samples,
    param_space=None,
    max_concurrent=2,
    **tune_kw,
):
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(search_alg, max_concurrent=max_concurrent),
            scheduler=scheduler,
            num_samples=num_samples,
            reuse_actors=True,
            **tune_kw,
        ),
        param_space=param_space or {},
        run_config=tune.RunConfig(
            storage_path=str(tmp_path / "ray"),
            name="exp",
            verbose=0,
            callbacks=[search_alg.end_of_experiment_callback()],
        ),
    )
    return tuner.fit()


def load(tmp_path: Path) -> list[optuna.trial.FrozenTrial]:
    """The study as another process sees it: loaded fresh from the sqlite file."""
    return optuna.load_study(study_name="s", storage=sqlite_url(tmp_path)).trials


def by_quality(trials) -> dict[float, optuna.trial.FrozenTrial]:
    return {round(t.params["quality"], 6): t for t in trials}


def epochs_by_quality(results) -> dict[float, int]:
    return {round(r.config["quality"], 6): r.metrics["epoch"] for r in results}


def assert_climb_history(trial: optuna.trial.FrozenTrial, n_steps: int) -> None:
    q = trial.params["quality"]
    expected = {s: score(q, s) for s in range(1, n_steps + 1)}
    assert trial.intermediate_values == pytest.approx(expected)


# ----- registries ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, cls",
    [
        ("median", optuna.pruners.MedianPruner),
        ("percentile", optuna.pruners.PercentilePruner),
        ("sha", optuna.pruners.SuccessiveHalvingPruner),
        ("hyperband", optuna.pruners.HyperbandPruner),
        ("none", type(None)),
    ],
)
def test_make_pruner_builds_each_registered_pruner(name, cls):
    assert set(PRUNERS) == {"median", "percentile", "sha", "hyperband", "none"}
    assert type(make_pruner(name)) is cls


def _study_with_complete(pruner, qualities):
    study = optuna.create_study(direction="maximize", pruner=pruner)
    for q in qualities:
        study.add_trial(
            optuna.trial.create_trial(
                value=score(q, EPOCHS),
                intermediate_values={s: score(q, s) for s in range(1, EPOCHS + 1)},
            )
        )
    return study


@pytest.mark.parametrize("name", ["median", "percentile"])
def test_default_pruners_wait_for_three_trials_and_the_second_step(name):
    low = 0.1  # far below every finished trial
    two = _study_with_complete(make_pruner(name), [0.9, 0.8])
    trial = two.ask()
    trial.report(score(low, 1), 1)
    trial.report(score(low, 2), 2)
    assert not trial.should_prune()  # only two finished trials: n_startup_trials=3

    three = _study_with_complete(make_pruner(name), [0.9, 0.8, 0.7])
    trial = three.ask()
    trial.report(score(low, 1), 1)
    assert not trial.should_prune()  # step 1 < n_warmup_steps=2
    trial.report(score(low, 2), 2)
    assert trial.should_prune()


def test_percentile_pruner_keeps_only_the_top_quarter():
    # Optuna's percentile is the share kept: for maximize, PercentilePruner(25) compares with
    # the 75th percentile of [0.9, 0.8, 0.7, 0.2] * 0.75 at step 2, i.e. 0.825 * 0.75, where
    # the median pruner compares with 0.75 * 0.75. Quality 0.78 sits in between.
    finished = [0.9, 0.8, 0.7, 0.2]
    for name, pruned in [("percentile", True), ("median", False)]:
        study = _study_with_complete(make_pruner(name), finished)
        trial = study.ask()
        trial.report(score(0.78, 1), 1)
        trial.report(score(0.78, 2), 2)
        assert bool(trial.should_prune()) is pruned, name


def test_make_pruner_rejects_unknown_names_and_options():
    with pytest.raises(ConfigError, match="hyperband, median, none, percentile, sha"):
        make_pruner("asha")
    with pytest.raises(ConfigError, match="median.*n_warmup"):
        make_pruner("median", n_warmup=1)
    with pytest.raises(ConfigError, match="percentile"):
        make_pruner("percentile", percentile=150)
    with pytest.raises(ConfigError, match="none"):
        make_pruner("none", n_startup_trials=1)
    assert make_pruner("median", n_startup_trials=7)._n_startup_trials == 7


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_make_sampler_is_seeded(name):
    def params(seed):
        study = optuna.create_study(sampler=make_sampler(name, seed=seed))
        study.optimize(lambda t: t.suggest_float("x", 0, 1) + t.suggest_float("y", 0, 1), 3)
        return [t.params for t in study.trials]

    assert params(0) == params(0)
    assert params(0) != params(1)


def test_cmaes_without_its_package_is_refused_up_front(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "cmaes" else real(n, *a)
    )
    with pytest.raises(ConfigError, match="pip install cmaes"):
        make_sampler("cmaes", seed=0)


def test_make_sampler_tpe_is_multivariate_with_constant_liar():
    sampler = make_sampler("tpe", seed=0)
    assert sampler._multivariate is True and sampler._constant_liar is True
    with pytest.raises(ConfigError, match="bayes.*cmaes, gp, nsga2, random, tpe"):
        make_sampler("bayes", seed=0)
    with pytest.raises(ConfigError, match="random"):
        make_sampler("random", seed=0, multivariate=True)


# ----- searcher, driven directly (no Ray cluster needed) -----------------------------------


def _drive(s: PruningOptunaSearch, trial_id: str, values: list[float]) -> None:
    s.suggest(trial_id)
    for step, value in enumerate(values, start=1):
        s.on_trial_result(trial_id, {"score": value, "training_iteration": step})


@pytest.mark.parametrize(
    "objective, mode, told", [("best", "max", 0.9), ("last", "max", 0.4), ("best", "min", 0.2)]
)
def test_completed_trial_is_told_its_best_or_last_value(tmp_path, objective, mode, told):
    s = searcher(tmp_path, objective=objective, mode=mode)
    _drive(s, "t", [0.2, 0.9, 0.4])
    s.on_trial_complete("t", {"score": 0.4, "training_iteration": 3, "done": True})
    (trial,) = load(tmp_path)
    assert trial.state == TrialState.COMPLETE
    assert trial.value == pytest.approx(told)
    assert trial.intermediate_values == {1: 0.2, 2: 0.9, 3: 0.4}


def test_error_nan_and_silent_trials_end_fail_marked_trials_pruned(tmp_path):
    s = searcher(tmp_path)
    _drive(s, "crashed", [0.5, 0.6])
    s.on_trial_complete("crashed", error=True)
    _drive(s, "nan", [0.5, math.nan])
    s.on_trial_complete("nan", {"score": math.nan, "training_iteration": 2})
    s.suggest("never-ran")
    s.on_trial_complete("never-ran")
    _drive(s, "asha-stopped", [0.1])
    s.mark_pruned("asha-stopped", {"score": 0.3, "training_iteration": 2})
    s.on_trial_complete("asha-stopped", {"score": 0.3, "training_iteration": 2, "done": True})

    crashed, nan, never, pruned = load(tmp_path)
    assert crashed.state == TrialState.FAIL and crashed.intermediate_values == {1: 0.5, 2: 0.6}
    # Ray's OptunaSearch would try COMPLETE with NaN, fail, and leave this one RUNNING.
    assert nan.state == TrialState.COMPLETE and nan.value == 0.5  # best over epochs skips NaN
    assert never.state == TrialState.FAIL and never.intermediate_values == {}
    assert pruned.state == TrialState.PRUNED
    assert pruned.value == 0.3 and pruned.intermediate_values == {1: 0.1, 2: 0.3}


def test_all_nan_trial_fails_instead_of_staying_running(tmp_path):
    s = searcher(tmp_path, objective="last")
    _drive(s, "t", [0.5, math.nan])
    with pytest.warns(UserWarning, match="nan is not acceptable"):
        s.on_trial_complete("t", {"score": math.nan, "training_iteration": 2})
    assert load(tmp_path)[0].state == TrialState.FAIL


def test_existing_study_with_other_direction_is_refused(tmp_path):
    optuna.create_study(study_name="s", storage=sqlite_url(tmp_path), direction="minimize")
    with pytest.raises(ConfigError, match="'s'.*minimize.*maximize"):
        searcher(tmp_path)


def test_relative_sqlite_url_is_made_absolute(tmp_path, monkeypatch):
    # Saved while the driver runs in tmp_path, restored from another directory: the
    # restored searcher must still find the same study file.
    monkeypatch.chdir(tmp_path)
    s = PruningOptunaSearch(QUALITY, metric="score", mode="max", storage="sqlite:///rel.db")
    s.suggest("t")
    s.save(str(tmp_path / "searcher.pkl"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    restored = PruningOptunaSearch(QUALITY, metric="score", mode="max")
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert len(restored.study.trials) == 1
    assert not (tmp_path / "elsewhere" / "rel.db").exists()
    with pytest.raises(ConfigError, match="storage"):
        PruningOptunaSearch(QUALITY, metric="score", mode="max", storage="nosuchdb://x")
    with pytest.raises(ConfigError, match="objective"):
        searcher(tmp_path, objective="mean")


def test_restore_keeps_trials_and_fails_orphans(tmp_path):
    s = searcher(tmp_path)
    _drive(s, "a", [0.5])
    s.suggest("b")
    s.save(str(tmp_path / "searcher.pkl"))
    # A driver killed after this ask and before Tune's next checkpoint leaves an orphan.
    orphan = s.study.ask()

    restored = searcher(tmp_path)
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_result("a", {"score": 0.7, "training_iteration": 2})
    restored.on_trial_complete("a", {"score": 0.7, "training_iteration": 2})

    a, b, orphaned = load(tmp_path)
    assert orphaned.number == orphan.number and orphaned.state == TrialState.FAIL
    assert a.state == TrialState.COMPLETE and a.intermediate_values == {1: 0.5, 2: 0.7}
    assert b.state == TrialState.RUNNING  # still owned by a Tune trial that will resume


def test_restore_from_stale_checkpoint_keeps_what_the_study_recorded(tmp_path):
    # SIGKILL: Tune's last experiment checkpoint predates a trial the study saw finish.
    s = searcher(tmp_path)
    _drive(s, "a", [0.5])
    s.save(str(tmp_path / "searcher.pkl"))
    s.on_trial_complete("a", {"score": 0.6, "training_iteration": 2})

    restored = searcher(tmp_path)
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_result("a", {"score": 0.1, "training_iteration": 1})  # Tune reruns "a"
    restored.on_trial_complete("a", {"score": 0.1, "training_iteration": 8})
    (a,) = load(tmp_path)
    assert a.state == TrialState.COMPLETE and a.value == 0.6
    assert a.intermediate_values == {1: 0.5, 2: 0.6}


def test_trial_rerun_after_error_gets_a_fresh_optuna_trial(tmp_path):
    s = searcher(tmp_path)
    params = s.suggest("t")
    _drive(s, "t", [0.5])
    s.on_trial_complete("t", error=True)
    # Tuner.restore(resume_errored=True) runs "t" again from scratch.
    s.on_trial_result("t", {"score": 0.6, "training_iteration": 1})
    s.on_trial_complete("t", {"score": 0.6, "training_iteration": 1})
    first, rerun = load(tmp_path)
    assert first.state == TrialState.FAIL
    assert rerun.state == TrialState.COMPLETE and rerun.value == 0.6
    assert rerun.params == params
    assert rerun.user_attrs == {RETRY_OF_ATTR: first.number, RAY_TRIAL_ID_ATTR: "t"}
    assert first.user_attrs == {RAY_TRIAL_ID_ATTR: "t"}


def test_searcher_limits_concurrency_itself(tmp_path):
    s = searcher(tmp_path)
    limiter = ConcurrencyLimiter(s, max_concurrent=2)  # hands the limit to the searcher
    assert limiter.suggest("a") is not None and limiter.suggest("b") is not None
    assert limiter.suggest("c") is None  # two running: no third Optuna trial is asked for
    assert len(load(tmp_path)) == 2
    limiter.on_trial_complete("a", {"score": 0.5, "training_iteration": 1})
    assert limiter.suggest("c") is not None


class _Controller:
    """Stands in for the wrapper Ray hands schedulers: only `search_alg` is used."""

    def __init__(self, search_alg):
        self.search_alg = search_alg


class _Trial:
    def __init__(self, trial_id):
        self.trial_id = trial_id


def test_scheduler_unwraps_searcher_and_answers_stop_when_optuna_prunes(tmp_path):
    s = searcher(tmp_path)
    controller = _Controller(SearchGenerator(ConcurrencyLimiter(s, max_concurrent=2)))
    assert find_optuna_searcher(controller.search_alg) is s
    scheduler = OptunaPruningScheduler(make_pruner("median"), metric="score", mode="max")
    for i, q in enumerate([0.9, 0.8, 0.7]):
        _drive(s, f"done{i}", [score(q, e) for e in range(1, EPOCHS + 1)])
        s.on_trial_complete(f"done{i}", {"score": score(q, EPOCHS), "training_iteration": 8})

    s.suggest("low")
    decisions = [
        scheduler.on_trial_result(controller, _Trial("low"), {"score": v, "training_iteration": i})
        for i, v in [(1, 0.05), (2, 0.075)]
    ]
    assert decisions == ["CONTINUE", "STOP"]  # step 1 is warm-up; 0.075 < median 0.6
    assert s.study.pruner is scheduler.pruner
    s.on_trial_complete("low", {"score": 0.075, "training_iteration": 2, "done": True})
    low = load(tmp_path)[-1]
    assert low.state == TrialState.PRUNED and low.intermediate_values == {1: 0.05, 2: 0.075}


def test_prune_metric_feeds_the_pruner_and_trials_are_told_the_searched_metric(tmp_path):
    """Trials that tie on the searched metric ("score", stuck at 0.5 as balanced accuracy is
    after an epoch of a model predicting one class) differ on the pruning metric ("auc"):
    the pruner judges "auc", the completed trials are told their best "score"."""
    s = searcher(tmp_path, prune_metric="auc")
    assert s.prune_metric == "auc"
    controller = _Controller(SearchGenerator(ConcurrencyLimiter(s, max_concurrent=2)))
    scheduler = OptunaPruningScheduler(make_pruner("median"), metric="score", mode="max")

    def result(step: int, score: float, auc: float) -> dict:
        return {"score": score, "auc": auc, "training_iteration": step}

    for i in range(3):
        s.suggest(f"done{i}")
        for step, (sc, auc) in enumerate([(0.5, 0.7), (0.5, 0.8), (0.8, 0.9)], start=1):
            s.on_trial_result(f"done{i}", result(step, sc, auc))
        s.on_trial_complete(f"done{i}", {**result(3, 0.8, 0.9), "done": True})
    s.suggest("low")
    decisions = [
        scheduler.on_trial_result(controller, _Trial("low"), result(step, 0.5, auc))
        for step, auc in [(1, 0.55), (2, 0.6)]
    ]
    assert decisions == ["CONTINUE", "STOP"]  # score ties at 0.5; auc 0.6 < median 0.8
    s.on_trial_complete("low", {**result(2, 0.5, 0.6), "done": True})

    trials = load(tmp_path)
    for done in trials[:3]:
        assert done.state == TrialState.COMPLETE
        assert done.value == pytest.approx(0.8)  # the best score, not an auc
        assert done.intermediate_values == {1: 0.7, 2: 0.8, 3: 0.9}
    low = trials[3]
    assert low.state == TrialState.PRUNED and low.intermediate_values == {1: 0.55, 2: 0.6}
    study = optuna.load_study(study_name="s", storage=sqlite_url(tmp_path))
    assert study.user_attrs["prune_metric"] == "auc"


def test_without_prune_metric_the_tie_on_the_searched_metric_is_not_pruned(tmp_path):
    """The same trials judged by "score" itself: the median is 0.5 and 0.5 is not below
    it, so the tied trial runs on (what prune_metric is for)."""
    s = searcher(tmp_path)
    assert s.prune_metric == "score"
    controller = _Controller(SearchGenerator(ConcurrencyLimiter(s, max_concurrent=2)))
    scheduler = OptunaPruningScheduler(make_pruner("median"), metric="score", mode="max")
    for i in range(3):
        s.suggest(f"done{i}")
        for step, sc in enumerate([0.5, 0.5, 0.8], start=1):
            s.on_trial_result(f"done{i}", {"score": sc, "training_iteration": step})
        s.on_trial_complete(f"done{i}", {"score": 0.8, "training_iteration": 3, "done": True})
    s.suggest("low")
    decisions = [
        scheduler.on_trial_result(
            controller, _Trial("low"), {"score": 0.5, "training_iteration": step}
        )
        for step in (1, 2)
    ]
    assert decisions == ["CONTINUE", "CONTINUE"]


def test_scheduler_refuses_a_mismatched_or_foreign_searcher(tmp_path):
    s = searcher(tmp_path)
    s.suggest("t")
    result = {"score": 0.1, "training_iteration": 1}
    for kw in [{"metric": "loss"}, {"metric": "score", "mode": "min"}]:
        scheduler = OptunaPruningScheduler(make_pruner("median"), **kw)
        with pytest.raises(ConfigError, match="differs from the searcher"):
            scheduler.on_trial_result(_Controller(s), _Trial("t"), result)
    scheduler = OptunaPruningScheduler(make_pruner("median"), metric="score")
    with pytest.raises(ConfigError, match="PruningOptunaSearch.*BasicVariantGenerator"):
        scheduler.on_trial_result(_Controller(tune.search.BasicVariantGenerator()), None, result)
    with pytest.raises(ConfigError, match="mode"):
        OptunaPruningScheduler(None, metric="score", mode="maximize")


# ----- real Ray Tune runs -------------------------------------------------------------------

MEDIAN_POINTS = [0.9, 0.8, 0.7, 0.6, 0.1, 0.95, 0.2, 0.3, 0.99, 0.05, 0.4, 0.15]


def test_median_pruner_stops_ray_trials_and_study_says_pruned(ray_session, tmp_path):
    results = fit(
        tmp_path,
        climb,
        searcher(tmp_path, MEDIAN_POINTS),
        OptunaPruningScheduler(make_pruner("median"), metric="score", mode="max"),
        num_samples=len(MEDIAN_POINTS),
    )
    assert results.num_errors == 0
    epochs = epochs_by_quality(results)
    trials = by_quality(load(tmp_path))
    assert sorted(trials) == sorted(MEDIAN_POINTS) == sorted(epochs)

    for q in [0.1, 0.2, 0.3, 0.05, 0.4, 0.15]:  # started late, below every possible median
        assert trials[q].state == TrialState.PRUNED, q
        assert epochs[q] == 2
        assert_climb_history(trials[q], 2)
        assert trials[q].value == pytest.approx(score(q, 2))
    for q in [0.9, 0.8, 0.95, 0.99]:  # never below the median of finished trials
        assert trials[q].state == TrialState.COMPLETE, q
        assert trials[q].value == pytest.approx(score(q, EPOCHS))
        assert_climb_history(trials[q], EPOCHS)
    # The Tune side and the study agree trial by trial. (0.7 and 0.6 may also be pruned,
    # even at epoch 8 if the third finished trial arrives only then: Optuna's own rule.)
    for q, trial in trials.items():
        assert trial.state in (TrialState.PRUNED, TrialState.COMPLETE), q
        if epochs[q] < EPOCHS:
            assert trial.state == TrialState.PRUNED, q
        assert len(trial.intermediate_values) == epochs[q]
    assert sum(epochs.values()) <= 6 * EPOCHS + 6 * 2 < len(MEDIAN_POINTS) * EPOCHS


def test_pruner_none_lets_every_trial_finish(ray_session, tmp_path):
    # Define-by-run space and TPE: the sampler, not a queue, proposes these trials.
    def space(trial):
        trial.suggest_float("quality", 0.0, 1.0)

    s = searcher(tmp_path, sampler=make_sampler("tpe", seed=3), space=space)
    results = fit(
        tmp_path,
        climb,
        s,
        OptunaPruningScheduler(make_pruner("none"), metric="score", mode="max"),
        num_samples=6,
    )
    trials = load(tmp_path)
    assert len(trials) == 6 and results.num_errors == 0
    assert set(epochs_by_quality(results).values()) == {EPOCHS}
    for trial in trials:
        assert trial.state == TrialState.COMPLETE
        assert trial.value == pytest.approx(score(trial.params["quality"], EPOCHS))


def test_errored_trial_is_fail_search_goes_on_and_resume_errored_records_rerun(
    ray_session, tmp_path
):
    flag = tmp_path / "crash"
    flag.touch()
    points = [0.9, 0.2, 0.8, 0.3]
    results = fit(
        tmp_path,
        climb_or_crash,
        searcher(tmp_path, points),
        OptunaPruningScheduler(make_pruner("median"), metric="score", mode="max"),
        num_samples=len(points),
        param_space={"crash_flag": str(flag)},
    )
    assert results.num_errors == 2
    trials = by_quality(load(tmp_path))
    for q in (0.9, 0.8):
        assert trials[q].state == TrialState.FAIL
        assert_climb_history(trials[q], 2)
    for q in (0.2, 0.3):
        assert trials[q].state == TrialState.COMPLETE
        assert trials[q].value == pytest.approx(score(q, EPOCHS))

    flag.unlink()  # the bug is fixed; rerun the crashed trials
    tune.Tuner.restore(str(tmp_path / "ray" / "exp"), climb_or_crash, resume_errored=True).fit()
    trials = load(tmp_path)
    assert len(trials) == 6
    assert [t.state for t in trials[:4]] == [TrialState.FAIL, TrialState.COMPLETE] * 2
    reruns = trials[4:]
    assert {t.user_attrs[RETRY_OF_ATTR] for t in reruns} == {0, 2}
    for t in reruns:
        assert t.state == TrialState.COMPLETE
        assert t.value == pytest.approx(score(t.params["quality"], EPOCHS))


def test_asha_early_stops_are_pruned_full_runs_complete(ray_session, tmp_path):
    points = [0.9, 0.8, 0.1, 0.7, 0.05, 0.2]
    asha = PrunedMarkingASHAScheduler(
        metric="score", mode="max", max_t=EPOCHS, grace_period=2, reduction_factor=2
    )
    results = fit(tmp_path, climb, searcher(tmp_path, points), asha, num_samples=len(points))
    epochs = epochs_by_quality(results)
    trials = by_quality(load(tmp_path))
    # 0.05 reaches rung 2 after 0.9 and 0.8 did: below the rung's median, it is stopped.
    assert epochs[0.05] == 2 and trials[0.05].state == TrialState.PRUNED
    for q, trial in trials.items():
        assert trial.state == (TrialState.PRUNED if epochs[q] < EPOCHS else TrialState.COMPLETE)
        assert_climb_history(trial, epochs[q])


def tie_and_climb(config: dict) -> None:
    """Every trial's "score" ties at 0.5; its "auc" climbs with its quality."""
    for epoch in range(1, EPOCHS + 1):
        time.sleep(0.02)
        tune.report({"score": 0.5, "auc": score(config["quality"], epoch), "epoch": epoch})


def test_asha_judges_the_prune_metric_and_trials_are_told_the_searched_one(ray_session, tmp_path):
    points = [0.9, 0.8, 0.1, 0.7, 0.05, 0.2]
    asha = PrunedMarkingASHAScheduler(
        metric="auc", mode="max", max_t=EPOCHS, grace_period=2, reduction_factor=2
    )
    s = searcher(tmp_path, points, prune_metric="auc")
    results = fit(tmp_path, tie_and_climb, s, asha, num_samples=len(points))
    epochs = epochs_by_quality(results)
    trials = by_quality(load(tmp_path))
    # On "score" every trial ties; on "auc" 0.05 is below rung 2's median: stopped there.
    assert epochs[0.05] == 2 and trials[0.05].state == TrialState.PRUNED
    for q, trial in trials.items():
        if epochs[q] == EPOCHS:
            assert trial.state == TrialState.COMPLETE and trial.value == 0.5, q
        else:
            assert trial.state == TrialState.PRUNED, q
        assert_climb_history(trial, epochs[q])  # intermediate values are the auc


def climb_then_dip(config: dict) -> None:
    """``climb``, except that a trial of quality > 0.8 collapses to 0 in its last epoch."""
    for epoch in range(1, EPOCHS + 1):
        value = score(config["quality"], epoch)
        if epoch == EPOCHS and config["quality"] > 0.8:
            value = 0.0
        final = {FINAL_EPOCH_KEY: float(epoch == EPOCHS)} if config["flag_final"] else {}
        tune.report({"score": value, "epoch": epoch, **final})


@pytest.mark.parametrize("flag_final", [False, True])
def test_no_trial_is_pruned_on_its_last_epoch(ray_session, tmp_path, flag_final):
    # Successive halving with rungs at 1, 2, 4 and 8 = the whole budget. The second trial
    # leads at every rung until its last epoch, where it falls below the first: judged
    # there it would be "pruned" after using its whole budget (and left out of the
    # completed trials). A result flagged as the last epoch is not judged.
    sha = make_pruner("sha", min_resource=1, reduction_factor=2)
    results = fit(
        tmp_path,
        climb_then_dip,
        searcher(tmp_path, [0.5, 0.9]),
        OptunaPruningScheduler(sha, metric="score", mode="max"),
        num_samples=2,
        param_space={"flag_final": flag_final},
        max_concurrent=1,  # the first trial's rungs are all recorded before the second's
    )
    assert results.num_errors == 0
    assert set(epochs_by_quality(results).values()) == {EPOCHS}
    trials = by_quality(load(tmp_path))
    assert trials[0.5].state == TrialState.COMPLETE
    assert len(trials[0.9].intermediate_values) == EPOCHS
    assert trials[0.9].state == (TrialState.COMPLETE if flag_final else TrialState.PRUNED)


def test_trials_cut_by_the_time_budget_end_pruned(ray_session, tmp_path):
    # Ray stops running trials at time_budget_s without telling the searcher; the
    # end-of-experiment callback closes them (without it they stay RUNNING forever).
    results = fit(
        tmp_path,
        climb,
        searcher(tmp_path, [0.9, 0.8, 0.7]),
        OptunaPruningScheduler(make_pruner("none"), metric="score", mode="max"),
        num_samples=3,
        param_space={"sleep": 0.5},  # 4 s per trial, far beyond the budget
        time_budget_s=3,
    )
    epochs = {round(r.config["quality"], 6): r.metrics.get("epoch", 0) for r in results}
    started = [t for t in load(tmp_path) if t.state != TrialState.WAITING]
    assert len(started) == len(epochs) == 2
    assert max(epochs.values()) >= 1  # the first trial had time for a few epochs
    for trial in started:
        n = epochs[round(trial.params["quality"], 6)]
        assert n < EPOCHS
        # Cut short after reporting: PRUNED; before its first report: FAIL.
        assert trial.state == (TrialState.PRUNED if n else TrialState.FAIL)
        assert_climb_history(trial, n)


# ----- resume after an interrupted driver ---------------------------------------------------

RESTORE_POINTS = [0.9, 0.8, 0.7, 0.6, 0.1, 0.2, 0.95, 0.15, 0.05, 0.3]

DRIVER = """
import logging, sys, time
import optuna, ray
from ray import tune
from ray.tune.search import ConcurrencyLimiter
from dala_search.search.optuna_search import PruningOptunaSearch
from dala_search.search.pruning import OptunaPruningScheduler, make_pruner, make_sampler

def climb(config):
    for epoch in range(1, 9):
        time.sleep(config["sleep"])
        tune.report({{"score": config["quality"] * (1 - 0.5**epoch), "epoch": epoch}})

ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
searcher = PruningOptunaSearch(
    {{"quality": optuna.distributions.FloatDistribution(0.0, 1.0)}},
    metric="score", mode="max", storage="{url}", study_name="s",
    sampler=make_sampler("random", seed=0),
    points_to_evaluate=[{{"quality": q}} for q in {points}],
)
tune.Tuner(
    climb,
    tune_config=tune.TuneConfig(
        search_alg=ConcurrencyLimiter(searcher, max_concurrent=2),
        scheduler=OptunaPruningScheduler(make_pruner("median"), metric="score", mode="max"),
        num_samples={n}, reuse_actors=True,
    ),
    param_space={{"sleep": 0.25}},
    run_config=tune.RunConfig(
        storage_path="{storage}", name="exp", verbose=0,
        callbacks=[searcher.end_of_experiment_callback()],
    ),
).fit()
"""


def _finished_trials(db: Path) -> int:
    try:
        with sqlite3.connect(db) as con:
            return con.execute(
                "SELECT count(*) FROM trials WHERE state IN ('COMPLETE', 'PRUNED')"
            ).fetchone()[0]
    except sqlite3.OperationalError:  # the driver has not created the tables yet
        return 0


@pytest.mark.slow
def test_pruning_goes_on_after_tuner_restore(ray_session, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(
        DRIVER.format(
            url=sqlite_url(tmp_path),
            points=RESTORE_POINTS,
            n=len(RESTORE_POINTS),
            storage=tmp_path / "ray",
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    driver = subprocess.Popen([sys.executable, str(script)], cwd=REPO, env=env)
    deadline = time.monotonic() + 120
    while _finished_trials(tmp_path / "study.db") < 2:
        assert driver.poll() is None, "driver exited before it could be interrupted"
        assert time.monotonic() < deadline, "driver made no progress"
        time.sleep(0.1)
    interrupted_at = datetime.now()
    driver.send_signal(signal.SIGINT)  # Ctrl+C: Tune saves the experiment and exits
    assert driver.wait(timeout=120) is not None
    # points_to_evaluate are queued as WAITING trials up front; the rest never started.
    started = [t for t in load(tmp_path) if t.state != TrialState.WAITING]
    assert 2 <= len(started) < len(RESTORE_POINTS)
    assert any(t.state == TrialState.RUNNING for t in started)  # interrupted mid-trial

    # The restored Tuner unpickles a new scheduler and searcher from the experiment folder.
    tuner = tune.Tuner.restore(str(tmp_path / "ray" / "exp"), climb, resume_errored=True)
    results = tuner.fit()

    trials = load(tmp_path)
    assert len(trials) == len(RESTORE_POINTS)  # nothing asked twice, nothing lost
    assert sorted(t.params["quality"] for t in trials) == sorted(RESTORE_POINTS)
    assert not [t for t in trials if not t.state.is_finished()]
    assert results.num_errors == 0 and len(results) == len(RESTORE_POINTS)
    epochs = epochs_by_quality(results)
    by_q = by_quality(trials)
    for q in [0.1, 0.2, 0.15, 0.05, 0.3]:  # asked only after the restore, all pruned
        assert by_q[q].datetime_start > interrupted_at, q
        assert by_q[q].state == TrialState.PRUNED, q
        assert epochs[q] == 2
        assert_climb_history(by_q[q], 2)
    assert by_q[0.95].state == TrialState.COMPLETE
