"""The decoded-image cache: every PNG decoded and resized once, shared by every trial.

On a GPU a ResNet50 epoch over one magnification takes under a second, while decoding its
~1,400 PNGs (700x460) takes several: decoding would bound every trial. So the images of
an index are decoded once per image size into one ``uint8`` array ``(N, S, S, 3)`` in a
``.npy`` file, and every trial (often in another process on the same node) opens it with
``np.load(mmap_mode="r")``: one copy in the page cache, no per-trial decode.

Resize: the whole 700x460 field is squashed to S x S (aspect ratio not kept). That is the
common BreakHis practice, and it keeps the whole field of view; a centre crop would drop a
third of the tissue of each image. Lanczos with ``reducing_gap`` (a box reduction to
about 3x the target, then Lanczos) is antialiased and costs ~1-4 ms per image, small next
to the PNG decode itself (~10 ms).

On disk, per (files, size) key: ``images-<S>px-<hash16>.npy`` and a ``.json`` sidecar
(paths in row order, skipped files, size). The sidecar is written last, atomically: a
cache without it is incomplete and is never opened. Concurrent builders of one key
serialise on ``fcntl.flock`` of a ``.lock`` file; the second finds the first's result.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image
from tqdm import tqdm

from dala_search.data.breakhis import ImageRecord, SkippedFile
from dala_search.errors import DataError

# Bump when the bytes a key maps to change (resize method, layout): old caches are then
# simply not found, never misread.
CACHE_FORMAT = 1
_RESAMPLE = Image.Resampling.LANCZOS
_REDUCING_GAP = 3.0
# Below this many images a process pool costs more than it saves.
_MIN_PARALLEL = 64


def default_cache_dir() -> Path:
    """``$DALA_CACHE_DIR``, else ``~/.cache/dala-search``."""
    env = os.environ.get("DALA_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dala-search"


class ImageCache:
    """A built cache: row ``i`` of ``images`` is the image at ``paths[i]``.

    Returned by `build_cache` / `open_cache`; read by the training data pipeline, which
    maps its records to rows with `rows_for`. Pickling (to Ray workers, DataLoader
    workers) sends only the file path and the row table: the unpickled object re-opens
    the memory map, so no process ever copies the array.
    """

    def __init__(
        self, path: Path, image_size: int, paths: list[str], skipped: list[SkippedFile]
    ) -> None:
        self.path = Path(path)
        self.image_size = image_size
        self.paths = paths
        self.skipped = skipped
        self._rows = {p: i for i, p in enumerate(paths)}
        self._images: np.ndarray | None = None

    @property
    def images(self) -> np.ndarray:
        """The ``(N, S, S, 3)`` uint8 array, memory-mapped read-only on first use.

        On a node that does not share the driver's cache folder (a cluster without a
        shared file system) the cache is built once on this node from the same images.
        """
        if self._images is None:
            if not self.path.is_file():
                self._rebuild_here()
            self._images = np.load(self.path, mmap_mode="r")
        return self._images

    def _rebuild_here(self) -> None:
        from types import SimpleNamespace

        missing = [p for p in self.paths if not os.path.isfile(p)]
        if missing:
            raise DataError(
                f"image cache {self.path} is not on this node and {len(missing)} of its "
                f"images are not either (e.g. {missing[0]}): put the data (or the cache "
                "folder, $DALA_CACHE_DIR) on a file system every node mounts at one path"
            )
        local = build_cache([SimpleNamespace(path=p) for p in self.paths], self.image_size)
        if local.paths != self.paths:
            raise DataError(
                f"image cache rebuilt on this node ({local.path}) differs from the driver's "
                f"({self.path}): {len(local.paths)} vs {len(self.paths)} decodable images"
            )
        self.path = local.path

    def __len__(self) -> int:
        return len(self.paths)

    def rows_for(self, records: Sequence[ImageRecord]) -> np.ndarray:
        """Row index per record (int64), ``-1`` where the image was skipped or is absent.

        Called once per split by the data pipeline; it drops (and reports) the -1s.
        """
        return np.array([self._rows.get(_key_path(r.path), -1) for r in records], np.int64)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_images"] = None  # never pickle the array: re-open the memmap by path
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (
            f"ImageCache({str(self.path)!r}, {len(self)} images at {self.image_size}px, "
            f"{len(self.skipped)} skipped)"
        )


def _key_path(path: str | Path) -> str:
    # Absolute but not symlink-resolved: the same spelling the index gives its records.
    return os.path.abspath(os.fspath(path))


def _fingerprint(paths: list[str], image_size: int) -> str:
    """Hash of (path, size, mtime_ns) for every file, the image size and the format.

    A file replaced or touched gives a new key, hence a fresh cache, never stale pixels.
    """
    h = hashlib.sha256(f"dala-search image cache v{CACHE_FORMAT} {image_size}px\n".encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()[:16]


def _decode(path: str, image_size: int) -> np.ndarray | str:
    """The resized RGB image as uint8 ``(S, S, 3)``, or why it cannot be read.

    Runs in worker processes; returns the reason instead of raising so one bad file
    never stops the build.
    """
    try:
        return decode_image(path, image_size)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError...
        return f"unreadable image ({type(e).__name__}: {e})"


def decode_image(source: str | Path | BinaryIO, image_size: int) -> np.ndarray:
    """One image (a path or an open binary file) decoded and squashed to uint8 ``(S, S, 3)``,
    exactly as the cache stores it; ``predict.py`` applies models to new images through it.
    Raises what PIL raises for an unreadable image."""
    with Image.open(source) as im:
        rgb = im.convert("RGB")  # forces the full decode: truncation fails here
    small = rgb.resize((image_size, image_size), _RESAMPLE, reducing_gap=_REDUCING_GAP)
    return np.asarray(small, dtype=np.uint8)


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``lock_path``; released when the process dies, too."""
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _decoded(
    paths: list[str], image_size: int, workers: int, progress: bool
) -> Iterator[np.ndarray | str]:
    """Decode results in input order, serially or in a process pool."""
    n_workers = (os.cpu_count() or 1) if workers <= 0 else workers
    bar = tqdm(
        total=len(paths),
        disable=not progress,
        file=sys.stderr,
        unit="img",
        desc=f"decode {image_size}px",
    )
    with bar:
        if n_workers == 1 or len(paths) < _MIN_PARALLEL:
            for p in paths:
                yield _decode(p, image_size)
                bar.update(1)
            return
        with ProcessPoolExecutor(max_workers=n_workers) as pool:
            try:
                for out in pool.map(partial(_decode, image_size=image_size), paths, chunksize=16):
                    yield out
                    bar.update(1)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise


def build_cache(
    records: Sequence[ImageRecord],
    image_size: int,
    cache_dir: str | Path | None = None,
    *,
    workers: int = 0,
    progress: bool = False,
) -> ImageCache:
    """Decode every record's image once to ``image_size`` px; reuse an existing cache.

    Built once per magnification and image size, before any trial starts (trials then
    only `open_cache` or unpickle). ``workers``: 0 = one process per
    CPU, 1 = serial. Unreadable images are listed in ``skipped``, never raised. Raises
    DataError for no records, a bad size, or when no image at all can be decoded.
    """
    if not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size must be a positive int, got {image_size!r}")
    paths = sorted({_key_path(r.path) for r in records})
    if not paths:
        raise DataError("no images to cache: the record list is empty")
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"images-{image_size}px-{_fingerprint(paths, image_size)}"
    npy, sidecar = folder / f"{stem}.npy", folder / f"{stem}.json"

    # A complete cache has its sidecar (written last); no lock is needed to read one.
    if (cache := _open_complete(npy)) is not None:
        return cache
    with _locked(folder / f"{stem}.lock"):
        if (cache := _open_complete(npy)) is not None:  # built while we waited
            return cache
        # We hold the key's lock, so any temporary file of this key is a dead builder's,
        # and a sidecar that failed to open belongs to a damaged cache: rebuild both.
        for stale in folder.glob(f".{stem}.*.tmp"):
            stale.unlink(missing_ok=True)
        sidecar.unlink(missing_ok=True)
        _build(paths, image_size, npy, sidecar, workers, progress)
    return open_cache(npy)


def _open_complete(npy: Path) -> ImageCache | None:
    """The cache at ``npy`` if it is complete and sound, else None (to be rebuilt)."""
    if not npy.with_suffix(".json").is_file():
        return None
    try:
        return open_cache(npy)
    except DataError:
        return None


def _build(
    paths: list[str], image_size: int, npy: Path, sidecar: Path, workers: int, progress: bool
) -> None:
    """Decode into a temporary memmap, compact if files were skipped, publish atomically."""
    folder, stem = npy.parent, npy.stem
    shape = (len(paths), image_size, image_size, 3)
    tmp = Path(tempfile.mkstemp(prefix=f".{stem}.", suffix=".tmp", dir=folder)[1])
    try:
        # Rows go straight to disk: building never holds the whole array in memory.
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        kept: list[str] = []
        skipped: list[SkippedFile] = []
        for path, result in zip(paths, _decoded(paths, image_size, workers, progress), strict=True):
            if isinstance(result, str):
                skipped.append(SkippedFile(path, result))
                continue
            out[len(kept)] = result
            kept.append(path)
        if not kept:
            raise DataError(
                f"none of the {len(paths)} images could be decoded, e.g. "
                f"{skipped[0].path}: {skipped[0].reason}"
            )
        if skipped:  # rows were filled in order: keep the decoded prefix only
            tmp = _compact(out, len(kept), folder, stem, tmp)
        out.flush()
        del out
        _fsync(tmp)
        tmp.chmod(0o644)  # mkstemp files are private; trials of other users may read it
        os.replace(tmp, npy)
        meta = {
            "format": CACHE_FORMAT,
            "image_size": image_size,
            "shape": [len(kept), image_size, image_size, 3],
            "resize": f"squash to {image_size}x{image_size}, {_RESAMPLE.name}, "
            f"reducing_gap={_REDUCING_GAP}",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "paths": kept,
            "skipped": [{"path": s.path, "reason": s.reason} for s in skipped],
        }
        # The sidecar goes last and atomically: its presence means "complete".
        _write_atomic(sidecar, json.dumps(meta, indent=1))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _compact(out: np.ndarray, n: int, folder: Path, stem: str, tmp: Path) -> Path:
    """Copy the first ``n`` rows to a new file in chunks (bounded memory); drop the old."""
    small = Path(tempfile.mkstemp(prefix=f".{stem}.", suffix=".tmp", dir=folder)[1])
    try:
        dst = np.lib.format.open_memmap(small, mode="w+", dtype=np.uint8, shape=(n, *out.shape[1:]))
        step = max(1, (64 << 20) // max(1, out[0].nbytes))  # ~64 MiB per chunk
        for i in range(0, n, step):
            j = min(i + step, n)
            dst[i:j] = out[i:j]
        dst.flush()
        del dst
    except BaseException:
        small.unlink(missing_ok=True)
        raise
    tmp.unlink()
    return small


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def open_cache(path: str | Path) -> ImageCache:
    """Open a complete cache by its ``.npy`` (or ``.json``) path, checking it is whole.

    Raises DataError
    when the sidecar is missing (an unfinished or interrupted build), of another format,
    or does not match the array's shape.
    """
    p = Path(path).expanduser()
    npy, sidecar = p.with_suffix(".npy"), p.with_suffix(".json")
    if not sidecar.is_file():
        raise DataError(
            f"{npy} is not a complete image cache (no {sidecar.name}: the build did not "
            "finish); build it again"
        )
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read cache sidecar {sidecar}: {e}") from e
    if meta.get("format") != CACHE_FORMAT:
        raise DataError(
            f"{sidecar}: cache format {meta.get('format')!r}, this version reads "
            f"{CACHE_FORMAT}; delete it and build again"
        )
    size = int(meta["image_size"])
    expected = (len(meta["paths"]), size, size, 3)
    try:
        arr = np.load(npy, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DataError(f"cannot open image cache {npy}: {e}") from e
    if arr.shape != expected or arr.dtype != np.uint8:
        raise DataError(
            f"{npy}: array {arr.shape} {arr.dtype} does not match its sidecar "
            f"{expected} uint8; delete both and build again"
        )
    skipped = [SkippedFile(s["path"], s["reason"]) for s in meta["skipped"]]
    cache = ImageCache(npy, size, list(meta["paths"]), skipped)
    cache._images = arr
    return cache
