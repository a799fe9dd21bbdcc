"""The one table a reviewer reads, per magnification (``report``'s comparison section and
``baselines --json``'s ``comparison``).

Read from the documents only (``runs.documents``): ``evaluation/<mag>[.<protocol>].json``
(DALAResNet50, the search's best configuration) and ``baselines/<mag>[.<protocol>].json``
(the paper's comparison models), for each split protocol present (patient, image, eva):

* ``rows``: every model x ``TABLE_METRICS``, each the pooled estimate with its 95%
  patient-level interval, with the split protocol, whether it leaks, and the folds;
* ``published``: the paper's own figures (``published.py``), labelled as published, never
  as ours;
* ``leakage``: per model evaluated under both the patient and the image protocol with the
  same configuration, the image-level minus the patient-level estimate, in points: how
  much a leaky split inflates the figure. Empty (``leakage_note`` says why) otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dala_search.published import published_rows
from dala_search.runs.documents import (
    SPLIT_PROTOCOLS,
    BaselineDocument,
    EvaluationDocument,
    MetricSummary,
    document_path,
)

TABLE_METRICS: tuple[str, ...] = (
    "accuracy",
    "f1",
    "iba",
    "gmean",
    "balanced_accuracy",
    "patient_accuracy",
)
OURS = "dalaresnet50"
# Config keys that do not change what is trained (where it ran).
_RUNTIME_KEYS = ("device", "num_threads")


def _read(cls: Any, path: Path, mag: str) -> Any:
    return cls.read(path, mag) if path.is_file() else None


# split protocol -> (its evaluation document, its baselines document), None where absent
Documents = dict[str, tuple[EvaluationDocument | None, BaselineDocument | None]]


def _documents(folder: Path, mag: str) -> Documents:
    """Every evaluation and baselines document of ``mag``, read once."""
    return {
        sp: (
            _read(EvaluationDocument, document_path(folder, "evaluation", mag, sp), mag),
            _read(BaselineDocument, document_path(folder, "baselines", mag, sp), mag),
        )
        for sp in SPLIT_PROTOCOLS
    }


def _docs(documents: Documents) -> dict[str, dict[str, tuple[Any, dict[str, MetricSummary]]]]:
    """split protocol -> model -> (its document, its metrics); the models present only."""
    out: dict[str, dict[str, tuple[Any, dict[str, MetricSummary]]]] = {}
    for sp, (ev, base) in documents.items():
        models: dict[str, tuple[Any, dict[str, MetricSummary]]] = {}
        if ev is not None and ev.metrics:
            models[OURS] = (ev, ev.metrics)
        if base is not None:
            # A tuned dalaresnet50 row is not the searched best's: its own name.
            own = " (own lr/wd)" if base.recipe == "tuned" else ""
            for row in base.rows:
                models[row.model + own] = (base, row.metrics)
        if models:
            out[sp] = models
    return out


def _summary(m: MetricSummary | None) -> dict[str, float | None] | None:
    if m is None:
        return None
    return {"estimate": m.estimate, "ci_low": m.ci_low, "ci_high": m.ci_high}


def _recipe(doc: Any) -> dict[str, Any]:
    return {k: v for k, v in doc.config.items() if k not in _RUNTIME_KEYS}


def leakage_rows(
    docs: dict[str, dict[str, tuple[Any, dict[str, MetricSummary]]]],
) -> tuple[list[dict[str, Any]], str | None]:
    """Per model with both a patient and an image evaluation of the same configuration:
    both estimates and the inflation (image minus patient) in points, per metric."""
    patient, image = docs.get("patient", {}), docs.get("image", {})
    if not patient or not image:
        missing = "patient" if not patient else "image"
        how = "" if missing == "patient" else " --protocol image"
        return [], (
            f"no {missing}-level evaluation yet: run `dala-search evaluate NAME{how}` "
            f"(and `baselines NAME{how}`) with the same --folds/--seeds"
        )
    rows, skipped = [], []
    for model in [m for m in patient if m in image]:
        (pdoc, pm), (idoc, im) = patient[model], image[model]
        if _recipe(pdoc) != _recipe(idoc):
            skipped.append(f"{model} (trained with another configuration under each protocol)")
            continue
        row: dict[str, Any] = {
            "model": model,
            "patient_folds": f"{pdoc.protocol} k={pdoc.k}",
            "image_folds": f"{idoc.protocol} k={idoc.k}",
            "patient": {},
            "image": {},
            "inflation_points": {},
        }
        for name in TABLE_METRICS:
            p = pm[name].estimate if name in pm else None
            i = im[name].estimate if name in im else None
            row["patient"][name], row["image"][name] = p, i
            row["inflation_points"][name] = None if p is None or i is None else (i - p) * 100
        rows.append(row)
    note = None
    if skipped:
        note = "left out: " + "; ".join(skipped)
    elif not rows:
        note = "no model was evaluated under both the patient and the image protocol"
    return rows, note


def magnification_comparison(folder: Path, mag: str) -> dict[str, Any]:
    """The comparison of one magnification as JSON (module docstring)."""
    return _comparison(_documents(Path(folder), mag), mag)


def _comparison(documents: Documents, mag: str) -> dict[str, Any]:
    docs = _docs(documents)
    rows = []
    for sp, models in docs.items():
        for model, (doc, metrics) in models.items():
            rows.append(
                {
                    "model": model,
                    "searched_best": model == OURS,
                    "split_protocol": sp,
                    "leaky": doc.leaky,
                    "folds": f"{doc.protocol} k={doc.k}",
                    "synthetic": doc.synthetic,
                    "metrics": {n: _summary(metrics.get(n)) for n in TABLE_METRICS},
                }
            )
    leakage, note = leakage_rows(docs)
    return {
        "magnification": mag,
        "metrics": list(TABLE_METRICS),
        "rows": rows,
        "published": published_rows(mag),
        "leakage": leakage,
        "leakage_note": note,
    }


def comparison_json(folder: Path, magnifications: Sequence[str]) -> list[dict[str, Any]]:
    """``magnification_comparison`` of each magnification (``baselines --json``)."""
    return [magnification_comparison(folder, m) for m in magnifications]


# ---- the report's view --------------------------------------------------------------------

OURS_LABEL = "DALAResNet50 (searched best)"


def report_view(folder: Path, mag: str) -> dict[str, Any] | None:
    """The comparison as the report's template shows it (text cells), or None when no
    document exists for ``mag`` yet: ``metrics``; ``rows`` of (model, split protocol as
    printed, folds, one "estimate [ci]" per metric); ``leakage`` of (model, metric,
    patient-level, image-level, inflation in points); ``comparison``: the JSON plus
    ``has_ours`` and ``any_leaky``."""
    from dala_search.data.protocols import label

    documents = _documents(Path(folder), mag)
    cmp = _comparison(documents, mag)
    if not cmp["rows"]:
        return None
    rows = [
        (
            OURS_LABEL if r["searched_best"] else r["model"],
            label(r["split_protocol"]),
            r["folds"],
            [_cell(r["metrics"][k]) for k in TABLE_METRICS],
        )
        for r in cmp["rows"]
    ]
    leakage = [
        (
            OURS_LABEL if row["model"] == OURS else row["model"],
            k,
            _num(row["patient"][k]),
            _num(row["image"][k]),
            "n/a" if row["inflation_points"][k] is None else f"{row['inflation_points'][k]:+.1f}",
        )
        for row in cmp["leakage"]
        for k in TABLE_METRICS
    ]
    summary = {
        **cmp,
        "has_ours": any(r["searched_best"] for r in cmp["rows"]),
        "any_leaky": any(r["leaky"] for r in cmp["rows"]),
        "recipe_lines": _recipe_lines(documents),
    }
    return {"metrics": list(TABLE_METRICS), "rows": rows, "leakage": leakage, "comparison": summary}


def _recipe_lines(documents: Documents) -> list[str]:
    """How each protocol's baselines were trained: the shared recipe or each model's own."""
    from dala_search.comparison import recipe_lines

    out = []
    for sp, (_, base) in documents.items():
        if base is not None:
            head = "" if sp == "patient" else f"{sp} protocol: "
            out += [head + line.strip() for line in recipe_lines(base)]
    return out


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _cell(m: dict[str, float | None] | None) -> str:
    """ "0.8123 [0.7012, 0.9234]" (as ``MetricSummary.cell``), "-" where not measured."""
    if m is None or m["estimate"] is None:
        return "-"
    if m["ci_low"] is None or m["ci_high"] is None:
        return _num(m["estimate"])
    return f"{_num(m['estimate'])} [{_num(m['ci_low'])}, {_num(m['ci_high'])}]"
