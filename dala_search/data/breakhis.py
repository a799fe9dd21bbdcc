"""BreakHis names and the index of a data directory.

The patient key is the slide id (``14-13412``), not the folder: the real archive has
slide 14-13412 under both ductal and lobular carcinoma, and it is one patient.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

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
