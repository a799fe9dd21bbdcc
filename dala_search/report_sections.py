"""What the report shows of one magnification (``MagSection``) and the sections read from
the search's records: the best trial, the evaluation (and nested) figures, the comparison
and the provenance. The figure sections are ``report_figures.py``."""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dala_search.report_config import ConfigRows
from dala_search.runs import schema
from dala_search.runs.documents import EvaluationDocument, MetricSummary

# Metrics shown first (the paper's four, then the rest of the evaluate command's set).
PAPER_METRICS = ("accuracy", "f1", "iba", "gmean")
EVAL_METRICS = (*PAPER_METRICS, "balanced_accuracy", "roc_auc", "patient_accuracy")


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


def _estimate_and_ci(m: MetricSummary) -> tuple[str, str]:
    """The pooled estimate and ``[low, high]`` as text (``n/a`` where undefined)."""
    if m.ci_low is None:
        return num(m.estimate), "n/a" + (f" ({m.ci_note})" if m.ci_note else "")
    return num(m.estimate), f"[{num(m.ci_low)}, {num(m.ci_high)}]"


def _fold_text(m: MetricSummary) -> str:
    if m.mean is None:
        return "n/a"
    return num(m.mean) + (f" ± {num(m.sd)}" if m.sd is not None else "")


def num(v: Any) -> str:
    """A number to 4 places (``n/a`` when not finite); anything else as text."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "n/a" if not math.isfinite(f) else f"{f:.4f}"


def best_section(sec: MagSection) -> None:
    """The best trial's validation and test metrics (the best table's row)."""
    if sec.best is None or not sec.best["best_run_id"]:
        return
    m = sec.best["metrics"]
    names = [k[len("best_test_") :] for k in m if k.startswith("best_test_")]
    order = [k for k in EVAL_METRICS if k in names] + sorted(set(names) - set(EVAL_METRICS))
    sec.metric_rows = [
        (k, num(m.get(f"best_val_{k}", float("nan"))), num(m[f"best_test_{k}"])) for k in order
    ]


def evaluation_section(sec: MagSection, path: Path) -> None:
    """The evaluation document's figures, and the nested ones when it has them."""
    if not path.is_file():
        return
    ev = EvaluationDocument.read(path, sec.magnification)
    names = [k for k in EVAL_METRICS if k in ev.metrics]
    names += sorted(set(ev.metrics) - set(EVAL_METRICS))
    for k in names:
        m = ev.metrics[k]
        estimate, ci = _estimate_and_ci(m)
        values = ", ".join(num(v) for v in m.values)
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


def comparison_section(sec: MagSection, folder: Path) -> None:
    """The reviewer's table (``comparison_table.report_view``); nothing without documents."""
    from dala_search.comparison_table import report_view

    view = report_view(folder, sec.magnification)
    if view is not None:
        sec.comparison = view["comparison"]
        sec.comparison_metrics = view["metrics"]
        sec.comparison_rows = view["rows"]
        sec.leakage_rows = view["leakage"]


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def provenance(parent: Any) -> dict[str, str]:
    """Data, split, space, code version and dates from the parent run's tags."""
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
