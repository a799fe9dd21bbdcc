"""A synthetic BreakHis: procedurally drawn H&E-like tiles in the archive's exact layout.

Used by the offline demo (``dala_search.data.demo``) and by tests, so every command runs on
a fresh machine without the real archive. The tree, the file names, the class balance
(~31% benign), the shared slide 14-13412 (ductal *and* lobular carcinoma, one patient)
and, on request, the Kaggle mirror's ``Folds.csv`` follow the real data; the pixels do not.
Every output carries a ``DALA_SYNTHETIC.json`` marker so no report can pass it off as real.

How a tile is drawn: ``tiles.py``.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.model_selection import StratifiedShuffleSplit
from tqdm import tqdm

from dala_search import __version__
from dala_search.data.breakhis import MAGNIFICATIONS, SUBTYPE_CODES, SUBTYPES
from dala_search.data.breakhis import SYNTHETIC_MARKER as MARKER
from dala_search.data.tiles import Patient, render_tile
from dala_search.errors import ConfigError, DataError

# Two patients per benign subtype and a malignant mix that, with the shared slide below,
# gives 8 benign and 16 malignant patients: 192 / 600 images benign (32%), as in the
# real archive (2,480 / 7,909 = 31%).
DEFAULT_PATIENTS: dict[str, int] = {
    "A": 2,
    "F": 2,
    "PT": 2,
    "TA": 2,
    "DC": 6,
    "LC": 3,
    "MC": 3,
    "PC": 3,
}
# The real archive files one patient under both ductal and lobular carcinoma.
SHARED_SLIDE = "14-13412"
SHARED_SUBTYPES: tuple[str, ...] = ("DC", "LC")

# Reference stain optical-density vectors (Macenko et al.'s H&E reference).
_H_REF = np.array([0.5626, 0.7201, 0.4062], dtype=np.float32)
_E_REF = np.array([0.2159, 0.8012, 0.5581], dtype=np.float32)


# --- Patients ---------------------------------------------------------------------------


def _slide_ids(rng: np.random.Generator, n: int) -> list[str]:
    """``14-22549AB``-style ids: year, number, optional letters; unique, never the shared id."""
    suffixes = ("", "", "", "AB", "CD", "EF", "A", "B")
    out: list[str] = []
    seen = {SHARED_SLIDE}
    while len(out) < n:
        year = int(rng.choice([13, 14, 15]))
        number = int(rng.integers(100, 30000))
        sid = f"{year}-{number}{suffixes[int(rng.integers(len(suffixes)))]}"
        if sid not in seen:
            seen.add(sid)
            out.append(sid)
    return out


def _jitter_direction(
    rng: np.random.Generator, base: np.ndarray, jitter: float
) -> tuple[float, ...]:
    # A stain vector nudged at random and renormalised: one staining batch.
    v = np.abs(base + rng.normal(0.0, jitter, 3))
    return tuple(float(x) for x in v / np.linalg.norm(v))


def make_patients(
    patients_per_subtype: dict[str, int], seed: int, *, shared_slide: bool = True
) -> list[Patient]:
    """The patient list, deterministic per seed."""
    rng = np.random.default_rng([seed, 1])
    plan: list[tuple[str, ...]] = []
    for code in SUBTYPE_CODES:
        plan += [(code,)] * patients_per_subtype.get(code, 0)
    with_shared = shared_slide and all(patients_per_subtype.get(c, 0) > 0 for c in SHARED_SUBTYPES)
    ids = _slide_ids(rng, len(plan))
    if with_shared:
        plan.append(SHARED_SUBTYPES)
        ids.append(SHARED_SLIDE)
    patients = []
    for subtypes, slide in zip(plan, ids, strict=True):
        label = SUBTYPES[subtypes[0]][0]
        # Patient-level grade: the class means differ, the tails overlap (a bland carcinoma
        # and an atypical fibroadenoma look alike), which keeps the task from being trivial.
        mean = 0.3 if label == "benign" else 0.65
        atypia = float(np.clip(rng.normal(mean, 0.15), 0.02, 0.98))
        patients.append(
            Patient(
                slide=slide,
                label=label,
                subtypes=subtypes,
                atypia=atypia,
                h_vec=_jitter_direction(rng, _H_REF, 0.04),
                e_vec=_jitter_direction(rng, _E_REF, 0.04),
                h_gain=float(rng.lognormal(0.0, 0.15)),
                e_gain=float(rng.lognormal(0.0, 0.2)),
                brightness=float(rng.uniform(0.9, 1.0)),
            )
        )
    return patients


# --- The tree ---------------------------------------------------------------------------


def _official_root(out: Path) -> Path:
    return out / "BreaKHis_v1"


def _kaggle_root(out: Path) -> Path:
    # The Kaggle mirror nests the archive folder in a folder of the same name.
    return out / "BreaKHis_v1" / "BreaKHis_v1"


# Layout name -> where ``histology_slides`` lives under the output folder.
LAYOUTS: dict[str, Callable[[Path], Path]] = {"official": _official_root, "kaggle": _kaggle_root}


@dataclass(frozen=True)
class _Job:
    """One file to draw: picklable, so a worker process needs nothing else."""

    path: Path
    patient: Patient
    subtype: str
    magnification: str
    width: int
    height: int
    seed: tuple[int, ...]  # the file's own RNG seed: output is independent of worker order


def _jobs(
    root: Path, patients: list[Patient], per_mag: int, size: tuple[int, int], seed: int
) -> Iterator[_Job]:
    """Every file of the tree, in a fixed order."""
    for pi, p in enumerate(patients):
        letter = "B" if p.label == "benign" else "M"
        for code in p.subtypes:
            folder = root / "histology_slides" / "breast" / p.label / "SOB" / SUBTYPES[code][1]
            # The slide folder has "_" before the year, the file name "-" (as in the archive).
            slide_dir = folder / f"SOB_{letter}_{code}_{p.slide}"
            for mi, mag in enumerate(MAGNIFICATIONS):
                for seq in range(1, per_mag + 1):
                    name = f"SOB_{letter}_{code}-{p.slide}-{mag[:-1]}-{seq:03d}.png"
                    file_seed = (seed, 2, pi, SUBTYPE_CODES.index(code), mi, seq)
                    yield _Job(slide_dir / mag / name, p, code, mag, *size, file_seed)


def _draw(job: _Job) -> None:
    """Render and write one tile; runs in a worker process."""
    rng = np.random.default_rng(list(job.seed))
    rgb = render_tile(job.patient, job.subtype, job.magnification, job.width, job.height, rng)
    job.path.parent.mkdir(parents=True, exist_ok=True)
    # Fast zlib level: noisy tiles barely compress better at higher levels.
    Image.fromarray(rgb).save(job.path, format="PNG", compress_level=1)


def _draw_all(jobs: list[_Job], workers: int, progress: bool) -> None:
    n_workers = (os.cpu_count() or 1) if workers <= 0 else workers
    bar = tqdm(total=len(jobs), disable=not progress, file=sys.stderr, unit="img", desc="synthetic")
    with bar:
        if n_workers == 1 or len(jobs) < 16:  # a pool costs more than it saves here
            for job in jobs:
                _draw(job)
                bar.update(1)
            return
        with ProcessPoolExecutor(max_workers=n_workers) as pool:
            try:
                for _ in pool.map(_draw, jobs, chunksize=4):
                    bar.update(1)
            except BaseException:
                # Stop queued tiles now rather than drawing them into a folder being removed.
                pool.shutdown(wait=True, cancel_futures=True)
                raise


def _write_folds(out: Path, root: Path, jobs: list[_Job], patients: list[Patient], seed: int):
    """``Folds.csv`` as in the Kaggle mirror: fold,mag,grp,filename; every image in every fold.

    Patient-disjoint, ~70/30 train/test by patient, stratified by class
    (scikit-learn's StratifiedShuffleSplit over patients, not images).
    """
    labels = np.array([p.label for p in patients])
    splitter = StratifiedShuffleSplit(n_splits=5, test_size=0.3, random_state=seed % 2**32)
    rel_base = root.parent  # file names read "BreaKHis_v1/histology_slides/..."
    with open(out / "Folds.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["fold", "mag", "grp", "filename"])
        for fold, (_, test) in enumerate(splitter.split(labels, labels), start=1):
            test_slides = {patients[i].slide for i in test}
            for job in jobs:
                grp = "test" if job.patient.slide in test_slides else "train"
                rel = job.path.relative_to(rel_base).as_posix()
                writer.writerow([fold, int(job.magnification[:-1]), grp, rel])


def _check_foldable(patients: list[Patient]) -> None:
    """A stratified patient split needs two patients of each class (checked before drawing)."""
    have = {label: sum(p.label == label for p in patients) for label in ("benign", "malignant")}
    if min(have.values()) < 2:
        raise ConfigError(
            "folds=True needs at least 2 patients of each class for a stratified patient "
            f"split; patients per class here: {have}"
        )


def _write_markers(tmp: Path, root: Path, marker: dict) -> None:
    """The marker at the output folder, plus copies on the way down to the image root.

    The copies keep the data flagged when a user points ``--data`` at an inner folder
    (the index looks for the marker at and below the folder it is given, never above).
    """
    text = json.dumps(marker, indent=2) + "\n"
    folder = root
    while True:
        (folder / MARKER).write_text(text)
        if folder == tmp:
            break
        folder = folder.parent


def _check_args(
    seed: int,
    patients_per_subtype: dict[str, int] | None,
    images_per_mag: int,
    width: int,
    height: int,
    layout: str,
) -> dict[str, int]:
    """Validate the keywords; return the patient plan (ConfigError names the bad value)."""
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    if images_per_mag < 1:
        raise ConfigError(f"images_per_mag must be >= 1, got {images_per_mag}")
    if width < 8 or height < 8:
        raise ConfigError(f"image size must be at least 8x8, got {width}x{height}")
    plan = dict(DEFAULT_PATIENTS if patients_per_subtype is None else patients_per_subtype)
    for code, n in plan.items():
        if code not in SUBTYPES:
            valid = ", ".join(SUBTYPE_CODES)
            raise ConfigError(f"patients_per_subtype: unknown subtype {code!r}; valid: {valid}")
        if not isinstance(n, int) or n < 0:
            raise ConfigError(f"patients_per_subtype[{code!r}] must be an int >= 0, got {n!r}")
    if sum(plan.values()) == 0:
        raise ConfigError("patients_per_subtype asks for no patients at all")
    return plan


def _check_target(out: Path, overwrite: bool) -> None:
    """Refuse to replace anything but an empty folder or, with overwrite, a previous demo."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"{out} exists and is not a directory; choose another output folder")
    if not any(out.iterdir()):
        return
    if not (out / MARKER).is_file():
        raise DataError(
            f"{out} is not empty and holds no {MARKER}: refusing to write synthetic data "
            "over what may be real data; choose an empty or new folder"
        )
    if not overwrite:
        raise DataError(f"{out} already holds a synthetic demo; pass overwrite=True to replace it")


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished tree into place; a replaced previous demo is deleted after."""
    if out.exists() and any(out.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / "tree")
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return
    if out.exists():
        out.rmdir()  # empty: rename() onto it would work on Linux but not everywhere
    os.rename(tmp, out)


def generate_demo(
    out_dir: str | Path,
    *,
    patients_per_subtype: dict[str, int] | None = None,
    images_per_mag: int = 6,
    width: int = 700,
    height: int = 460,
    seed: int = 0,
    layout: str = "official",
    folds: bool = False,
    progress: bool = False,
    overwrite: bool = False,
    shared_slide: bool = True,
    workers: int = 0,
) -> Path:
    """Write a synthetic BreakHis tree under ``out_dir`` and return it, resolved.

    ``layout``: ``"official"`` (``BreaKHis_v1/histology_slides/...``) or ``"kaggle"``
    (``BreaKHis_v1/BreaKHis_v1/histology_slides/...``). ``folds`` adds ``Folds.csv`` at
    ``out_dir`` in the Kaggle mirror's format (file names ``BreaKHis_v1/histology_slides/...``),
    patient-disjoint. ``shared_slide`` files slide 14-13412 under both DC and LC when
    both are asked for (one extra patient). ``workers``: 0 = one process per CPU,
    1 = serial. Same arguments, same bytes: every file has its own seed.

    The tree is built in a hidden folder beside ``out_dir`` and renamed into place at the
    end, so an interrupted run leaves nothing half-written at ``out_dir``. Raises
    DataError when ``out_dir`` is non-empty and not a previous demo, or is a previous
    demo and ``overwrite`` is false; ConfigError for invalid sizes, counts or layout.
    """
    plan = _check_args(seed, patients_per_subtype, images_per_mag, width, height, layout)
    out = Path(out_dir).expanduser().resolve()
    _check_target(out, overwrite)
    patients = make_patients(plan, seed, shared_slide=shared_slide)
    if folds:
        _check_foldable(patients)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private (0700); a data folder is not secret
        root = LAYOUTS[layout](tmp)
        jobs = list(_jobs(root, patients, images_per_mag, (width, height), seed))
        _draw_all(jobs, workers, progress)
        if folds:
            _write_folds(tmp, root, jobs, patients, seed)
        marker = {
            "synthetic": True,
            "generator": "dala-search",
            "version": __version__,
            "seed": seed,
            "layout": layout,
            "folds": folds,
            "width": width,
            "height": height,
            "images_per_mag": images_per_mag,
            "patients_per_subtype": plan,
            "shared_slide": shared_slide,
            "n_images": len(jobs),
            "patients": [
                {
                    "slide": p.slide,
                    "label": p.label,
                    "subtypes": list(p.subtypes),
                    "atypia": round(p.atypia, 3),
                }
                for p in patients
            ],
            "note": "procedurally drawn H&E-like tiles in the BreakHis layout; not patient data",
        }
        _write_markers(tmp, root, marker)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
