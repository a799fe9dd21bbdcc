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

import datetime as dt
from importlib import resources
from pathlib import Path
from typing import Any

from dala_search.errors import DalaError
from dala_search.report_config import split_config
from dala_search.report_figures import figures_section, gradcam_section, optuna_section
from dala_search.report_sections import (
    MagSection,
    best_section,
    comparison_section,
    evaluation_section,
    provenance,
)
from dala_search.runs import schema
from dala_search.runs.plan import open_search

SECTIONS = ("best", "evaluation", "comparison", "optuna", "figures", "gradcam", "provenance")


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
        best_section(sec)
        if sec.best is not None:
            sec.config = split_config(sec.best["config"], plan.space)
        evaluation_section(sec, folder / "evaluation" / f"{mag}.json")
        comparison_section(sec, folder)
        optuna_section(sec, plan, mag, fig_dir, html_path.parent)
        figures_section(sec, uri, fig_dir, html_path.parent)
        gradcam_section(
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
        sec.provenance = provenance(parents.get(mag))
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
