"""Final evaluation of a search's best configurations, and the folds the baselines share.

``dala-search evaluate NAME`` (``evaluate_search``) calls this module, and
``dala-search baselines NAME`` (``comparison.run_baselines``) trains the paper's models on
the same folds with this module's helpers; ``dala-search report`` READS what both write.
The file formats (``dala_search/runs/documents.py``) are that interface.

The protocols (``--folds K`` or ``--seeds K``) and their folds: ``folds.py``.

Every run is the same ``train.train_trial`` as a search trial, with the best configuration
read from MLflow (the magnification's parent run names the best trial; its
``trial_config.json`` artifact is the exact config) and ``--epochs``/``--device`` applied.

Every figure is a test figure of patients the fold's model never trained on. Per metric the
document holds (``dala_search/runs/documents.py`` is the format, field by field):

- ``estimate``: the metric on all folds' test predictions pooled (the primary figure), with
  ``ci_low`` / ``ci_high``, its 95% patient-level cluster-bootstrap interval
  (``dala_search/intervals.py``: patients resampled with replacement within their class,
  2,000 resamples, percentile interval, seeded with the search's seed): always inside
  [0, 1]. With ``seeds`` (and BreakHis's official folds) test parts overlap: a patient
  tested by several repetitions contributes each repetition's predictions, scored as one
  patient-level unit per repetition and resampled as one patient.
- ``mean``, ``sd``, ``values``: the per-fold figures (secondary): the mean and sample SD of
  the defined fold values, and the value of each fold (``null`` where undefined in that
  fold, e.g. ROC AUC on a test part with one class). ``mean`` is NOT the centre of the
  interval; ``estimate`` is the figure the interval is for.

Files: ``<search folder>/evaluation/<mag>.json`` (``EvaluationDocument``) and, from
``comparison.py``, ``<search folder>/baselines/<mag>.json`` (``BaselineDocument``).
``--protocol image|eva`` (``data/protocols.py``; image-level splits are LEAKY) writes
``<mag>.<protocol>.json`` beside them and never replaces the patient-level figures.

MLflow, on the magnification's parent run: ``test_<name>_estimate`` / ``_ci_low`` /
``_ci_high`` / ``_mean`` / ``_sd`` metrics and the artifact ``evaluation/<mag>.json``
(evaluate); metrics ``baseline_<model>_test_<name>_...`` likewise and the artifact
``baselines/<mag>.json`` (baselines). The search's registered best model version
(``dala.registered_model`` tag of the parent run) gets tags ``dala.eval.protocol``,
``dala.eval.k`` and ``dala.eval.test_<name>`` = "estimate [ci_low, ci_high]".

Folds run one after the other in this process (on the GPU when there is one).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from dala_search.errors import DalaError
from dala_search.evaluate_best import (
    BestConfig,
    best_config,
    open_bests,
    select_magnifications,
    tracking_client,
)
from dala_search.evaluate_folds import (
    Log,
    data_index,
    fold_data,
    fold_record,
    prepare_magnification,
    stderr_log,
    train_folds,
)
from dala_search.evaluate_summary import (
    EVAL_METRICS,
    FoldOutcome,
    fold_figures,
    pooled,
    summarise,
)
from dala_search.evaluate_tables import evaluation_table, fold_cell, nested_table
from dala_search.runs import schema
from dala_search.runs.documents import (
    EvaluationDocument,
    MetricSummary,
    NestedEstimate,
    document_path,
)
from dala_search.runs.plan import SearchRef

# The evaluation's helpers live in evaluate_*.py; comparison.py, nested.py, the CLI and the
# tests import them from here, the evaluation's one entry point.
__all__ = [
    "EVAL_METRICS",
    "SUMMARY_PARTS",
    "BestConfig",
    "FoldOutcome",
    "Log",
    "best_config",
    "data_index",
    "evaluate_search",
    "evaluation_table",
    "fold_cell",
    "fold_data",
    "fold_figures",
    "fold_record",
    "metric_batch",
    "nested_table",
    "open_bests",
    "pooled",
    "prepare_magnification",
    "select_magnifications",
    "stderr_log",
    "summarise",
    "tracking_client",
    "train_folds",
    "with_nested",
]


def evaluate_search(
    name: str,
    *,
    protocol: str = "folds",
    k: int = 5,
    magnifications: str | None = None,
    epochs: int | None = None,
    device: str | None = None,
    runs_dir: str | Path | None = None,
    tracking_uri: str | None = None,
    log: Log = stderr_log,
    split_protocol: str = "patient",
) -> list[dict[str, Any]]:
    """``dala-search evaluate``: retrain each best config on K folds; write, log, return.

    Returns one document per magnification (the ``evaluation/<mag>.json`` content).
    ``split_protocol`` other than patient (``--protocol image|eva``) writes
    ``evaluation/<mag>.<protocol>.json`` beside the patient one, and MLflow metrics
    ``test_<protocol>_<name>_...``; it tags no registered model.
    """
    ref, bests = open_bests(
        name,
        protocol=protocol,
        k=k,
        magnifications=magnifications,
        epochs=epochs,
        device=device,
        runs_dir=runs_dir,
        tracking_uri=tracking_uri,
    )
    docs = []
    for best, data, splits in fold_data(ref, bests, protocol, k, log, split_protocol):
        mag = best.magnification
        folds = train_folds(best.config, data, splits, protocol, label=mag, log=log)
        path = document_path(ref.folder, "evaluation", mag, split_protocol)
        previous = _previous_nested(path, mag, log) if split_protocol == "patient" else None
        doc = with_nested(
            EvaluationDocument(
                **fold_record(ref, best, data, splits, protocol, k, folds),
                best_run_id=best.best_run_id,
                metrics=summarise(folds, EVAL_METRICS, seed=ref.plan.seed),
            ),
            previous,
        )
        path = doc.write(path)
        log(f"[{mag}] wrote {path}")
        _log_evaluation(ref, best, doc, log)
        docs.append(doc.to_json())
    return docs


def _previous_nested(path: Path, mag: str, log: Log) -> NestedEstimate | None:
    """The nested estimate an earlier ``--nested`` left in ``path`` (kept by a new
    ``evaluate``, which only replaces the non-nested figures). A file this version cannot
    read is replaced, as before ``--nested`` existed, and the log says so."""
    if not path.is_file():
        return None
    try:
        return EvaluationDocument.read(path, mag).nested
    except DalaError as e:
        log(f"[{mag}] note: replacing {path}, which this version cannot read ({e})")
        return None


def with_nested(doc: EvaluationDocument, nested: NestedEstimate | None) -> EvaluationDocument:
    """``doc`` holding ``nested`` and the ``selection_optimism`` of its own figures.

    ``selection_optimism[m]`` = the non-nested pooled ``estimate`` of ``m`` minus the nested
    ``estimate`` (positive: the non-nested figure overstates what the procedure delivers on
    patients it did not select on). Null per metric where either is undefined; the whole
    key null (``nested.optimism_note`` says why) when ``doc`` has no non-nested figures.
    """
    if nested is None:
        return dataclasses.replace(doc, nested=None, selection_optimism=None)
    if not doc.metrics:
        note = (
            "no non-nested evaluation yet: run `dala-search evaluate NAME --folds K` "
            "(selection_optimism is then computed against its pooled estimate)"
        )
        nested = dataclasses.replace(nested, optimism_of=None, optimism_note=note)
        return dataclasses.replace(doc, nested=nested, selection_optimism=None)
    optimism: dict[str, float | None] = {}
    for name, ours in nested.metrics.items():
        other = doc.metrics.get(name)
        if other is None or other.estimate is None or ours.estimate is None:
            optimism[name] = None
        else:
            optimism[name] = other.estimate - ours.estimate
    of = f"the pooled estimate of `evaluate` ({doc.protocol} k={doc.k}) minus the nested one"
    nested = dataclasses.replace(nested, optimism_of=of, optimism_note=None)
    return dataclasses.replace(doc, nested=nested, selection_optimism=optimism)


SUMMARY_PARTS = ("estimate", "ci_low", "ci_high", "mean", "sd")


def metric_batch(prefix: str, metrics: dict[str, MetricSummary]) -> list[Any]:
    """MLflow ``Metric``s ``<prefix><name>_<part>`` for each of ``SUMMARY_PARTS`` (the
    defined ones)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    out = []
    for name, s in metrics.items():
        for part in SUMMARY_PARTS:
            value = getattr(s, part)
            if value is not None:  # MLflow has no "undefined": leave the metric out
                out.append(Metric(f"{prefix}{name}_{part}", float(value), now, 0))
    return out


def _log_evaluation(ref: SearchRef, best: BestConfig, doc: EvaluationDocument, log: Log) -> None:
    """Metrics and the JSON on the parent run; the figures as tags on the registered model."""
    from mlflow.entities import RunTag

    client = tracking_client(ref.tracking_uri)
    mag = best.magnification
    sp = doc.split_protocol
    patient = sp == "patient"
    # Another protocol's figures sit beside the patient ones, never over them.
    tag = schema.TAG_EVALUATION if patient else f"{schema.TAG_EVALUATION}.{sp}"
    value = f"{doc.protocol} k={doc.k}" + (", LEAKY image-level split" if doc.leaky else "")
    client.log_batch(
        best.parent_run_id,
        metrics=metric_batch("test_" if patient else f"test_{sp}_", doc.metrics),
        tags=[RunTag(tag, value)],
    )
    name = document_path(ref.folder, "evaluation", mag, sp).name
    client.log_dict(best.parent_run_id, doc.to_json(), f"evaluation/{name}")
    if not patient:
        log(f"[{mag}] --protocol {sp}: figures logged on the parent run; no model tagged")
        return
    if not best.registered_model:
        log(
            f"[{mag}] note: the best trial logged no model, so no registered version to tag; "
            "the figures are on the parent run"
        )
        return
    model, _, version = best.registered_model.rpartition("/")
    tags = {schema.TAG_EVAL_PROTOCOL: doc.protocol, schema.TAG_EVAL_K: str(doc.k)}
    for name, s in doc.metrics.items():
        tags[f"{schema.TAG_EVAL_TEST_PREFIX}{name}"] = s.cell()
    for key, value in tags.items():
        client.set_model_version_tag(model, version, key, value)
    log(f"[{mag}] tagged registered model {model} version {version} with the figures")
