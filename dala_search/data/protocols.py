"""Split protocols: how one magnification's images are cut into train / val / test.

``--protocol`` of ``data split``, ``train``, ``start``, ``evaluate`` and ``baselines``:

* ``patient`` (the default): patient-disjoint, grouped by slide (``splits.patient_split``,
  ``folds.fold_splits``). The only protocol whose figures say how a model does on new
  patients.
* ``image``: image-level stratified random splits and folds (scikit-learn's
  ``train_test_split`` / ``StratifiedKFold``), as most BreakHis papers report (very likely
  the DALAResNet50 paper too). **LEAKY**: near-duplicate views of one patient sit in train
  and test, so its figures are inflated; every printout, JSON (``"leaky": true``), MLflow
  tag and report section says so. Only on request, to measure that inflation.
* ``eva``: the public kaiko-ai/eva BreakHis task: 40X only, the four subtypes with at least
  7 patients (TA, MC, F, DC), eva's fixed validation patients as the test side (eva
  reports its leaderboard, balanced accuracy, on them); our validation patients (best
  epoch) are carved from the other patients. Images of other subtypes are on no side.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

from dala_search.config import PROTOCOLS
from dala_search.data.breakhis import ImageRecord
from dala_search.data.splits import (
    SIDES,
    Split,
    _as_tuple,
    carve_val_split,
    inner_folds,
    patient_split,
)
from dala_search.errors import ConfigError, DataError

LEAKY_PROTOCOLS = frozenset({"image"})
LEAKY_NOTE = (
    "LEAKY: image-level split, images of one patient on several sides; figures are inflated "
    "and say nothing about new patients"
)

EVA_MAGNIFICATION = "40X"
EVA_SUBTYPES: tuple[str, ...] = ("TA", "MC", "F", "DC")
# eva's validation patients, copied from kaiko-ai/eva
# src/eva/vision/data/datasets/classification/breakhis.py (``BreaKHis._val_patient_ids``)
# at commit 73b61a797bfda8daf232f6abea2bc87ac614589c (the file last changed in
# 7d8db614ce2e1c66e6c4f656171110cc85dd8feb). eva keys a patient by the part of the slide id
# after the year (``SOB_B_TA-14-3411F-40-001.png`` -> ``3411F``): so does ``eva_patient``.
EVA_VAL_PATIENTS: tuple[str, ...] = (
    "18842D",
    "19979",
    "15275",
    "15792",
    "16875",
    "3909",
    "5287",
    "16716",
    "2773",
    "5695",
    "16184CD",
    "23060CD",
    "21998CD",
    "21998EF",
)
EVA_SOURCE = (
    "kaiko-ai/eva src/eva/vision/data/datasets/classification/breakhis.py "
    "@73b61a797bfda8daf232f6abea2bc87ac614589c"
)


def check_protocol(name: str) -> str:
    """``name`` when it is a protocol; else a ConfigError listing them."""
    if name not in PROTOCOLS:
        raise ConfigError(f"--protocol {name!r}: valid: {', '.join(PROTOCOLS)}")
    return name


def is_leaky(protocol: str) -> bool:
    return check_protocol(protocol) in LEAKY_PROTOCOLS


def label(protocol: str) -> str:
    """How printouts name a protocol; the leaky one carries its warning."""
    return {
        "patient": "patient-level (patient-disjoint)",
        "image": "image-level, LEAKY",
        "eva": "eva (kaiko-ai/eva BreakHis task, patient-disjoint)",
    }[check_protocol(protocol)]


def described(protocol: str) -> str:
    """``label`` plus, for the leaky protocol, what the leak means (tables' headers)."""
    return label(protocol) + (f" ({LEAKY_NOTE})" if is_leaky(protocol) else "")


def check_magnifications(protocol: str, magnifications: Sequence[str]) -> None:
    """``eva`` is 40X only: a ConfigError for any other selection (``all`` included)."""
    if check_protocol(protocol) == "eva" and tuple(magnifications) != (EVA_MAGNIFICATION,):
        raise ConfigError(
            f"--protocol eva is eva's BreakHis task, {EVA_MAGNIFICATION} only; got "
            f"magnification(s) {', '.join(magnifications)}: use -m {EVA_MAGNIFICATION}"
        )


def check_fold_protocol(fold: int | None, protocol: str) -> None:
    """``--fold`` (an official, patient-disjoint Folds.csv fold) is a split of its own: it
    takes no other ``--protocol``."""
    check_protocol(protocol)
    if fold is not None and protocol != "patient":
        raise ConfigError(
            f"--fold {fold} with --protocol {protocol}: an official fold is its own "
            "(patient-disjoint) split; drop one of them"
        )


def make_split(
    records: Sequence[ImageRecord],
    protocol: str,
    *,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
) -> Split:
    """The train/val/test split of ``records`` under ``protocol`` (module docstring)."""
    protocol = check_protocol(protocol)
    if protocol == "image":
        return image_split(
            records, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction
        )
    if protocol == "eva":
        return eva_split(records, seed=seed, val_fraction=val_fraction)
    return patient_split(records, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)


# ---- image (LEAKY) -------------------------------------------------------------------------


def image_split(
    records: Sequence[ImageRecord],
    *,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
) -> Split:
    """Image-level stratified random train/val/test (scikit-learn's ``train_test_split``).

    LEAKY by design: a patient's images land on several sides. Stratified by class.
    """
    if val_fraction + test_fraction >= 1:
        raise DataError(
            f"val_fraction + test_fraction must be below 1, got {val_fraction} + {test_fraction}"
        )
    everything = np.arange(len(records))
    y = _labels(records, everything)
    rest, test = _stratified(everything, y, test_fraction, seed, "test")
    train, val = _stratified(
        rest, _labels(records, rest), val_fraction / (1 - test_fraction), seed, "val"
    )
    return _image(
        records,
        train,
        val,
        test,
        f"image-level (LEAKY), stratified by label, seed {seed}, val {val_fraction}, "
        f"test {test_fraction}",
    )


def image_folds(
    records: Sequence[ImageRecord], k: int, *, seed: int = 0, val_fraction: float = 0.15
) -> list[Split]:
    """K image-level stratified folds (``StratifiedKFold``): every image tested once; the
    validation images of each fold carved from its training images. LEAKY."""
    everything = np.arange(len(records))
    y = _labels(records, everything)
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    try:
        parts = list(cv.split(np.zeros(len(everything)), y))
    except ValueError as e:
        raise DataError(f"--folds {k} with --protocol image: {e}") from None
    out = []
    for i, (rest, test) in enumerate(parts, start=1):
        train, val = _stratified(rest, y[rest], val_fraction, seed, "val")
        out.append(
            _image(
                records,
                train,
                test=test,
                val=val,
                description=f"image-level (LEAKY) fold {i} of {k} (StratifiedKFold, seed "
                f"{seed}), val {val_fraction} of its train images",
            )
        )
    return out


def image_inner_folds(
    records: Sequence[ImageRecord], split: Split, k: int, *, seed: int = 0
) -> list[Split]:
    """``--cv K`` under ``image``: K ``StratifiedKFold`` folds of the non-test images."""
    pool = np.array(sorted(split.train + split.val), dtype=np.int64)
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    try:
        parts = list(cv.split(np.zeros(len(pool)), _labels(records, pool)))
    except ValueError as e:
        raise DataError(f"--cv {k} with --protocol image: {e}") from None
    return [
        _image(
            records,
            pool[tr],
            pool[va],
            np.asarray(split.test),
            f"inner image-level fold {j}/{k} (seed {seed}) of {split.description}",
        )
        for j, (tr, va) in enumerate(parts, start=1)
    ]


def _labels(records: Sequence[ImageRecord], idx: np.ndarray) -> np.ndarray:
    return np.array([records[i].label_index for i in idx], dtype=np.int64)


def _stratified(
    idx: np.ndarray, y: np.ndarray, fraction: float, seed: int, side: str
) -> tuple[np.ndarray, np.ndarray]:
    try:
        rest, carved = train_test_split(idx, test_size=fraction, stratify=y, random_state=seed)
    except ValueError as e:
        raise DataError(f"image-level {side} side ({len(idx)} images): {e}") from None
    return np.asarray(rest), np.asarray(carved)


def _image(
    records: Sequence[ImageRecord],
    train: np.ndarray,
    val: np.ndarray,
    test: np.ndarray,
    description: str,
) -> Split:
    split = Split(
        train=_as_tuple(train),
        val=_as_tuple(val),
        test=_as_tuple(test),
        description=description,
        protocol="image",
        leaky=True,
    )
    for side in SIDES:
        if len({records[i].label for i in split.indices(side)}) < 2:
            raise DataError(f"{description}: the {side} side has images of one class only")
    return split


# ---- eva ---------------------------------------------------------------------------------


def eva_patient(slide: str) -> str:
    """eva's patient key: the slide id without its year (``14-3411F`` -> ``3411F``)."""
    return slide.split("-", 1)[-1]


def eva_indices(records: Sequence[ImageRecord]) -> np.ndarray:
    """Positions of the records in eva's task (40X, subtypes TA, MC, F, DC).

    A DataError when none are, or when any of eva's validation patients is missing: eva's
    figures are on exactly those patients.
    """
    mags = sorted({r.magnification for r in records})
    if mags != [EVA_MAGNIFICATION]:
        raise ConfigError(
            f"--protocol eva is {EVA_MAGNIFICATION} only; these images are at {', '.join(mags)}"
        )
    idx = np.array([i for i, r in enumerate(records) if r.subtype in EVA_SUBTYPES], dtype=np.int64)
    present = {eva_patient(records[i].slide) for i in idx}
    missing = [p for p in EVA_VAL_PATIENTS if p not in present]
    if missing:
        raise DataError(
            f"--protocol eva: {len(missing)} of eva's {len(EVA_VAL_PATIENTS)} validation "
            f"patients have no {EVA_MAGNIFICATION} image of subtype {'/'.join(EVA_SUBTYPES)} "
            f"here: slide(s) {', '.join(missing)} (any year, e.g. 14-{missing[0]}); eva's "
            f"task needs the real BreakHis archive ({EVA_SOURCE})"
        )
    return idx


def eva_split(
    records: Sequence[ImageRecord], *, seed: int = 0, val_fraction: float = 0.15
) -> Split:
    """eva's task: test = eva's validation patients; val carved (patient-grouped, both
    classes) from the other TA/MC/F/DC patients; other subtypes left out."""
    idx = eva_indices(records)
    wanted = set(EVA_VAL_PATIENTS)
    in_test = np.array([eva_patient(records[i].slide) in wanted for i in idx], dtype=bool)
    rest, test = idx[~in_test], idx[in_test]
    left_out = len(records) - len(idx)
    return carve_val_split(
        records,
        rest,
        test,
        val_fraction=val_fraction,
        seed=seed,
        description=(
            f"eva ({EVA_MAGNIFICATION}, subtypes {', '.join(EVA_SUBTYPES)}; test = eva's "
            f"{len(EVA_VAL_PATIENTS)} validation patients), val {val_fraction} of the other "
            f"patients, seed {seed}"
            + (f", {left_out} image(s) of other subtypes left out" if left_out else "")
        ),
        protocol="eva",
        rest_needs="--protocol eva's training patients",
    )


# ---- inner folds (--cv) ------------------------------------------------------------------


def protocol_inner_folds(
    records: Sequence[ImageRecord], split: Split, k: int, *, seed: int, protocol: str
) -> list[Split]:
    """``--cv K`` folds of ``split``'s non-test images under ``protocol``."""
    if check_protocol(protocol) == "image":
        return image_inner_folds(records, split, k, seed=seed)
    folds = inner_folds(records, split, k, seed=seed)  # patient-grouped: patient and eva
    return [dataclasses.replace(f, protocol=protocol) for f in folds]
