"""The evaluation and baseline documents (``dala_search.runs.documents``): round trips and
strict reading (a malformed file names the file and the key)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dala_search.errors import DalaError
from dala_search.runs.documents import (
    BaselineDocument,
    EvaluationDocument,
    MetricSummary,
    ModelRow,
)


def summary(estimate: float = 0.8, low: float | None = 0.7, high: float | None = 0.9):
    return MetricSummary(
        estimate=estimate,
        ci_low=low,
        ci_high=high,
        mean=0.79,
        sd=0.02,
        values=(0.78, None, 0.8),
        n_undefined=3,
        ci_note=None if low is not None else "undefined in 900 of 2000 resamples",
    )


COMMON = dict(
    magnification="40X",
    search="s",
    protocol="folds",
    k=3,
    config={"lr": 0.01},
    synthetic=True,
    code_version="0.1.0+t",
    ci="patient-level cluster bootstrap ...",
    splits=[{"description": "fold 1"}],
    n_images=120,
    n_patients=12,
)


def evaluation() -> EvaluationDocument:
    return EvaluationDocument(
        **COMMON,
        best_run_id="abc",
        metrics={"accuracy": summary(), "roc_auc": summary(0.5, None, None)},
    )


def test_documents_round_trip_through_files(tmp_path: Path) -> None:
    ev = evaluation()
    path = ev.write(tmp_path / "evaluation" / "40X.json")
    assert EvaluationDocument.read(path, "40X") == ev
    data = json.loads(path.read_text())
    assert data["metrics"]["accuracy"]["values"] == [0.78, None, 0.8]
    assert {"estimate", "mean", "ci_low", "ci_high", "sd"} <= set(data["metrics"]["accuracy"])
    base = BaselineDocument(
        **COMMON,
        rows=[ModelRow("resnet50", {"f1": summary()})],
        dalaresnet50=ModelRow("dalaresnet50", ev.metrics),
    )
    path = base.write(tmp_path / "baselines" / "40X.json")
    assert BaselineDocument.read(path) == base
    assert (
        BaselineDocument.from_json({**base.to_json(), "dalaresnet50": None}, "x").dalaresnet50
        is None
    )
    assert summary().cell() == "0.8000 [0.7000, 0.9000]"
    assert summary(0.5, None, None).cell() == "0.5000"


def _bad(tmp_path: Path, edit) -> str:
    data = evaluation().to_json()
    edit(data)
    path = tmp_path / "40X.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DalaError) as e:
        EvaluationDocument.read(path, "40X")
    assert str(path) in str(e.value)
    return str(e.value)


def test_malformed_documents_name_the_file_and_key(tmp_path: Path) -> None:
    assert "'metrics'" in _bad(tmp_path, lambda d: d.pop("metrics"))
    assert "'k'" in _bad(tmp_path, lambda d: d.update(k="3"))
    assert "'synthetic'" in _bad(tmp_path, lambda d: d.update(synthetic=1))
    assert "'protocol'" in _bad(tmp_path, lambda d: d.update(protocol="bootstrap"))
    msg = _bad(tmp_path, lambda d: d["metrics"]["accuracy"].pop("estimate"))
    assert "'metrics.accuracy.estimate'" in msg and "missing" in msg
    msg = _bad(tmp_path, lambda d: d["metrics"]["accuracy"].update(ci_low=0.95))
    assert "'metrics.accuracy.ci_low'" in msg
    assert "'metrics.accuracy.ci_low'" in _bad(
        tmp_path, lambda d: d["metrics"]["accuracy"].update(ci_high=None)
    )
    assert "'metrics.accuracy.values'" in _bad(
        tmp_path, lambda d: d["metrics"]["accuracy"].update(values=[0.5, "x"])
    )
    assert "unknown key" in _bad(tmp_path, lambda d: d.update(extra=1))
    assert "'magnification'" in _bad(tmp_path, lambda d: d.update(magnification="100X"))
    # The t-interval documents of earlier versions: no 'estimate', a clear message.
    old = {"mean": 0.7, "ci_low": -1.45, "ci_high": 2.78, "values": [0.6, 0.8]}
    assert "run it again" in _bad(tmp_path, lambda d: d["metrics"].update(accuracy=old))
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(DalaError, match="cannot read it as JSON"):
        EvaluationDocument.read(path)


def test_baseline_rows_are_checked(tmp_path: Path) -> None:
    data = BaselineDocument(**COMMON, rows=[ModelRow("vgg16", {"f1": summary()})]).to_json()
    data["rows"][0]["metrics"]["f1"]["sd"] = "wide"
    with pytest.raises(DalaError, match=r"'rows\[0\]\.metrics\.f1\.sd'"):
        BaselineDocument.from_json(data, "b.json")


def test_documents_module_imports_no_framework() -> None:
    code = (
        "import sys, dala_search.runs.documents, dala_search.intervals; "
        "bad = [m for m in ('ray', 'optuna', 'mlflow', 'dala_search.search') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
