"""The answer of a multi-objective search: its Pareto front, per magnification.

A trial is on the front when no other completed (and feasible) trial is at least as good in
every objective and better in one: Optuna's ``Study.best_trials``, which leaves out pruned,
failed and constraint-violating trials. Read from the study itself (the record of what was
told), matched to MLflow trial runs by magnification and Optuna trial number.

``front_rows`` is what ``dala-search best --json`` prints as ``pareto``; ``record_front``
writes the front onto MLflow when a magnification ends (table, plot, ``dala.pareto`` tags).
Imports no Ray.
"""

from __future__ import annotations

from typing import Any

import optuna

from dala_search.runs import schema

#: Tag on a trial run that is on its magnification's Pareto front.
TAG_PARETO = "dala.pareto"
FRONT_TABLE = "pareto_front.json"
FRONT_PLOT = "figures/pareto_front.png"


def _trial_runs(client: Any, experiment_id: str, magnification: str) -> dict[int, str]:
    """Optuna trial number -> MLflow run id, for one magnification's trial runs."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{schema.TAG_ROLE}` = 'trial' and tags.`{schema.TAG_MAG}` = '{magnification}'"
        ),
        max_results=5000,
    )
    out = {}
    for run in runs:
        number = run.data.tags.get(schema.TAG_OPTUNA_NUMBER, "")
        if number.isdigit():
            out[int(number)] = run.info.run_id
    return out


def front_rows(
    study: optuna.Study, runs: dict[int, str] | None = None
) -> list[dict[str, Any]] | None:
    """The study's Pareto front, best primary first; None for a single-objective study.

    Each row: ``trial`` (Optuna number), ``values`` (objective metric -> value), ``params``,
    ``run_id`` (None when ``runs`` has no run for it) and ``primary_best`` (the front's best
    by the primary objective, which is the best by it among every feasible trial).
    """
    if len(study.directions) < 2:
        return None
    names = study.metric_names or [f"objective_{i}" for i in range(len(study.directions))]
    sign = 1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1
    front = sorted(study.best_trials, key=lambda t: (-sign * t.values[0], t.number))
    return [
        {
            "trial": t.number,
            "values": dict(zip(names, t.values, strict=True)),
            "params": t.params,
            "run_id": (runs or {}).get(t.number),
            "primary_best": i == 0,
        }
        for i, t in enumerate(front)
    ]


def read_front(
    storage: str, study_name: str, client: Any, experiment_id: str, magnification: str
) -> list[dict[str, Any]] | None:
    """``front_rows`` of a stored study, with MLflow run ids."""
    study = optuna.load_study(study_name=study_name, storage=storage)
    if len(study.directions) < 2:
        return None
    return front_rows(study, _trial_runs(client, experiment_id, magnification))


def paper_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The completed trial that ran the ``paper`` point (``--enqueue paper``), if any: the
    one whose enqueued parameters (Optuna's ``fixed_params``) are that point's."""
    point = next(
        (p for p in study.user_attrs.get("enqueued", []) if p.get("source") == "paper"), None
    )
    if point is None:
        return None
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return next((t for t in done if t.system_attrs.get("fixed_params") == point["params"]), None)


def front_figure(
    study: optuna.Study,
    rows: list[dict[str, Any]],
    marked: optuna.trial.FrozenTrial | None = None,
) -> Any:
    """Primary objective against each other objective: completed trials grey, the front
    in colour, the primary's best ringed, ``marked`` (the paper's point) as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows[0]["values"]) if rows else list(study.metric_names or [])
    others = names[1:]
    fig, axes = plt.subplots(1, max(1, len(others)), figsize=(4.5 * max(1, len(others)), 4))
    axes = list(axes) if len(others) > 1 else [axes]
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    for ax, other in zip(axes, others, strict=False):
        j = names.index(other)
        ax.scatter([t.values[j] for t in done], [t.values[0] for t in done], c="0.7", s=18,
                   label="completed")  # fmt: skip
        ax.plot([r["values"][other] for r in rows], [r["values"][names[0]] for r in rows],
                "o-", c="tab:red", label="Pareto front")  # fmt: skip
        best = next((r for r in rows if r["primary_best"]), None)
        if best is not None:
            ax.scatter([best["values"][other]], [best["values"][names[0]]], s=140,
                       facecolors="none", edgecolors="k", label="best primary")  # fmt: skip
        if marked is not None:
            ax.scatter([marked.values[j]], [marked.values[0]], marker="*", s=160, c="tab:blue",
                       label="paper's configuration")  # fmt: skip
        ax.set_xlabel(other)
        ax.set_ylabel(names[0])
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def record_front(
    client: Any,
    experiment_id: str,
    parent_run_id: str,
    storage: str,
    study_name: str,
    magnification: str,
) -> list[dict[str, Any]] | None:
    """Write the front onto MLflow: the table and plot on the parent run, ``dala.pareto``
    true on the front's trial runs (false on the other completed ones). None and nothing
    written for a single-objective study."""
    study = optuna.load_study(study_name=study_name, storage=storage)
    if len(study.directions) < 2:
        return None
    runs = _trial_runs(client, experiment_id, magnification)
    rows = front_rows(study, runs) or []
    on_front = {r["trial"] for r in rows}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.number in runs:
            value = str(t.number in on_front).lower()
            schema.retry(client.set_tag, runs[t.number], TAG_PARETO, value)
    schema.retry(client.log_dict, parent_run_id, {"front": rows}, FRONT_TABLE)
    if rows:
        import matplotlib.pyplot as plt

        fig = front_figure(study, rows, paper_trial(study))
        schema.retry(client.log_figure, parent_run_id, fig, FRONT_PLOT)
        plt.close(fig)
    return rows


def add_fronts(rows: list[dict[str, Any]], name: str, runs_dir: Any, uri: str) -> None:
    """Give each magnification row of ``best`` its ``pareto`` front, for a search with
    several objectives (its plan's ``objectives``); rows of other searches are unchanged."""
    from dala_search.errors import DalaError
    from dala_search.runs.plan import open_search

    try:
        plan = open_search(name, runs_dir).plan
    except DalaError:  # only MLflow's record is left (no folder): `best` reads that alone
        return
    if len(plan.objectives) < 2:
        return
    client = schema.client(uri)
    exp = client.get_experiment_by_name(schema.experiment_name(name))
    for row in rows:
        mag = row["magnification"]
        row["pareto"] = read_front(
            plan.storage, plan.study_name(mag), client, exp.experiment_id, mag
        )


def front_lines(row: dict[str, Any]) -> list[str]:
    """Text lines of one magnification's front for ``best`` (none without a front)."""
    front = row.get("pareto")
    if not front:
        return []
    lines = [f"       Pareto front ({len(front)} trial(s); * = best primary):"]
    for r in front:
        values = "  ".join(f"{k}={v:.4g}" for k, v in r["values"].items())
        params = " ".join(f"{k}={v}" for k, v in r["params"].items())
        mark = "*" if r["primary_best"] else " "
        lines.append(f"     {mark} trial {r['trial']:<3} {values}  run {r['run_id']}  {params}")
    return lines


#: Registry alias of the front's point ``i`` (in ``front_rows`` order; point 0, the primary's
#: best, has the alias ``best`` from ``SearchTracker.record_best``).
PARETO_ALIAS = "pareto-{}"


def register_front(
    client: Any, uri: str, search: str, magnification: str, rows: list[dict[str, Any]]
) -> dict[str, str]:
    """Register the model of every front point but the primary's best (registered as
    ``best`` already) under the magnification's model name, aliased ``pareto-<i>``.

    A point whose alias already names a version of its own run is left as it is (a resumed
    search summarises again); ``pareto-*`` aliases of points no longer on the front are
    removed. A point whose run logged no model gets no alias. Returns alias -> version.
    """
    import mlflow

    name = schema.model_name(magnification)
    wanted: dict[str, str] = {}
    for i, row in enumerate(rows):
        if row["primary_best"] or not row["run_id"]:
            continue
        alias = PARETO_ALIAS.format(i)
        run = client.get_run(row["run_id"])
        if run.data.tags.get(schema.TAG_HAS_MODEL) != "true":
            continue
        try:
            current = client.get_model_version_by_alias(name, alias)
        except mlflow.exceptions.MlflowException:  # no such alias (or model) yet
            current = None
        if current is not None and current.run_id == row["run_id"]:
            wanted[alias] = current.version
            continue
        mlflow.set_tracking_uri(uri)
        version = mlflow.register_model(
            run.data.tags.get(schema.TAG_MODEL_URI, f"runs:/{row['run_id']}/model"),
            name,
            tags={schema.TAG_SEARCH: search, schema.TAG_MAG: magnification},
        )
        client.set_registered_model_alias(name, alias, version.version)
        wanted[alias] = version.version
    try:
        aliases = client.get_registered_model(name).aliases
    except mlflow.exceptions.MlflowException:  # nothing registered: nothing stale
        return wanted
    for alias in aliases:
        if alias.startswith(PARETO_ALIAS.format("")) and alias not in wanted:
            client.delete_registered_model_alias(name, alias)
    return wanted
