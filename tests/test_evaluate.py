"""`dala-search evaluate` and `dala-search baselines` on a real finished search.

The shared ``finished_search`` is read-only: the module fixture copies its search folder,
its MLflow store and its artifacts, and points the copy's artifact paths at the copy, so
the evaluation writes (JSON, MLflow metrics, artifacts, model tags) never touch it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dala_search.cli import main
from dala_search.comparison import BASELINE_METRICS
from dala_search.data.breakhis import index_breakhis
from dala_search.data.splits import check_disjoint
from dala_search.errors import DataError
from dala_search.evaluate import EVAL_METRICS, evaluation_table
from dala_search.folds import fold_splits

K = 2


def _slides(index, records, idx) -> set[str]:
    return {records[i].slide for i in idx}


# ---- folds and statistics (no training) ----------------------------------------------------


def test_grouped_folds_test_every_patient_once(demo_root: Path) -> None:
    index = index_breakhis(demo_root, verify=False)
    records = index.select("40X")
    assert index.folds_csv is None  # so the grouped K-fold applies
    splits = fold_splits(index, records, "folds", 3, seed=0)
    assert len(splits) == 3
    tests = [_slides(index, records, s.test) for s in splits]
    for s, test in zip(splits, tests, strict=True):
        check_disjoint(records, s)  # train/val/test patient-disjoint within the fold
        assert not (_slides(index, records, s.train) | _slides(index, records, s.val)) & test
        assert {records[i].label for i in s.test} == {"benign", "malignant"}
        assert {records[i].label for i in s.val} == {"benign", "malignant"}
    for i in range(3):
        for j in range(i + 1, 3):
            assert not tests[i] & tests[j]
    assert set().union(*tests) == {r.slide for r in records}
    # Same arguments, same folds: evaluate and baselines rely on it.
    again = fold_splits(index, records, "folds", 3, seed=0)
    assert [s.test for s in again] == [s.test for s in splits]


def test_seeds_protocol_makes_k_different_patient_splits(demo_root: Path) -> None:
    index = index_breakhis(demo_root, verify=False)
    records = index.select("40X")
    splits = fold_splits(index, records, "seeds", 3, seed=5)
    assert [s.description.split("seed ")[1].split(",")[0] for s in splits] == ["5", "6", "7"]
    assert len({s.test for s in splits}) > 1
    for s in splits:
        check_disjoint(records, s)


def test_too_many_folds_for_the_patients_is_refused(demo_root: Path) -> None:
    index = index_breakhis(demo_root, verify=False)
    records = index.select("40X")
    benign = len({r.slide for r in records if r.label == "benign"})
    with pytest.raises(DataError, match=rf"--folds {benign + 1}: .*benign"):
        fold_splits(index, records, "folds", benign + 1)


def test_official_folds_used_when_the_data_has_them(tmp_path: Path) -> None:
    from dala_search.data.synthetic import generate_demo

    root = generate_demo(
        tmp_path / "kaggle", images_per_mag=2, width=32, height=32, layout="kaggle", folds=True
    )
    index = index_breakhis(root, verify=False)
    assert index.folds_csv is not None
    records = index.select("40X")
    splits = fold_splits(index, records, "folds", 2, seed=0)
    assert [s.description.split(" (")[0] for s in splits] == ["official fold 1", "official fold 2"]
    for s in splits:
        check_disjoint(records, s)
    with pytest.raises(DataError, match=r"--folds 9: .*Folds.csv has 5 fold"):
        fold_splits(index, records, "folds", 9)


def test_tables_show_the_pooled_estimate_with_its_interval_and_the_fold_figures(
    tmp_path: Path, write_result_jsons
) -> None:
    from dala_search.comparison import baselines_table

    evaluation, baselines = write_result_jsons(tmp_path / "s", "40X")
    lines = evaluation_table(evaluation)
    assert "pooled [95% CI]" in lines[1] and "fold mean ± sd" in lines[1]
    (acc,) = [ln for ln in lines if ln.split()[0] == "accuracy"]
    assert "0.8123 [0.7012, 0.9234]" in acc and "0.8123 ± 0.0500" in acc
    assert lines[-1] == "  (patient-level cluster bootstrap (test))"
    lines = baselines_table(baselines)
    assert [ln.split()[0] for ln in lines[2:5]] == ["dalaresnet50", "densenet121", "<b>vgg16</b>"]
    assert "0.6543 [0.54, 0.77]" in lines[3]
    assert len({len(ln) for ln in lines[1:5]}) == 1  # the columns line up


# ---- end to end on a copy of the finished search (conftest.search_copy) -------------------


@pytest.fixture(scope="module")
def evaluated(search_copy: dict) -> dict:
    """`dala-search evaluate tiny --folds 2 --epochs 1 --json` on the copy."""
    result = CliRunner().invoke(
        main,
        ["evaluate", search_copy["name"], "--folds", str(K), "--epochs", "1", "--json"]
        + search_copy["args"],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    return {"out": json.loads(result.stdout), "stderr": result.stderr}


@pytest.mark.slow
def test_evaluate_writes_the_documented_json(search_copy: dict, evaluated: dict) -> None:
    (doc,) = evaluated["out"]["magnifications"]
    path = search_copy["runs_dir"] / search_copy["name"] / "evaluation" / "40X.json"
    assert json.loads(path.read_text()) == doc
    assert doc["magnification"] == "40X" and doc["search"] == search_copy["name"]
    assert doc["protocol"] == "folds" and doc["k"] == K
    assert doc["synthetic"] is True and doc["code_version"]
    assert doc["config"]["epochs"] == 1 and doc["config"]["pretrained"] == "none"
    assert set(doc["metrics"]) == set(EVAL_METRICS)
    assert doc["ci"].startswith("patient-level cluster bootstrap") and "2000 resamples" in doc["ci"]
    for name, m in doc["metrics"].items():
        assert len(m["values"]) == K, name
        if m["ci_low"] is not None:  # the interval of the pooled estimate, inside [0, 1]
            assert 0.0 <= m["ci_low"] <= m["ci_high"] <= 1.0, name
            assert m["estimate"] is not None
    acc = doc["metrics"]["accuracy"]
    assert acc["mean"] == pytest.approx(sum(acc["values"]) / K)
    # Folds: every test image once, so the pooled accuracy is the image-weighted fold mean.
    sizes = [s["test"]["n_images"] for s in doc["splits"]]
    assert doc["n_images"] == sum(sizes)
    assert acc["estimate"] == pytest.approx(
        sum(v * n for v, n in zip(acc["values"], sizes, strict=True)) / sum(sizes)
    )
    # Folds are patient-disjoint: every patient tested once, never trained on in its fold.
    tests = [set(s["test"]["slides"]) for s in doc["splits"]]
    assert not tests[0] & tests[1]
    for s in doc["splits"]:
        assert not set(s["test"]["slides"]) & (set(s["train"]["slides"]) | set(s["val"]["slides"]))
    # Progress: one line when a fold starts and one when it ends.
    assert evaluated["stderr"].count("[40X] fold 1/2") == 2
    assert "[40X] fold 2/2: test acc" in evaluated["stderr"]


@pytest.mark.slow
def test_evaluate_logs_to_mlflow(search_copy: dict, evaluated: dict) -> None:
    from mlflow import MlflowClient

    (doc,) = evaluated["out"]["magnifications"]
    client = MlflowClient(search_copy["tracking_uri"])
    exp = client.get_experiment_by_name(f"dala-search/{search_copy['name']}")
    (parent,) = client.search_runs(
        [exp.experiment_id], filter_string="tags.`dala.role` = 'magnification'"
    )
    m = parent.data.metrics
    assert m["test_accuracy_mean"] == pytest.approx(doc["metrics"]["accuracy"]["mean"])
    assert m["test_accuracy_estimate"] == pytest.approx(doc["metrics"]["accuracy"]["estimate"])
    assert m["test_accuracy_ci_low"] == pytest.approx(doc["metrics"]["accuracy"]["ci_low"])
    assert m["test_f1_ci_high"] == pytest.approx(doc["metrics"]["f1"]["ci_high"])
    assert parent.data.tags["dala.evaluation"] == f"folds k={K}"
    logged = client.download_artifacts(parent.info.run_id, "evaluation/40X.json")
    assert json.loads(Path(logged).read_text()) == doc
    # The search's registered best version carries the figures.
    model, version = parent.data.tags["dala.registered_model"].rsplit("/", 1)
    tags = client.get_model_version(model, version).tags
    assert tags["dala.eval.protocol"] == "folds" and tags["dala.eval.k"] == str(K)
    acc = doc["metrics"]["accuracy"]
    assert tags["dala.eval.test_accuracy"] == (
        f"{acc['estimate']:.4f} [{acc['ci_low']:.4f}, {acc['ci_high']:.4f}]"
    )
    # Written to the copy's artifact store, not to the shared fixture's.
    pattern = "*/artifacts/evaluation/40X.json"
    assert len(list(search_copy["artifacts"].glob(pattern))) == 1
    assert not list(search_copy["source_artifacts"].glob(pattern))


@pytest.mark.slow
def test_baselines_command_with_two_models(search_copy: dict, evaluated: dict) -> None:
    args = ["baselines", search_copy["name"], "--models", "resnet50,densenet121"]
    args += ["--folds", str(K), "--epochs", "1"] + search_copy["args"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("40X  search tiny, folds k=2 (SYNTHETIC data)")
    assert [ln.split()[0] for ln in lines[2:5]] == ["dalaresnet50", "resnet50", "densenet121"]
    # The table's columns line up under the header.
    assert len({len(ln) for ln in lines[1:5]}) == 1

    path = search_copy["runs_dir"] / search_copy["name"] / "baselines" / "40X.json"
    doc = json.loads(path.read_text())
    assert doc["magnification"] == "40X" and doc["k"] == K
    assert [r["model"] for r in doc["rows"]] == ["resnet50", "densenet121"]
    for row in doc["rows"]:
        assert set(row["metrics"]) == set(BASELINE_METRICS)
        for m in row["metrics"].values():
            assert len(m["values"]) == K
            assert {"estimate", "mean", "sd", "ci_low", "ci_high"} <= set(m)
            assert m["ci_low"] is None or 0.0 <= m["ci_low"] <= m["ci_high"] <= 1.0
    # Same folds as the evaluation, and its row beside the baselines.
    (evaluation,) = evaluated["out"]["magnifications"]
    assert doc["splits"] == evaluation["splits"]
    assert doc["dalaresnet50"]["model"] == "dalaresnet50"
    assert doc["dalaresnet50"]["metrics"]["f1"] == evaluation["metrics"]["f1"]

    from mlflow import MlflowClient

    client = MlflowClient(search_copy["tracking_uri"])
    exp = client.get_experiment_by_name(f"dala-search/{search_copy['name']}")
    (parent,) = client.search_runs(
        [exp.experiment_id], filter_string="tags.`dala.role` = 'magnification'"
    )
    acc = doc["rows"][1]["metrics"]["accuracy"]["mean"]
    assert parent.data.metrics["baseline_densenet121_test_accuracy_mean"] == pytest.approx(acc)
    logged = client.download_artifacts(parent.info.run_id, "baselines/40X.json")
    assert json.loads(Path(logged).read_text()) == doc


@pytest.mark.slow
def test_baselines_command_trains_dinov2_and_vgg16_inception(
    search_copy: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The paper's two models added in issue 20, on the synthetic search's 32 px images."""
    from huggingface_hub import constants

    folder = search_copy["runs_dir"] / search_copy["name"] / "baselines"
    # The module's search copy may hold an earlier test's baselines: a refused run must
    # leave the folder exactly as it was.
    before = sorted((p, p.stat().st_mtime_ns) for p in folder.rglob("*")) if folder.exists() else []
    models = ["--models", "dinov2_vitb14,vgg16_inception"]
    common = [search_copy["name"], *models, "--folds", str(K), "--epochs", "1"]
    common += search_copy["args"]
    # --pretrained imagenet with no network and empty caches: each model fails before any
    # training (no fold line, no document) with where to put its weights.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read by huggingface_hub at import
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    for model, where in (
        ("dinov2_vitb14", str(tmp_path / "hf" / "models--timm--vit_base_patch14_dinov2.lvd142m")),
        ("vgg16_inception", str(tmp_path / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth")),
    ):
        args = ["baselines", *common, "--pretrained", "imagenet"]
        args[args.index("--models") + 1] = model
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output + repr(result.exception)
        assert f"'{model}', pretrained='imagenet'" in result.output and where in result.output
        assert "fold 1/" not in result.output  # no training started
        now = (
            sorted((p, p.stat().st_mtime_ns) for p in folder.rglob("*")) if folder.exists() else []
        )
        assert now == before

    result = CliRunner().invoke(main, ["baselines", *common, "--pretrained", "none"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("40X  search tiny, folds k=2 (SYNTHETIC data)")
    # A dalaresnet50 row leads when an earlier test evaluated the module's search copy.
    end = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("(pooled"))
    rows = [ln.split()[0] for ln in lines[2:end]]
    assert rows in (
        ["dinov2_vitb14", "vgg16_inception"],
        ["dalaresnet50", "dinov2_vitb14", "vgg16_inception"],
    ), lines
    assert "dinov2_vitb14: 32 px images resized to 28 px" in result.stderr
    doc = json.loads((folder / "40X.json").read_text())
    assert [r["model"] for r in doc["rows"]] == ["dinov2_vitb14", "vgg16_inception"]
    for row in doc["rows"]:
        assert set(row["metrics"]) == set(BASELINE_METRICS)
        assert all(len(m["values"]) == K for m in row["metrics"].values())


def _no_network(url: str, dst: str, *args: object, **kwargs: object) -> None:
    import urllib.error

    raise urllib.error.URLError("[Errno -2] Name or service not known")


# ---- bad input: one clear line, exit 2 ------------------------------------------------------


def _run(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output


def test_unknown_search_name_exits_2(tmp_path: Path) -> None:
    for cmd in ("evaluate", "baselines"):
        code, out = _run([cmd, "nope", "--runs-dir", str(tmp_path)])
        assert code == 2 and "no search named 'nope'" in out, out


def test_unknown_model_exits_2(tmp_path: Path) -> None:
    code, out = _run(
        ["baselines", "x", "--models", "resnet50,alexnet", "--runs-dir", str(tmp_path)]
    )
    assert code == 2 and "unknown baseline model 'alexnet'" in out and "vit_b_16" in out, out


@pytest.mark.parametrize("option", [["--folds", "1"], ["--seeds", "0"]])
def test_fewer_than_two_folds_exits_2(tmp_path: Path, option: list[str]) -> None:
    for cmd in ("evaluate", "baselines"):
        code, out = _run([cmd, "x", *option, "--runs-dir", str(tmp_path)])
        assert code == 2 and f"{option[0]} {option[1]}: needs at least 2" in out, out


def test_folds_and_seeds_together_exit_2(tmp_path: Path) -> None:
    code, out = _run(["evaluate", "x", "--folds", "3", "--seeds", "3", "--runs-dir", str(tmp_path)])
    assert code == 2 and "exclude each other" in out, out


def test_magnification_not_in_the_search_exits_2(search_copy: dict) -> None:
    code, out = _run(["evaluate", search_copy["name"], "-m", "100X", *search_copy["args"]])
    assert code == 2 and "has no 100X" in out and "searched 40X" in out, out
