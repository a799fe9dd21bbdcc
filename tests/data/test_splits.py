"""Patient-disjoint splits: random grouped splits and the Kaggle mirror's official folds."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import pytest

from dala_search.data.breakhis import BreakHisIndex, ImageRecord, index_breakhis
from dala_search.data.splits import (
    SIDES,
    Split,
    check_disjoint,
    official_fold_split,
    patient_split,
)
from dala_search.errors import DataError

SHARED = "14-13412"


def sides_of(records: Sequence[ImageRecord], split: Split) -> dict[str, dict[str, set]]:
    """Slides and labels per side, worked out here without the module's helpers."""
    out = {}
    for side, idx in (("train", split.train), ("val", split.val), ("test", split.test)):
        out[side] = {
            "slides": {records[i].slide for i in idx},
            "labels": {records[i].label for i in idx},
        }
    return out


@pytest.fixture(scope="module")
def index30(tmp_path_factory, make_breakhis_tree, make_patients) -> BreakHisIndex:
    """30 patients (10 benign, 20 malignant incl. the DC+LC slide), 2 mags, 2 images each."""
    root = tmp_path_factory.mktemp("p30")
    make_breakhis_tree(root, patients=make_patients(10, 20), mags=("40X", "100X"), size=(8, 8))
    return index_breakhis(root)


# --- patient_split -----------------------------------------------------------------------


def test_index30_is_what_the_property_test_assumes(index30: BreakHisIndex) -> None:
    assert len(index30.slides()) == 30
    # 29 single-subtype slides + the shared slide twice (DC and LC) = 31 folders
    assert len(index30.records) == 31 * 2 * 2
    assert {r.subtype for r in index30.records if r.slide == SHARED} == {"DC", "LC"}


@pytest.mark.parametrize("mag", [None, "40X"])
def test_patient_split_is_leak_free_over_many_seeds(index30: BreakHisIndex, mag) -> None:
    records = index30.select(mag)
    n = len(records)
    for seed in range(50):
        split = patient_split(records, seed=seed)
        s = sides_of(records, split)
        assert not s["train"]["slides"] & s["val"]["slides"], seed
        assert not s["train"]["slides"] & s["test"]["slides"], seed
        assert not s["val"]["slides"] & s["test"]["slides"], seed
        for side in SIDES:
            assert s[side]["labels"] == {"benign", "malignant"}, (seed, side)
        all_idx = split.train + split.val + split.test
        assert len(all_idx) == n and set(all_idx) == set(range(n)), seed
        # every image of a slide goes with its slide
        for side in SIDES:
            idx = set(split.indices(side))
            assert idx == {i for i, r in enumerate(records) if r.slide in s[side]["slides"]}
        # fractions are approximate: 5 folds of 30 patients -> ~6 test patients,
        # then ~5 folds of the remaining 24 -> ~5 val patients
        assert 4 <= len(s["test"]["slides"]) <= 8, seed
        assert 3 <= len(s["val"]["slides"]) <= 7, seed
        assert split.train == tuple(sorted(split.train))


def test_patient_split_is_deterministic_and_seed_dependent(index30: BreakHisIndex) -> None:
    records = index30.records
    assert patient_split(records, seed=3) == patient_split(records, seed=3)
    tests = {patient_split(records, seed=s).test for s in range(10)}
    assert len(tests) > 1


def test_shared_slide_stays_on_one_side(index30: BreakHisIndex) -> None:
    records = index30.records
    shared = {i for i, r in enumerate(records) if r.slide == SHARED}
    assert len(shared) == 8  # DC and LC, 2 mags, 2 images
    for seed in range(50):
        split = patient_split(records, seed=seed)
        holding = [side for side in SIDES if shared & set(split.indices(side))]
        assert len(holding) == 1, (seed, holding)
        assert shared <= set(split.indices(holding[0]))


def test_subtype_stratification_and_unknown_key(index30: BreakHisIndex) -> None:
    split = patient_split(index30.records, seed=1, stratify="subtype")
    s = sides_of(index30.records, split)
    assert all(s[side]["labels"] == {"benign", "malignant"} for side in SIDES)
    assert "stratified by subtype" in split.description
    with pytest.raises(DataError, match="unknown stratify 'slide'; valid: label, subtype"):
        patient_split(index30.records, stratify="slide")


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"val_fraction": 0}, "val_fraction"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"test_fraction": 0}, "test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction \\+ test_fraction"),
    ],
)
def test_bad_fractions_name_the_argument(index30: BreakHisIndex, kwargs, named) -> None:
    with pytest.raises(DataError, match=named):
        patient_split(index30.records, **kwargs)


def test_too_few_patients_of_a_class(tmp_path: Path, make_breakhis_tree, make_patients) -> None:
    make_breakhis_tree(tmp_path, patients=make_patients(2, 8), mags=("40X",), images_per_mag=1)
    records = index_breakhis(tmp_path).records
    with pytest.raises(DataError, match=r"class 'benign'.*only 2 available"):
        patient_split(records)


def test_three_patients_per_class_are_enough(index30: BreakHisIndex) -> None:
    # keep 3 benign and 3 malignant patients: one of each class per side
    keep = sorted({r.slide for r in index30.records if r.label == "benign"})[:3]
    keep += sorted({r.slide for r in index30.records if r.label == "malignant"})[:3]
    records = [r for r in index30.records if r.slide in keep]
    for seed in range(10):
        s = sides_of(records, patient_split(records, seed=seed))
        assert all(len(s[side]["slides"]) == 2 for side in SIDES)
        assert all(s[side]["labels"] == {"benign", "malignant"} for side in SIDES)


def test_empty_records_refused() -> None:
    with pytest.raises(DataError, match="empty"):
        patient_split([])


def test_split_to_json(index30: BreakHisIndex) -> None:
    records = index30.select("100X")
    split = patient_split(records, seed=0)
    js = split.to_json(records)
    assert set(js) == {
        "train",
        "val",
        "test",
        "description",
        "protocol",
        "leaky",
        "slides_on_several_sides",
    }
    assert (js["protocol"], js["leaky"], js["slides_on_several_sides"]) == ("patient", False, 0)
    assert js["description"] == "patient-disjoint, stratified by label, seed 0, val 0.15, test 0.2"
    assert sum(js[side]["n_images"] for side in SIDES) == len(records)
    for side in SIDES:
        assert js[side]["slides"] == sorted(sides_of(records, split)[side]["slides"])
        assert js[side]["n_images"] == len(split.indices(side))
    with pytest.raises(ValueError, match="valid: train, val, test"):
        split.side_slides(records, "validation")


def test_check_disjoint_catches_a_shared_slide(index30: BreakHisIndex) -> None:
    records = index30.records
    split = patient_split(records, seed=0)
    check_disjoint(records, split)  # the real split passes
    moved = split.test[0]  # one image of a test slide, now also in train
    leaky = dataclasses.replace(split, train=split.train + (moved,))
    with pytest.raises(DataError, match=f"{records[moved].slide} on both train and test"):
        check_disjoint(records, leaky)
    twice = dataclasses.replace(split, val=split.val + split.val[:1])
    with pytest.raises(DataError, match="twice on val"):
        check_disjoint(records, twice)


# --- official folds (Kaggle layout) ------------------------------------------------------


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory, make_breakhis_tree, make_patients) -> tuple[BreakHisIndex, dict]:
    """A Kaggle-layout tree of 20 patients with a Folds.csv of two folds.

    Fold 1: every patient, 3 benign + 4 malignant in test. Fold 2: only 12 patients.
    """
    root = tmp_path_factory.mktemp("kaggle")
    patients = make_patients(8, 12)
    benign = sorted(s for s, c in patients.items() if isinstance(c, str) and c in "A F PT TA")
    malignant = sorted(set(patients) - set(benign))
    test1 = set(benign[:3] + malignant[:4])
    fold1 = {s: "test" if s in test1 else "train" for s in patients}
    subset = benign[:4] + malignant[:8]
    fold2 = {s: "test" if s in benign[2:4] + malignant[5:8] else "train" for s in subset}
    make_breakhis_tree(
        root,
        layout="kaggle",
        patients=patients,
        mags=("40X", "100X"),
        size=(8, 8),
        folds={1: fold1, 2: fold2},
    )
    return index_breakhis(root), {1: fold1, 2: fold2}


def test_kaggle_tree_has_a_folds_csv(kaggle) -> None:
    index, _ = kaggle
    assert index.folds_csv == index.root / "Folds.csv"
    lines = index.folds_csv.read_text().splitlines()
    assert lines[0] == "fold,mag,grp,filename"
    fold, mag, grp, filename = lines[1].split(",")
    assert filename.startswith("BreaKHis_v1/histology_slides/breast/")
    assert (index.root / "BreaKHis_v1" / filename).is_file()


def test_official_fold_follows_the_csv(kaggle) -> None:
    index, folds = kaggle
    records = index.select("40X")
    split = official_fold_split(index, records, 1, seed=0)
    s = sides_of(records, split)
    expected_test = {slide for slide, g in folds[1].items() if g == "test"}
    expected_train = {slide for slide, g in folds[1].items() if g == "train"}
    assert s["test"]["slides"] == expected_test
    assert s["train"]["slides"] | s["val"]["slides"] == expected_train
    assert not s["train"]["slides"] & s["val"]["slides"]
    assert s["val"]["labels"] == s["train"]["labels"] == {"benign", "malignant"}
    assert len(split.train) + len(split.val) + len(split.test) == len(records)
    assert all(records[i].magnification == "40X" for i in split.train + split.val + split.test)
    assert split.description.startswith("official fold 1 (Folds.csv)")
    assert official_fold_split(index, records, 1, seed=0) == split
    assert {official_fold_split(index, records, 1, seed=k).val for k in range(8)} != {split.val}


def test_records_not_in_the_fold_are_left_out(kaggle) -> None:
    index, folds = kaggle
    records = index.records  # both magnifications pooled
    split = official_fold_split(index, records, 2)
    s = sides_of(records, split)
    assert s["train"]["slides"] | s["val"]["slides"] | s["test"]["slides"] == set(folds[2])
    n_in_fold = sum(1 for r in records if r.slide in folds[2])
    assert len(split.train) + len(split.val) + len(split.test) == n_in_fold < len(records)
    assert f"{len(records) - n_in_fold} image(s) not in the fold left out" in split.description


def test_official_fold_errors(kaggle, tmp_path: Path, make_breakhis_tree) -> None:
    index, _ = kaggle
    with pytest.raises(DataError, match=r"fold 7 is not in .*Folds.csv; folds there: 1, 2"):
        official_fold_split(index, index.records, 7)
    make_breakhis_tree(tmp_path, layout="official", mags=("40X",), images_per_mag=1)
    plain = index_breakhis(tmp_path)
    with pytest.raises(DataError, match=f"no Folds.csv under {plain.root}"):
        official_fold_split(plain, plain.records, 1)


def _rows(index: BreakHisIndex, fold: int = 1) -> list[str]:
    """The data lines of the module's Folds.csv for one fold, as written."""
    lines = index.folds_csv.read_text().splitlines()[1:]
    return [ln for ln in lines if ln.startswith(f"{fold},")]


def _with_csv(index: BreakHisIndex, tmp_path: Path, text: str) -> BreakHisIndex:
    path = tmp_path / "Folds.csv"
    path.write_text(text)
    return dataclasses.replace(index, folds_csv=path)


def test_leaky_fold_refused(kaggle, tmp_path: Path) -> None:
    index, folds = kaggle
    rows = _rows(index)
    # one 40X image of a train slide moved to test: the slide is on both sides
    victim = next(i for i, ln in enumerate(rows) if ",40,train," in ln)
    slide = next(s for s in folds[1] if s in rows[victim])
    rows[victim] = rows[victim].replace(",train,", ",test,")
    leaky = _with_csv(index, tmp_path, "fold,mag,grp,filename\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=f"Folds.csv: fold 1 puts slide\\(s\\) {slide} in both"):
        official_fold_split(leaky, leaky.select("40X"), 1)


def test_shared_slide_split_by_subtype_is_a_leak(kaggle, tmp_path: Path) -> None:
    # A fold that treats the DC and LC folders of 14-13412 as two patients leaks one patient.
    index, _ = kaggle
    rows = [
        ln.replace(",test,", ",train,") if "_DC-" in ln else ln.replace(",train,", ",test,")
        for ln in _rows(index)
        if SHARED in ln
    ]
    rows += [ln for ln in _rows(index) if SHARED not in ln]
    leaky = _with_csv(index, tmp_path, "fold,mag,grp,filename\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=f"slide\\(s\\) {SHARED} in both train and test"):
        official_fold_split(leaky, leaky.records, 1)


GOOD = "BreaKHis_v1/histology_slides/breast/benign/SOB/adenosis/SOB_B_A_14-1/40X/"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("fold,mag,filename\n1,40,x.png\n", "missing column\\(s\\) grp"),
        ("", "is empty"),
        ("fold,mag,grp,filename\n", "header but no rows"),
        (f"fold,mag,grp,filename\nx,40,train,{GOOD}SOB_B_A-14-1-40-001.png\n", "line 2: fold 'x'"),
        (f"fold,mag,grp,filename\n0,40,train,{GOOD}SOB_B_A-14-1-40-001.png\n", "line 2: fold '0'"),
        (f"fold,mag,grp,filename\n1,50,train,{GOOD}SOB_B_A-14-1-40-001.png\n", "line 2: mag '50'"),
        (f"fold,mag,grp,filename\n1,40,val,{GOOD}SOB_B_A-14-1-40-001.png\n", "line 2: grp 'val'"),
        ("fold,mag,grp,filename\n1,40,train,a.png\n1,40,test,b.png\n", "line 2: 'a.png'"),
        (f"fold,mag,grp,filename\n1,100,test,{GOOD}SOB_B_A-14-1-40-001.png\n", "line 2: mag 100"),
        (f"fold,mag,grp,filename\n1,40,test,{GOOD}SOB_B_A-14-1-40-001.png\n1,40\n", "line 3: exp"),
    ],
)
def test_malformed_folds_csv_refused(kaggle, tmp_path: Path, text: str, match: str) -> None:
    index, _ = kaggle
    bad = _with_csv(index, tmp_path, text)
    with pytest.raises(DataError, match=match) as e:
        official_fold_split(bad, bad.records, 1)
    assert str(tmp_path / "Folds.csv") in str(e.value)


def test_files_missing_from_the_index_refused(kaggle, tmp_path: Path) -> None:
    index, _ = kaggle
    ghosts = [f"1,40,train,{GOOD}SOB_B_A-14-1-40-{k:03d}.png" for k in range(1, 6)]
    text = "fold,mag,grp,filename\n" + "\n".join(_rows(index) + ghosts) + "\n"
    bad = _with_csv(index, tmp_path, text)
    with pytest.raises(DataError, match=r"names 5 file\(s\) not found .*SOB_B_A-14-1-40-001.png"):
        official_fold_split(bad, bad.records, 1)


def test_unreadable_image_in_the_fold_is_left_out(tmp_path: Path, make_breakhis_tree) -> None:
    patients = {"14-1": "A", "14-2": "F", "14-3": "TA", "15-1": "DC", "15-2": "MC", "15-3": "PC"}
    fold = {"14-1": "test", "15-1": "test"} | {s: "train" for s in ("14-2", "14-3", "15-2", "15-3")}
    tree = make_breakhis_tree(
        tmp_path, layout="kaggle", patients=patients, mags=("40X",), folds={1: fold}
    )
    broken = tree.paths[0]
    broken.write_bytes(broken.read_bytes()[:20])
    index = index_breakhis(tmp_path)
    assert [Path(s.path).name for s in index.skipped] == [broken.name]
    split = official_fold_split(index, index.records, 1, val_fraction=0.3)
    assert len(split.train) + len(split.val) + len(split.test) == len(tree.paths) - 1
    s = sides_of(index.records, split)
    assert s["test"]["slides"] == {"14-1", "15-1"}
