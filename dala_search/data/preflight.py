"""Check a search's data before anything starts: no folder, no MLflow run, no Ray.

``dala-search start`` and ``resume`` (``search/planning.py``) call `check_search_data`
before anything starts: a data folder without BreakHis images, a magnification without
images, a split without both classes on every side, or a bad ``Folds.csv`` then fails in
seconds with the path named, instead of after the search folder, the MLflow experiment
and the Ray session exist.

It indexes (verifying every PNG) and splits each magnification exactly as
``train.prepare_data`` will, but decodes nothing: the image cache is built later, by the
search, once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dala_search.data import protocols
from dala_search.data.breakhis import BreakHisIndex, check_magnification, index_breakhis
from dala_search.data.splits import official_fold_split
from dala_search.errors import DataError


def check_search_data(
    data_dir: str | Path,
    magnifications: Sequence[str],
    *,
    seed: int = 0,
    fold: int | None = None,
    cv: int = 1,
    progress: bool = False,
    protocol: str = "patient",
) -> BreakHisIndex:
    """Index ``data_dir`` and make every magnification's split; return the index.

    Runs before a search creates anything. Raises DataError naming the folder and the
    magnification (or the Folds.csv and its fold) when one cannot be searched.
    The split arguments are ``prepare_data``'s defaults, so a split that passes here is the
    one the search will use. ``cv`` >= 2 also makes the inner folds of a cross-validated
    objective (a class with fewer non-test patients than folds is refused here).
    ``protocol``: the split protocol (``data.protocols``); eva's missing patients fail here.
    """
    protocols.check_magnifications(protocol, tuple(magnifications))
    index = index_breakhis(data_dir, progress=progress)
    for mag in magnifications:
        records = index.select(check_magnification(mag))
        if not records:
            raise DataError(
                f"--data {index.root}: no images at magnification {mag} "
                f"(it holds {_counts(index)}); choose others with --magnification"
            )
        try:
            if fold is not None:
                split = official_fold_split(index, records, fold, seed=seed)
            else:
                split = protocols.make_split(records, protocol, seed=seed)
        except DataError as e:
            option = f"--fold {fold}: " if fold is not None else ""
            raise DataError(f"{option}--data {index.root}, magnification {mag}: {e}") from None
        if cv > 1:
            try:
                protocols.protocol_inner_folds(records, split, cv, seed=seed, protocol=protocol)
            except DataError as e:
                raise DataError(
                    f"--cv {cv}: --data {index.root}, magnification {mag}: {e}"
                ) from None
    return index


def _counts(index: BreakHisIndex) -> str:
    """``40X: 12, 100X: 0, ...``: what the folder does hold, for the error message."""
    return ", ".join(f"{m}: {sum(c.values())}" for m, c in index.counts().items())
