"""Benchmark 4: fixed cost per trial of a real search vs a plain loop over ``train_trial``.

N short trials (1 epoch, no pruning, one at a time) through ``plan_search`` + ``run_search``
(Ray Tune trial start, Optuna, MLflow child run, per-epoch metrics, figures, model), then
the same N configurations (read back from the Optuna study) in a plain loop over
``train_trial`` in this process, each timed. Overhead per trial = (search - loop) / N; it
includes the per-search costs (trial process start, parent run, study, best-model
registration) shared over the N trials, so the breakdown also gives them apart, from the
trial runs' MLflow start and end times: ``one_off_s`` (search start to the first trial's
run, and the last trial's run to the end) and ``steady_per_trial_s`` (per later trial: the
gap since the previous trial's run ended + its run's time beyond the loop's time for the
same config). Every measured search starts Ray afresh, as each ``dala-search start`` does:
``ray_init_s`` is the time ``run_search`` spent in ``ray.init`` (part of ``one_off_s``). A
warm-up search of one trial first builds the image cache on disk (kept between searches of
a data set) and warms the page cache; Ray is shut down after it. From these, the per-search
cost (``per_search_s``: one-off plus the first trial's own extra) and the steady per-trial
cost are given apart, and the per-trial cost with start-up amortised over 8, 32 and 128
trials (``(per_search_s + (N - 1) * steady_per_trial_s) / N``: the first trial's overhead
is in ``per_search_s``). The MLflow part is broken down by timing
the trial's own record calls. Goal: < 1.5 s per trial.

    python bench/overhead.py [--quick] [--record]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

SPACE = Path(__file__).resolve().parent / "search_space.yaml"
AMORTISED_OVER = (8, 32, 128)  # trials per search
SIZES = {  # trials per search, repetitions (search, loop alternately)
    "tiny": dict(trials=1, reps=1),
    "quick": dict(trials=8, reps=1),
    "full": dict(trials=16, reps=2),
}


def _configs(plan, space):  # noqa: ANN001, ANN202
    """The configurations the search's trials ran, rebuilt as the trial function does."""
    import optuna

    study = optuna.load_study(study_name=plan.study_name("40X"), storage=plan.storage)
    overrides = {"epochs": 1, "select_metric": plan.metric, "device": "cpu"}
    overrides["num_threads"] = max(1, int(plan.cpus_per_trial))
    return [space.trial_config(t.params, **overrides) for t in study.get_trials()]


def _breakdown(uri: str, name: str, start: float, end: float, loop_each: list[float]) -> dict:
    """One-off and steady costs of one search, from its trial runs' MLflow times.

    ``loop_each[i]``: seconds the plain loop took for Optuna trial ``i``'s configuration.
    """
    from mlflow import MlflowClient

    from dala_search.runs import schema

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(schema.experiment_name(name))
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{schema.TAG_ROLE}` = 'trial'",
        order_by=["attributes.start_time ASC"],
    )
    spans = [
        (
            r.info.start_time / 1000,
            r.info.end_time / 1000,
            int(r.data.tags[schema.TAG_OPTUNA_NUMBER]),
        )
        for r in runs
    ]
    steady = [
        (t0 - prev_end) + (t1 - t0 - loop_each[number])
        for (_, prev_end, _), (t0, t1, number) in zip(spans, spans[1:], strict=False)
    ]
    return {
        "one_off_s": round((spans[0][0] - start) + (end - spans[-1][1]), 3),
        "first_trial_extra_s": round(spans[0][1] - spans[0][0] - loop_each[spans[0][2]], 3),
        "steady_per_trial_s": round(c.median(steady), 3) if steady else None,
        "trial_processes": len({r.data.tags.get(schema.TAG_PID) for r in runs}),
    }


def _record_costs(configs, data, uri: str) -> dict[str, float]:  # noqa: ANN001
    """Seconds per trial of each MLflow step run_trial takes, on this process's clock."""
    from dala_search.search import tracking
    from dala_search.search.trainable import _log_figures
    from dala_search.train import train_trial

    search = tracking.SearchTracker(uri, f"overhead-records-{time.time_ns()}")
    parent = search.parent_run("40X", tags={})
    costs = {"run_and_params_s": 0.0, "epoch_metrics_s": 0.0, "figures_s": 0.0, "model_s": 0.0}
    for i, config in enumerate(configs):
        result = train_trial(config, data, keep_model=True)
        t0 = time.perf_counter()
        tracker = tracking.TrialTracker(
            uri, search.experiment_id, parent, f"t{i}", tags={}, params=config.to_dict()
        )
        tracker.log_dict(config.to_dict(), "trial_config.json")
        t1 = time.perf_counter()
        for epoch, metrics in enumerate(result.history, 1):
            tracker.log_metrics(metrics, step=epoch)
        tracker.log_metrics(result.summary(), step=result.epochs_run)
        t2 = time.perf_counter()
        _log_figures(tracker, result)
        t3 = time.perf_counter()
        tracker.log_model(result.model, config.to_dict(), "40X")  # only for a new best
        tracker.finish("completed")
        t4 = time.perf_counter()
        for k, dt in zip(costs, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            costs[k] += dt / len(configs)
    return {k: round(v, 3) for k, v in costs.items()}


class _TimedRayInit:
    """Wraps ``ray.init`` (run_search calls it through the module) to time each call."""

    def __init__(self) -> None:
        import ray

        self.ray, self.original, self.seconds = ray, ray.init, []

    def __enter__(self) -> _TimedRayInit:
        def timed(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            start = time.perf_counter()
            try:
                return self.original(*a, **kw)
            finally:
                self.seconds.append(time.perf_counter() - start)

        self.ray.init = timed
        return self

    def __exit__(self, *exc: object) -> None:
        self.ray.init = self.original


def _median_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(c.median(values), 3) if values else None


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    args = p.parse_args()
    load0 = c.load_start()
    size = SIZES[c.size_of(args)]
    n = size["trials"]

    import ray
    import torch

    from dala_search.search.tuner import plan_search, run_search
    from dala_search.space_file import load_space
    from dala_search.train import prepare_data, train_trial

    torch.set_num_threads(args.threads)
    space = load_space(SPACE)
    base = c.work_dir(args)
    root = c.demo_data(base, images_per_mag=2, width=96, height=64)
    searches: list[float] = []
    loops: list[float] = []
    breakdowns: list[dict] = []
    ray_inits: list[float] = []  # the warm-up's first, then one per measured search
    with tempfile.TemporaryDirectory(dir=base) as scratch:
        s = Path(scratch)
        uri = f"sqlite:///{s / 'mlflow.db'}"

        def search(name: str, trials: int) -> tuple[float, object, float, float]:
            plan = plan_search(
                space=str(SPACE),
                name=name,
                data_dir=root,
                trials=trials,
                epochs=1,
                pruner="none",
                seed=len(searches),  # each repetition samples other configurations
                tracking_uri=uri,
                runs_dir=s / "runs",
                cpus_per_trial=args.threads,
            )
            ray.shutdown()  # every search starts its own Ray, as `dala-search start` does
            start, wall_start = time.perf_counter(), time.time()
            with _TimedRayInit() as timed:
                outcome = run_search(plan)[0]
            wall = time.perf_counter() - start
            if len(timed.seconds) != 1:
                raise SystemExit(f"search {name}: ray.init ran {len(timed.seconds)} times, not 1")
            ray_inits.append(timed.seconds[0])
            if outcome.completed != trials:
                raise SystemExit(f"search {name}: {outcome} (expected {trials} completed)")
            return wall, plan, wall_start, time.time()

        try:
            if not args.tiny:  # --tiny (the tests) keeps only the structure, and its time
                c.log("warm-up search (image cache, page cache; Ray restarts after it)")
                search("warmup", 1)
                ray_inits.clear()
            data = prepare_data(root, "40X", image_size=int(space.fixed["image_size"]))
            configs = []
            for r in range(size["reps"]):
                wall, plan, t0, t1 = search(f"measured-{r}", n)
                searches.append(wall)
                c.log(f"rep {r + 1}: search of {n} trials {wall:.1f} s")
                configs = _configs(plan, space)
                loop_each = []
                for config in configs:
                    start = time.perf_counter()
                    train_trial(config, data)
                    loop_each.append(time.perf_counter() - start)
                loops.append(sum(loop_each))
                c.log(f"rep {r + 1}: plain loop over the same {n} configs {loops[-1]:.1f} s")
                breakdowns.append(_breakdown(uri, plan.name, t0, t1, loop_each))
                c.log(f"rep {r + 1}: {breakdowns[-1]}")
        finally:
            ray.shutdown()
        records = _record_costs(configs, data, uri)

    search_s, loop_s = c.median(searches), c.median(loops)
    per_trial = (search_s - loop_s) / n
    one_off = c.median([b["one_off_s"] for b in breakdowns])
    first_extra = c.median([b["first_trial_extra_s"] for b in breakdowns])
    steady = _median_or_none([b["steady_per_trial_s"] for b in breakdowns])
    per_search = one_off + first_extra
    amortised = {
        str(k): round((per_search + (k - 1) * steady) / k, 3) if steady is not None else None
        for k in AMORTISED_OVER
    }
    result = {
        "per_trial_overhead_s": round(per_trial, 3),
        "search_s_per_trial": round(search_s / n, 3),
        "loop_s_per_trial": round(loop_s / n, 3),
        "trials": n,
        "reps": size["reps"],
        "runs_s": {"search": [round(v, 2) for v in searches], "loop": [round(v, 2) for v in loops]},
        "ray_init_s": round(c.median(ray_inits), 3),
        "ray_init_runs_s": [round(v, 3) for v in ray_inits],
        "one_off_s": round(one_off, 3),
        "first_trial_extra_s": round(first_extra, 3),
        "per_search_s": round(per_search, 3),
        "steady_per_trial_s": steady,
        "amortised_per_trial_s": amortised,
        "trial_processes": [b["trial_processes"] for b in breakdowns],
        "mlflow_per_trial": records,
        "goal": "per_trial_overhead_s < 1.5",
        "meets_goal": per_trial < 1.5,
        "_load_start": load0,
    }
    c.finite_positive(result, ["search_s_per_trial", "loop_s_per_trial", "ray_init_s"])
    summary = (
        f"{n} trials of 1 epoch at 40X (32 px), one at a time, median of {size['reps']}\n"
        f"through the search (Ray Tune + Optuna + MLflow): {search_s / n:6.2f} s per trial\n"
        f"plain loop over train_trial, same configs:        {loop_s / n:6.2f} s per trial\n"
        f"fixed overhead per trial at {n} trials: {per_trial:.2f} s (goal < 1.5 s)\n"
        f"  once per search: {per_search:.2f} s = {one_off:.2f} s (ray.init "
        f"{result['ray_init_s']:.2f} s, Tune set-up, first trial process start and imports; "
        f"end of search) + the first trial's own extra {first_extra:.2f} s (first torch ops "
        f"in a new process)\n"
        f"  every later trial: {_fmt(steady)} s (scheduling, Optuna, MLflow, the reused trial "
        f"process: {result['trial_processes']} process(es) per search)\n"
        f"  per trial with the once-per-search cost amortised: "
        + ", ".join(f"{_fmt(v)} s over {k}" for k, v in amortised.items())
        + "\nof which MLflow, timed in-process per trial: "
        + ", ".join(f"{k} {v:.2f}" for k, v in records.items())
        + " (model_s only for a trial that beats the best so far)"
    )
    c.finish("overhead", args, result, summary)


if __name__ == "__main__":
    main()
