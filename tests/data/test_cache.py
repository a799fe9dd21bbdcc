"""Decoded-image cache: content, reuse, keys, bad files, atomicity, locking, pickling."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dala_search.data import cache as cache_mod
from dala_search.data.breakhis import ImageRecord, parse_filename
from dala_search.data.cache import ImageCache, build_cache, default_cache_dir, open_cache
from dala_search.errors import DataError

REPO = Path(__file__).resolve().parents[2]


def _record(path: Path) -> ImageRecord:
    n = parse_filename(path.name)
    return ImageRecord(path, n.label, n.subtype, n.slide, n.magnification, n.seq)


def _solid(folder: Path, seq: int, colour: tuple[int, int, int], size=(70, 46)) -> ImageRecord:
    """A one-colour PNG with a BreakHis name: its resized rows are known exactly."""
    path = folder / f"SOB_B_A-14-22549AB-40-{seq:03d}.png"
    Image.new("RGB", size, colour).save(path)
    return _record(path)


@pytest.fixture
def images(tmp_path: Path) -> list[ImageRecord]:
    src = tmp_path / "src"
    src.mkdir()
    return [_solid(src, i + 1, (10 * i, 100 + i, 200 - i)) for i in range(5)]


def test_build_content_names_and_rows(images: list[ImageRecord], tmp_path: Path) -> None:
    c = build_cache(images[::-1], 8, tmp_path / "c", workers=1)  # input order is irrelevant
    assert len(c) == 5 and c.image_size == 8
    assert c.images.shape == (5, 8, 8, 3) and c.images.dtype == np.uint8
    assert c.paths == sorted(str(r.path) for r in images)  # rows in sorted path order
    # A solid colour stays exactly that colour after resizing.
    for i in range(5):
        assert (c.images[i] == np.array([10 * i, 100 + i, 200 - i])).all()
    assert c.path.parent == tmp_path / "c"
    assert c.path.name.startswith("images-8px-") and len(c.path.stem) == len("images-8px-") + 16
    meta = json.loads(c.path.with_suffix(".json").read_text())
    assert meta["paths"] == c.paths and meta["image_size"] == 8 and meta["skipped"] == []
    # Readable by other users' trial processes (mkstemp alone would make them 0600).
    assert c.path.stat().st_mode & 0o777 == 0o644
    assert c.path.with_suffix(".json").stat().st_mode & 0o777 == 0o644
    other = _solid(tmp_path, 9, (1, 2, 3))  # never cached
    np.testing.assert_array_equal(c.rows_for([images[3], other, images[0]]), [3, -1, 0])


def test_whole_field_is_squashed_not_cropped(tmp_path: Path) -> None:
    # 700x460: left half red, right half blue, a green top-left corner the size of one
    # output pixel (700/16 x 460/16). A centre crop would cut the corner away.
    arr = np.zeros((460, 700, 3), np.uint8)
    arr[:, :350] = (255, 0, 0)
    arr[:, 350:] = (0, 0, 255)
    arr[:29, :44] = (0, 255, 0)
    path = tmp_path / "SOB_M_DC-14-13412-400-001.png"
    Image.fromarray(arr).save(path)
    # Real BreakHis has some 700x456 images: both sizes land at S x S.
    odd = tmp_path / "SOB_M_DC-14-13412-400-002.png"
    Image.fromarray(arr[:456]).save(odd)
    c = build_cache([_record(path), _record(odd)], 16, tmp_path / "c", workers=1)
    img = c.images[0].astype(int)
    assert img[8, 0].tolist() == [255, 0, 0] and img[8, 15].tolist() == [0, 0, 255]
    assert img[0, 0, 1] > 150 and img[0, 0, 0] < 100  # the corner pixel is mostly green
    assert c.images[1].shape == (16, 16, 3)


def test_second_call_reuses_without_decoding(
    images: list[ImageRecord], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = build_cache(images, 8, tmp_path / "c", workers=1)
    mtime = first.path.stat().st_mtime_ns

    def no_decode(*_: object) -> None:
        raise AssertionError("decoded again")

    monkeypatch.setattr(cache_mod, "_decode", no_decode)
    again = build_cache(images, 8, tmp_path / "c", workers=1)
    assert again.path == first.path and again.path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.images, first.images)


def test_key_changes_with_size_and_file_change(images: list[ImageRecord], tmp_path: Path) -> None:
    a = build_cache(images, 8, tmp_path / "c", workers=1)
    b = build_cache(images, 4, tmp_path / "c", workers=1)
    assert a.path != b.path and b.images.shape == (5, 4, 4, 3)
    # Replacing a file's content (new mtime/size) must not serve the stale pixels.
    Image.new("RGB", (70, 46), (7, 7, 7)).save(images[0].path)
    os.utime(images[0].path, ns=(1, 1))
    c = build_cache(images, 8, tmp_path / "c", workers=1)
    assert c.path != a.path
    assert (c.images[0] == 7).all()


def test_unreadable_images_are_skipped_with_reasons(
    images: list[ImageRecord], tmp_path: Path
) -> None:
    src = images[0].path.parent
    truncated = src / "SOB_B_A-14-22549AB-40-010.png"
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 60, 3), np.uint8))
    big.save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:400])
    garbage = src / "SOB_B_A-14-22549AB-40-011.png"
    garbage.write_bytes(b"not a png at all")
    missing = src / "SOB_B_A-14-22549AB-40-012.png"
    recs = [*images, _record(truncated), _record(garbage)]
    recs.append(ImageRecord(missing, "benign", "A", "14-22549AB", "40X", 12))
    c = build_cache(recs, 8, tmp_path / "c", workers=1)
    assert len(c) == 5 and c.images.shape[0] == 5
    reasons = {Path(s.path).name: s.reason for s in c.skipped}
    assert set(reasons) == {truncated.name, garbage.name, missing.name}
    assert all(r.startswith("unreadable image") for r in reasons.values())
    assert "truncated" in reasons[truncated.name].lower()
    np.testing.assert_array_equal(c.rows_for(recs[4:]), [4, -1, -1, -1])
    # The kept rows were compacted in order: row 4 is still image 5's colour.
    assert (c.images[4] == np.array([40, 104, 196])).all()
    reopened = open_cache(c.path)
    assert [s.path for s in reopened.skipped] == [s.path for s in c.skipped]


def test_nothing_decodable_or_nothing_given_is_a_data_error(tmp_path: Path) -> None:
    bad = tmp_path / "SOB_B_A-14-22549AB-40-001.png"
    bad.write_bytes(b"x")
    with pytest.raises(DataError, match="none of the 1 images"):
        build_cache([_record(bad)], 8, tmp_path / "c", workers=1)
    assert not list((tmp_path / "c").glob("*.npy"))
    with pytest.raises(DataError, match="empty"):
        build_cache([], 8, tmp_path / "c")
    with pytest.raises(DataError, match="image_size"):
        build_cache([_record(bad)], 0, tmp_path / "c")


def _left_behind(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def test_exception_mid_build_leaves_nothing(
    images: list[ImageRecord], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = cache_mod._decode
    calls = []

    def flaky(path: str, size: int):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-build
        return real(path, size)

    monkeypatch.setattr(cache_mod, "_decode", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_cache(images, 8, tmp_path / "c", workers=1)
    assert _left_behind(tmp_path / "c") == []
    monkeypatch.setattr(cache_mod, "_decode", real)
    assert len(build_cache(images, 8, tmp_path / "c", workers=1)) == 5


_SLOW_BUILD = """
import sys, time
from pathlib import Path
from dala_search.data import cache
from dala_search.data.breakhis import ImageRecord, parse_filename
real = cache._decode
def slow(p, s):
    time.sleep(0.2)
    return real(p, s)
cache._decode = slow
recs = []
for p in sorted(Path(sys.argv[1]).glob("*.png")):
    n = parse_filename(p.name)
    recs.append(ImageRecord(p, n.label, n.subtype, n.slide, n.magnification, n.seq))
cache.build_cache(recs, 8, sys.argv[2], workers=1)
"""


def test_killed_build_leaves_no_usable_looking_cache(
    images: list[ImageRecord], tmp_path: Path
) -> None:
    folder = tmp_path / "c"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_BUILD, str(images[0].path.parent), str(folder)], env=env
    )
    try:
        deadline = time.monotonic() + 30
        while not list(folder.glob(".*.tmp")) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert list(folder.glob(".*.tmp")), "the build never started"
        time.sleep(0.3)  # mid-build: some rows written, not all
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not list(folder.glob("*.json")) and not list(folder.glob("images-*.npy"))
    # The next build takes the lock, clears the dead builder's temp file and succeeds.
    c = build_cache(images, 8, folder, workers=1)
    assert len(c) == 5
    assert not list(folder.glob(".*.tmp"))


def _build_counting(images, folder, counter, out) -> None:  # runs in a forked child
    real = cache_mod._decode

    def counting(path: str, size: int):
        with counter.get_lock():
            counter.value += 1
        time.sleep(0.05)  # widen the race window
        return real(path, size)

    cache_mod._decode = counting
    out.put(str(build_cache(images, 8, folder, workers=1).path))


def test_concurrent_builders_decode_once(images: list[ImageRecord], tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    counter, out = ctx.Value("i", 0), ctx.Queue()
    procs = [
        ctx.Process(target=_build_counting, args=(images, tmp_path / "c", counter, out))
        for _ in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    paths = {out.get(timeout=5) for _ in procs}
    assert len(paths) == 1
    assert counter.value == 5  # one builder decoded; the others waited, then reused
    c = open_cache(paths.pop())
    assert (c.images[2] == np.array([20, 102, 198])).all()


def test_damaged_cache_is_rebuilt(images: list[ImageRecord], tmp_path: Path) -> None:
    c = build_cache(images, 8, tmp_path / "c", workers=1)
    c.path.write_bytes(c.path.read_bytes()[:200])  # truncated array, sidecar intact
    with pytest.raises(DataError, match="cannot open|does not match"):
        open_cache(c.path)
    again = build_cache(images, 8, tmp_path / "c", workers=1)
    assert again.path == c.path and (again.images[1] == np.array([10, 101, 199])).all()


def test_open_cache_refuses_incomplete(images: list[ImageRecord], tmp_path: Path) -> None:
    c = build_cache(images, 8, tmp_path / "c", workers=1)
    sidecar = c.path.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    assert open_cache(sidecar).paths == c.paths  # the sidecar path works too
    sidecar.write_text(json.dumps({**meta, "paths": meta["paths"][:4]}))
    with pytest.raises(DataError, match="does not match its sidecar"):
        open_cache(c.path)
    sidecar.unlink()
    with pytest.raises(DataError, match="not a complete image cache"):
        open_cache(c.path)


def test_pickle_sends_no_pixels(images: list[ImageRecord], tmp_path: Path) -> None:
    c = build_cache(images, 32, tmp_path / "c", workers=1)
    assert c.images.nbytes == 5 * 32 * 32 * 3
    blob = pickle.dumps(c)
    assert len(blob) < 3000  # the array is 15 kB; paths and metadata are not
    back = pickle.loads(blob)
    assert isinstance(back, ImageCache) and back._images is None  # re-opened lazily
    assert isinstance(back.images, np.memmap) and not back.images.flags.writeable
    np.testing.assert_array_equal(back.images, c.images)
    np.testing.assert_array_equal(back.rows_for(images), [0, 1, 2, 3, 4])


def test_parallel_decode_matches_serial(
    images: list[ImageRecord], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache_mod, "_MIN_PARALLEL", 0)  # use the pool even for 5 images
    par = build_cache(images, 8, tmp_path / "p", workers=2)
    ser = build_cache(images, 8, tmp_path / "s", workers=1)
    assert par.paths == ser.paths
    np.testing.assert_array_equal(par.images, ser.images)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DALA_CACHE_DIR", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("DALA_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "dala-search"


def test_core_module_imports_no_framework() -> None:
    code = (
        "import sys, dala_search.data.cache, dala_search.data.sampling, "
        "dala_search.data.synthetic; "
        "print(sorted(m for m in ('ray', 'optuna', 'mlflow') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_node_without_the_drivers_cache_builds_its_own(
    images: list[ImageRecord], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trial unpickled on a node that does not mount the driver's cache folder (no shared
    file system) decodes the same images there once; rows stay the same."""
    import shutil

    driver = build_cache(images, 8, tmp_path / "driver", workers=1)
    expected = np.array(driver.images)
    shipped = pickle.dumps(driver)
    shutil.rmtree(tmp_path / "driver")  # "another node": the driver's folder is not here
    monkeypatch.setenv("DALA_CACHE_DIR", str(tmp_path / "node"))
    on_node = pickle.loads(shipped)
    assert (on_node.images == expected).all()
    assert on_node.path.parent == tmp_path / "node"
    assert on_node.rows_for(images).tolist() == driver.rows_for(images).tolist()


def test_a_node_with_neither_cache_nor_images_says_what_to_share(
    images: list[ImageRecord], tmp_path: Path
) -> None:
    import shutil

    shipped = pickle.dumps(build_cache(images, 8, tmp_path / "driver", workers=1))
    shutil.rmtree(tmp_path / "driver")
    shutil.rmtree(images[0].path.parent)
    with pytest.raises(DataError, match="not on this node.*file system every node mounts"):
        _ = pickle.loads(shipped).images
