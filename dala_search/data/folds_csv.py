"""Folds.csv, the Kaggle mirror's official BreakHis folds: one row per image (fold, mag,
grp, filename), read and validated row by row (``splits.official_fold_split`` uses it)."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dala_search.data.breakhis import MAGNIFICATIONS, parse_filename
from dala_search.errors import DataError

FOLDS_COLUMNS: tuple[str, ...] = ("fold", "mag", "grp", "filename")
FOLDS_GROUPS: tuple[str, ...] = ("train", "test")


@dataclass(frozen=True)
class FoldRow:
    """One validated row of Folds.csv."""

    fold: int
    magnification: str  # "40X" ...
    grp: str  # "train" | "test"
    name: str  # the file's base name, the key into the index
    slide: str


def read_folds_csv(path: Path) -> list[FoldRow]:
    """Read and validate Folds.csv (columns fold, mag, grp, filename).

    A DataError names the file and the line of the first
    bad row: a missing column, a fold that is not a positive integer, a magnification
    other than 40/100/200/400, a group other than train/test, or a file name that is
    not a BreakHis name or disagrees with the row's magnification.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: Excel's BOM
            rows = _parse_folds(path, csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read {path} as CSV: {e}") from e
    if not rows:
        raise DataError(f"{path} has a header but no rows")
    return rows


def _parse_folds(path: Path, reader: Iterator[list[str]]) -> list[FoldRow]:
    """Header check, then one validated FoldRow per non-blank line."""
    header = next(reader, None)
    if header is None:
        raise DataError(f"{path} is empty; expected columns {_join(FOLDS_COLUMNS)}")
    names = [h.strip().lower() for h in header]
    absent = [c for c in FOLDS_COLUMNS if c not in names]
    if absent:
        raise DataError(f"{path}: missing column(s) {_join(absent)}; the header is {_join(header)}")
    col = {c: names.index(c) for c in FOLDS_COLUMNS}
    rows = []
    for line, cells in enumerate(reader, start=2):
        if not any(c.strip() for c in cells):
            continue  # blank line
        rows.append(_fold_row(path, line, cells, col))
    return rows


def _fold_row(path: Path, line: int, cells: list[str], col: dict[str, int]) -> FoldRow:
    """Validate one Folds.csv row; errors name the file, line and value."""
    where = f"{path}, line {line}"
    if len(cells) <= max(col.values()):
        raise DataError(f"{where}: expected {len(col)} columns, got {len(cells)}")
    value = {c: cells[i].strip() for c, i in col.items()}
    try:
        fold = int(value["fold"])
    except ValueError:
        fold = 0
    if fold < 1:
        raise DataError(f"{where}: fold {value['fold']!r} is not a positive integer")
    mag = f"{value['mag']}X"
    if not value["mag"].isdigit() or mag not in MAGNIFICATIONS:
        valid = ", ".join(m[:-1] for m in MAGNIFICATIONS)
        raise DataError(f"{where}: mag {value['mag']!r} is not one of {valid}")
    grp = value["grp"].lower()
    if grp not in FOLDS_GROUPS:
        raise DataError(f"{where}: grp {value['grp']!r} is not one of {_join(FOLDS_GROUPS)}")
    name = Path(value["filename"].replace("\\", "/")).name
    try:
        parsed = parse_filename(name)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from e
    if parsed.magnification != mag:
        raise DataError(
            f"{where}: mag {value['mag']} but the file {name} is {parsed.magnification}"
        )
    return FoldRow(fold=fold, magnification=mag, grp=grp, name=name, slide=parsed.slide)


def _join(items: Iterable[object]) -> str:
    return ", ".join(str(x) for x in items)
