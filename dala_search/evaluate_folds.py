"""Training a configuration over the folds of an evaluation: the search's data indexed
once, each magnification's data prepared, one ``train.train_trial`` per fold, and the
fields every per-magnification document records about how its figures were made."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dala_search.config import TrialConfig
from dala_search.data.breakhis import BreakHisIndex
from dala_search.errors import DataError
from dala_search.evaluate_best import BestConfig
from dala_search.evaluate_summary import FoldOutcome
from dala_search.evaluate_tables import fmt
from dala_search.folds import fold_splits
from dala_search.intervals import N_RESAMPLES, method_name
from dala_search.runs import schema
from dala_search.runs.plan import SearchRef

Log = Callable[[str], None]


def stderr_log(line: str) -> None:
    """The default progress log: one line to stderr, flushed."""
    print(line, file=sys.stderr, flush=True)


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
            f"{fmt(t.get('accuracy'))}  bal.acc {fmt(t.get('balanced_accuracy'))}  "
            f"F1 {fmt(t.get('f1'))}  AUC {fmt(t.get('roc_auc'))}  "
            f"(best epoch {result.best_epoch}, {time.perf_counter() - start:.1f} s)"
        )
    return out


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
    made (``runs.document_base.FoldsRecord``)."""
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
