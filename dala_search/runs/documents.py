"""The evaluation and baseline documents: ``evaluation/<mag>.json`` and ``baselines/<mag>.json``.

``dala-search evaluate`` (``evaluate.py``) writes ``EvaluationDocument``, ``dala-search
baselines`` (``comparison.py``) writes ``BaselineDocument``, ``dala-search report`` reads
both; this module is that interface (the field comments are the format's documentation:
the shared fields and ``MetricSummary`` in ``document_base.py``, ``BaselineDocument`` in
``baseline_document.py``, the evaluation's own fields below). Files are strict JSON
(undefined numbers are ``null``), written atomically (temp file + rename). Reading
validates every key and type: a malformed or outdated file is a ``DalaError`` naming the
file and the key.

Per metric (``MetricSummary``) the primary figure is the pooled out-of-fold ``estimate``
with its patient-level cluster-bootstrap interval ``ci_low``/``ci_high``
(``dala_search.intervals``; the document's ``ci`` names the method); ``mean``, ``sd`` and
``values`` are the per-fold figures (secondary). So ``mean`` is what it always was, the
mean of the fold values, and the interval is NOT centred on it: it is the interval of
``estimate``.

No ray, optuna or mlflow here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dala_search.runs.baseline_document import RECIPES, BaselineDocument, ModelRow
from dala_search.runs.document_base import (
    PROTOCOLS,
    SPLIT_PROTOCOLS,
    FoldsRecord,
    MetricSummary,
    document_path,
    metrics_from,
    metrics_json,
)
from dala_search.runs.json_files import Reader

# The documents' shared parts live in document_base.py and the baselines document in
# baseline_document.py; every reader imports them from here.
__all__ = [
    "PROTOCOLS",
    "RECIPES",
    "SPLIT_PROTOCOLS",
    "BaselineDocument",
    "EvaluationDocument",
    "FoldsRecord",
    "MetricSummary",
    "ModelRow",
    "NestedEstimate",
    "document_path",
]


@dataclass(frozen=True, kw_only=True)
class NestedEstimate:
    """``evaluate NAME --nested K``: the figure of the whole selection procedure.

    For each of K outer patient folds the search was run again (its space, trials, sampler,
    pruner, ``cv``; seed ``runs.plan.nested_seed``) on the outer-training patients only, and
    its best configuration tested on the outer-test patients (that inner search's best
    trial did exactly that: its test predictions are pooled here). Every patient is tested
    once, by a model whose configuration was chosen without seeing it.
    """

    k: int  # outer folds
    cv: int  # inner folds per trial of the inner searches (1: one validation split)
    searches: list[str]  # the K inner searches (own MLflow experiment and folder each)
    seeds: list[int]  # their seeds (runs.plan.nested_seed)
    best_run_ids: list[str]  # each inner search's best trial (its test predictions pooled)
    configs: list[dict[str, Any]]  # the configuration each outer fold chose (TrialConfig keys)
    splits: list[dict[str, Any]]  # the outer splits (PatientSplit.to_json): test = fold k
    n_images: int  # pooled outer-test predictions
    n_patients: int  # distinct outer-test patients (the bootstrap's clusters)
    ci: str  # how the intervals were computed (intervals.method_name)
    metrics: dict[str, MetricSummary] = field(default_factory=dict)  # as ``metrics`` above
    optimism_of: str | None = None  # which non-nested figure ``selection_optimism`` uses
    optimism_note: str | None = None  # why ``selection_optimism`` is null

    _KEYS = (
        "k",
        "cv",
        "searches",
        "seeds",
        "best_run_ids",
        "configs",
        "splits",
        "n_images",
        "n_patients",
        "ci",
        "metrics",
        "optimism_of",
        "optimism_note",
    )

    def to_json(self) -> dict[str, Any]:
        out = {key: getattr(self, key) for key in self._KEYS}
        out["metrics"] = metrics_json(self.metrics)
        return out

    @classmethod
    def from_json(cls, data: Any, source: str, where: str = "nested.") -> NestedEstimate:
        r = Reader(data, source, where)
        r.only(*cls._KEYS)
        out = cls(
            k=r.get("k", int),
            cv=r.get("cv", int),
            searches=r.get("searches", list),
            seeds=r.get("seeds", list),
            best_run_ids=r.get("best_run_ids", list),
            configs=r.get("configs", list),
            splits=r.get("splits", list),
            n_images=r.get("n_images", int),
            n_patients=r.get("n_patients", int),
            ci=r.get("ci", str),
            metrics=metrics_from(r, "metrics"),
            optimism_of=r.get("optimism_of", str, null=True),
            optimism_note=r.get("optimism_note", str, null=True),
        )
        if out.k < 2:
            raise r.error(f"expected at least 2, found {out.k}", "k")
        for key in ("searches", "seeds", "best_run_ids", "configs", "splits"):
            if len(getattr(out, key)) != out.k:
                raise r.error(f"expected {out.k} entries (one per outer fold)", key)
        return out


def _optimism_from(r: Reader) -> dict[str, float | None] | None:
    raw = r.get("selection_optimism", dict, null=True)
    if raw is None:
        return None
    child = r.child("selection_optimism", raw)
    return {name: child.number(name) for name in raw}


@dataclass(frozen=True, kw_only=True)
class EvaluationDocument(FoldsRecord):
    """``<search folder>/evaluation/<mag>.json``: the best configuration retrained on K folds.

    Also logged as the artifact ``evaluation/<mag>.json`` of the magnification's parent run,
    with metrics ``test_<name>_estimate`` / ``_ci_low`` / ``_ci_high`` / ``_mean`` there.
    """

    best_run_id: str  # the MLflow run of the best trial (its trial_config.json is ``config``)
    metrics: dict[str, MetricSummary] = field(default_factory=dict)  # name ->, names in
    # evaluate.EVAL_METRICS: accuracy, balanced_accuracy, f1, gmean, iba, roc_auc (binary:
    # malignant positive), patient_accuracy. Empty ({}) only in a document that
    # ``--nested`` wrote before any ``evaluate --folds/--seeds``: the common fields then
    # describe the outer folds (protocol "folds", k = K, the outer splits, the pooled
    # outer-test predictions) and ``config``/``best_run_id`` the search's own best.
    nested: NestedEstimate | None = None  # ``evaluate --nested K`` (null until it ran)
    selection_optimism: dict[str, float | None] | None = None  # per metric: the pooled
    # non-nested ``metrics[m].estimate`` minus ``nested.metrics[m].estimate`` (null where
    # either is undefined; the whole key null without both: ``nested.optimism_note`` says)

    def to_json(self) -> dict[str, Any]:
        return {
            **self._common_json(),
            "best_run_id": self.best_run_id,
            "metrics": metrics_json(self.metrics),
            "nested": self.nested.to_json() if self.nested else None,
            "selection_optimism": self.selection_optimism,
        }

    @classmethod
    def from_json(cls, data: Any, source: str) -> EvaluationDocument:
        r = Reader(data, source)
        r.only(*cls._COMMON, "best_run_id", "metrics", "nested", "selection_optimism")
        # Documents written before --nested existed have neither key: read as null.
        nested_raw = r.data.get("nested")
        nested = None if nested_raw is None else NestedEstimate.from_json(nested_raw, source)
        metrics = (
            metrics_from(r, "metrics")
            if nested is None or r.data.get("metrics")
            else {**r.get("metrics", dict)}
        )
        return cls(
            **cls._common_from(r),
            best_run_id=r.get("best_run_id", str),
            metrics=metrics,
            nested=nested,
            selection_optimism=_optimism_from(r) if "selection_optimism" in r.data else None,
        )
