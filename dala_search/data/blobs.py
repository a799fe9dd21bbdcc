"""Soft, irregular ellipses ("blobs") painted into float fields, and smooth noise: the
drawing primitives of a synthetic tile (``tiles.render_tile``).

Nuclei, lumens and mucin pools are blobs; painting is vectorised over them (numpy work of
size N x patch, no Python loop per nucleus).
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Zero-mean, ~unit-variance noise with features about ``cell`` pixels wide."""
    gh, gw = max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)
    small = rng.standard_normal((gh, gw)).astype(np.float32)
    # Bicubic upsampling of a coarse grid: smooth noise in ~1 ms, no scipy needed.
    return np.asarray(Image.fromarray(small, "F").resize((w, h), Image.Resampling.BICUBIC))


def draw_blobs(
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


class Blobs:
    """Blob specs collected by the architecture painters, drawn in one `draw_blobs` call."""

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
        draw_blobs(
            field, cy[keep], cx[keep], a[keep], b[keep], theta[keep], wobble[keep], value[keep], rng
        )


def low_res_blobs(blobs: Blobs, h: int, w: int, factor: int, rng, grow: float, mask=None):
    """Draw enlarged blobs at 1/factor resolution and upsample: soft, merging regions.

    Used for cytoplasm (cells' halos run together into epithelium instead of bubbles),
    lumens and mucin (no hard outline), at a fraction of the full-resolution cost.
    """
    hs, ws = max(2, -(-h // factor)), max(2, -(-w // factor))
    small = np.zeros((hs, ws), np.float32)
    cy, cx, a, b, theta, value, wobble, epi = blobs.arrays()
    keep = np.ones(len(cy), bool) if mask is None else mask(epi)
    draw_blobs(
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
