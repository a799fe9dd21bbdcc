"""Final evaluation of a search's best configurations, and the folds the baselines share.

``dala-search evaluate NAME`` (``evaluate_search``) calls this module, and
``dala-search baselines NAME`` (``comparison.run_baselines``) trains the paper's models on
the same folds with this module's helpers; ``dala-search report`` READS what both write.
The file formats below are that interface; change them only together with the report.

The protocols (``--folds K`` or ``--seeds K``) and their folds: ``folds.py``.

Every run is the same ``train.train_trial`` as a search trial, with the best configuration
read from MLflow (the magnification's parent run names the best trial; its
``trial_config.json`` artifact is the exact config) and ``--epochs``/``--device`` applied.

The confidence interval is a two-sided 95 % Student t-interval over the K per-fold test
values (``scipy.stats.t``, K - 1 degrees of freedom): mean +- t * sd / sqrt(K). Values that are
undefined in a fold (e.g. ROC AUC on a test part with one class) are written as ``null`` and
left out of the mean and interval; with fewer than two defined values the interval is
``null``. The interval is not clipped to [0, 1]: with K = 2 the t quantile is 12.7 and an
interval wider than the metric's range says honestly how little two folds tell.

Files (written atomically: temp file + rename; strict JSON, undefined numbers are ``null``):

``<search folder>/evaluation/<mag>.json``::

    {"magnification": "40X", "search": NAME, "protocol": "folds" | "seeds", "k": K,
     "config": {TrialConfig keys}, "synthetic": bool, "code_version": "0.1.0+abc123",
     "ci": "<how the interval was computed>",
     "splits": [{"description", "train"|"val"|"test": {"slides", "n_images"}}, one per fold],
     "best_run_id": "<MLflow run of the best trial>",
     "metrics": {NAME: {"mean", "ci_low", "ci_high", "values": [one per fold]}}}

  NAME in ``EVAL_METRICS``: accuracy, balanced_accuracy, f1, gmean, iba, roc_auc,
  patient_accuracy (``dala_search.metrics``; binary IBA, malignant positive).

``<search folder>/baselines/<mag>.json``::

    {"magnification": "40X", "search": NAME, "protocol": ..., "k": K, "synthetic": bool,
     "code_version": ..., "ci": ..., "splits": [...], "config": {the shared training config},
     "rows": [{"model": "resnet50", "metrics": {NAME: {"mean", "ci_low", "ci_high",
               "values"}}}, ...],
     "dalaresnet50": {"model": "dalaresnet50", "protocol", "k", "metrics": {...}} | null}

  NAME in ``comparison.BASELINE_METRICS`` (accuracy, f1, iba, gmean, balanced_accuracy, roc_auc);
  ``dalaresnet50`` is the evaluation of the same search read from ``evaluation/<mag>.json``
  when it exists and used the same protocol and k (the same folds), else ``null``.

MLflow, on the magnification's parent run: ``test_<name>_mean`` / ``_ci_low`` / ``_ci_high``
metrics and the artifact ``evaluation/<mag>.json`` (evaluate); metrics
``baseline_<model>_test_<name>_mean`` / ``_ci_low`` / ``_ci_high`` and the artifact
``baselines/<mag>.json`` (baselines). The search's registered best model version
(``dala.registered_model`` tag of the parent run) gets tags ``dala.eval.protocol``,
``dala.eval.k`` and ``dala.eval.test_<name>`` = "mean [ci_low, ci_high]".

Folds run one after the other in this process (on the GPU when there is one).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
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
from dala_search.runs import schema
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
CI_METHOD = "95% Student t-interval over the k folds/seeds (scipy.stats.t, k-1 df)"

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


def confidence_interval(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and 95% t-interval of the defined (finite) values; ``values`` kept, NaN -> None."""
    from scipy import stats

    kept = [None if v is None or not math.isfinite(v) else float(v) for v in values]
    finite = np.array([v for v in kept if v is not None], dtype=np.float64)
    mean = float(finite.mean()) if len(finite) else None
    low = high = None
    if len(finite) >= 2:
        half = float(stats.t.ppf(0.975, len(finite) - 1) * finite.std(ddof=1))
        half /= math.sqrt(len(finite))
        low, high = mean - half, mean + half
    return {"mean": mean, "ci_low": low, "ci_high": high, "values": kept}


def summarise(per_fold: Sequence[dict[str, float]], names: Sequence[str]) -> dict[str, Any]:
    """``{name: confidence_interval(values over folds)}`` for each metric name."""
    return {n: confidence_interval([m.get(n, math.nan) for m in per_fold]) for n in names}


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
) -> list[dict[str, float]]:
    """Train ``config`` once per split and return each split's test metrics.

    ``data`` is a ``train.TrialData`` of the magnification (its own split is ignored).
    ``seeds`` trains split i with ``config.seed + i``; ``folds`` keeps the config's seed.
    One progress line per fold goes to ``log``.
    """
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
        result = train_trial(cfg, fold, **kwargs)
        out.append(result.test)
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
    ref: SearchRef, bests: Sequence[BestConfig], protocol: str, k: int, log: Log
) -> Iterator[tuple[BestConfig, Any, list[Any]]]:
    """Per best configuration, in turn: (best, its magnification's data, the fold splits),
    the data indexed once; ``evaluate_search`` and ``comparison.run_baselines`` share it."""
    index = data_index(ref, log)
    for best in bests:
        data = prepare_magnification(ref, index, best.magnification, best.config)
        yield best, data, fold_splits(index, data.records, protocol, k, seed=ref.plan.seed)


def fold_document(
    ref: SearchRef,
    best: BestConfig,
    data: Any,
    splits: Sequence[Any],
    protocol: str,
    k: int,
    **figures: Any,
) -> dict[str, Any]:
    """What every per-magnification document records about how its figures were made."""
    return {
        "magnification": best.magnification,
        "search": ref.name,
        "protocol": protocol,
        "k": k,
        "config": best.config.to_dict(),
        **figures,
        "synthetic": bool(data.synthetic),
        "code_version": schema.code_version(),
        "ci": CI_METHOD,
        "splits": [s.to_json(data.records) for s in splits],
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
) -> list[dict[str, Any]]:
    """``dala-search evaluate``: retrain each best config on K folds; write, log, return.

    Returns one document per magnification (the ``evaluation/<mag>.json`` content).
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
    for best, data, splits in fold_data(ref, bests, protocol, k, log):
        mag = best.magnification
        per_fold = train_folds(best.config, data, splits, protocol, label=mag, log=log)
        doc = fold_document(
            ref, best, data, splits, protocol, k, metrics=summarise(per_fold, EVAL_METRICS)
        )
        doc["best_run_id"] = best.best_run_id
        path = write_json(ref.folder / "evaluation" / f"{mag}.json", doc)
        log(f"[{mag}] wrote {path}")
        _log_evaluation(ref, best, doc, log)
        docs.append(doc)
    return docs


def metric_batch(prefix: str, metrics: dict[str, dict[str, Any]]) -> list[Any]:
    """MLflow ``Metric``s ``<prefix><name>_mean`` / ``_ci_low`` / ``_ci_high`` (defined ones)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    out = []
    for name, s in metrics.items():
        for part in ("mean", "ci_low", "ci_high"):
            if s[part] is not None:  # MLflow has no "undefined": leave the metric out
                out.append(Metric(f"{prefix}{name}_{part}", float(s[part]), now, 0))
    return out


def _log_evaluation(ref: SearchRef, best: BestConfig, doc: dict[str, Any], log: Log) -> None:
    """Metrics and the JSON on the parent run; the figures as tags on the registered model."""
    from mlflow.entities import RunTag

    client = tracking_client(ref.tracking_uri)
    mag = best.magnification
    client.log_batch(
        best.parent_run_id,
        metrics=metric_batch("test_", doc["metrics"]),
        tags=[RunTag(schema.TAG_EVALUATION, f"{doc['protocol']} k={doc['k']}")],
    )
    client.log_dict(best.parent_run_id, doc, f"evaluation/{mag}.json")
    if not best.registered_model:
        log(
            f"[{mag}] note: the best trial logged no model, so no registered version to tag; "
            "the figures are on the parent run"
        )
        return
    model, _, version = best.registered_model.rpartition("/")
    tags = {schema.TAG_EVAL_PROTOCOL: doc["protocol"], schema.TAG_EVAL_K: str(doc["k"])}
    for name, s in doc["metrics"].items():
        tags[f"{schema.TAG_EVAL_TEST_PREFIX}{name}"] = (
            f"{_fmt(s['mean'])} [{_fmt(s['ci_low'])}, {_fmt(s['ci_high'])}]"
        )
    for key, value in tags.items():
        client.set_model_version_tag(model, version, key, value)
    log(f"[{mag}] tagged registered model {model} version {version} with the figures")


# ---- files and tables ---------------------------------------------------------------------


def write_json(path: Path, doc: dict[str, Any]) -> Path:
    """Strict JSON (NaN refused: callers turn undefined values into null), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(doc, handle, indent=2, allow_nan=False)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the report reads it as anyone
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def evaluation_table(doc: dict[str, Any]) -> list[str]:
    """Plain-text lines for one magnification's evaluation (the CLI prints them)."""
    tag = " (SYNTHETIC data)" if doc["synthetic"] else ""
    lines = [f"{doc['magnification']}  search {doc['search']}, {doc['protocol']} k={doc['k']}{tag}"]
    lines.append(f"  {'metric':20}{'mean':>9}  {'95% CI':>20}")
    for name, s in doc["metrics"].items():
        ci = f"[{_fmt(s['ci_low'])}, {_fmt(s['ci_high'])}]" if s["ci_low"] is not None else "n/a"
        lines.append(f"  {name:20}{_fmt(s['mean']):>9}  {ci:>20}")
    return lines
