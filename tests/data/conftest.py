"""Tiny BreakHis trees in the real archive layouts, written with PIL, for the data tests.

``make_breakhis_tree(root, layout="official" | "kaggle", patients=..., ...)`` writes real
(tiny, random) PNGs at exactly the paths the archive uses:

official: root/BreaKHis_v1/histology_slides/breast/<class>/SOB/<subtype folder>/
          SOB_B_A_14-22549AB/40X/SOB_B_A-14-22549AB-40-001.png
kaggle:   root/BreaKHis_v1/BreaKHis_v1/histology_slides/... and root/Folds.csv whose
          filename column is relative to root/BreaKHis_v1 (as in the Kaggle mirror).

``make_patients(n_benign, n_malignant)`` builds a ``patients`` mapping with the subtypes
cycled and the shared slide 14-13412 (ductal + lobular) included.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dala_search.data.breakhis import MAGNIFICATIONS, SUBTYPES

SHARED_SLIDE = "14-13412"  # under both ductal and lobular carcinoma in the real archive

# slide id -> subtype code, or several codes for a slide filed under several subtypes
Patients = Mapping[str, "str | Sequence[str]"]

DEFAULT_PATIENTS: dict[str, str | tuple[str, ...]] = {
    "14-22549AB": "A",
    "14-21998CD": "F",
    "14-29960CD": "PT",
    "14-16196": "TA",
    SHARED_SLIDE: ("DC", "LC"),
    "15-19440": "MC",
    "14-9146": "PC",
}


@dataclass
class BreakHisTree:
    """What `make_breakhis_tree` wrote."""

    top: Path  # the root argument (index this one, or images_root)
    images_root: Path  # the BreaKHis_v1 folder that holds histology_slides/
    paths: list[Path] = field(default_factory=list)  # every PNG written
    folds_csv: Path | None = None

    def names(self) -> set[str]:
        return {p.name for p in self.paths}


def image_path(images_root: Path, slide: str, subtype: str, mag: str, seq: int) -> Path:
    """The official path of one image, e.g. .../SOB_B_A_14-22549AB/40X/SOB_B_A-...-40-001.png."""
    cls, folder = SUBTYPES[subtype]
    letter = cls[0].upper()
    slide_dir = f"SOB_{letter}_{subtype}_{slide}"  # "_" before the year in the folder
    name = f"SOB_{letter}_{subtype}-{slide}-{mag[:-1]}-{seq:03d}.png"  # "-" in the file
    return (
        images_root / "histology_slides" / "breast" / cls / "SOB" / folder / slide_dir / mag / name
    )


def write_png(path: Path, size: tuple[int, int], rng: np.random.Generator) -> None:
    """A real, decodable RGB PNG of random pixels; size is (width, height) as in PIL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")


def write_folds_csv(path: Path, rows: Sequence[tuple[object, object, object, object]]) -> Path:
    """Folds.csv with the Kaggle header; rows are (fold, mag, grp, filename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["fold", "mag", "grp", "filename"])
        w.writerows(rows)
    return path


def _make_breakhis_tree(
    root: Path,
    layout: str = "official",
    patients: Patients | None = None,
    images_per_mag: int = 2,
    size: tuple[int, int] = (12, 8),
    mags: Sequence[str] = MAGNIFICATIONS,
    folds: Mapping[int, Mapping[str, str]] | None = None,
    seed: int = 0,
) -> BreakHisTree:
    """Write the tree; ``folds`` maps fold -> {slide: "train"|"test"} and writes Folds.csv.

    Kaggle layout: Folds.csv at ``root``; official layout: at ``root`` too when asked for.
    """
    layouts = {"official": Path("BreaKHis_v1"), "kaggle": Path("BreaKHis_v1") / "BreaKHis_v1"}
    if layout not in layouts:
        raise ValueError(f"layout {layout!r}; valid: {', '.join(layouts)}")
    root = Path(root)
    tree = BreakHisTree(top=root, images_root=root / layouts[layout])
    rng = np.random.default_rng(seed)
    patients = DEFAULT_PATIENTS if patients is None else patients
    by_slide: dict[str, list[Path]] = {}
    for slide, codes in patients.items():
        for code in (codes,) if isinstance(codes, str) else codes:
            for mag in mags:
                for seq in range(1, images_per_mag + 1):
                    path = image_path(tree.images_root, slide, code, mag, seq)
                    write_png(path, size, rng)
                    tree.paths.append(path)
                    by_slide.setdefault(slide, []).append(path)
    if folds is not None:
        # The Kaggle filename column is relative to the outer BreaKHis_v1 folder.
        rel_base = root / "BreaKHis_v1" if layout == "kaggle" else root
        rows = []
        for fold, groups in folds.items():
            for slide, grp in groups.items():
                for p in by_slide[slide]:
                    mag = p.parent.name
                    rows.append((fold, mag[:-1], grp, p.relative_to(rel_base).as_posix()))
        tree.folds_csv = write_folds_csv(root / "Folds.csv", rows)
    return tree


def _make_patients(
    n_benign: int, n_malignant: int, *, shared: bool = True
) -> dict[str, str | tuple[str, ...]]:
    """n_benign + n_malignant patients, subtypes cycled; the shared DC+LC slide counts as one."""
    benign = [c for c, (cls, _) in SUBTYPES.items() if cls == "benign"]
    malignant = [c for c, (cls, _) in SUBTYPES.items() if cls == "malignant"]
    out: dict[str, str | tuple[str, ...]] = {}
    for i in range(n_benign):
        out[f"14-{10000 + i}"] = benign[i % len(benign)]
    start = 0
    if shared and n_malignant:
        out[SHARED_SLIDE] = ("DC", "LC")
        start = 1
    for i in range(start, n_malignant):
        out[f"15-{20000 + i}"] = malignant[i % len(malignant)]
    return out


@pytest.fixture(scope="session")
def make_breakhis_tree() -> Callable[..., BreakHisTree]:
    """Factory fixture: ``make_breakhis_tree(root, layout=..., patients=..., ...)``."""
    return _make_breakhis_tree


@pytest.fixture(scope="session")
def make_patients() -> Callable[..., dict[str, str | tuple[str, ...]]]:
    """Factory fixture: ``make_patients(n_benign, n_malignant, shared=True)``."""
    return _make_patients
