"""The report's figures: Optuna's plots of the study, the best trial's confusion matrix and
ROC curve (its MLflow artifacts) and the Grad-CAM maps of the best model (``explain.py``).
Each is a PNG beside the page and inlined as a data URI; one that cannot exist says why."""

from __future__ import annotations

import base64
import warnings
from pathlib import Path
from typing import Any

from dala_search.report_sections import Figure, MagSection, num


def _save(fig: Any, fig_dir: Path, name: str, page_dir: Path, title: str) -> Figure:
    import matplotlib.pyplot as plt

    path = fig_dir / name
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return _png_figure(path, page_dir, title)


def _png_figure(path: Path, page_dir: Path, title: str, caption: str = "") -> Figure:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return Figure(
        title=title,
        file=str(path.relative_to(page_dir)),
        src=f"data:image/png;base64,{data}",
        caption=caption,
    )


def optuna_section(sec: MagSection, plan: Any, mag: str, fig_dir: Path, page_dir: Path) -> None:
    """Optuna's matplotlib plots of the magnification's study (they are 'experimental')."""
    import optuna
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    import dala_search.plots  # noqa: F401 - selects the headless Agg backend

    try:
        study = optuna.load_study(study_name=plan.study_name(mag), storage=plan.storage)
    except KeyError:
        sec.optuna.append(
            Figure("Optuna study", missing=f"no study {plan.study_name(mag)!r} in {plan.storage}")
        )
        return
    trials = study.get_trials(deepcopy=False)
    sec.trial_counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    sec.trial_counts = {k: v for k, v in sec.trial_counts.items() if v}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    stem = f"{mag}_optuna"
    if len(study.directions) > 1:  # several objectives: the front (pareto.py) instead
        from dala_search import pareto

        rows = pareto.front_rows(study) or []
        if not rows:
            sec.optuna.append(Figure("Pareto front", missing="no completed feasible trial"))
        else:
            fig = pareto.front_figure(study, rows, pareto.paper_trial(study))
            sec.optuna.append(_save(fig, fig_dir, f"{stem}_pareto.png", page_dir, "Pareto front"))
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if not complete:
            sec.optuna.append(
                Figure(
                    "Optimisation history",
                    missing="no trial of this study completed (all pruned, failed or running)",
                )
            )
            return
        ax = ovm.plot_optimization_history(study, target_name=plan.tune_metric)
        sec.optuna.append(
            _save(ax.figure, fig_dir, f"{stem}_history.png", page_dir, "Optimisation history")
        )
        ax = ovm.plot_parallel_coordinate(study, target_name=plan.tune_metric)
        sec.optuna.append(
            _save(ax.figure, fig_dir, f"{stem}_parallel.png", page_dir, "Parallel coordinates")
        )
        names = {k for t in complete for k in t.params}
        varied = [k for k in names if len({repr(t.params.get(k)) for t in complete}) > 1]
        values = {t.value for t in complete}
        why = ""
        if len(complete) < 2:
            why = f"only {len(complete)} completed trial(s)"
        elif not varied:
            why = "no parameter varied across the completed trials"
        elif len(values) < 2:
            why = f"every completed trial scored the same ({num(complete[0].value)})"
        if why:
            sec.optuna.append(
                Figure(
                    "Parameter importances",
                    missing=f"not computable: {why} (importances need at least 2 completed "
                    "trials whose parameters and scores differ; run more trials)",
                )
            )
            return
        ax = ovm.plot_param_importances(study, target_name=plan.tune_metric)
        sec.optuna.append(
            _save(ax.figure, fig_dir, f"{stem}_importances.png", page_dir, "Parameter importances")
        )


def figures_section(sec: MagSection, uri: str, fig_dir: Path, page_dir: Path) -> None:
    """The best trial's own test figures, downloaded from its MLflow artifacts."""
    if sec.best is None or not sec.best["best_run_id"]:
        return
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    run_id = sec.best["best_run_id"]
    logged = {a.path for a in client.list_artifacts(run_id, "figures")}
    for art, title in (
        ("figures/test_confusion_matrix.png", "Confusion matrix (test patients)"),
        ("figures/test_roc_curve.png", "ROC curve (test patients)"),
    ):
        if art not in logged:
            why = (
                "the test side had a single class, so no ROC curve exists"
                if art.endswith("roc_curve.png")
                else "the trial logged no confusion matrix"
            )
            sec.figures.append(Figure(title, missing=f"{art} is not in run {run_id}: {why}"))
            continue
        local = Path(client.download_artifacts(run_id, art, str(fig_dir)))
        target = fig_dir / f"{sec.magnification}_{Path(art).name}"
        local.replace(target)
        sec.figures.append(_png_figure(target, page_dir, title, caption=f"run {run_id}"))


def gradcam_section(
    sec: MagSection,
    plan: Any,
    uri: str,
    parent: Any,
    fig_dir: Path,
    page_dir: Path,
    *,
    per_class: int,
    log: bool,
    progress: bool,
) -> None:
    """Grad-CAM maps of the best registered model on test images of each class."""
    from dala_search.explain import gradcam_for_best

    if per_class == 0:
        sec.gradcam_note = "left out by request (--gradcam-per-class 0)"
        return
    if sec.best is None or not sec.best["best_run_id"]:
        return  # the template says no trial completed
    registered = sec.best.get("registered_model")
    if not registered:
        sec.gradcam_note = (
            f"the best trial (run {sec.best['best_run_id']}) logged no model, so there is "
            "nothing to explain"
        )
        return
    model_name, version = registered.rsplit("/", 1)
    # The version this search registered (the alias `best` may since point elsewhere).
    model_uri = f"models:/{model_name}/{version}"
    out_dir = fig_dir / f"{sec.magnification}_gradcam"
    manifest = gradcam_for_best(
        tracking_uri=uri,
        parent_run_id=parent.info.run_id,
        model_uri=model_uri,
        config=sec.best["config"],
        data_dir=plan.data_dir,
        magnification=sec.magnification,
        seed=plan.seed,
        fold=plan.fold,
        out_dir=out_dir,
        per_class=per_class,
        log_to_mlflow=log,
        progress=progress,
    )
    where = f"parent run artifacts gradcam/{sec.magnification}/" if log else "not logged"
    sec.gradcam_note = f"model {model_uri}; {where}; the map explains the predicted class"
    for s in manifest:
        sec.gradcam.append(
            _png_figure(
                out_dir / s["file"],
                page_dir,
                f"true {s['true_class']}, predicted {s['predicted_class']} "
                f"(p={s['probability']:.2f})",
                caption=f"slide {s['slide']}: {Path(s['image']).name}",
            )
        )
