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
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dala_search.config import TrialConfig
from dala_search.data.breakhis import BreakHisIndex
from dala_search.errors import ConfigError, DalaError, DataError
from dala_search.folds import check_protocol, fold_splits
from dala_search.intervals import N_RESAMPLES, cluster_bootstrap, method_name
from dala_search.runs import schema
from dala_search.runs.documents import (
    EvaluationDocument,
    MetricSummary,
    NestedEstimate,
    document_path,
)
from dala_search.runs.plan import SearchRef, open_search, parse_magnifications

EVAL_METRICS: tuple[str, ...] = (
    "accuracy",
    "balanced_accuracy",
    "f1",
    "gmean",
    "iba",
    "roc_auc",
    "patient_accuracy",
)

Log = Callable[[str], None]


def stderr_log(line: str) -> None:
    """The default progress log: one line to stderr, flushed."""
    print(line, file=sys.stderr, flush=True)


def tracking_client(uri: str) -> Any:
    """An ``MlflowClient`` on ``uri``."""
    return schema.client(uri)


# ---- the search -------------------------------------------------------------------------


def select_magnifications(ref: SearchRef, requested: str | None) -> tuple[str, ...]:
    """The search's magnifications, or the requested subset of them (comma list or 'all')."""
    if requested is None or requested.strip().lower() == "all":
        return tuple(ref.plan.magnifications)
    mags = parse_magnifications(requested)
    missing = [m for m in mags if m not in ref.plan.magnifications]
    if missing:
        raise ConfigError(
            f"--magnification: search {ref.name!r} has no {', '.join(missing)}; "
            f"it searched {', '.join(ref.plan.magnifications)}"
        )
    return mags


@dataclass(frozen=True)
class BestConfig:
    """The best trial of one magnification, as MLflow recorded it."""

    magnification: str
    parent_run_id: str
    best_run_id: str
    registered_model: str | None  # "dalaresnet50-40X/3"
    config: TrialConfig


def best_config(
    ref: SearchRef,
    magnification: str,
    *,
    epochs: int | None = None,
    device: str | None = None,
) -> BestConfig:
    """Read the best configuration of ``magnification`` back from MLflow.

    The parent run's ``dala.best_run_id`` names the trial; its ``trial_config.json``
    artifact is the config it trained with (params are strings; the artifact is typed).
    ``epochs`` and ``device`` (default ``auto``) override it; a warmup longer than the new
    epochs is shortened to fit (the written config shows it); the search's CPU thread
    count is dropped (torch's default for this process).
    """
    client = tracking_client(ref.tracking_uri)
    exp = client.get_experiment_by_name(schema.experiment_name(ref.name))
    if exp is None:
        raise DalaError(f"no search named {ref.name!r} in the MLflow store {ref.tracking_uri}")
    parents = client.search_runs(
        [exp.experiment_id],
        filter_string=(
            f"tags.`{schema.TAG_ROLE}` = 'magnification' and "
            f"tags.`{schema.TAG_MAG}` = '{magnification}'"
        ),
    )
    if not parents:
        raise DalaError(f"search {ref.name!r} has no MLflow run for {magnification} yet")
    parent = parents[0]
    best_run_id = parent.data.tags.get(schema.TAG_BEST_RUN)
    if not best_run_id:
        raise DalaError(
            f"search {ref.name!r}, {magnification}: no completed trial yet (nothing to evaluate)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(best_run_id, "trial_config.json", tmp)
        except Exception as e:
            raise DalaError(
                f"search {ref.name!r}, {magnification}: cannot read trial_config.json of the "
                f"best trial's run {best_run_id} in {ref.tracking_uri}: {e}"
            ) from e
        raw = json.loads(Path(path).read_text())
    source = f"trial_config.json of run {best_run_id}"
    config = TrialConfig.from_dict(raw, source=source)
    changes: dict[str, Any] = {"num_threads": 0, "device": device or "auto"}
    if epochs is not None:
        changes["epochs"] = epochs
        # A warmup as long as the shortened run would leave no decay: keep it shorter.
        changes["warmup_epochs"] = min(config.warmup_epochs, epochs - 1)
    try:
        config = config.replace(**changes)
    except ConfigError as e:
        raise ConfigError(f"{source} with --epochs/--device: {e}") from None
    return BestConfig(
        magnification=magnification,
        parent_run_id=parent.info.run_id,
        best_run_id=best_run_id,
        registered_model=parent.data.tags.get(schema.TAG_REGISTERED),
        config=config,
    )


# ---- statistics ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FoldOutcome:
    """One fold's test figures and the predictions they came from (pooled across folds)."""

    test: dict[str, float]  # the fold's test metrics (train_trial's)
    y_true: np.ndarray  # (n,) test labels, in the order of split.test
    y_prob: np.ndarray  # (n, C) test probabilities
    slides: list[str]  # the patient of each test image


def fold_figures(values: Sequence[float | None]) -> dict[str, Any]:
    """Per-fold ``values`` (NaN -> None), the ``mean`` and sample ``sd`` of the defined ones."""
    kept = [None if v is None or not math.isfinite(v) else float(v) for v in values]
    finite = np.array([v for v in kept if v is not None], dtype=np.float64)
    mean = float(finite.mean()) if len(finite) else None
    sd = float(finite.std(ddof=1)) if len(finite) >= 2 else None
    return {"mean": mean, "sd": sd, "values": tuple(kept)}


def pooled(folds: Sequence[FoldOutcome]) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """All folds' test predictions: labels, probabilities, patients (the bootstrap's
    clusters) and ``<fold>:<patient>`` (the patient-level units: a patient tested by several
    folds/seeds is one prediction per fold's model)."""
    y_true = np.concatenate([f.y_true for f in folds]).astype(np.int64)
    y_prob = np.concatenate([f.y_prob for f in folds])
    clusters = [s for f in folds for s in f.slides]
    units = [f"{i}:{s}" for i, f in enumerate(folds) for s in f.slides]
    return y_true, y_prob, clusters, units


def summarise(
    folds: Sequence[FoldOutcome], names: Sequence[str], *, seed: int
) -> dict[str, MetricSummary]:
    """Per metric: the pooled estimate with its cluster-bootstrap interval, and the fold
    figures (module docstring)."""
    y_true, y_prob, clusters, units = pooled(folds)
    intervals = cluster_bootstrap(
        y_true, y_prob, clusters, names, units=units, n_resamples=N_RESAMPLES, seed=seed
    )
    out = {}
    for n in names:
        iv = intervals[n]
        out[n] = MetricSummary(
            estimate=iv.estimate,
            ci_low=iv.low,
            ci_high=iv.high,
            **fold_figures([f.test.get(n, math.nan) for f in folds]),
            n_undefined=iv.n_undefined,
            ci_note=iv.reason,
        )
    return out


# ---- training over folds ----------------------------------------------------------------


def _with_split(data: Any, split: Any) -> Any:
    # The magnification's TrialData with another split: same records, cache rows and labels.
    return dataclasses.replace(data, split=split)


def train_folds(
    config: TrialConfig,
    data: Any,
    splits: Sequence[Any],
    protocol: str,
    *,
    label: str,
    build_model: Callable[[TrialConfig], Any] | None = None,
    log: Log = stderr_log,
) -> list[FoldOutcome]:
    """Train ``config`` once per split; each split's test metrics and predictions.

    ``data`` is a ``train.TrialData`` of the magnification (its own split is ignored).
    ``seeds`` trains split i with ``config.seed + i``; ``folds`` keeps the config's seed.
    One progress line per fold goes to ``log``.
    """
    from dala_search.model.foundation import LinearProbe, is_foundation
    from dala_search.train import train_trial

    kwargs = {} if build_model is None else {"build_model": build_model}
    out = []
    for i, split in enumerate(splits):
        cfg = config.replace(seed=config.seed + i) if protocol == "seeds" else config
        fold = _with_split(data, split)
        start = time.perf_counter()
        n = {side: len(split.indices(side)) for side in ("train", "val", "test")}
        p = {side: len(split.side_slides(data.records, side)) for side in ("train", "val", "test")}
        log(
            f"[{label}] {protocol[:-1]} {i + 1}/{len(splits)}: train {n['train']} / val "
            f"{n['val']} / test {n['test']} images ({p['train']}/{p['val']}/{p['test']} "
            f"patients), {cfg.epochs} epoch(s) ..."
        )
        if isinstance(build_model, LinearProbe) or (build_model is None and is_foundation(cfg)):
            from dala_search.train_head import train_head_trial  # a head on embeddings

            probe = isinstance(build_model, LinearProbe)
            result = train_head_trial(build_model.config_for(cfg) if probe else cfg, fold)
        else:
            result = train_trial(cfg, fold, **kwargs)
        out.append(
            FoldOutcome(
                test=result.test,
                y_true=np.asarray(result.test_scores["y_true"], dtype=np.int64),
                y_prob=np.asarray(result.test_scores["y_prob"], dtype=np.float64),
                slides=data.slides(split.test),
            )
        )
        t = result.test
        log(
            f"[{label}] {protocol[:-1]} {i + 1}/{len(splits)}: test acc "
            f"{_fmt(t.get('accuracy'))}  bal.acc {_fmt(t.get('balanced_accuracy'))}  "
            f"F1 {_fmt(t.get('f1'))}  AUC {_fmt(t.get('roc_auc'))}  "
            f"(best epoch {result.best_epoch}, {time.perf_counter() - start:.1f} s)"
        )
    return out


def _fmt(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def prepare_magnification(
    ref: SearchRef, index: BreakHisIndex, mag: str, config: TrialConfig
) -> Any:
    """``train.prepare_data`` for one magnification at the config's image size."""
    from dala_search.train import prepare_data

    return prepare_data(index, mag, image_size=config.image_size, seed=ref.plan.seed)


def data_index(ref: SearchRef, log: Log) -> BreakHisIndex:
    """The index of the data the search ran on (DataError when that folder is gone)."""
    from dala_search.data.breakhis import index_breakhis

    data_dir = Path(ref.plan.data_dir)
    if not data_dir.is_dir():
        raise DataError(
            f"search {ref.name!r} was run on {data_dir}, which is not there any more "
            "(the evaluation retrains on the same data)"
        )
    log(f"indexing {data_dir} ...")
    return index_breakhis(data_dir)


def open_bests(
    name: str,
    *,
    protocol: str,
    k: int,
    magnifications: str | None,
    epochs: int | None,
    device: str | None,
    runs_dir: str | Path | None,
    tracking_uri: str | None,
) -> tuple[SearchRef, list[BestConfig]]:
    """The search and each chosen magnification's best configuration, all read before any
    training (a bad protocol, magnification or search fails at once)."""
    check_protocol(protocol, k)
    ref = open_search(name, runs_dir, tracking_uri)
    mags = select_magnifications(ref, magnifications)
    return ref, [best_config(ref, m, epochs=epochs, device=device) for m in mags]


def fold_data(
    ref: SearchRef,
    bests: Sequence[BestConfig],
    protocol: str,
    k: int,
    log: Log,
    split_protocol: str = "patient",
) -> Iterator[tuple[BestConfig, Any, list[Any]]]:
    """Per best configuration, in turn: (best, its magnification's data, the fold splits),
    the data indexed once; ``evaluate_search`` and ``comparison.run_baselines`` share it.
    ``split_protocol``: patient, image (LEAKY) or eva (``data.protocols``)."""
    from dala_search.data import protocols

    protocols.check_magnifications(split_protocol, [b.magnification for b in bests])
    if protocols.is_leaky(split_protocol):
        log(f"WARNING: --protocol {split_protocol} is {protocols.LEAKY_NOTE}")
    index = data_index(ref, log)
    for best in bests:
        data = prepare_magnification(ref, index, best.magnification, best.config)
        splits = fold_splits(
            index, data.records, protocol, k, seed=ref.plan.seed, split_protocol=split_protocol
        )
        yield best, data, splits


def fold_record(
    ref: SearchRef,
    best: BestConfig,
    data: Any,
    splits: Sequence[Any],
    protocol: str,
    k: int,
    folds: Sequence[FoldOutcome],
) -> dict[str, Any]:
    """The fields every per-magnification document records about how its figures were
    made (``runs.documents._FoldsRecord``)."""
    return {
        "magnification": best.magnification,
        "search": ref.name,
        "protocol": protocol,
        "k": k,
        "config": best.config.to_dict(),
        "synthetic": bool(data.synthetic),
        "code_version": schema.code_version(),
        "ci": method_name(N_RESAMPLES, ref.plan.seed),
        "splits": [s.to_json(data.records) for s in splits],
        "n_images": sum(len(f.y_true) for f in folds),
        "n_patients": len({s for f in folds for s in f.slides}),
        "split_protocol": splits[0].protocol,
        "leaky": bool(splits[0].leaky),
    }


# ---- evaluate -----------------------------------------------------------------------------


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


# ---- files and tables ---------------------------------------------------------------------


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
            f"  {name:20}{s.cell():>26}  {_fmt(other.estimate if other else None):>10}  "
            f"{'n/a' if opt is None else f'{opt:+.4f}':>9}"
        )
    lines.append(f"  (selection_optimism: {n.optimism_of or n.optimism_note})")
    return lines
