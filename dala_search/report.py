"""``dala-search report NAME``: one self-contained HTML page per search.

``dala-search report`` (``cli/results.py``) calls ``build_report``. The page (jinja2 template
``templates/report.html.j2``) gathers what the search and the later commands recorded, per
magnification:

* best configuration and its validation/test metrics (MLflow: ``runs.schema.best_table``,
  the parent runs) and the Optuna study's trial counts;
* the final evaluation: per metric the pooled out-of-fold estimate with its 95%
  patient-level bootstrap interval, and the per-fold mean ± SD and values
  (``<search folder>/evaluation/<mag>.json``, written by ``dala-search evaluate``);
* the comparison (``comparison_table.py``): every model under each split protocol
  (``baselines/`` and ``evaluation/`` documents), the paper's published figures in their own
  row, and the leakage rows (image-level minus patient-level, in points);
* Optuna's own visualisations of the study (matplotlib backend: PNG without plotly/kaleido);
* confusion matrix and ROC curve of the best trial (its MLflow artifacts ``figures/...``);
* Grad-CAM heat maps of the best model on test images of each class (``explain.py``, logged
  to the parent run as ``gradcam/<mag>/``);
* provenance: data set path, synthetic or real, split, code versions, dates.

A section whose source is missing says so and names the command that fills it; it is never
left empty or filled with made-up numbers. Figures are written as PNG files into a folder
beside the page *and* inlined as data URIs, so the page opens offline from disk, alone.
Every string that reaches the page goes through jinja2's autoescaping.
"""

from __future__ import annotations

import base64
import datetime as dt
import math
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from dala_search.errors import DalaError
from dala_search.report_config import ConfigRows, split_config
from dala_search.runs import schema
from dala_search.runs.documents import EvaluationDocument, MetricSummary
from dala_search.runs.plan import open_search

# Metrics shown first (the paper's four, then the rest of the evaluate command's set).
PAPER_METRICS = ("accuracy", "f1", "iba", "gmean")
EVAL_METRICS = (*PAPER_METRICS, "balanced_accuracy", "roc_auc", "patient_accuracy")
SECTIONS = ("best", "evaluation", "comparison", "optuna", "figures", "gradcam", "provenance")


@dataclass
class Figure:
    """A PNG in the report (``src`` a data URI) or, when it cannot exist, why (``missing``)."""

    title: str
    file: str = ""  # path relative to the page
    src: str = ""
    missing: str = ""
    caption: str = ""


@dataclass
class MagSection:
    """Everything the page shows for one magnification."""

    magnification: str
    best: dict[str, Any] | None = None  # best_table row
    trial_counts: dict[str, int] = field(default_factory=dict)
    metric_rows: list[tuple[str, str, str]] = field(default_factory=list)  # name, val, test
    config: ConfigRows | None = None  # the best configuration: searched, then fixed
    evaluation: dict[str, Any] | None = None  # the document's JSON and its "source" path
    evaluation_doc: EvaluationDocument | None = None
    evaluation_rows: list[tuple[str, str, str, str, str]] = field(default_factory=list)
    # --nested: metric, non-nested "estimate [ci]", nested estimate, its interval, its fold
    # mean ± SD, selection optimism
    nested_rows: list[tuple[str, str, str, str, str, str]] = field(default_factory=list)
    comparison: dict[str, Any] | None = None  # comparison_table.magnification_comparison
    comparison_metrics: list[str] = field(default_factory=list)
    # model, split protocol (as printed), folds, one "estimate [ci]" per metric
    comparison_rows: list[tuple[str, str, str, list[str]]] = field(default_factory=list)
    # model, metric, patient-level, image-level, inflation in points ("+12.3")
    leakage_rows: list[tuple[str, str, str, str, str]] = field(default_factory=list)
    optuna: list[Figure] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    gradcam: list[Figure] = field(default_factory=list)
    gradcam_note: str = ""
    provenance: dict[str, str] = field(default_factory=dict)


def default_report_path(folder: Path) -> Path:
    return folder / "report" / "report.html"


def build_report(
    name: str,
    *,
    runs_dir: str | Path | None = None,
    out: str | Path | None = None,
    tracking_uri: str | None = None,
    gradcam_per_class: int = 2,
    log_gradcam: bool = True,
    progress: bool = True,
) -> Path:
    """Write the report of search ``name``; returns the HTML path.

    ``tracking_uri`` overrides the one in ``search.json`` (a store that moved);
    ``gradcam_per_class=0`` leaves Grad-CAM out (the page says so); ``log_gradcam=False``
    keeps the overlays out of MLflow (used on stores a caller must not change).
    """
    ref = open_search(name, runs_dir, tracking_uri)
    folder, plan, uri = ref.folder, ref.plan, ref.tracking_uri
    html_path = Path(out).resolve() if out else default_report_path(folder)
    if html_path.suffix.lower() not in (".html", ".htm"):
        raise DalaError(f"--out {out}: the report is an HTML file; give a path ending in .html")
    fig_dir = html_path.parent / f"{html_path.stem}_figures"
    fig_dir.mkdir(parents=True, exist_ok=True)

    rows = {r["magnification"]: r for r in schema.best_table(uri, name)}
    parents = _parent_runs(uri, name)
    mags = [m for m in plan.magnifications if m in rows or m in parents] or list(rows)
    steps: Any = mags
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(mags, desc="report", unit="magnification")
    sections = []
    for mag in steps:
        sec = MagSection(mag, best=rows.get(mag))
        _best_section(sec)
        if sec.best is not None:
            sec.config = split_config(sec.best["config"], plan.space)
        _evaluation_section(sec, folder / "evaluation" / f"{mag}.json")
        _comparison_section(sec, folder)
        _optuna_section(sec, plan, mag, fig_dir, html_path.parent)
        _figures_section(sec, uri, fig_dir, html_path.parent)
        _gradcam_section(
            sec,
            plan,
            uri,
            parents.get(mag),
            fig_dir,
            html_path.parent,
            per_class=gradcam_per_class,
            log=log_gradcam,
            progress=progress,
        )
        sec.provenance = _provenance(parents.get(mag))
        sections.append(sec)

    html = _render(
        search=name,
        plan=plan,
        uri=uri,
        folder=folder,
        sections=sections,
        synthetic=any(s.best and s.best["synthetic"] for s in sections),
    )
    tmp = html_path.with_name(f".{html_path.name}.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(html_path)  # atomic: a browser never sees half a page
    return html_path


# ---- sources ----------------------------------------------------------------------------


def _parent_runs(uri: str, name: str) -> dict[str, Any]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(schema.experiment_name(name))
    if exp is None:  # best_table has already refused this; kept for direct callers
        raise DalaError(f"no search named {name!r} in the MLflow store {uri}")
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{schema.TAG_ROLE}` = 'magnification'"
    )
    return {r.data.tags[schema.TAG_MAG]: r for r in runs}


def _estimate_and_ci(m: MetricSummary) -> tuple[str, str]:
    """The pooled estimate and ``[low, high]`` as text (``n/a`` where undefined)."""
    if m.ci_low is None:
        return _num(m.estimate), "n/a" + (f" ({m.ci_note})" if m.ci_note else "")
    return _num(m.estimate), f"[{_num(m.ci_low)}, {_num(m.ci_high)}]"


def _fold_text(m: MetricSummary) -> str:
    if m.mean is None:
        return "n/a"
    return _num(m.mean) + (f" ± {_num(m.sd)}" if m.sd is not None else "")


def _num(v: Any) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "n/a" if not math.isfinite(f) else f"{f:.4f}"


# ---- sections ---------------------------------------------------------------------------


def _best_section(sec: MagSection) -> None:
    if sec.best is None or not sec.best["best_run_id"]:
        return
    m = sec.best["metrics"]
    names = [k[len("best_test_") :] for k in m if k.startswith("best_test_")]
    order = [k for k in EVAL_METRICS if k in names] + sorted(set(names) - set(EVAL_METRICS))
    sec.metric_rows = [
        (k, _num(m.get(f"best_val_{k}", float("nan"))), _num(m[f"best_test_{k}"])) for k in order
    ]


def _evaluation_section(sec: MagSection, path: Path) -> None:
    if not path.is_file():
        return
    ev = EvaluationDocument.read(path, sec.magnification)
    names = [k for k in EVAL_METRICS if k in ev.metrics]
    names += sorted(set(ev.metrics) - set(EVAL_METRICS))
    for k in names:
        m = ev.metrics[k]
        estimate, ci = _estimate_and_ci(m)
        values = ", ".join(_num(v) for v in m.values)
        sec.evaluation_rows.append((k, estimate, ci, _fold_text(m), values))
    sec.evaluation = {**ev.to_json(), "source": str(path)}
    sec.evaluation_doc = ev
    if ev.nested is not None:
        optimism = ev.selection_optimism or {}
        for k in [k for k in EVAL_METRICS if k in ev.nested.metrics]:
            m = ev.nested.metrics[k]
            estimate, ci = _estimate_and_ci(m)
            other = ev.metrics[k].cell() if k in ev.metrics else "n/a"
            opt = optimism.get(k)
            sec.nested_rows.append(
                (k, other, estimate, ci, _fold_text(m), "n/a" if opt is None else f"{opt:+.4f}")
            )


def _comparison_section(sec: MagSection, folder: Path) -> None:
    """The reviewer's table (``comparison_table.report_view``); nothing without documents."""
    from dala_search.comparison_table import report_view

    view = report_view(folder, sec.magnification)
    if view is not None:
        sec.comparison = view["comparison"]
        sec.comparison_metrics = view["metrics"]
        sec.comparison_rows = view["rows"]
        sec.leakage_rows = view["leakage"]


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


def _optuna_section(sec: MagSection, plan: Any, mag: str, fig_dir: Path, page_dir: Path) -> None:
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
            why = f"every completed trial scored the same ({_num(complete[0].value)})"
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


def _figures_section(sec: MagSection, uri: str, fig_dir: Path, page_dir: Path) -> None:
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


def _gradcam_section(
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


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _provenance(parent: Any) -> dict[str, str]:
    if parent is None:
        return {}
    t = parent.data.tags
    return {
        "data set": t.get(schema.TAG_DATA_ROOT, "-"),
        "data": "SYNTHETIC (procedural tiles, not patients)"
        if t.get(schema.TAG_SYNTHETIC) == "true"
        else "real",
        "split": t.get(schema.TAG_SPLIT, "-"),
        "search space": t.get(schema.TAG_SPACE, "-"),
        "code version": t.get(schema.TAG_CODE, "-"),
        "MLflow parent run": parent.info.run_id,
        "started": _when(parent.info.start_time),
        "ended": _when(parent.info.end_time),
    }


# ---- page -------------------------------------------------------------------------------


def _render(**ctx: Any) -> str:
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    template = resources.files("dala_search") / "templates" / "report.html.j2"
    return env.from_string(template.read_text(encoding="utf-8")).render(
        generated=now,
        report_code_version=schema.code_version(),
        section_ids=SECTIONS,
        **ctx,
    )
