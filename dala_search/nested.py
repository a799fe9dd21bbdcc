"""Nested evaluation: ``dala-search evaluate NAME --nested K``.

The figure ``evaluate`` gives re-uses the patients the configuration was chosen on, so it
is optimistic by the selection (Cawley & Talbot, JMLR 2010). Here the whole selection
procedure is evaluated instead: for each of K outer patient folds
(``folds.fold_splits(..., "folds", K, seed=<the search's seed>)``, the folds ``evaluate
--folds K`` uses: each patient tested exactly once) the search is run again on the
outer-training patients only, and its best configuration is tested on the outer-test
patients. Pooled over the K folds, that is the nested estimate, with the same pooled
figure, patient-level interval and fold mean ± SD as ``evaluate``.

The inner search of outer fold k is an ordinary search (``tuner.run_search``) whose plan
is the original's (space, trials, sampler, pruner, prune_on, ``cv``, epochs, resources,
tracking store, time budget) with:

- ``outer`` = {"protocol": "folds", "k": K, "fold": k, "of": NAME, "seed": NAME's seed}:
  its data split is outer fold k (test = the outer-test patients; train/val carved from the
  others, or with ``cv`` > 1 the inner folds of the others), logged as ``split.json`` /
  ``inner_folds.json`` on its parent runs like any search's;
- ``seed`` = ``runs.plan.nested_seed(seed, k)`` = seed * 1000 + k;
- name ``<NAME>.nested<K>.outer<k>``, folder ``<NAME's folder>/nested<K>/outer<k>/``, its own
  Optuna study (in that folder unless the search named an RDB ``--storage``) and its own
  MLflow experiment ``dala-search/<NAME>.nested<K>.outer<k>``, tagged ``dala.nested.of`` and
  ``dala.nested.outer_fold`` (experiment and parent runs). Own experiments rather than
  nested runs under NAME's magnification run: a search is one experiment (its trials, best
  readers and resume all key on it), so an inner search is a search;
- ``log_models`` False: the nested estimate needs the best trial's test predictions, not its
  weights, and an inner search must not register a version of the magnification's model
  (nor move its ``best`` alias).

The best configuration of an inner search is not retrained: its best trial already trained
it on the outer-training patients and tested it on the outer-test ones (with ``--cv`` its
test figures are the fold models' ensemble). Every trial logs those predictions
(``test_predictions.json``, search/trainable.py); they are read back and checked to be the
outer-test images before pooling.

Inner searches run one after another in one Ray session (each one's trials run
concurrently as resources allow). Running the command again continues: an inner search
whose magnifications all finished is skipped, a started one resumes
(``run_search(resume=True)``, as ``dala-search resume``), a missing one starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dala_search.config import TrialConfig
from dala_search.data.breakhis import BreakHisIndex
from dala_search.errors import ConfigError, DalaError, DataError
from dala_search.evaluate import (
    EVAL_METRICS,
    FoldOutcome,
    Log,
    best_config,
    data_index,
    fold_record,
    metric_batch,
    prepare_magnification,
    select_magnifications,
    stderr_log,
    summarise,
    with_nested,
)
from dala_search.folds import fold_splits
from dala_search.intervals import N_RESAMPLES, method_name
from dala_search.metrics import classification_metrics
from dala_search.runs import schema
from dala_search.runs.documents import EvaluationDocument, NestedEstimate
from dala_search.runs.plan import PLAN_FILE, SearchPlan, SearchRef, nested_seed, open_search


def check_k(k: object) -> int:
    """``--nested K``: an integer >= 2 (K outer folds)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ConfigError(f"--nested {k!r}: needs at least 2 outer folds")
    return k


def inner_name(search: str, k: int, fold: int) -> str:
    return f"{search}.nested{k}.outer{fold}"


def inner_plan(ref: SearchRef, k: int, fold: int, mags: Sequence[str]) -> SearchPlan:
    """The plan of outer fold ``fold``'s inner search (module docstring); the one saved in
    its folder when it was started before (so a re-run continues the same search)."""
    plan = ref.plan
    folder = ref.folder / f"nested{k}" / f"outer{fold}"
    outer = {"protocol": "folds", "k": k, "fold": fold, "of": ref.name, "seed": plan.seed}
    if (folder / PLAN_FILE).is_file():
        saved = SearchPlan.load(folder)
        if saved.outer != outer or not set(mags) <= set(saved.magnifications):
            raise DalaError(
                f"{folder / PLAN_FILE}: an inner search of another nested evaluation "
                f"(outer {saved.outer}, magnifications {', '.join(saved.magnifications)}); "
                f"move it away to start this one"
            )
        return saved
    default_storage = f"sqlite:///{Path(plan.folder) / 'optuna.db'}"
    storage = (
        f"sqlite:///{folder / 'optuna.db'}" if plan.storage == default_storage else plan.storage
    )
    return dataclasses.replace(
        plan,
        name=inner_name(ref.name, k, fold),
        magnifications=tuple(mags),
        seed=nested_seed(plan.seed, fold),
        tracking_uri=ref.tracking_uri,
        storage=storage,
        folder=str(folder),
        fold=None,
        log_models=False,
        outer=outer,
    )


def check_outer_folds(ref: SearchRef, index: BreakHisIndex, mags: Sequence[str], k: int) -> None:
    """Make every outer split (and with ``cv`` > 1 the inner folds of its training side)
    before anything runs: too many folds for a class's patients fails here, naming
    ``--nested``."""
    from dala_search.data.splits import inner_folds

    for mag in mags:
        records = index.select(mag)
        try:
            splits = fold_splits(index, records, "folds", k, seed=ref.plan.seed)
        except DataError as e:
            msg = str(e).replace(f"--folds {k}", f"--nested {k}").replace("--folds", "--nested")
            raise DataError(f"magnification {mag}: {msg}") from None
        if ref.plan.cv > 1:
            for fold, split in enumerate(splits, start=1):
                try:
                    inner_folds(records, split, ref.plan.cv, seed=nested_seed(ref.plan.seed, fold))
                except DataError as e:
                    raise DataError(
                        f"--nested {k} with the search's --cv {ref.plan.cv}: magnification "
                        f"{mag}, outer fold {fold}: {e}"
                    ) from None


def inner_finished(plan: SearchPlan) -> bool:
    """Every magnification of the inner search has a FINISHED parent run with a best trial."""
    store = schema.client(plan.tracking_uri)
    exp = store.get_experiment_by_name(schema.experiment_name(plan.name))
    if exp is None:
        return False
    parents = store.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{schema.TAG_ROLE}` = 'magnification'"
    )
    done = {
        r.data.tags.get(schema.TAG_MAG)
        for r in parents
        if r.info.status == "FINISHED" and r.data.tags.get(schema.TAG_BEST_RUN)
    }
    return set(plan.magnifications) <= done


def run_inner_searches(plans: Sequence[SearchPlan], index: BreakHisIndex, log: Log) -> None:
    """Run, resume or skip each inner search, one after the other (module docstring).

    ``tuner.SearchInterrupted`` propagates: the caller says to run the command again.
    """
    from dala_search.search.tuner import run_search

    for plan in plans:
        fold = f"outer fold {plan.outer['fold']}/{plan.outer['k']}" if plan.outer else ""
        if inner_finished(plan):
            log(f"[nested] {fold}: inner search {plan.name} finished before; skipped")
            continue
        started = (Path(plan.folder) / PLAN_FILE).is_file()
        log(
            f"[nested] {fold}: {'resuming' if started else 'starting'} inner search "
            f"{plan.name} ({plan.trials} trial(s) per magnification, seed {plan.seed})"
        )
        start = time.perf_counter()
        # Tune prints its experiment tables to stdout: they go to stderr with the progress,
        # so `evaluate --nested K --json` prints one JSON document on stdout.
        with contextlib.redirect_stdout(sys.stderr):
            run_search(plan, resume=started, index=index)
        log(f"[nested] {fold}: inner search {plan.name} done ({time.perf_counter() - start:.0f} s)")


def inner_best(plan: SearchPlan, mag: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(best run id, its test predictions, its trial config) of an inner search's
    magnification, read back from MLflow."""
    store = schema.client(plan.tracking_uri)
    exp = store.get_experiment_by_name(schema.experiment_name(plan.name))
    parents = (
        store.search_runs(
            [exp.experiment_id],
            filter_string=(
                f"tags.`{schema.TAG_ROLE}` = 'magnification' and tags.`{schema.TAG_MAG}` = '{mag}'"
            ),
        )
        if exp is not None
        else []
    )
    best = parents[0].data.tags.get(schema.TAG_BEST_RUN) if parents else None
    if not best:
        raise DalaError(
            f"inner search {plan.name!r} ({plan.folder}), {mag}: no completed trial, so no "
            "nested estimate; run it with more trials or a longer --time-budget"
        )
    predictions = schema.run_json(store, best, schema.TEST_PREDICTIONS)
    config = schema.run_json(store, best, "trial_config.json")
    return best, predictions, config


def outer_outcome(
    predictions: dict[str, Any], split: Any, records: Sequence[Any], source: str
) -> FoldOutcome:
    """The inner search's best test predictions as one outer fold's outcome, after checking
    they are the outer-test images (same positions, same patients)."""
    positions = [int(p) for p in predictions.get("positions", [])]
    if positions != list(split.test):
        raise DalaError(
            f"{source}: its test images are not outer fold's test images "
            f"({len(positions)} vs {len(split.test)}); was the data changed since?"
        )
    slides = [records[i].slide for i in split.test]
    if list(predictions["slides"]) != slides:
        raise DalaError(f"{source}: its test patients differ from the outer fold's")
    y_true = np.asarray(predictions["y_true"], dtype=np.int64)
    y_prob = np.asarray(predictions["y_prob"], dtype=np.float64)
    return FoldOutcome(
        test=classification_metrics(y_true, y_prob, slides=slides),
        y_true=y_true,
        y_prob=y_prob,
        slides=slides,
    )


def nested_evaluate(
    name: str,
    *,
    k: int,
    magnifications: str | None = None,
    runs_dir: str | Path | None = None,
    tracking_uri: str | None = None,
    log: Log = stderr_log,
) -> list[dict[str, Any]]:
    """``dala-search evaluate NAME --nested K``: run (or continue) the K inner searches,
    pool their best trials' outer-test predictions, write ``nested`` and
    ``selection_optimism`` into ``evaluation/<mag>.json`` and onto the magnification's
    parent run. Returns the documents written."""
    check_k(k)
    ref = open_search(name, runs_dir, tracking_uri)
    if ref.plan.protocol != "patient":
        raise ConfigError(
            f"--nested {k}: search {name!r} split by --protocol {ref.plan.protocol}; a nested "
            "evaluation re-runs the search on patient-disjoint outer folds, so it needs a "
            "patient-protocol search"
        )
    mags = select_magnifications(ref, magnifications)
    # The search's own records must be there (DalaError naming what is missing).
    bests = {m: best_config(ref, m) for m in mags}
    index = data_index(ref, log)
    check_outer_folds(ref, index, mags, k)
    plans = [inner_plan(ref, k, fold, mags) for fold in range(1, k + 1)]
    run_inner_searches(plans, index, log)

    docs = []
    for mag in mags:
        best = bests[mag]
        data = prepare_magnification(ref, index, mag, best.config)
        splits = fold_splits(index, data.records, "folds", k, seed=ref.plan.seed)
        folds, run_ids, configs = [], [], []
        for plan, split in zip(plans, splits, strict=True):
            run_id, predictions, config = inner_best(plan, mag)
            source = f"inner search {plan.name}, {mag}, run {run_id} ({schema.TEST_PREDICTIONS})"
            folds.append(outer_outcome(predictions, split, data.records, source))
            run_ids.append(run_id)
            configs.append(TrialConfig.from_dict(config, source=source).to_dict())
        nested = NestedEstimate(
            k=k,
            cv=ref.plan.cv,
            searches=[p.name for p in plans],
            seeds=[p.seed for p in plans],
            best_run_ids=run_ids,
            configs=configs,
            splits=[s.to_json(data.records) for s in splits],
            n_images=sum(len(f.y_true) for f in folds),
            n_patients=len({s for f in folds for s in f.slides}),
            ci=method_name(N_RESAMPLES, ref.plan.seed),
            metrics=summarise(folds, EVAL_METRICS, seed=ref.plan.seed),
        )
        path = ref.folder / "evaluation" / f"{mag}.json"
        if path.is_file():
            doc = EvaluationDocument.read(path, mag)
        else:  # no `evaluate` yet: the common fields describe the outer folds
            doc = EvaluationDocument(
                **fold_record(ref, best, data, splits, "folds", k, folds),
                best_run_id=best.best_run_id,
                metrics={},
            )
        doc = with_nested(doc, nested)
        doc.write(path)
        log(f"[{mag}] wrote the nested estimate into {path}")
        _log_nested(ref, best.parent_run_id, doc)
        docs.append(doc.to_json())
    return docs


def _log_nested(ref: SearchRef, parent_run_id: str, doc: EvaluationDocument) -> None:
    """``nested_test_<m>_estimate/_ci_low/_ci_high/_mean/_sd`` and ``selection_optimism_<m>``
    on the magnification's parent run, the inner searches as a tag, the document as an
    artifact."""
    from mlflow.entities import Metric, RunTag

    assert doc.nested is not None
    now = int(time.time() * 1000)
    metrics = metric_batch("nested_test_", doc.nested.metrics)
    metrics += [
        Metric(f"selection_optimism_{m}", float(v), now, 0)
        for m, v in (doc.selection_optimism or {}).items()
        if v is not None
    ]
    tag = f"K={doc.nested.k} " + ",".join(doc.nested.searches)
    store = schema.client(ref.tracking_uri)
    schema.retry(
        store.log_batch, parent_run_id, metrics=metrics, tags=[RunTag(schema.TAG_NESTED, tag)]
    )
    schema.retry(
        store.log_dict, parent_run_id, doc.to_json(), f"evaluation/{doc.magnification}.json"
    )
