"""Patient-disjoint train/val/test splits of BreakHis records.

Every split is grouped by slide id (the patient): an image-level split puts near-duplicate
views of one patient on both sides and inflates every metric. Slide 14-13412 appears under
both ductal and lobular carcinoma; grouping by the slide id in the file name keeps it whole.
The grouping and stratification are scikit-learn's `StratifiedGroupKFold`; this module only
chooses the fold and checks the result.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from dala_search.data.breakhis import CLASSES, BreakHisIndex, ImageRecord
from dala_search.data.folds_csv import read_folds_csv
from dala_search.errors import DataError

SIDES: tuple[str, ...] = ("train", "val", "test")

# What the grouped split balances across sides. Both keep both classes on every side
# (checked separately); "subtype" also spreads the eight subtypes.
STRATIFY: dict[str, Callable[[ImageRecord], int]] = {
    "label": lambda r: r.label_index,
    "subtype": lambda r: r.subtype_index,
}


@dataclass(frozen=True)
class Split:
    """Indices into the ``records`` list a split was made from, one tuple per side."""

    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]
    description: str  # e.g. "patient-disjoint, seed 0, val 0.15, test 0.2"
    # How it was made (``data.protocols``): "patient" (every function here), "image"
    # (image-level, LEAKY: a patient's images on several sides) or "eva".
    protocol: str = "patient"
    leaky: bool = False

    def indices(self, side: str) -> tuple[int, ...]:
        """The indices of one side; a ValueError lists the valid sides."""
        if side not in SIDES:
            raise ValueError(f"unknown split side {side!r}; valid: {', '.join(SIDES)}")
        return getattr(self, side)

    def side_slides(self, records: Sequence[ImageRecord], side: str) -> list[str]:
        """Sorted slide ids (patients) on one side; used by reports and leak checks."""
        return sorted({records[i].slide for i in self.indices(side)})

    def to_json(self, records: Sequence[ImageRecord]) -> dict:
        """A JSON-ready record of the split, logged with every search (MLflow, CLI)."""
        out: dict = {
            side: {
                "slides": self.side_slides(records, side),
                "n_images": len(self.indices(side)),
            }
            for side in SIDES
        }
        out["description"] = self.description
        out["protocol"] = self.protocol
        out["leaky"] = self.leaky
        # Patient-disjoint protocols keep this at 0 (check_disjoint); "image" does not.
        out["slides_on_several_sides"] = len(self.shared_slides(records))
        return out

    def shared_slides(self, records: Sequence[ImageRecord]) -> list[str]:
        """Sorted slides with images on more than one side (always none but for "image")."""
        seen: dict[str, int] = {}
        for side in SIDES:
            for slide in self.side_slides(records, side):
                seen[slide] = seen.get(slide, 0) + 1
        return sorted(s for s, n in seen.items() if n > 1)


def patient_split(
    records: Sequence[ImageRecord],
    *,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    stratify: str = "label",
) -> Split:
    """Split ``records`` by patient into train/val/test, stratified, deterministic per seed.

    One split per magnification: all trials share it. The test patients are carved first,
    then the validation patients from the rest.
    Fractions are approximate: a carve takes one fold of ``round(1/fraction)`` grouped
    folds (fewer folds, so a larger share, when a class has fewer patients than that).
    Every side holds both classes, or a DataError says which class is short.
    """
    _check_fraction("test_fraction", test_fraction)
    _check_fraction("val_fraction", val_fraction)
    if val_fraction + test_fraction >= 1:
        raise DataError(
            f"val_fraction + test_fraction must be below 1, got {val_fraction} + {test_fraction}"
        )
    key = _stratify_key(stratify)
    if not records:
        raise DataError("no images to split (the selection is empty)")
    everything = np.arange(len(records))
    # Each of train, val and test needs a patient of each class.
    _require_patients(records, everything, 3, "a train/val/test split")
    rest, test = _carve(records, everything, test_fraction, seed, key, "test", min_rest=2)
    # The val fraction is of all patients, so of the rest it is a larger share.
    rest_fraction = val_fraction / (1 - test_fraction)
    train, val = _carve(records, rest, rest_fraction, seed, key, "val", min_rest=1)
    split = Split(
        train=_as_tuple(train),
        val=_as_tuple(val),
        test=_as_tuple(test),
        description=(
            f"patient-disjoint, stratified by {stratify}, seed {seed}, "
            f"val {val_fraction}, test {test_fraction}"
        ),
    )
    check_disjoint(records, split)
    return split


def official_fold_split(
    index: BreakHisIndex,
    records: Sequence[ImageRecord],
    fold: int,
    *,
    seed: int = 0,
    val_fraction: float = 0.15,
) -> Split:
    """Train/test from one fold of the Kaggle mirror's Folds.csv; val carved from its train.

    Rows are matched
    to ``records`` by file name, for the records' magnification(s); records the CSV does not
    mention are left out, and so are images the index skipped as unreadable (the index
    reports them). ``val_fraction`` is a share of the fold's training patients. A fold that
    puts one slide in train and test is refused: it would leak.
    """
    if index.folds_csv is None:
        raise DataError(f"no Folds.csv under {index.root} (the Kaggle mirror has one at its top)")
    csv_path = index.folds_csv
    _check_fraction("val_fraction", val_fraction)
    rows = read_folds_csv(csv_path)
    folds = sorted({row.fold for row in rows})
    if fold not in folds:
        raise DataError(f"fold {fold!r} is not in {csv_path}; folds there: {_join(folds)}")
    mags = {r.magnification for r in records}
    wanted = [row for row in rows if row.fold == fold and row.magnification in mags]

    indexed = {r.path.name for r in index.records}
    skipped = {Path(s.path).name for s in index.skipped}
    missing = sorted({row.name for row in wanted} - indexed - skipped)
    if missing:
        raise DataError(
            f"{csv_path}: fold {fold} names {len(missing)} file(s) not found under "
            f"{index.root}, e.g. {_join(missing[:3])}"
        )

    # A slide on both sides (at the same magnification) is a leak, whatever the CSV meant.
    sides_of: dict[str, set[str]] = {}
    for row in wanted:
        sides_of.setdefault(row.slide, set()).add(row.grp)
    leaky = sorted(slide for slide, grps in sides_of.items() if len(grps) > 1)
    if leaky:
        raise DataError(
            f"{csv_path}: fold {fold} puts slide(s) {_join(leaky[:5])} in both train and test; "
            "that leaks patients between sides, use a patient-disjoint split instead"
        )

    position = {r.path.name: i for i, r in enumerate(records)}
    grp_of = {position[row.name]: row.grp for row in wanted if row.name in position}
    train_all = np.array(sorted(i for i, g in grp_of.items() if g == "train"), dtype=np.int64)
    test = np.array(sorted(i for i, g in grp_of.items() if g == "test"), dtype=np.int64)
    _require_patients(records, test, 1, f"the test side of fold {fold} in {csv_path}")
    left_out = len(records) - len(grp_of)
    return carve_val_split(
        records,
        train_all,
        test,
        val_fraction=val_fraction,
        seed=seed,
        description=(
            f"official fold {fold} ({csv_path.name}), val {val_fraction} of its train "
            f"patients, seed {seed}"
            + (f", {left_out} image(s) not in the fold left out" if left_out else "")
        ),
        rest_needs=f"the train side of fold {fold} in {csv_path}",
    )


def carve_val_split(
    records: Sequence[ImageRecord],
    rest: np.ndarray,
    test: np.ndarray,
    *,
    val_fraction: float,
    seed: int,
    description: str,
    protocol: str = "patient",
    rest_needs: str | None = None,
) -> Split:
    """The split with test side ``test``: validation patients carved from ``rest`` (grouped
    by slide, stratified by label, both classes on each side), the others of ``rest``
    train; checked patient-disjoint. ``rest_needs`` names ``rest`` in the DataError raised
    first when a class has fewer than the 2 patients a train and a val side need."""
    if rest_needs is not None:
        _require_patients(records, rest, 2, rest_needs)
    train, val = _carve(records, rest, val_fraction, seed, STRATIFY["label"], "val", min_rest=1)
    split = Split(
        train=_as_tuple(train),
        val=_as_tuple(val),
        test=_as_tuple(test),
        description=description,
        protocol=protocol,
    )
    check_disjoint(records, split)
    return split


def inner_folds(
    records: Sequence[ImageRecord],
    split: Split,
    k: int,
    *,
    seed: int = 0,
    stratify: str = "label",
) -> list[Split]:
    """K inner folds of ``split``'s non-test patients, for a cross-validated objective.

    The patients of ``split.train`` and ``split.val`` are cut into ``k`` folds by
    scikit-learn's `StratifiedGroupKFold` (grouped by slide, stratified, shuffled with
    ``seed``); fold j validates on part j and trains on the others. The test side is kept
    as it is in every fold: no test patient is trained or validated on. Every non-test
    patient is validated exactly once. A DataError names the class when it has fewer than
    ``k`` non-test patients (a fold would have none of it), or when the grouped assignment
    leaves a validation part without a class.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise DataError(f"inner folds: k must be an integer >= 2, got {k!r}")
    key = _stratify_key(stratify)
    pool = np.array(sorted(split.train + split.val), dtype=np.int64)
    if len(pool) == 0:
        raise DataError(f"split {split.description!r} has no training or validation images")
    _require_patients(records, pool, k, f"{k} inner folds of the non-test patients")
    groups = np.array([records[i].slide for i in pool])
    y = np.array([key(records[i]) for i in pool])
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", module="sklearn")
        parts = list(cv.split(np.zeros(len(pool)), y, groups))
    folds = []
    for j, (train_pos, val_pos) in enumerate(parts, start=1):
        if _min_patients(records, pool[val_pos]) < 1:
            raise DataError(
                f"inner fold {j} of {k} (seed {seed}) validates on no patient of a class "
                f"({_describe(_patients_per_class(records, pool[val_pos]))}); use fewer "
                "folds or another seed"
            )
        fold = Split(
            train=_as_tuple(pool[train_pos]),
            val=_as_tuple(pool[val_pos]),
            test=split.test,
            description=f"inner fold {j}/{k} (seed {seed}) of {split.description}",
        )
        check_disjoint(records, fold)
        folds.append(fold)
    return folds


def min_class_patients(records: Sequence[ImageRecord], indices: Sequence[int]) -> int:
    """Patients (slides) of the rarer class among ``indices``: the most inner folds possible."""
    return _min_patients(records, np.asarray(indices, dtype=np.int64))


def check_disjoint(records: Sequence[ImageRecord], split: Split) -> None:
    """Raise DataError if a slide (patient) or an image is on two sides.

    Called at the end of both split functions, and by anyone loading a saved split.
    """
    slides = {side: set(split.side_slides(records, side)) for side in SIDES}
    for i, a in enumerate(SIDES):
        for b in SIDES[i + 1 :]:
            shared = sorted(slides[a] & slides[b])
            if shared:
                raise DataError(
                    f"split {split.description!r} is not patient-disjoint: slide(s) "
                    f"{_join(shared[:5])} on both {a} and {b}"
                )
    for side in SIDES:
        idx = split.indices(side)
        if len(set(idx)) != len(idx):
            raise DataError(f"split {split.description!r} lists an image twice on {side}")


def _carve(
    records: Sequence[ImageRecord],
    indices: np.ndarray,
    fraction: float,
    seed: int,
    key: Callable[[ImageRecord], int],
    side: str,
    *,
    min_rest: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` by patient into (rest, carved), carved ≈ ``fraction`` of patients.

    Makes ``round(1/fraction)`` StratifiedGroupKFold folds (fewer when a class has fewer
    patients than that) and takes the first, in the seeded order, whose carved side holds
    a patient of each class and whose rest holds at least ``min_rest`` of each: with few
    patients of a class, the greedy fold assignment can leave a fold without one.
    """
    groups = np.array([records[i].slide for i in indices])
    y = np.array([key(records[i]) for i in indices])
    # More folds than the rarer class has patients would leave some folds without it;
    # with few patients the carve then takes a larger share than asked (never below 2 folds).
    n_splits = max(2, min(round(1 / fraction), _min_patients(records, indices)))
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # Few images of a rare subtype is expected; the class check below is what matters.
        warnings.filterwarnings("ignore", message="The least populated class", module="sklearn")
        folds = list(cv.split(np.zeros(len(indices)), y, groups))
    for rest_pos, carved_pos in folds:
        rest, carved = indices[rest_pos], indices[carved_pos]
        if _min_patients(records, carved) >= 1 and _min_patients(records, rest) >= min_rest:
            return rest, carved
    per_class = _patients_per_class(records, indices)
    raise DataError(
        f"no patient-disjoint {side} side with both classes: none of {n_splits} grouped folds "
        f"(seed {seed}) works with {_describe(per_class)}; try another seed or a larger "
        f"{side}_fraction"
    )


def _require_patients(
    records: Sequence[ImageRecord], indices: np.ndarray, need: int, what: str
) -> None:
    """DataError naming the class and its patient count when a class has fewer than ``need``."""
    per_class = _patients_per_class(records, indices)
    for cls in CLASSES:
        if per_class[cls] < need:
            raise DataError(
                f"{what} needs at least {need} patient(s) (slides) of class {cls!r} so that "
                f"every side has both classes; only {per_class[cls]} available "
                f"({_describe(per_class)})"
            )


def _patients_per_class(records: Sequence[ImageRecord], indices: np.ndarray) -> dict[str, int]:
    slides: dict[str, set[str]] = {c: set() for c in CLASSES}
    for i in indices:
        slides[records[i].label].add(records[i].slide)
    return {c: len(s) for c, s in slides.items()}


def _min_patients(records: Sequence[ImageRecord], indices: np.ndarray) -> int:
    return min(_patients_per_class(records, indices).values())


def _describe(per_class: dict[str, int]) -> str:
    return ", ".join(f"{n} {c} patient(s)" for c, n in per_class.items())


def _check_fraction(name: str, value: float) -> None:
    if not 0 < value < 1:
        raise DataError(f"{name} must be between 0 and 1 (exclusive), got {value!r}")


def _stratify_key(name: str) -> Callable[[ImageRecord], int]:
    try:
        return STRATIFY[name]
    except KeyError:
        raise DataError(f"unknown stratify {name!r}; valid: {_join(STRATIFY)}") from None


def _as_tuple(indices: np.ndarray) -> tuple[int, ...]:
    return tuple(sorted(int(i) for i in indices))


def _join(items: Iterable[object]) -> str:
    return ", ".join(str(x) for x in items)
