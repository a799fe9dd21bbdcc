"""Synthetic BreakHis: layout, names, shared slide, folds, determinism, safety, signal."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dala_search.data import synthetic as syn
from dala_search.data.breakhis import MAGNIFICATIONS, index_breakhis, parse_filename
from dala_search.data.synthetic import DEFAULT_PATIENTS, generate_demo, make_patients
from dala_search.errors import ConfigError, DataError

ONE_EACH = dict.fromkeys(DEFAULT_PATIENTS, 1)
TINY = dict(patients_per_subtype=ONE_EACH, images_per_mag=1, width=48, height=32, workers=1)


def _pngs(root: Path) -> list[Path]:
    return sorted(root.rglob("*.png"))


def _digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in _pngs(root)
    }


def test_official_layout_names_and_marker(tmp_path: Path) -> None:
    out = generate_demo(tmp_path / "demo", seed=3, **TINY)
    assert out == (tmp_path / "demo").resolve()
    files = _pngs(out)
    # 8 patients + the shared slide filed twice (DC and LC) = 10 folders x 4 mags x 1.
    assert len(files) == 40
    pattern = re.compile(
        r"BreaKHis_v1/histology_slides/breast/(benign|malignant)/SOB/(\w+)/"
        r"SOB_([BM])_([A-Z]+)_(\d\d-\d+[A-Z]*)/(\d+X)/SOB_\3_\4-\5-(\d+)-001\.png$"
    )
    for f in files:
        m = pattern.search(f.relative_to(out).as_posix())
        assert m, f
        name = parse_filename(f.name)
        assert (name.label, name.subtype, name.slide) == (m[1], m[4], m[5])
        assert syn.SUBTYPES[m[4]][1] == m[2]  # the subtype folder matches the code
        assert m[6] == name.magnification  # the magnification folder matches the name
        assert f"{m[7]}X" == m[6]
    marker = json.loads((out / "DALA_SYNTHETIC.json").read_text())
    assert marker["synthetic"] is True and marker["generator"] == "dala-search"
    assert marker["seed"] == 3 and marker["width"] == 48 and marker["layout"] == "official"
    assert marker["n_images"] == 40
    # A copy keeps the data flagged when --data points at the inner folder.
    assert (out / "BreaKHis_v1" / "DALA_SYNTHETIC.json").is_file()
    with Image.open(files[0]) as im:
        assert im.size == (48, 32) and im.mode == "RGB"


def test_shared_slide_is_under_ductal_and_lobular(tmp_path: Path) -> None:
    out = generate_demo(tmp_path / "demo", **TINY)
    shared = [f for f in _pngs(out) if "14-13412" in f.name]
    assert sorted({f.name.split("-")[0] for f in shared}) == ["SOB_M_DC", "SOB_M_LC"]
    assert {f.parent.parent.name for f in shared} == {"SOB_M_DC_14-13412", "SOB_M_LC_14-13412"}
    assert {f.parents[2].name for f in shared} == {"ductal_carcinoma", "lobular_carcinoma"}
    # Slide ids are unique per patient: 9 patients, 9 ids.
    slides = {parse_filename(f.name).slide for f in _pngs(out)}
    assert len(slides) == 9
    idx = index_breakhis(out)
    assert idx.synthetic and len(idx.records) == 40 and len(idx.slides()) == 9
    assert idx.counts()["40X"] == {"benign": 4, "malignant": 6}


def test_default_plan_has_the_real_class_balance() -> None:
    patients = make_patients(DEFAULT_PATIENTS, 0)
    # 8 benign, 15 malignant + the shared slide; images scale with folders filed under.
    assert len(patients) == 24
    folders = defaultdict(int)
    for p in patients:
        folders[p.label] += len(p.subtypes)
    assert folders == {"benign": 8, "malignant": 17}
    assert folders["benign"] / 25 == pytest.approx(0.32)  # real archive: 2480/7909 = 0.31
    assert {c for p in patients for c in p.subtypes} == set(syn.SUBTYPE_CODES)
    assert len({p.slide for p in patients}) == 24
    assert all(re.fullmatch(r"1[345]-\d+[A-Z]*", p.slide) for p in patients)
    # Grades overlap between classes: a bland carcinoma is blander than an atypical benign.
    benign = [p.atypia for p in patients if p.label == "benign"]
    malignant = [p.atypia for p in patients if p.label == "malignant"]
    assert np.mean(benign) < np.mean(malignant)
    assert max(benign) > min(malignant)


def test_deterministic_per_seed_and_worker_count(tmp_path: Path) -> None:
    a = _digest(generate_demo(tmp_path / "a", seed=1, **TINY))
    b = _digest(generate_demo(tmp_path / "b", seed=1, **{**TINY, "workers": 2}))
    c = _digest(generate_demo(tmp_path / "c", seed=2, **TINY))
    assert a == b
    assert set(a.values()).isdisjoint(c.values())  # another seed, other tiles
    assert len(set(a.values())) == len(a)  # no two tiles alike


def test_kaggle_layout_with_patient_disjoint_folds(tmp_path: Path) -> None:
    plan = dict.fromkeys(DEFAULT_PATIENTS, 2)  # 8 benign, 8 malignant + shared = 17
    out = generate_demo(
        tmp_path / "k",
        patients_per_subtype=plan,
        images_per_mag=1,
        width=32,
        height=24,
        layout="kaggle",
        folds=True,
        workers=1,
    )
    assert (out / "BreaKHis_v1" / "BreaKHis_v1" / "histology_slides").is_dir()
    files = {p.relative_to(out / "BreaKHis_v1").as_posix() for p in _pngs(out)}
    assert len(files) == (16 + 2) * 4
    with open(out / "Folds.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["fold", "mag", "grp", "filename"]
    by_fold = defaultdict(list)
    for fold, mag, grp, name in rows[1:]:
        by_fold[int(fold)].append((int(mag), grp, name))
    assert sorted(by_fold) == [1, 2, 3, 4, 5]
    test_sets = []
    for entries in by_fold.values():
        # Every image exactly once per fold, relative to the outer BreaKHis_v1 folder.
        assert sorted(n for _, _, n in entries) == sorted(files)
        for mag, _, name in entries:
            assert f"{mag}X" == parse_filename(name).magnification
        groups = defaultdict(set)
        for _, grp, name in entries:
            p = parse_filename(name)
            groups[grp].add((p.slide, p.label))
        train, test = groups["train"], groups["test"]
        assert not {s for s, _ in train} & {s for s, _ in test}  # patient-disjoint
        # 17 patients, test_size 0.3 -> ceil(5.1) = 6 test patients, both classes.
        assert len(test) == 6 and len(train) == 11
        assert {lab for _, lab in test} == {"benign", "malignant"}
        test_sets.append(frozenset(test))
    assert len(set(test_sets)) > 1  # the five folds are different splits
    idx = index_breakhis(out)
    assert idx.folds_csv == out / "Folds.csv" and idx.synthetic


def test_folds_need_two_patients_per_class(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least 2 patients of each class"):
        generate_demo(
            tmp_path / "f", folds=True, **{**TINY, "patients_per_subtype": {"A": 1, "DC": 2}}
        )
    assert not (tmp_path / "f").exists()


def test_refuses_user_data_and_previous_demo_without_overwrite(tmp_path: Path) -> None:
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="refusing"):
        generate_demo(user, **TINY)
    assert [p.name for p in user.iterdir()] == ["notes.txt"]

    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        generate_demo(tmp_path / "file", **TINY)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(_pngs(generate_demo(empty, **TINY))) == 40  # an empty folder is fine

    with pytest.raises(DataError, match="overwrite=True"):
        generate_demo(empty, **TINY)
    (empty / "BreaKHis_v1" / "extra.txt").write_text("old")
    out = generate_demo(empty, overwrite=True, seed=9, **{**TINY, "images_per_mag": 2})
    assert json.loads((out / "DALA_SYNTHETIC.json").read_text())["seed"] == 9
    assert len(_pngs(out)) == 80 and not (out / "BreaKHis_v1" / "extra.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_interrupted_generation_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = syn._draw
    calls = []

    def flaky(job):
        calls.append(job)
        if len(calls) == 5:
            raise KeyboardInterrupt
        real(job)

    monkeypatch.setattr(syn, "_draw", flaky)
    with pytest.raises(KeyboardInterrupt):
        generate_demo(tmp_path / "demo", **TINY)
    assert list(tmp_path.iterdir()) == []  # no out_dir, no hidden partial folder


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"patients_per_subtype": {"XX": 1}}, "unknown subtype 'XX'; valid: A, F, PT, TA, DC"),
        ({"patients_per_subtype": {"A": -1}}, r"patients_per_subtype\['A'\]"),
        ({"patients_per_subtype": {"A": 0}}, "no patients"),
        ({"layout": "zip"}, "unknown layout 'zip'; valid: official, kaggle"),
        ({"images_per_mag": 0}, "images_per_mag"),
        ({"width": 4}, "at least 8x8"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        generate_demo(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()


def _dark_fraction(rgb: np.ndarray) -> float:
    """Share of haematoxylin-dark pixels: a crude nuclear density."""
    return float((rgb.mean(axis=2) < 140).mean())


def test_tiles_look_like_stained_tissue() -> None:
    patients = make_patients(DEFAULT_PATIENTS, 0)
    benign = next(p for p in patients if p.label == "benign")
    tile = syn.render_tile(benign, benign.subtypes[0], "100X", 175, 115, np.random.default_rng(0))
    assert tile.shape == (115, 175, 3) and tile.dtype == np.uint8
    r, g, b = (tile[..., i].astype(float).mean() for i in range(3))
    assert r > b > g  # pink/purple H&E, never green or grey
    assert tile.std() > 10  # texture, not a flat colour

    # Magnification is a zoom: the same tissue at 400X has fewer, larger nuclei, so the
    # image is smoother (neighbouring pixels agree more) than at 40X.
    def roughness(mag: str) -> float:
        t = syn.render_tile(benign, "A", mag, 350, 230, np.random.default_rng(1))
        lum = t.astype(float).mean(axis=2)
        return float(np.abs(np.diff(lum, axis=1)).mean())

    assert roughness("40X") > 1.5 * roughness("400X")


def test_classes_differ_but_overlap_across_patients() -> None:
    """Learnable, not trivial: patient-held-out colour features beat chance, not perfectly."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import GroupKFold, cross_val_predict

    patients = make_patients(DEFAULT_PATIENTS, 0)
    feats, labels, groups, per_patient = [], [], [], defaultdict(list)
    for pi, p in enumerate(patients):
        for mi, mag in enumerate(MAGNIFICATIONS):
            for k in range(2):
                rng = np.random.default_rng([pi, mi, k])
                tile = syn.render_tile(p, p.subtypes[k % len(p.subtypes)], mag, 350, 230, rng)
                small = np.asarray(Image.fromarray(tile).resize((64, 64), Image.Resampling.BOX))
                px = small.reshape(-1, 3) / 255.0
                feats.append([*px.mean(0), *px.std(0), _dark_fraction(small)])
                labels.append(p.label == "malignant")
                groups.append(pi)
                per_patient[(p.slide, p.label)].append(_dark_fraction(small))
    means = {k: np.mean(v) for k, v in per_patient.items()}
    benign = [m for (_, lab), m in means.items() if lab == "benign"]
    malignant = [m for (_, lab), m in means.items() if lab == "malignant"]
    assert np.mean(malignant) > np.mean(benign)  # denser nuclei in carcinoma
    assert max(benign) > min(malignant)  # but patients overlap
    pred = cross_val_predict(
        LogisticRegression(class_weight="balanced", max_iter=1000),
        np.array(feats),
        np.array(labels),
        groups=groups,
        cv=GroupKFold(4),
    )
    bacc = balanced_accuracy_score(labels, pred)
    assert 0.55 < bacc < 0.95, bacc
