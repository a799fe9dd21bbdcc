"""A synthetic BreakHis: procedurally drawn H&E-like tiles in the archive's exact layout.

Used by the offline demo (``dala_search.data.demo``) and by tests, so every command runs on
a fresh machine without the real archive. The tree, the file names, the class balance
(~31% benign), the shared slide 14-13412 (ductal *and* lobular carcinoma, one patient)
and, on request, the Kaggle mirror's ``Folds.csv`` follow the real data; the pixels do not.
Every output carries a ``DALA_SYNTHETIC.json`` marker so no report can pass it off as real.

How a tile is drawn (all numpy, vectorised over nuclei):
  * stain concentrations, haematoxylin ``H`` and eosin ``E``, are painted as float fields;
    the colour comes from Beer-Lambert mixing of per-patient stain vectors, so the
    patient-to-patient colour shift looks like a real staining batch effect;
  * stroma: eosin with wavy collagen fibres and scattered spindle fibroblasts;
  * nuclei: soft ellipses with a random radial wobble (irregular outline), chromatin
    grain and a cytoplasm halo;
  * one patient-level ``atypia`` in [0, 1] (benign ~0.3, malignant ~0.65, overlapping)
    sets nucleus size, density, irregularity, stain variability and how organised the
    epithelium is (glandular rings versus solid sheets); subtypes add their own
    architecture (mucin pools, single-file lines, slit-like ducts...). The overlap is
    deliberate: a CNN should learn it, but not perfectly, and only across patients;
  * magnification is a zoom: higher magnification, larger and fewer nuclei.
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

# Apparent zoom relative to 40X. Not the optical ratio (10x at 400X): BreakHis fields at
# 400X show nuclei of ~20 px radius at 700 px wide, about 8x their 40X size.
_ZOOM: dict[str, float] = {"40X": 1.0, "100X": 2.3, "200X": 4.5, "400X": 8.0}
_NATIVE_WIDTH = 700.0  # sizes below are in pixels of a 700-px-wide tile, then scaled

# Reference stain optical-density vectors (Macenko et al.'s H&E reference).
_H_REF = np.array([0.5626, 0.7201, 0.4062], dtype=np.float32)
_E_REF = np.array([0.2159, 0.8012, 0.5581], dtype=np.float32)


# --- Patients ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Patient:
    """One synthetic patient (slide): what is fixed across all its tiles."""

    slide: str
    label: str  # "benign" | "malignant"
    subtypes: tuple[str, ...]  # folders it is filed under (two for the shared slide)
    atypia: float  # 0 = bland, organised; 1 = large, crowded, pleomorphic
    h_vec: tuple[float, float, float]  # haematoxylin OD direction (per-patient batch effect)
    e_vec: tuple[float, float, float]
    h_gain: float  # stain strength
    e_gain: float
    brightness: float  # illumination / background tint


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
    """The patient list, deterministic per seed. Called by `generate_demo`."""
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


# --- Drawing ----------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Zero-mean, ~unit-variance noise with features about ``cell`` pixels wide."""
    gh, gw = max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)
    small = rng.standard_normal((gh, gw)).astype(np.float32)
    # Bicubic upsampling of a coarse grid: smooth noise in ~1 ms, no scipy needed.
    return np.asarray(Image.fromarray(small, "F").resize((w, h), Image.Resampling.BICUBIC))


def _blobs(
    field: np.ndarray,
    cy: np.ndarray,
    cx: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    theta: np.ndarray,
    wobble: np.ndarray | float,
    value: np.ndarray | float,
    rng: np.random.Generator,
) -> None:
    """Paint soft, irregular ellipses into ``field`` (in place, keeping the max).

    Blobs are drawn in groups of similar size, each group at once on a common square
    patch, so the cost is numpy work of size N x patch, not a Python loop per nucleus.
    ``wobble`` scales a random radial perturbation of harmonics 2-4 (0 = clean ellipse).
    """
    n = len(cy)
    if n == 0:
        return
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    wob = np.broadcast_to(np.asarray(wobble, np.float32), (n,))
    val = np.broadcast_to(np.asarray(value, np.float32), (n,))
    # Random harmonic amplitudes and phases, drawn for all blobs up front so the result
    # does not depend on how they are grouped.
    amps = wob[:, None] * rng.uniform(0.3, 1.0, (n, 3)).astype(np.float32) / np.array([1, 2, 3])
    phase = rng.uniform(0, 2 * np.pi, (n, 3)).astype(np.float32)
    # Each blob's reach: the outline never passes a * (1 + sum of amplitudes).
    reach = np.ceil(a * (1.0 + amps.sum(1)) + 1.0).astype(np.int64)
    # Bin reaches geometrically (x1.25) so a few huge nuclei do not inflate every patch.
    bins = np.ceil(1.25 ** np.ceil(np.log(np.maximum(reach, 1)) / np.log(1.25))).astype(np.int64)
    for radius in np.unique(bins):
        sel = np.flatnonzero(bins == radius)
        _blob_group(
            field,
            cy[sel],
            cx[sel],
            a[sel],
            b[sel],
            theta[sel],
            amps[sel],
            phase[sel],
            val[sel],
            int(radius),
        )


def _blob_group(field, cy, cx, a, b, theta, amps, phase, value, radius: int) -> None:
    h, w = field.shape
    off = np.arange(-radius, radius + 1, dtype=np.int64)
    iy, ix = np.floor(cy).astype(np.int64), np.floor(cx).astype(np.int64)

    def col(x: np.ndarray) -> np.ndarray:  # one value per blob, broadcast over its patch
        return np.asarray(x, np.float32)[:, None, None]

    dy = off.astype(np.float32)[None, :, None] - col(cy - iy)
    dx = off.astype(np.float32)[None, None, :] - col(cx - ix)
    cos_t, sin_t = col(np.cos(theta)), col(np.sin(theta))
    x = (dx * cos_t + dy * sin_t) / col(a)
    y = (dy * cos_t - dx * sin_t) / col(b)
    r = np.sqrt(x * x + y * y) + 1e-6
    rho = 1.0
    if radius > 4:  # a wobbly outline is invisible on a blob a few pixels wide: skip it
        # cos/sin of k*phi from powers of (x + iy)/r: no arctan2 or trig per pixel.
        c1, s1 = x / r, y / r
        c2, s2 = c1 * c1 - s1 * s1, 2 * c1 * s1
        c3, s3 = c1 * c2 - s1 * s2, s1 * c2 + c1 * s2
        c4, s4 = c2 * c2 - s2 * s2, 2 * c2 * s2
        for k, (ck, sk) in enumerate(((c2, s2), (c3, s3), (c4, s4))):
            amp, ph = amps[:, k], phase[:, k]
            rho = rho + col(amp * np.cos(ph)) * ck - col(amp * np.sin(ph)) * sk
    # Soft edge about one pixel wide (in units of the minor axis): anti-aliased outlines.
    m = np.clip((rho - r) * col(b) + 0.5, 0.0, 1.0) * col(value)
    rows = iy[:, None, None] + off[None, :, None]
    cols = ix[:, None, None] + off[None, None, :]
    ok = (m > 0) & (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    np.maximum.at(field.reshape(-1), (rows * w + cols)[ok], m[ok])


class _Blobs:
    """Blob specs collected by the architecture painters, drawn in one `_blobs` call."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, ...]] = []

    def add(self, cy, cx, a, b, theta, value=1.0, wobble=0.0, epithelial=False) -> None:
        cy = np.asarray(cy, np.float32).ravel()
        n = len(cy)

        def full(x: object) -> np.ndarray:
            return np.broadcast_to(np.asarray(x, np.float32).ravel(), (n,))

        spec = (cy, full(cx), full(a), full(b), full(theta), full(value), full(wobble))
        self.parts.append((*spec, np.full(n, bool(epithelial))))

    def arrays(self) -> tuple[np.ndarray, ...]:
        """cy, cx, a, b, theta, value, wobble, epithelial: concatenated."""
        if not self.parts:
            return tuple(np.zeros(0, np.float32) for _ in range(7)) + (np.zeros(0, bool),)
        return tuple(np.concatenate(col) for col in zip(*self.parts, strict=True))

    def draw(self, field: np.ndarray, rng: np.random.Generator, mask=None) -> None:
        cy, cx, a, b, theta, value, wobble, epi = self.arrays()
        keep = slice(None) if mask is None else mask(epi)
        _blobs(
            field, cy[keep], cx[keep], a[keep], b[keep], theta[keep], wobble[keep], value[keep], rng
        )


def _ring_points(t0: np.ndarray, per: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Angles of ``per[i]`` evenly spaced points on ring i (offset t0[i]), and ring ids."""
    ring = np.repeat(np.arange(len(per)), per)
    start = np.concatenate([[0], np.cumsum(per)[:-1]])
    j = np.arange(len(ring)) - start[ring]
    return t0[ring] + 2 * np.pi * j / per[ring], ring


@dataclass
class _Tile:
    """Everything an architecture painter needs: geometry, grade and what it adds to."""

    rng: np.random.Generator
    h: int
    w: int
    r_nuc: float  # mean epithelial nucleus radius, pixels
    atypia: float
    fibre_angle: float
    nuclei: _Blobs
    lumens: _Blobs  # white space (gland lumens, clefts)
    mucin: _Blobs  # pale blue-grey mucin pools

    def epithelial_cells(self, cy: np.ndarray, cx: np.ndarray, theta=None) -> None:
        """Add epithelial nuclei at the given centres with grade-dependent pleomorphism."""
        rng, n, a = self.rng, len(cy), self.atypia
        size = self.r_nuc * np.clip(rng.lognormal(0.0, 0.08 + 0.3 * a, n), 0.5, 2.5)
        # Benign nuclei are round-ish; atypical ones elongated in random directions.
        aspect = np.clip(rng.normal(0.85 - 0.2 * a, 0.08 + 0.1 * a, n), 0.45, 1.0)
        angle = rng.uniform(0, np.pi, n) if theta is None else theta
        # Hyperchromasia and variable staining grow with the grade.
        value = np.clip(rng.normal(1.0 + 0.5 * a, 0.08 + 0.3 * a, n), 0.5, 2.4)
        wobble = 0.03 + 0.2 * a
        self.nuclei.add(cy, cx, size, size * aspect, angle, value, wobble, epithelial=True)

    def rings(self, count: int, size: float, squash=(0.6, 1.0), fold: float = 0.0) -> None:
        """Glands: a lumen ringed by one (benign) or several (atypical) layers of cells."""
        rng, a, r = self.rng, self.atypia, self.r_nuc
        if count == 0:
            return
        cy = rng.uniform(-0.1, 1.1, count) * self.h
        cx = rng.uniform(-0.1, 1.1, count) * self.w
        ra = size * rng.lognormal(0.0, 0.3, count)
        rb = ra * rng.uniform(*squash, count)
        th = rng.uniform(0, np.pi, count)
        open_ = max(0.15, 1.0 - 0.8 * a)  # crowded, atypical glands lose their lumen
        self.lumens.add(cy, cx, ra * open_, rb * open_, th, 1.0, 0.05 + fold)
        # Benign glands: one cell layer; atypical ones stratify into several.
        layers = 1 + rng.poisson(3.0 * a, count)
        gland = np.repeat(np.arange(count), layers)
        layer = np.arange(len(gland)) - np.repeat(np.cumsum(layers) - layers, layers)
        grow = open_ + (layer + 0.7) * 2.2 * r / ra[gland]
        per = np.maximum(4, (2 * np.pi * ra[gland] * grow / (2.3 * r)).astype(np.int64))
        t, ring = _ring_points(rng.uniform(0, 1, len(per)), per)
        g = gland[ring]
        # Disorganisation: positional jitter grows with the grade.
        jy, jx = rng.normal(0, (0.1 + 0.9 * a) * r, (2, len(t)))
        ey, ex = ra[g] * grow[ring] * np.sin(t), rb[g] * grow[ring] * np.cos(t)
        ys = cy[g] + ex * np.sin(th[g]) + ey * np.cos(th[g]) + jy
        xs = cx[g] + ex * np.cos(th[g]) - ey * np.sin(th[g]) + jx
        # Benign cells line up perpendicular to the basement membrane; atypical ones do not.
        normal = t + th[g] + np.pi / 2 * (1 - a) + rng.normal(0, 0.2 + 1.5 * a, len(t))
        self.epithelial_cells(ys, xs, theta=normal)
        if a < 0.5:  # an outer layer of flat myoepithelial nuclei marks benign glands
            out = open_ + (layers + 0.8) * 2.2 * r / ra
            per = np.maximum(4, (2 * np.pi * ra * out / (4 * r)).astype(np.int64))
            t, g = _ring_points(np.zeros(count), per)
            ey, ex = ra[g] * out[g] * np.sin(t), rb[g] * out[g] * np.cos(t)
            ys = cy[g] + ex * np.sin(th[g]) + ey * np.cos(th[g])
            xs = cx[g] + ex * np.cos(th[g]) - ey * np.sin(th[g])
            self.nuclei.add(ys, xs, 0.7 * r, 0.28 * r, -t - th[g], 1.1)

    def sheets(self, count: int, spread: float, cells: int) -> None:
        """Solid nests of crowded tumour cells (a clustered point process)."""
        rng = self.rng
        if count == 0:
            return
        cy, cx = rng.uniform(0, self.h, count), rng.uniform(0, self.w, count)
        sy, sx = spread * rng.lognormal(0, 0.3, (2, count))
        n = np.maximum(1, (cells * rng.lognormal(0, 0.3, count)).astype(np.int64))
        k = np.repeat(np.arange(count), n)
        oy, ox = rng.standard_normal((2, len(k)))
        self.epithelial_cells(cy[k] + oy * sy[k], cx[k] + ox * sx[k])

    def files(self, count: int, length: int) -> None:
        """Single-file lines of small cells (lobular carcinoma's 'Indian file')."""
        rng, r = self.rng, self.r_nuc
        if count == 0:
            return
        cy, cx = rng.uniform(0, self.h, (count, 1)), rng.uniform(0, self.w, (count, 1))
        ang = self.fibre_angle + rng.normal(0, 0.3, (count, 1))
        ang = ang + np.cumsum(rng.normal(0, 0.08, (count, length)), axis=1)
        steps = np.arange(length) * 2.4 * r
        jy, jx = rng.normal(0, 0.3 * r, (2, count, length))
        self.epithelial_cells(
            (cy + steps * np.sin(ang) + jy).ravel(), (cx + steps * np.cos(ang) + jx).ravel()
        )

    def pools(self, count: int, size: float) -> None:
        """Mucin lakes with floating tumour clusters (mucinous carcinoma)."""
        rng = self.rng
        if count == 0:
            return
        cy, cx = rng.uniform(0, self.h, count), rng.uniform(0, self.w, count)
        ra = size * rng.lognormal(0, 0.3, count)
        self.mucin.add(
            cy, cx, ra, ra * rng.uniform(0.5, 1.0, count), rng.uniform(0, np.pi, count), 1.0, 0.12
        )
        k = np.repeat(np.arange(count), np.maximum(3, rng.poisson(6, count)))
        oy, ox = rng.normal(0, 0.25, (2, len(k)))
        self.epithelial_cells(cy[k] + oy * ra[k], cx[k] + ox * ra[k])

    def fibroblasts(self, per_area: float, area: float) -> None:
        """Spindle nuclei aligned with the collagen, and a few round dark lymphocytes."""
        rng, h, w = self.rng, self.h, self.w
        # Stromal nuclei do not share the tumour's atypia: undo its size factor.
        r0 = self.r_nuc / (1 + 0.45 * self.atypia)
        n = int(rng.poisson(per_area * area))
        r = r0 * rng.uniform(0.7, 1.1, n)
        ang = self.fibre_angle + rng.normal(0, 0.25, n)
        self.nuclei.add(rng.uniform(0, h, n), rng.uniform(0, w, n), r, 0.3 * r, ang, 1.3)
        m = int(rng.poisson(per_area * area / 4))
        self.nuclei.add(rng.uniform(0, h, m), rng.uniform(0, w, m), 0.55 * r0, 0.55 * r0, 0, 1.8)


# Architecture per subtype: painter(tile, gland size in px, area) adds structures.
# ``area`` is the tile's area in 400X-field units (1 at 400X, ~64 at 40X), so counts per
# unit area stay the same across magnifications and only the zoom changes.
Painter = Callable[[_Tile, float, float], None]


def _count(t: _Tile, mean: float) -> int:
    return int(t.rng.poisson(max(mean, 0.0)))


def _paint_adenosis(t: _Tile, gland: float, area: float) -> None:
    t.rings(_count(t, 3.0 * area), 0.7 * gland)  # many small, crowded glands
    t.fibroblasts(30, area)


def _paint_fibroadenoma(t: _Tile, gland: float, area: float) -> None:
    t.rings(_count(t, 1.0 * area), 1.4 * gland, squash=(0.12, 0.35))  # compressed, slit ducts
    t.fibroblasts(40, area)


def _paint_phyllodes(t: _Tile, gland: float, area: float) -> None:
    t.rings(_count(t, 0.6 * area), 1.7 * gland, squash=(0.1, 0.3), fold=0.25)  # leaf-like clefts
    t.fibroblasts(90, area)  # cellular stroma


def _paint_tubular(t: _Tile, gland: float, area: float) -> None:
    t.rings(_count(t, 4.0 * area), 0.55 * gland, squash=(0.8, 1.0))  # packed round tubules
    t.fibroblasts(20, area)


def _paint_ductal(t: _Tile, gland: float, area: float) -> None:
    t.sheets(_count(t, 1.2 * area * (0.5 + t.atypia)), 2.2 * gland, int(60 * (0.5 + t.atypia)))
    t.rings(_count(t, 0.8 * area * (1.2 - t.atypia)), gland, fold=0.15)  # cribriform remnants
    t.fibroblasts(25, area)


def _paint_lobular(t: _Tile, gland: float, area: float) -> None:
    t.files(_count(t, 2.5 * area), 14)
    t.sheets(_count(t, 0.5 * area), 1.5 * gland, 25)
    t.fibroblasts(25, area)


def _paint_mucinous(t: _Tile, gland: float, area: float) -> None:
    t.pools(_count(t, 0.8 * area), 2.5 * gland)
    t.sheets(_count(t, 0.4 * area), 1.5 * gland, 25)
    t.fibroblasts(20, area)


def _paint_papillary(t: _Tile, gland: float, area: float) -> None:
    t.rings(_count(t, 1.0 * area), 1.4 * gland, squash=(0.4, 0.9), fold=0.35)  # fronds
    t.sheets(_count(t, 0.5 * area), 1.5 * gland, 30)
    t.fibroblasts(25, area)


PAINTERS: dict[str, Painter] = {
    "A": _paint_adenosis,
    "F": _paint_fibroadenoma,
    "PT": _paint_phyllodes,
    "TA": _paint_tubular,
    "DC": _paint_ductal,
    "LC": _paint_lobular,
    "MC": _paint_mucinous,
    "PC": _paint_papillary,
}


def _low_res_blobs(blobs: _Blobs, h: int, w: int, factor: int, rng, grow: float, mask=None):
    """Draw enlarged blobs at 1/factor resolution and upsample: soft, merging regions.

    Used for cytoplasm (cells' halos run together into epithelium instead of bubbles),
    lumens and mucin (no hard outline), at a fraction of the full-resolution cost.
    """
    hs, ws = max(2, -(-h // factor)), max(2, -(-w // factor))
    small = np.zeros((hs, ws), np.float32)
    cy, cx, a, b, theta, value, wobble, epi = blobs.arrays()
    keep = np.ones(len(cy), bool) if mask is None else mask(epi)
    _blobs(
        small,
        cy[keep] / factor,
        cx[keep] / factor,
        a[keep] * grow / factor,
        b[keep] * grow / factor,
        theta[keep],
        wobble[keep],
        value[keep],
        rng,
    )
    up = Image.fromarray(small, "F").resize((w, h), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(up), 0.0, 1.0)


def render_tile(
    patient: Patient,
    subtype: str,
    magnification: str,
    width: int,
    height: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """One H&E-like tile as a ``(height, width, 3)`` uint8 array.

    Called by `generate_demo` (one per file); usable alone to look at tiles.
    """
    h, w = height, width
    unit = _ZOOM[magnification] * width / _NATIVE_WIDTH  # pixels per 40X-at-700 pixel
    # The grade jitters a little from field to field of the same patient.
    atypia = float(np.clip(patient.atypia + rng.normal(0, 0.06), 0.0, 1.0))
    r_nuc = max(0.6, 2.4 * unit * (1 + 0.45 * atypia))
    # Field of view in 400X-field units: independent of the pixel size asked for.
    area = (h / w) / (460 / 700) * (_ZOOM["400X"] / _ZOOM[magnification]) ** 2
    tile = _Tile(
        rng=rng,
        h=h,
        w=w,
        r_nuc=r_nuc,
        atypia=atypia,
        fibre_angle=float(rng.uniform(0, np.pi)),
        nuclei=_Blobs(),
        lumens=_Blobs(),
        mucin=_Blobs(),
    )
    PAINTERS[subtype](tile, 12.0 * unit, area)

    # Stroma: eosin with wavy collagen bundles (a warped sinusoid whose contrast fades in
    # and out) over coarse density variation.
    ang = tile.fibre_angle
    k = 2 * np.pi / max(3.0, 6.0 * unit)
    ys, xs = np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32)
    along = (xs * np.float32(k * np.cos(ang)))[None, :] + (ys * np.float32(k * np.sin(ang)))[
        :, None
    ]
    fibre = np.sin(along + 6.0 * _smooth_noise(rng, h, w, 30 * unit))
    fibre *= np.clip(0.5 + 0.5 * _smooth_noise(rng, h, w, 20 * unit), 0, 1)
    coarse = _smooth_noise(rng, h, w, 25 * unit)
    e = (0.5 + 0.08 * coarse) * (1.0 + 0.14 * fibre)
    # Loose areas and tears in the stroma: thresholded coarse noise becomes white space.
    holes = np.clip((_smooth_noise(rng, h, w, 30 * unit) - 1.5) * 1.5, 0, 1)

    factor = 4 if min(h, w) >= 64 else 1
    white = np.maximum(_low_res_blobs(tile.lumens, h, w, factor, rng, 1.0), holes)
    mucin = _low_res_blobs(tile.mucin, h, w, factor, rng, 1.0)
    cyto = _low_res_blobs(tile.nuclei, h, w, factor, rng, 2.0, mask=lambda epi: epi)
    nuclei = np.zeros((h, w), np.float32)
    tile.nuclei.draw(nuclei, rng)
    grain = _smooth_noise(rng, h, w, max(1.0, 0.4 * r_nuc))  # chromatin texture

    e = e * (1 - 0.85 * white) * (1 - 0.75 * mucin) + 0.3 * cyto * (1 - white)
    hem = 0.03 + 0.12 * cyto + 0.22 * mucin + nuclei * (0.85 + 0.18 * grain)
    e = e * (1 - 0.5 * np.minimum(nuclei, 1))  # nuclei hide the eosin beneath them

    # Beer-Lambert: optical density = sum of stain concentration x stain vector.
    od = (hem * patient.h_gain)[..., None] * np.array(patient.h_vec, np.float32)
    od += (e * patient.e_gain)[..., None] * np.array(patient.e_vec, np.float32)
    rgb = np.exp(-od) * np.float32(255.0 * patient.brightness)
    rgb += rng.standard_normal((h, w, 3), dtype=np.float32) * np.float32(2.5)  # camera noise
    return np.clip(rgb, 0, 255).astype(np.uint8)


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

    Called by the CLI's demo path (`dala_search.data.demo.ensure_demo_data`) and by tests.

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
