"""BreakHis names and the index of a data directory.

The patient key is the slide id (``14-13412``), not the folder: the real archive has
slide 14-13412 under both ductal and lobular carcinoma, and it is one patient.
"""

from __future__ import annotations

import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from dala_search.errors import DataError

MAGNIFICATIONS: tuple[str, ...] = ("40X", "100X", "200X", "400X")
CLASSES: tuple[str, ...] = ("benign", "malignant")

# Subtype code -> (class, folder name in the official archive).
SUBTYPES: dict[str, tuple[str, str]] = {
    "A": ("benign", "adenosis"),
    "F": ("benign", "fibroadenoma"),
    "PT": ("benign", "phyllodes_tumor"),
    "TA": ("benign", "tubular_adenoma"),
    "DC": ("malignant", "ductal_carcinoma"),
    "LC": ("malignant", "lobular_carcinoma"),
    "MC": ("malignant", "mucinous_carcinoma"),
    "PC": ("malignant", "papillary_carcinoma"),
}
SUBTYPE_CODES: tuple[str, ...] = tuple(SUBTYPES)

# SOB_B_A-14-22549AB-40-001.png: biopsy, class, subtype, year-slide, magnification, sequence.
_NAME = re.compile(
    r"^SOB_(?P<cls>[BM])_(?P<sub>[A-Z]+)-(?P<slide>\d+-\d+[A-Z]*)-(?P<mag>\d+)-(?P<seq>\d+)\.png$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class ParsedName:
    """What a BreakHis file name says about its image."""

    label: str  # "benign" | "malignant"
    subtype: str  # one of SUBTYPE_CODES
    slide: str  # patient key, e.g. "14-13412"
    magnification: str  # one of MAGNIFICATIONS
    seq: int


def parse_filename(name: str) -> ParsedName:
    """Parse ``SOB_B_A-14-22549AB-40-001.png``; a ValueError names the file otherwise."""
    base = Path(name).name
    m = _NAME.match(base)
    if m is None:
        raise ValueError(
            f"{base!r} is not a BreakHis file name (SOB_<B|M>_<subtype>-<slide>-<mag>-<seq>.png)"
        )
    cls = "benign" if m["cls"].upper() == "B" else "malignant"
    sub = m["sub"].upper()
    if sub not in SUBTYPES:
        raise ValueError(f"{base!r}: unknown subtype {sub!r}; valid: {', '.join(SUBTYPE_CODES)}")
    if SUBTYPES[sub][0] != cls:
        raise ValueError(f"{base!r}: subtype {sub} is {SUBTYPES[sub][0]}, but the name says {cls}")
    mag = f"{int(m['mag'])}X"
    if mag not in MAGNIFICATIONS:
        valid = ", ".join(MAGNIFICATIONS)
        raise ValueError(f"{base!r}: unknown magnification {mag}; valid: {valid}")
    slide = m["slide"].upper()
    return ParsedName(label=cls, subtype=sub, slide=slide, magnification=mag, seq=int(m["seq"]))


@dataclass(frozen=True)
class ImageRecord:
    """One image of the index. ``path`` is absolute; ``slide`` is the patient key."""

    path: Path
    label: str
    subtype: str
    slide: str
    magnification: str
    seq: int

    @property
    def label_index(self) -> int:
        """0 benign, 1 malignant (malignant is the positive class)."""
        return CLASSES.index(self.label)

    @property
    def subtype_index(self) -> int:
        """Index into SUBTYPE_CODES, for 8-class subtype classification."""
        return SUBTYPE_CODES.index(self.subtype)


@dataclass(frozen=True)
class SkippedFile:
    """A file left out of the index or the cache, and why (reported, never a crash)."""

    path: str
    reason: str


def check_magnification(value: str) -> str:
    """Normalise ``40x``/``40`` to ``40X``; a DataError lists the valid ones otherwise."""
    v = value.strip().upper()
    if not v.endswith("X"):
        v += "X"
    if v not in MAGNIFICATIONS:
        raise DataError(f"unknown magnification {value!r}; valid: {', '.join(MAGNIFICATIONS)}")
    return v


# --- The index of a data directory ---------------------------------------------------

# Marker a synthetic-data generator writes so that every report can say the numbers
# are not from the real archive.
SYNTHETIC_MARKER = "DALA_SYNTHETIC.json"
# The Kaggle mirror puts Folds.csv at its top, one or two levels above the images.
FOLDS_CSV = "folds.csv"  # compared lower-cased
_MARKER_DEPTH = 2  # how far under the root Folds.csv and the marker are looked for


@dataclass
class BreakHisIndex:
    """Every usable BreakHis image under one directory, and what was left out and why.

    Built by `index_breakhis`; read by the splits, the decoded-image cache and the CLI's
    ``index`` report.
    """

    root: Path  # the directory the user gave, resolved
    records: list[ImageRecord]  # sorted by path, deterministic
    skipped: list[SkippedFile]  # non-BreakHis PNGs, unreadable/truncated images, duplicates
    folds_csv: Path | None  # Folds.csv at the root or at most 2 levels under it
    synthetic: bool  # a DALA_SYNTHETIC.json marker sits at the root or up to 2 levels below

    def select(self, magnification: str | None) -> list[ImageRecord]:
        """Records of one magnification; ``None`` or ``"all"`` pools the four."""
        if magnification is None or magnification.strip().lower() == "all":
            return list(self.records)
        mag = check_magnification(magnification)
        return [r for r in self.records if r.magnification == mag]

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per magnification and class, all four magnifications, zeros kept."""
        out = {m: dict.fromkeys(CLASSES, 0) for m in MAGNIFICATIONS}
        for r in self.records:
            out[r.magnification][r.label] += 1
        return out

    def subtype_counts(self) -> dict[str, dict[str, int]]:
        """Images per magnification and subtype code, zeros kept."""
        out = {m: dict.fromkeys(SUBTYPE_CODES, 0) for m in MAGNIFICATIONS}
        for r in self.records:
            out[r.magnification][r.subtype] += 1
        return out

    def slides(self) -> list[str]:
        """Sorted unique slide ids (patients)."""
        return sorted({r.slide for r in self.records})

    def to_json(self) -> dict:
        """A JSON-ready summary, for ``dala-search index`` and the MLflow parent run."""
        return {
            "root": str(self.root),
            "synthetic": self.synthetic,
            "n_images": len(self.records),
            "n_slides": len(self.slides()),
            "counts": self.counts(),
            "subtypes": self.subtype_counts(),
            "skipped": [{"path": s.path, "reason": s.reason} for s in self.skipped],
            "folds_csv": None if self.folds_csv is None else str(self.folds_csv),
        }


def index_breakhis(
    root: str | Path, *, verify: bool = True, progress: bool = False
) -> BreakHisIndex:
    """Index every BreakHis PNG under ``root`` (any depth: official or Kaggle layout).

    The file name is
    authoritative for class, subtype, slide and magnification; folders are not
    cross-checked. With ``verify`` each PNG is opened and its chunks' CRCs checked, so a
    truncated or corrupt file is reported in ``skipped`` instead of failing a trial later.
    Raises DataError when ``root`` is not a directory or holds no BreakHis image.
    """
    given = Path(root).expanduser()
    if not given.exists():
        raise DataError(f"data directory {str(given)!r} does not exist")
    if not given.is_dir():
        raise DataError(f"data path {str(given)!r} is not a directory")
    base = given.resolve()

    pngs, folds_csvs, markers = _walk(base)
    skipped: list[SkippedFile] = []
    parsed: list[tuple[Path, ParsedName]] = []
    for path in pngs:
        try:
            parsed.append((path, parse_filename(path.name)))
        except ValueError as e:
            skipped.append(SkippedFile(str(path), str(e)))

    problems = _verify_all([p for p, _ in parsed], progress) if verify else [None] * len(parsed)

    records: list[ImageRecord] = []
    first_seen: dict[str, Path] = {}  # basename -> kept path; basenames are unique in BreakHis
    for (path, name), problem in zip(parsed, problems, strict=True):
        if problem is not None:
            skipped.append(SkippedFile(str(path), problem))
            continue
        if path.name in first_seen:
            skipped.append(SkippedFile(str(path), f"duplicate of {first_seen[path.name]}"))
            continue
        first_seen[path.name] = path
        records.append(
            ImageRecord(
                path=path,
                label=name.label,
                subtype=name.subtype,
                slide=name.slide,
                magnification=name.magnification,
                seq=name.seq,
            )
        )

    skipped.sort(key=lambda s: Path(s.path).parts)
    if not records:
        detail = ""
        if skipped:  # PNGs were there but none usable: show why, the user can act on it
            detail = f"; {len(skipped)} PNG file(s) skipped, e.g. {skipped[0].path}: "
            detail += skipped[0].reason
        raise DataError(f"no BreakHis images (SOB_*.png) under {base}{detail}")
    return BreakHisIndex(
        root=base,
        records=records,
        skipped=skipped,
        folds_csv=folds_csvs[0] if folds_csvs else None,
        synthetic=bool(markers),
    )


def _walk(base: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """PNG candidates (sorted by path), Folds.csv files (shallowest first), synthetic markers.

    Hidden files and folders (``._x.png`` from macOS, ``.ipynb_checkpoints``) are ignored:
    they are never images of the archive. Symlinked folders are followed once each.
    """
    pngs: list[Path] = []
    folds: list[tuple[int, Path]] = []
    markers: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop or a second link to a folder already walked
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        depth = len(here.relative_to(base).parts)
        for name in filenames:
            if name.startswith("."):
                continue
            lower = name.lower()
            if lower.endswith(".png"):
                pngs.append(here / name)
            elif depth <= _MARKER_DEPTH and lower == FOLDS_CSV:
                folds.append((depth, here / name))
            elif depth <= _MARKER_DEPTH and name == SYNTHETIC_MARKER:
                markers.append(here / name)
    pngs.sort(key=lambda p: p.parts)
    folds.sort(key=lambda dp: (dp[0], dp[1].parts))
    return pngs, [p for _, p in folds], markers


def _verify_all(paths: list[Path], progress: bool) -> list[str | None]:
    """Check each PNG in a few threads (file reads and zlib's CRC release the GIL)."""
    workers = min(8, 2 * (os.cpu_count() or 1))
    bar = tqdm(
        total=len(paths), disable=not progress, file=sys.stderr, unit="img", desc="verify PNGs"
    )
    out: list[str | None] = []
    with bar, ThreadPoolExecutor(max_workers=workers) as pool:
        for problem in pool.map(_png_problem, paths):
            out.append(problem)
            bar.update(1)
    return out


def _png_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable, complete PNG, or None when it is.

    ``verify()`` walks every chunk to IEND and checks its CRC without decoding pixels:
    a truncated download fails with "Truncated File Read", a flipped byte with a bad
    checksum. Only PNG is accepted: the archive has nothing else.
    """
    try:
        with Image.open(path, formats=["PNG"]) as im:
            im.verify()
    except UnidentifiedImageError:
        return "not a readable PNG image"
    except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, EOFError...
        return f"unreadable PNG ({type(e).__name__}: {e})"
    return None
