"""Plain-text tables of an evaluation document (the CLI prints them)."""

from __future__ import annotations

import math
from typing import Any

from dala_search.runs.documents import EvaluationDocument, MetricSummary


def fmt(v: float | None, digits: int = 4) -> str:
    """``v`` to ``digits`` places, or ``n/a`` when undefined."""
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def fold_cell(s: MetricSummary) -> str:
    """``0.8100 ± 0.0300``: the per-fold mean ± SD (the secondary figure)."""
    if s.mean is None:
        return "n/a"
    return f"{s.mean:.4f}" + (f" ± {s.sd:.4f}" if s.sd is not None else "")


def evaluation_table(doc: EvaluationDocument | dict[str, Any]) -> list[str]:
    """Plain-text lines for one magnification's evaluation (the CLI prints them)."""
    from dala_search.data.protocols import described

    if not isinstance(doc, EvaluationDocument):
        doc = EvaluationDocument.from_json(doc, "evaluation document")
    tag = " (SYNTHETIC data)" if doc.synthetic else ""
    if not doc.metrics:
        lines = [f"{doc.magnification}  search {doc.search}, no non-nested evaluation yet{tag}"]
    else:
        lines = [
            f"{doc.magnification}  search {doc.search}, {doc.protocol} k={doc.k}, "
            f"{doc.n_images} test predictions of {doc.n_patients} patients{tag}; "
            f"split protocol: {described(doc.split_protocol)}"
        ]
        lines.append(f"  {'metric':20}{'pooled [95% CI]':>26}  {'fold mean ± sd':>17}")
        for name, s in doc.metrics.items():
            lines.append(f"  {name:20}{s.cell():>26}  {fold_cell(s):>17}")
        lines.append(f"  ({doc.ci})")
    if doc.nested is not None:
        lines += nested_table(doc)
    return lines


def nested_table(doc: EvaluationDocument) -> list[str]:
    """The nested estimate next to the non-nested one and their difference, per metric."""
    n = doc.nested
    assert n is not None
    lines = [
        f"  nested, {n.k} outer folds ({n.n_images} test predictions of {n.n_patients} "
        f"patients; inner searches {', '.join(n.searches)}):",
        f"  {'metric':20}{'nested [95% CI]':>26}  {'non-nested':>10}  {'optimism':>9}",
    ]
    for name, s in n.metrics.items():
        other = doc.metrics.get(name)
        opt = (doc.selection_optimism or {}).get(name)
        lines.append(
            f"  {name:20}{s.cell():>26}  {fmt(other.estimate if other else None):>10}  "
            f"{'n/a' if opt is None else f'{opt:+.4f}':>9}"
        )
    lines.append(f"  (selection_optimism: {n.optimism_of or n.optimism_note})")
    return lines
