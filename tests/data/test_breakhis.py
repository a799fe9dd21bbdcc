"""BreakHis names and the index of a data directory (official and Kaggle layouts)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dala_search.data.breakhis import (
    CLASSES,
    MAGNIFICATIONS,
    SUBTYPE_CODES,
    SUBTYPES,
    BreakHisIndex,
    index_breakhis,
    parse_filename,
)
from dala_search.errors import DataError

# The default tree (conftest.DEFAULT_PATIENTS): 7 slides, one of them (14-13412) under both
# DC and LC, so 8 (slide, subtype) folders; 4 benign and 4 malignant folders.
DEFAULT_SLIDES = sorted(
    ["14-22549AB", "14-21998CD", "14-29960CD", "14-16196", "14-13412", "15-19440", "14-9146"]
)

# --- names ---------------------------------------------------------------------------


@pytest.mark.parametrize("mag", MAGNIFICATIONS)
@pytest.mark.parametrize("code", SUBTYPE_CODES)
def test_parse_every_subtype_and_magnification(code: str, mag: str) -> None:
    cls, _ = SUBTYPES[code]
    name = f"SOB_{cls[0].upper()}_{code}-14-22549AB-{mag[:-1]}-007.png"
    p = parse_filename(name)
    assert (p.label, p.subtype, p.slide, p.magnification, p.seq) == (
        cls,
        code,
        "14-22549AB",
        mag,
        7,
    )


def test_parse_takes_the_base_name_of_a_path() -> None:
    p = parse_filename("/data/x/SOB_B_TA-14-16196-400-012.png")
    assert (p.label, p.subtype, p.slide, p.magnification, p.seq) == (
        "benign",
        "TA",
        "14-16196",
        "400X",
        12,
    )


def test_shared_slide_is_one_patient_under_two_subtypes() -> None:
    dc = parse_filename("SOB_M_DC-14-13412-100-005.png")
    lc = parse_filename("SOB_M_LC-14-13412-100-005.png")
    assert (dc.subtype, lc.subtype) == ("DC", "LC")
    assert dc.slide == lc.slide == "14-13412"
    assert dc.label == lc.label == "malignant"


@pytest.mark.parametrize(
    "name",
    [
        "SOB_B_A_14-22549AB-40-001.png",  # folder spelling ("_" before the year)
        "SOB_B_DC-14-13412-40-001.png",  # DC is malignant, name says benign
        "SOB_M_X-14-13412-40-001.png",  # unknown subtype
        "SOB_B_A-14-22549AB-50-001.png",  # no 50X magnification
        "SOB_B_A-14-22549AB-40-001.jpg",
        "SOB_B_A-14-22549AB-40.png",
        "scan.png",
    ],
)
def test_parse_rejects_invalid_names(name: str) -> None:
    with pytest.raises(ValueError, match=r"SOB_|subtype|magnification|BreakHis"):
        parse_filename(name)


# --- indexing --------------------------------------------------------------------------


def test_index_official_layout(tmp_path: Path, make_breakhis_tree) -> None:
    tree = make_breakhis_tree(tmp_path, layout="official", images_per_mag=2)
    index = index_breakhis(tmp_path)

    assert index.root == tmp_path.resolve()
    assert len(index.records) == 8 * 4 * 2 == len(tree.paths)
    assert index.skipped == []
    assert index.folds_csv is None and index.synthetic is False
    assert [r.path for r in index.records] == sorted(tree.paths, key=lambda p: p.parts)
    assert all(r.path.is_absolute() for r in index.records)
    assert index.slides() == DEFAULT_SLIDES
    # 4 benign and 4 malignant subtype folders, 2 images each per magnification
    assert index.counts() == {m: {"benign": 8, "malignant": 8} for m in MAGNIFICATIONS}
    assert index.subtype_counts()["200X"] == dict.fromkeys(SUBTYPE_CODES, 2)
    shared = [r for r in index.records if r.slide == "14-13412"]
    assert {r.subtype for r in shared} == {"DC", "LC"} and len(shared) == 16


def test_index_kaggle_layout_from_any_level(tmp_path: Path, make_breakhis_tree) -> None:
    tree = make_breakhis_tree(tmp_path, layout="kaggle", folds={1: {"14-22549AB": "train"}})
    top = index_breakhis(tmp_path)
    assert top.folds_csv == tmp_path.resolve() / "Folds.csv"
    assert {r.path.name for r in top.records} == tree.names()
    assert len(top.records) == 64

    for start in (tmp_path / "BreaKHis_v1", tmp_path / "BreaKHis_v1" / "BreaKHis_v1"):
        inner = index_breakhis(start)
        assert [r.path for r in inner.records] == [r.path for r in top.records]
        assert inner.folds_csv is None  # Folds.csv sits above these roots


def test_folds_csv_and_marker_looked_for_two_levels_down(tmp_path: Path, make_breakhis_tree):
    make_breakhis_tree(tmp_path / "a" / "b", patients={"14-22549AB": "A"})
    (tmp_path / "a" / "b" / "Folds.csv").write_text("fold,mag,grp,filename\n")
    (tmp_path / "a" / "b" / "DALA_SYNTHETIC.json").write_text("{}")
    two = index_breakhis(tmp_path)
    assert two.folds_csv == tmp_path.resolve() / "a" / "b" / "Folds.csv"
    assert two.synthetic is True

    (tmp_path / "deep").mkdir()
    shutil.move(tmp_path / "a", tmp_path / "deep" / "a")  # now three levels down
    three = index_breakhis(tmp_path)
    assert three.folds_csv is None and three.synthetic is False
    assert len(three.records) == len(two.records) == 8


def test_non_images_ignored_non_breakhis_png_skipped(tmp_path: Path, make_breakhis_tree) -> None:
    tree = make_breakhis_tree(tmp_path, patients={"14-22549AB": "A"})
    mag_dir = tree.paths[0].parent
    for name in ("notes.txt", "list.csv", "Thumbs.db", "SOB_B_A-14-22549AB-40-099.jpg"):
        (mag_dir / name).write_bytes(b"not an image")
    # macOS resource forks and hidden folders are never images of the archive
    (mag_dir / "._SOB_B_A-14-22549AB-40-001.png").write_bytes(b"\x00\x05\x16\x07")
    hidden = tree.images_root / ".ipynb_checkpoints"
    hidden.mkdir()
    shutil.copy(tree.paths[0], hidden / "SOB_B_A-14-22549AB-40-050.png")
    shutil.copy(tree.paths[0], mag_dir / "scan.png")

    index = index_breakhis(tmp_path)
    assert {r.path.name for r in index.records} == tree.names()
    assert [Path(s.path).name for s in index.skipped] == ["scan.png"]
    assert "not a BreakHis file name" in index.skipped[0].reason


def test_name_is_authoritative_over_folders(tmp_path: Path, make_breakhis_tree) -> None:
    tree = make_breakhis_tree(tmp_path, patients={"14-22549AB": "A"})
    # a malignant file misfiled in the benign adenosis 40X folder
    shutil.copy(tree.paths[0], tree.paths[0].parent / "SOB_M_PC-15-190-100-001.png")
    rec = {r.path.name: r for r in index_breakhis(tmp_path).records}["SOB_M_PC-15-190-100-001.png"]
    assert (rec.label, rec.subtype, rec.slide, rec.magnification) == (
        "malignant",
        "PC",
        "15-190",
        "100X",
    )


def test_truncated_garbage_and_corrupt_pngs_are_skipped(tmp_path: Path, make_breakhis_tree):
    tree = make_breakhis_tree(tmp_path, patients={"14-22549AB": "A"}, size=(64, 48))
    truncated, garbage, flipped, jpeg = tree.paths[:4]
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    garbage.write_bytes(b"this is not a png at all" * 10)
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside IDAT: only the chunk CRC can tell
    flipped.write_bytes(bytes(raw))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(jpeg, format="JPEG")

    index = index_breakhis(tmp_path)
    reasons = {Path(s.path).name: s.reason for s in index.skipped}
    assert set(reasons) == {p.name for p in (truncated, garbage, flipped, jpeg)}
    assert "Truncated" in reasons[truncated.name]
    assert reasons[garbage.name] == "not a readable PNG image"
    assert "checksum" in reasons[flipped.name]
    assert reasons[jpeg.name] == "not a readable PNG image"
    assert len(index.records) == len(tree.paths) - 4
    assert all(Path(s.path).is_absolute() for s in index.skipped)

    # without verification the damaged files are indexed as they are
    assert len(index_breakhis(tmp_path, verify=False).records) == len(tree.paths)


def test_duplicate_basename_keeps_the_first(tmp_path: Path, make_breakhis_tree) -> None:
    tree = make_breakhis_tree(tmp_path, patients={"14-22549AB": "A"})
    shutil.copytree(tree.images_root, tmp_path / "copy" / "BreaKHis_v1")  # tree inside itself
    index = index_breakhis(tmp_path)
    assert [r.path for r in index.records] == sorted(tree.paths, key=lambda p: p.parts)
    assert len(index.skipped) == len(tree.paths)
    first = index.skipped[0]
    assert "copy" in Path(first.path).parts
    original = tmp_path.resolve() / Path(first.path).relative_to(tmp_path.resolve() / "copy")
    assert first.reason == f"duplicate of {original}"


def test_symlink_loop_terminates(tmp_path: Path, make_breakhis_tree) -> None:
    tree = make_breakhis_tree(tmp_path, patients={"14-22549AB": "A"})
    os.symlink(tmp_path, tree.images_root / "loop")
    index = index_breakhis(tmp_path)
    assert len(index.records) == len(tree.paths) and index.skipped == []


def test_missing_file_and_empty_roots_raise(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as e:
        index_breakhis(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        index_breakhis(tmp_path / "f.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as e:
        index_breakhis(empty)
    assert str(e.value) == f"no BreakHis images (SOB_*.png) under {empty.resolve()}"


def test_only_unreadable_pngs_raise_and_say_why(tmp_path: Path) -> None:
    bad = tmp_path / "SOB_B_A-14-22549AB-40-001.png"
    bad.write_bytes(b"garbage")
    with pytest.raises(DataError, match="1 PNG file.*not a readable PNG image"):
        index_breakhis(tmp_path)


def test_relative_root_is_resolved(tmp_path: Path, make_breakhis_tree, monkeypatch) -> None:
    make_breakhis_tree(tmp_path, patients={"14-22549AB": "A"})
    monkeypatch.chdir(tmp_path / "BreaKHis_v1")
    index = index_breakhis(".")
    assert index.root == (tmp_path / "BreaKHis_v1").resolve()
    assert all(r.path.is_absolute() and r.path.exists() for r in index.records)


def test_progress_bar_goes_to_stderr(tmp_path: Path, make_breakhis_tree, capsys) -> None:
    make_breakhis_tree(tmp_path, patients={"14-22549AB": "A"})
    index_breakhis(tmp_path, progress=True)
    captured = capsys.readouterr()
    assert "verify PNGs" in captured.err and "8/8" in captured.err
    assert captured.out == ""
    index_breakhis(tmp_path)
    assert capsys.readouterr().err == ""


# --- summaries and selection -----------------------------------------------------------


def test_counts_keep_zeros_and_to_json_shape(tmp_path: Path, make_breakhis_tree) -> None:
    make_breakhis_tree(
        tmp_path, patients={"14-22549AB": "A", "15-19440": "MC"}, mags=("40X",), images_per_mag=3
    )
    (tmp_path / "scan.png").write_bytes(b"x")
    index = index_breakhis(tmp_path)
    assert index.counts() == {
        "40X": {"benign": 3, "malignant": 3},
        "100X": {"benign": 0, "malignant": 0},
        "200X": {"benign": 0, "malignant": 0},
        "400X": {"benign": 0, "malignant": 0},
    }
    expected_40 = dict.fromkeys(SUBTYPE_CODES, 0) | {"A": 3, "MC": 3}
    assert index.subtype_counts()["40X"] == expected_40
    assert index.subtype_counts()["400X"] == dict.fromkeys(SUBTYPE_CODES, 0)

    js = index.to_json()
    assert set(js) == {
        "root",
        "synthetic",
        "n_images",
        "n_slides",
        "counts",
        "subtypes",
        "skipped",
        "folds_csv",
    }
    assert js["root"] == str(tmp_path.resolve())
    assert (js["n_images"], js["n_slides"], js["synthetic"], js["folds_csv"]) == (6, 2, False, None)
    assert js["skipped"] == [
        {"path": str(tmp_path.resolve() / "scan.png"), "reason": index.skipped[0].reason}
    ]
    assert json.loads(json.dumps(js)) == js  # plain JSON types only


@pytest.fixture(scope="module")
def small_index(tmp_path_factory, make_breakhis_tree) -> BreakHisIndex:
    root = tmp_path_factory.mktemp("small")
    make_breakhis_tree(root, images_per_mag=1)
    return index_breakhis(root)


@pytest.mark.parametrize("spelling", ["40X", "40x", "40", " 40X "])
def test_select_one_magnification(small_index: BreakHisIndex, spelling: str) -> None:
    sel = small_index.select(spelling)
    assert len(sel) == 8 and {r.magnification for r in sel} == {"40X"}
    assert sel == [r for r in small_index.records if r.path.parent.name == "40X"]


@pytest.mark.parametrize("pooled", [None, "all", "ALL"])
def test_select_pooled(small_index: BreakHisIndex, pooled: str | None) -> None:
    sel = small_index.select(pooled)
    assert sel == small_index.records and sel is not small_index.records
    assert len(sel) == 32


def test_select_unknown_magnification_lists_valid(small_index: BreakHisIndex) -> None:
    with pytest.raises(DataError, match="'50X'.*40X, 100X, 200X, 400X"):
        small_index.select("50X")


def test_labels_follow_classes(small_index: BreakHisIndex) -> None:
    for r in small_index.records:
        assert CLASSES[r.label_index] == r.label == SUBTYPES[r.subtype][0]
