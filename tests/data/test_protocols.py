"""Split protocols (``data.protocols``): patient, image (LEAKY) and eva, through
``dala-search data split`` and the library.

The eva tests use a tiny tree built here to hold eva's validation patients (slide ids
``14-<eva id>``; the synthetic generator draws its own ids, so it never contains them):
the subtypes given to those patients are ours (eva's source lists ids, not subtypes), so
the test checks eva's patients and subtype/magnification filter, not eva's image counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from dala_search.cli import main
from dala_search.data.breakhis import index_breakhis
from dala_search.data.protocols import (
    EVA_SUBTYPES,
    EVA_VAL_PATIENTS,
    eva_split,
    image_folds,
)
from dala_search.errors import ConfigError, DalaError
from dala_search.folds import fold_splits


def _split_json(root: Path, *args: str) -> dict:
    result = CliRunner().invoke(main, ["data", "split", str(root), "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _on_several_sides(js: dict) -> set[str]:
    seen: dict[str, int] = {}
    for side in ("train", "val", "test"):
        for slide in js[side]["slides"]:
            seen[slide] = seen.get(slide, 0) + 1
    return {s for s, n in seen.items() if n > 1}


@pytest.fixture(scope="module")
def tree30(tmp_path_factory, make_breakhis_tree, make_patients) -> Path:
    """30 patients (10 benign, 20 malignant), 40X only, 4 images each."""
    root = tmp_path_factory.mktemp("proto30")
    patients = make_patients(10, 20)
    make_breakhis_tree(root, patients=patients, mags=("40X",), images_per_mag=4, size=(8, 8))
    return root


def test_image_protocol_puts_slides_on_several_sides_and_says_so(tree30: Path) -> None:
    js = _split_json(tree30, "--protocol", "image")
    assert js["protocol"] == "image" and js["leaky"] is True
    shared = _on_several_sides(js)
    assert shared, "an image-level split of 4 images per patient shares patients"
    assert js["slides_on_several_sides"] == len(shared)
    assert "LEAKY" in js["description"]
    # Every image on exactly one side.
    assert sum(js[s]["n_images"] for s in ("train", "val", "test")) == 31 * 4
    plain = CliRunner().invoke(main, ["data", "split", str(tree30), "--protocol", "image"])
    assert plain.exit_code == 0 and "LEAKY" in plain.stdout
    assert f"{len(shared)} slide(s) have images on more than one side" in plain.stdout


@pytest.mark.parametrize("seed", ["0", "1", "2"])
def test_patient_protocol_never_shares_a_slide(tree30: Path, seed: str) -> None:
    js = _split_json(tree30, "--seed", seed)  # patient is the default
    assert (js["protocol"], js["leaky"], js["slides_on_several_sides"]) == ("patient", False, 0)
    assert not _on_several_sides(js)


def test_image_folds_test_every_image_once_and_leak(tree30: Path) -> None:
    index = index_breakhis(tree30)
    records = index.select("40X")
    folds = image_folds(records, 3, seed=0)
    tested = [i for f in folds for i in f.test]
    assert sorted(tested) == list(range(len(records)))
    for f in folds:
        assert f.leaky and f.protocol == "image"
        assert not set(f.test) & (set(f.train) | set(f.val))  # images, not patients
    assert any(f.shared_slides(records) for f in folds)
    # fold_splits under the image protocol: the same folds as evaluate and baselines use.
    again = fold_splits(index, records, "folds", 3, seed=0, split_protocol="image")
    assert [f.test for f in again] == [f.test for f in folds]


def test_fold_and_other_protocol_refused(tree30: Path) -> None:
    result = CliRunner().invoke(
        main, ["data", "split", str(tree30), "--fold", "1", "--protocol", "image"]
    )
    assert result.exit_code == 2 and "--fold 1 with --protocol image" in result.output


# ---- eva ----------------------------------------------------------------------------------


def _eva_patients(drop: tuple[str, ...] = ()) -> dict[str, str]:
    """eva's validation patients (subtypes ours, cycled), 8 training patients of eva's four
    subtypes, and one patient of each other subtype (which eva leaves out)."""
    patients = {
        f"14-{pid}": EVA_SUBTYPES[i % 4]
        for i, pid in enumerate(EVA_VAL_PATIENTS)
        if pid not in drop
    }
    patients.update({f"13-{100 + i}": EVA_SUBTYPES[i % 4] for i in range(8)})
    patients.update({"15-901": "A", "15-902": "PT", "15-903": "LC", "15-904": "PC"})
    return patients


@pytest.fixture(scope="module")
def eva_tree(tmp_path_factory, make_breakhis_tree) -> Path:
    root = tmp_path_factory.mktemp("eva")
    make_breakhis_tree(root, patients=_eva_patients(), mags=("40X", "100X"), size=(8, 8))
    return root


def test_eva_protocol_keeps_eva_patients_subtypes_and_40x(eva_tree: Path) -> None:
    js = _split_json(eva_tree, "--protocol", "eva")
    assert js["protocol"] == "eva" and js["leaky"] is False
    assert js["slides_on_several_sides"] == 0
    assert js["test"]["slides"] == sorted(f"14-{p}" for p in EVA_VAL_PATIENTS)
    index = index_breakhis(eva_tree)
    subtype = {r.slide: r.subtype for r in index.records}
    used = {s for side in ("train", "val", "test") for s in js[side]["slides"]}
    assert {subtype[s] for s in used} == set(EVA_SUBTYPES)
    assert used == {s for s, code in subtype.items() if code in EVA_SUBTYPES}
    # 2 images per patient at 40X; the 4 other-subtype patients are on no side.
    assert sum(js[s]["n_images"] for s in ("train", "val", "test")) == 2 * (14 + 8)
    assert "8 image(s) of other subtypes left out" in js["description"]


def test_eva_protocol_is_40x_only(eva_tree: Path) -> None:
    for mag in ("100X", "all"):
        result = CliRunner().invoke(
            main, ["data", "split", str(eva_tree), "-m", mag, "--protocol", "eva"]
        )
        assert result.exit_code == 2, result.output
        assert "--protocol eva is eva's BreakHis task, 40X only" in result.output


def test_eva_missing_patients_are_named(tmp_path: Path, make_breakhis_tree, demo_root) -> None:
    make_breakhis_tree(tmp_path, patients=_eva_patients(drop=("19979", "21998EF")), mags=("40X",))
    result = CliRunner().invoke(main, ["data", "split", str(tmp_path), "--protocol", "eva"])
    assert result.exit_code == 2
    assert "2 of eva's 14 validation patients" in result.output
    assert "slide(s) 19979, 21998EF" in result.output and "kaiko-ai/eva" in result.output
    # The synthetic demo data has none of them: all 14 named.
    result = CliRunner().invoke(main, ["data", "split", str(demo_root), "--protocol", "eva"])
    assert result.exit_code == 2 and "14 of eva's 14 validation patients" in result.output


def test_eva_in_evaluation_folds_needs_seeds(eva_tree: Path) -> None:
    index = index_breakhis(eva_tree)
    records = index.select("40X")
    with pytest.raises(ConfigError, match="use --seeds 2"):
        fold_splits(index, records, "folds", 2, split_protocol="eva")
    splits = fold_splits(index, records, "seeds", 2, seed=3, split_protocol="eva")
    assert splits[0].test == splits[1].test == eva_split(records, seed=3).test
    assert all(s.protocol == "eva" for s in splits)
    with pytest.raises(DalaError, match="40X only"):
        eva_split(index.select("100X"))


@pytest.mark.slow
def test_train_under_the_image_protocol_says_leaky(tree30: Path, tmp_path: Path) -> None:
    args = ["train", "--data", str(tree30), "--protocol", "image", "--epochs", "1"]
    args += ["--image-size", "32", "--pretrained", "none", "--device", "cpu", "--json"]
    result = CliRunner().invoke(main, [*args, "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    out = json.loads(result.stdout)
    assert (out["protocol"], out["leaky"]) == ("image", True)
    assert (out["data"]["protocol"], out["data"]["leaky"]) == ("image", True)
    assert "LEAKY" in out["data"]["split"] and "WARNING: --protocol image is LEAKY" in result.stderr
