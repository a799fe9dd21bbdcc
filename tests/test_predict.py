"""Using a search's result: the registered pyfunc on image bytes, ``dala-search predict`` on
files (same numbers, a broken file skipped, TTA), and the real ``mlflow models serve``.

Uses the session's ``finished_search`` (a real 3-trial search at 40X, 32 px, read-only).
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from dala_search.cli import main
from dala_search.runs import schema

pytestmark = pytest.mark.slow

BEST = f"models:/{schema.model_name('40X')}@best"
GOOD = "SOB_B_A-14-22549AB-40-001.png"  # a BreakHis name: slide 14-22549AB, 40X


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def best(finished_search: dict) -> dict:
    import mlflow

    mlflow.set_tracking_uri(finished_search["tracking_uri"])
    return {"pyfunc": mlflow.pyfunc.load_model(BEST), **finished_search}


def _predict_cli(best: dict, *args: str) -> object:
    base = ["--runs-dir", str(best["runs_dir"]), "--tracking-uri", best["tracking_uri"]]
    return CliRunner().invoke(main, ["predict", *args, *base, "--device", "cpu"])


def test_pyfunc_on_png_bytes_matches_predict_and_a_broken_file_is_skipped(
    best: dict, tmp_path: Path
) -> None:
    pyfunc = best["pyfunc"]
    meta = pyfunc.metadata
    assert [c.name for c in meta.get_input_schema().inputs] == ["image"]
    assert meta.saved_input_example_info is not None
    assert meta.metadata["magnification"] == "40X" and meta.metadata["image_size"] == 32
    assert meta.metadata["class_names"] == ["benign", "malignant"]

    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (460, 700, 3), dtype=np.uint8)  # BreakHis's 700x460
    png = _png(pixels)
    out = pyfunc.predict(pd.DataFrame({"image": [png]}))
    assert list(out.columns) == ["prob_benign", "prob_malignant", "predicted"]
    assert out.loc[0, "prob_benign"] + out.loc[0, "prob_malignant"] == pytest.approx(1, abs=1e-6)

    folder = tmp_path / "images"
    folder.mkdir()
    (folder / GOOD).write_bytes(png)
    Image.fromarray(pixels[:100, :150]).save(folder / "other name.jpg")  # no slide in it
    broken = folder / "SOB_M_DC-14-2523-40-002.png"
    broken.write_bytes(png[: len(png) // 3])  # truncated: PIL fails on the full decode
    preds, patients = tmp_path / "p.csv", tmp_path / "pt.csv"
    cams = tmp_path / "cams"
    res = _predict_cli(
        best, best["name"], str(folder), "--out", str(preds), "--patients-out", str(patients),
        "--gradcam", str(cams),
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    (cam,) = cams.iterdir()  # original | overlay, at least DISPLAY_SIZE wide each
    assert cam.name == GOOD and Image.open(cam).size == (2 * 192, 192)
    assert f"skipped {broken}: unreadable image" in res.output and "skipped 2" in res.output
    table = pd.read_csv(preds, keep_default_na=False)
    assert list(table.columns) == [
        "path", "slide", "magnification", "predicted", "prob_benign", "prob_malignant"
    ]  # fmt: skip
    assert len(table) == 1  # "other name.jpg" names no magnification and -m was not given
    row = table.iloc[0]
    assert (row["slide"], row["magnification"]) == ("14-22549AB", "40X")
    assert row["predicted"] == out.loc[0, "predicted"]
    assert row["prob_malignant"] == pytest.approx(out.loc[0, "prob_malignant"], abs=1e-5)
    per_slide = pd.read_csv(patients)
    assert per_slide.to_dict("records") == [
        {
            "slide": "14-22549AB",
            "magnification": "40X",
            "n_images": 1,
            "mean_prob_benign": pytest.approx(row["prob_benign"]),
            "mean_prob_malignant": pytest.approx(row["prob_malignant"]),
            "predicted": row["predicted"],
        }
    ]


def test_predict_with_magnification_takes_any_name_and_tta_averages_8_views(
    best: dict, tmp_path: Path
) -> None:
    # A 32 px square image: no resize, so the 8 transposed files are exactly the TTA views.
    # (This tiny model may saturate on noise; test_predict_unit.py shows the views differ.)
    pixels = np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    image = tmp_path / "plain.png"
    image.write_bytes(_png(pixels))
    preds = tmp_path / "p.csv"
    res = _predict_cli(
        best, BEST, str(image), "-m", "40X", "--tta", "--out", str(preds),
        "--patients-out", str(tmp_path / "pt.csv"),
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "8 views" in res.output
    (row,) = pd.read_csv(preds, keep_default_na=False).to_dict("records")
    assert row["slide"] == ""
    views = []
    for k in range(4):
        turned = np.rot90(pixels, k)
        views += [_png(np.ascontiguousarray(turned)), _png(np.ascontiguousarray(turned[:, ::-1]))]
    each = best["pyfunc"].predict(pd.DataFrame({"image": views}))
    assert row["prob_malignant"] == pytest.approx(each["prob_malignant"].mean(), abs=1e-5)
    # The served model's own TTA parameter gives the same.
    tta = best["pyfunc"].predict(pd.DataFrame({"image": [_png(pixels)]}), params={"tta": True})
    assert tta.loc[0, "prob_malignant"] == pytest.approx(row["prob_malignant"], abs=1e-5)


def test_predict_fails_only_when_nothing_was_predicted(best: dict, tmp_path: Path) -> None:
    bad = tmp_path / GOOD
    bad.write_bytes(b"not an image")
    res = _predict_cli(best, best["name"], str(bad), "--out", str(tmp_path / "p.csv"))
    assert res.exit_code == 2, res.output
    assert "nothing could be predicted" in res.output and not (tmp_path / "p.csv").exists()


def test_mlflow_models_serve_answers_a_png(best: dict, unused_port: int) -> None:
    # The server execs `uvicorn` from PATH: the environment's bin, as in an activated venv.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": best["tracking_uri"], "PATH": path}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", BEST]
    cmd += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(unused_port)]
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{unused_port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping"
            time.sleep(1)
        pixels = np.random.default_rng(5).integers(0, 256, (460, 700, 3), dtype=np.uint8)
        png = _png(pixels)
        body = {
            "dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(png).decode()]]}
        }
        req = urllib.request.Request(
            f"{url}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            (answer,) = json.loads(r.read())["predictions"]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    local = best["pyfunc"].predict(pd.DataFrame({"image": [png]}))
    assert answer["predicted"] == local.loc[0, "predicted"]
    assert answer["prob_benign"] + answer["prob_malignant"] == pytest.approx(1, abs=1e-6)
    assert answer["prob_malignant"] == pytest.approx(local.loc[0, "prob_malignant"], abs=1e-5)
