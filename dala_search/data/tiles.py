"""Drawing one synthetic H&E-like tile (``render_tile``), for ``synthetic.generate_demo``.

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

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dala_search.data.blobs import Blobs, low_res_blobs, smooth_noise


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


# Apparent zoom relative to 40X. Not the optical ratio (10x at 400X): BreakHis fields at
# 400X show nuclei of ~20 px radius at 700 px wide, about 8x their 40X size.
_ZOOM: dict[str, float] = {"40X": 1.0, "100X": 2.3, "200X": 4.5, "400X": 8.0}
_NATIVE_WIDTH = 700.0  # sizes below are in pixels of a 700-px-wide tile, then scaled


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
    nuclei: Blobs
    lumens: Blobs  # white space (gland lumens, clefts)
    mucin: Blobs  # pale blue-grey mucin pools

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


def render_tile(
    patient: Patient,
    subtype: str,
    magnification: str,
    width: int,
    height: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """One H&E-like tile as a ``(height, width, 3)`` uint8 array (one per demo file;
    usable alone to look at tiles)."""
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
        nuclei=Blobs(),
        lumens=Blobs(),
        mucin=Blobs(),
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
    fibre = np.sin(along + 6.0 * smooth_noise(rng, h, w, 30 * unit))
    fibre *= np.clip(0.5 + 0.5 * smooth_noise(rng, h, w, 20 * unit), 0, 1)
    coarse = smooth_noise(rng, h, w, 25 * unit)
    e = (0.5 + 0.08 * coarse) * (1.0 + 0.14 * fibre)
    # Loose areas and tears in the stroma: thresholded coarse noise becomes white space.
    holes = np.clip((smooth_noise(rng, h, w, 30 * unit) - 1.5) * 1.5, 0, 1)

    factor = 4 if min(h, w) >= 64 else 1
    white = np.maximum(low_res_blobs(tile.lumens, h, w, factor, rng, 1.0), holes)
    mucin = low_res_blobs(tile.mucin, h, w, factor, rng, 1.0)
    cyto = low_res_blobs(tile.nuclei, h, w, factor, rng, 2.0, mask=lambda epi: epi)
    nuclei = np.zeros((h, w), np.float32)
    tile.nuclei.draw(nuclei, rng)
    grain = smooth_noise(rng, h, w, max(1.0, 0.4 * r_nuc))  # chromatin texture

    e = e * (1 - 0.85 * white) * (1 - 0.75 * mucin) + 0.3 * cyto * (1 - white)
    hem = 0.03 + 0.12 * cyto + 0.22 * mucin + nuclei * (0.85 + 0.18 * grain)
    e = e * (1 - 0.5 * np.minimum(nuclei, 1))  # nuclei hide the eosin beneath them

    # Beer-Lambert: optical density = sum of stain concentration x stain vector.
    od = (hem * patient.h_gain)[..., None] * np.array(patient.h_vec, np.float32)
    od += (e * patient.e_gain)[..., None] * np.array(patient.e_vec, np.float32)
    rgb = np.exp(-od) * np.float32(255.0 * patient.brightness)
    rgb += rng.standard_normal((h, w, 3), dtype=np.float32) * np.float32(2.5)  # camera noise
    return np.clip(rgb, 0, 255).astype(np.uint8)
