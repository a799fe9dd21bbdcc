"""The folds of the final evaluation, which the baselines share.

Protocols (``--folds K`` or ``--seeds K``, K >= 2; the same for both commands, so the
baselines see exactly the folds the evaluation saw):

* ``folds``: K patient-disjoint test parts. With an official ``Folds.csv`` in the data, its
  folds 1..K (train/test as published; refused if K exceeds the folds there). Otherwise
  scikit-learn's ``StratifiedGroupKFold`` (grouped by slide id = patient, stratified by
  class, shuffled with the search's seed): every patient is tested exactly once. In both
  cases the validation patients (best-epoch selection) are carved from the fold's training
  patients (15 %, grouped, both classes), so no test patient ever steers training.
* ``seeds``: K seeded patient-disjoint train/val/test splits (``splits.patient_split`` with
  seeds s..s+K-1, test 20 %), each trained with the config's seed + i: the "five random
  trials" of the BreakHis papers. Test parts may overlap between repetitions.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from dala_search.data.breakhis import BreakHisIndex, ImageRecord
from dala_search.errors import ConfigError, DataError

PROTOCOLS: tuple[str, ...] = ("folds", "seeds")
VAL_FRACTION = 0.15  # of each fold's training patients, for best-epoch selection
TEST_FRACTION = 0.2  # of all patients, "seeds" protocol only


def check_protocol(protocol: str, k: int) -> None:
    """ConfigError for an unknown protocol or fewer than two folds/seeds."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ConfigError(
            f"--{protocol} {k!r}: needs at least 2 (a confidence interval needs two or more "
            "test results)"
        )


def fold_splits(
    index: BreakHisIndex,
    records: Sequence[ImageRecord],
    protocol: str,
    k: int,
    *,
    seed: int = 0,
    split_protocol: str = "patient",
) -> list[Any]:
    """The K patient-disjoint train/val/test splits of ``records`` (see module docstring).

    The evaluation and the baselines ask with the same arguments, so both train on
    identical folds. Returns ``data.splits.Split`` objects indexing ``records``.
    ``split_protocol`` (``data.protocols``): "image" makes K image-level (LEAKY) folds or
    seeded splits instead; "eva" repeats eva's fixed split with seeds (``seeds`` only).
    """
    from dala_search.data.splits import carve_val_split, official_fold_split, patient_split

    check_protocol(protocol, k)
    if split_protocol != "patient":
        return _other_protocol(records, protocol, k, seed, split_protocol)
    if protocol == "seeds":
        return [
            patient_split(
                records, seed=seed + i, val_fraction=VAL_FRACTION, test_fraction=TEST_FRACTION
            )
            for i in range(k)
        ]
    if index.folds_csv is not None:
        from dala_search.data.folds_csv import read_folds_csv

        available = sorted({row.fold for row in read_folds_csv(index.folds_csv)})
        if k > len(available):
            raise DataError(
                f"--folds {k}: {index.folds_csv} has {len(available)} fold(s) "
                f"({', '.join(map(str, available))}); use --folds {len(available)} or fewer"
            )
        return [
            official_fold_split(index, records, fold, seed=seed, val_fraction=VAL_FRACTION)
            for fold in available[:k]
        ]
    return [
        carve_val_split(
            records,
            rest,
            test,
            val_fraction=VAL_FRACTION,
            seed=seed,
            description=(
                f"patient-disjoint fold {i + 1} of {k} (StratifiedGroupKFold by slide, seed "
                f"{seed}), val {VAL_FRACTION} of its train patients"
            ),
        )
        for i, (rest, test) in enumerate(_grouped_kfold(records, k, seed))
    ]


def _other_protocol(
    records: Sequence[ImageRecord], protocol: str, k: int, seed: int, split_protocol: str
) -> list[Any]:
    """``fold_splits`` under the image or eva protocol (``data.protocols``)."""
    from dala_search.data import protocols

    if protocols.check_protocol(split_protocol) == "eva":
        if protocol != "seeds":
            raise ConfigError(
                "--protocol eva has one fixed test side (eva's validation patients), so no "
                f"folds: use --seeds {k} (eva's split trained {k} times, seeds {seed}..)"
            )
        return [
            protocols.eva_split(records, seed=seed + i, val_fraction=VAL_FRACTION) for i in range(k)
        ]
    if protocol == "seeds":
        return [
            protocols.image_split(
                records, seed=seed + i, val_fraction=VAL_FRACTION, test_fraction=TEST_FRACTION
            )
            for i in range(k)
        ]
    return protocols.image_folds(records, k, seed=seed, val_fraction=VAL_FRACTION)


def outer_split(index: BreakHisIndex, records: Sequence[ImageRecord], outer: dict) -> Any:
    """Outer fold ``outer["fold"]`` (1..k) of a nested evaluation (``SearchPlan.outer``):
    the ``fold_splits`` split evaluate's ``--folds k`` would make with ``outer["seed"]``, so
    the inner search and the nested estimate agree on the outer-test patients."""
    missing = [key for key in ("protocol", "k", "fold", "seed") if key not in outer]
    if missing:
        raise ConfigError(f"outer fold record {outer!r}: missing key(s) {missing}")
    k, fold = int(outer["k"]), int(outer["fold"])
    if not 1 <= fold <= k:
        raise ConfigError(f"outer fold record: fold {fold} is not in 1..{k}")
    return fold_splits(index, records, outer["protocol"], k, seed=int(outer["seed"]))[fold - 1]


def _grouped_kfold(
    records: Sequence[ImageRecord], k: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(rest, test) index pairs: every patient in exactly one test part, both classes in each."""
    from sklearn.model_selection import StratifiedGroupKFold

    per_class: dict[str, set[str]] = {}
    for r in records:
        per_class.setdefault(r.label, set()).add(r.slide)
    fewest = min(len(s) for s in per_class.values()) if len(per_class) == 2 else 0
    if fewest < k:
        counts = ", ".join(f"{len(s)} {c}" for c, s in sorted(per_class.items()))
        raise DataError(
            f"--folds {k}: every test part needs a patient of each class, but the data has "
            f"{counts or 'no'} patient(s) here; use --folds {max(fewest, 2)} or fewer"
        )
    y = np.array([r.label_index for r in records])
    groups = np.array([r.slide for r in records])
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # Few images of a class in a fold is expected; the class check below is what matters.
        warnings.filterwarnings("ignore", message="The least populated class", module="sklearn")
        folds = list(cv.split(np.zeros(len(records)), y, groups))
    for i, (_, test) in enumerate(folds):
        if len(set(y[test])) < 2:
            raise DataError(
                f"--folds {k}: the grouped fold {i + 1} (seed {seed}) has patients of one "
                "class only; use fewer folds"
            )
    return folds
