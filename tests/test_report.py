"""`dala-search report` and Grad-CAM on a real finished search (the shared read-only fixture).

The report reads the search through a copy of its ``search.json`` in a tmp runs dir (the
plan's MLflow store and Optuna storage are read, never written: ``log_gradcam=False``);
MLflow logging of the overlays is covered by ``tests/browser/test_mlflow_ui.py``, which owns
its search.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dala_search.cli import main
from dala_search.report import SECTIONS, build_report


def _copy_search(finished: dict, dest: Path) -> Path:
    """A runs dir holding only the search's plan (read-only stores stay where they are)."""
    folder = dest / finished["name"]
    folder.mkdir(parents=True)
    shutil.copy(finished["runs_dir"] / finished["name"] / "search.json", folder)
    return dest


def sections_of(html: str) -> dict[str, str]:
    """Section id -> its HTML."""
    return dict(re.findall(r'<section id="([a-z]+)">(.*?)</section>', html, flags=re.S))


def missing_notes(part: str) -> list[str]:
    return [re.sub(r"\s+", " ", m) for m in re.findall(r'class="missing">(.*?)</p>', part, re.S)]


@pytest.fixture(scope="module")
def full_report(finished_search: dict, tmp_path_factory, write_result_jsons) -> dict:
    runs = _copy_search(finished_search, tmp_path_factory.mktemp("report") / "runs")
    evaluation, baselines = write_result_jsons(runs / finished_search["name"], "40X")
    out = runs.parent / "out" / "report.html"
    path = build_report(
        finished_search["name"], runs_dir=runs, out=out, log_gradcam=False, progress=False
    )
    return {"path": path, "html": path.read_text(), "evaluation": evaluation, "runs": runs}


def test_every_section_is_filled_from_its_source(full_report: dict, finished_search: dict):
    from dala_search.runs.schema import best_table

    parts = sections_of(full_report["html"])
    assert list(parts) == list(SECTIONS)
    for sid, part in parts.items():
        assert "<table" in part or "<img" in part, f"section {sid} shows nothing"
        notes = missing_notes(part)
        # The only stated gap allowed: importances of a tiny study (said why, not faked).
        assert all(n.startswith("Parameter importances: not computable") for n in notes), notes
    (row,) = best_table(finished_search["tracking_uri"], finished_search["name"])
    best = parts["best"]
    assert row["best_run_id"] in best
    assert f"<td>lr</td><td>{row['config']['lr']}</td>" in best
    acc = row["metrics"]["best_test_accuracy"]
    assert f"{acc:.4f}" in best
    # A single-split search: the report says what that risks and what --cv/--nested cost.
    assert "one validation split" in best and "<code>--cv K</code>" in best
    assert f"evaluate {finished_search['name']} --nested K" in best
    ev = parts["evaluation"]
    assert "0.8123" in ev and "[0.7012, 0.9234]" in ev and "0.8369" in ev
    assert "± 0.0500" in ev and "patient-level cluster bootstrap (test)" in ev
    cmp = parts["comparison"]
    assert "densenet121" in cmp and "0.6543 [0.5432, 0.7654]" in cmp
    assert "DALAResNet50 (searched best)" in cmp and "0.8456 [0.7345, 0.9567]" in cmp
    assert "recipe: shared recipe (DALAResNet50&#39;s tuned lr/wd)" in cmp
    # Escaped, never markup: a model name from a JSON file cannot inject HTML.
    assert "&lt;b&gt;vgg16&lt;/b&gt;" in cmp and "<b>vgg16" not in full_report["html"]
    prov = parts["provenance"]
    assert str(finished_search["plan"].data_dir) in prov
    assert "SYNTHETIC" in prov and "patient-disjoint" in prov
    assert "SYNTHETIC data" in full_report["html"].split('<section id="best">')[0]


def test_best_configuration_shows_the_searched_parameters_first(
    full_report: dict, finished_search: dict, tiny_space: Path
):
    from dala_search.report_config import split_config
    from dala_search.runs.schema import best_table

    (row,) = best_table(finished_search["tracking_uri"], finished_search["name"])
    best = sections_of(full_report["html"])["best"]
    searched, fixed = best.split('<details class="fixed">')
    searched = searched.split('<table class="config searched">')[1]
    # the tiny space's params, in its order, highlighted; nothing fixed among them
    names = re.findall(r"<tr><td>([a-z_0-9]+)</td>", searched.split("</table>")[0])
    assert names == ["attention", "fc1", "lr", "loss_weighting", "focal_gamma"]
    # the fixed rest (the space's fixed:, the options, defaults) folded away, not lost
    fixed = fixed.split("</details>")[0]
    assert "fixed settings" in fixed and "<summary>" in fixed
    for key in ("image_size", "batch_size", "epochs", "pretrained", "seed"):
        assert f"<tr><td>{key}</td><td>{row['config'][key]}</td></tr>" in fixed
    assert "<td>lr</td>" not in fixed
    assert len(re.findall("<tr><td>", fixed)) == len(row["config"]) - len(names)
    # focal_gamma only counts when the loss is focal: said so when it is not
    inactive = "not sampled for this trial" in searched
    assert inactive == (row["config"]["loss_weighting"] != "focal")
    # the table of all metrics stays after it
    assert best.index("</details>") < best.index('<table class="metrics">')
    # a space that cannot be read: everything in one table, and the page says why
    rows = split_config(row["config"], str(tiny_space.parent / "moved.yaml"))
    assert not rows.searched and len(rows.fixed) == len(row["config"])
    assert "moved.yaml" in rows.note and "cannot be read" in rows.note


def test_figures_are_files_beside_the_page_and_inlined(full_report: dict, finished_search: dict):
    from mlflow import MlflowClient

    page_dir = full_report["path"].parent
    imgs = re.findall(
        r'<img src="data:image/png;base64,([^"]+)"[^>]*data-file="([^"]+)"', full_report["html"]
    )
    assert len(imgs) >= 2 + 2 + 2  # optuna (history, parallel), confusion + ROC, Grad-CAM
    for b64, rel in imgs:
        data = base64.b64decode(b64)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert (page_dir / rel).read_bytes() == data
    # The confusion matrix is the best trial's own artifact, byte for byte.
    client = MlflowClient(finished_search["tracking_uri"])
    run_id = finished_search["outcomes"][0].best_run_id
    art = Path(
        client.download_artifacts(run_id, "figures/test_confusion_matrix.png", str(page_dir.parent))
    )
    shown = {rel: b64 for b64, rel in imgs}
    cm = next(rel for rel in shown if rel.endswith("test_confusion_matrix.png"))
    assert base64.b64decode(shown[cm]) == art.read_bytes()


def test_gradcam_shows_test_patients_of_each_class(full_report: dict, finished_search: dict):
    from PIL import Image

    from dala_search.explain import DISPLAY_SIZE, MANIFEST
    from dala_search.train import prepare_data

    plan = finished_search["plan"]
    gdir = full_report["path"].parent / "report_figures" / "40X_gradcam"
    samples = json.loads((gdir / MANIFEST).read_text())
    data = prepare_data(plan.data_dir, "40X", image_size=32, seed=plan.seed, fold=plan.fold)
    test_slides = set(data.slides(data.split.test))
    test_classes = {data.records[i].label for i in data.split.test}
    assert {s["slide"] for s in samples} <= test_slides  # held-out patients only
    assert {s["true_class"] for s in samples} == test_classes
    for s in samples:
        assert s["explained_class"] == s["predicted_class"] and 0.0 <= s["probability"] <= 1.0
        img = np.asarray(Image.open(gdir / s["file"]))
        # The cache squashes images square; original | overlay side by side, upscaled.
        assert img.shape == (DISPLAY_SIZE, 2 * DISPLAY_SIZE, 3)
        assert f'data-file="report_figures/40X_gradcam/{s["file"]}"' in full_report["html"]


def test_missing_sources_name_the_command(finished_search: dict, tmp_path: Path):
    runs = _copy_search(finished_search, tmp_path / "runs")
    name = finished_search["name"]
    path = build_report(name, runs_dir=runs, gradcam_per_class=0, progress=False)
    assert path == runs / name / "report" / "report.html"
    parts = sections_of(path.read_text())
    assert f"dala-search evaluate {name}" in " ".join(missing_notes(parts["evaluation"]))
    assert f"dala-search baselines {name}" in " ".join(missing_notes(parts["comparison"]))
    assert "left out by request" in " ".join(missing_notes(parts["gradcam"]))
    assert "<img" not in parts["gradcam"] and "<table" not in parts["evaluation"]


def test_bad_inputs_exit_2_naming_file_and_key(
    finished_search: dict, tmp_path: Path, write_result_jsons
):
    runs = _copy_search(finished_search, tmp_path / "runs")
    name = finished_search["name"]
    bad = runs / name / "evaluation" / "40X.json"
    write_result_jsons(runs / name, "40X")
    doc = json.loads(bad.read_text())
    del doc["metrics"]
    bad.write_text(json.dumps(doc))
    r = CliRunner().invoke(main, ["report", name, "--runs-dir", str(runs)])
    assert r.exit_code == 2, r.output
    assert str(bad) in r.output and "'metrics'" in r.output
    r = CliRunner().invoke(main, ["report", "nope", "--runs-dir", str(runs)])
    assert r.exit_code == 2 and "no search named 'nope'" in r.output
    r = CliRunner().invoke(main, ["report", "../x", "--runs-dir", str(runs)])
    assert r.exit_code == 2
    r = CliRunner().invoke(main, ["report", name, "--runs-dir", str(runs), "--out", "r.pdf"])
    assert r.exit_code == 2 and ".html" in r.output


def test_gradcam_overlays_on_a_fresh_model(demo_root: Path):
    """The library part alone: target layer, per-class sampling, a frozen backbone."""
    import torch

    from dala_search.explain import DISPLAY_SIZE, gradcam_overlays, target_layer
    from dala_search.model.dalaresnet import DALAResNet50, PostAttention
    from dala_search.train import prepare_data

    torch.manual_seed(0)
    # Every backbone stage frozen: gradients must still reach layer4 (through the input).
    model = DALAResNet50(2, pretrained="none", freeze_stages=4, fc1=16, fc2=16)
    layer = target_layer(model)
    assert isinstance(layer, PostAttention) and layer is model.backbone.layer4[-1]
    data = prepare_data(demo_root, "40X", image_size=32)
    items = gradcam_overlays(model, data, per_class=1, seed=3)
    classes = {data.records[i].label for i in data.split.test}
    assert sorted(s.true_class for s, _ in items) == sorted(classes)
    for _, img in items:
        assert img.dtype == np.uint8 and img.shape == (DISPLAY_SIZE, 2 * DISPLAY_SIZE, 3)
        assert not np.array_equal(img[:, :DISPLAY_SIZE], img[:, DISPLAY_SIZE:])


def test_gradcam_overlays_on_an_ensemble(demo_root: Path):
    """A cross-validated search registers an ensemble: Grad-CAM reads every member's layer."""
    import torch

    from dala_search.explain import DISPLAY_SIZE, gradcam_overlays, target_layers
    from dala_search.model.dalaresnet import DALAResNet50
    from dala_search.model.ensemble import ProbabilityEnsemble
    from dala_search.train import prepare_data

    torch.manual_seed(0)
    members = [DALAResNet50(2, pretrained="none", fc1=16, fc2=16) for _ in range(2)]
    ensemble = ProbabilityEnsemble(members)
    layers = target_layers(ensemble)
    assert [id(x) for x in layers] == [id(m.backbone.layer4[-1]) for m in members]
    data = prepare_data(demo_root, "40X", image_size=32)
    items = gradcam_overlays(ensemble, data, per_class=1, seed=3)
    assert items and all(img.shape == (DISPLAY_SIZE, 2 * DISPLAY_SIZE, 3) for _, img in items)
    probs = torch.softmax(ensemble(torch.zeros(1, 3, 32, 32)), dim=1)
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-6)
