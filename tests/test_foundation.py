"""Foundation-model backbones (issue 24): a frozen timm model's embeddings cached once, heads
searched on them, a gated model refused before any work. All offline: ``fm_tiny`` uses
timm's randomly initialised 0.4M-parameter test ResNet at 32 px. The Ray searches, the
CLI subprocess and the baselines run are marked slow (CI still runs them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dala_search.config import TrialConfig
from dala_search.errors import ConfigError

TINY = {
    "backbone": "timm:test_resnet.r160_in1k",
    "pretrained": "none",
    "image_size": 32,
    "embed_size": 32,
    "epochs": 2,
    "batch_size": 16,
    "fc1": 16,
    "fc2": 8,
    "device": "cpu",
}


def _embedding_files(folder: Path) -> dict[str, tuple[int, int]]:
    """Embedding arrays in ``folder``: name -> (inode, mtime_ns); a rebuild changes both."""
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("embeddings-*.npy")
    }


@pytest.fixture(scope="module")
def fm_search(tmp_path_factory: pytest.TempPathFactory, demo_root: Path) -> dict:
    """``start --space fm_tiny`` (3 trials, 2 at a time in Ray workers) with a cache folder
    of its own, so the embeddings are surely computed by this search."""
    import ray

    from dala_search.search.tuner import plan_search, run_search

    root = tmp_path_factory.mktemp("fm")
    cache = root / "cache"
    old = os.environ.get("DALA_CACHE_DIR")
    os.environ["DALA_CACHE_DIR"] = str(cache)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    try:
        plan = plan_search(
            space="fm_tiny", name="fm", data_dir=demo_root, tracking_uri=uri, runs_dir=root / "r"
        )
        try:
            outcomes = run_search(plan)
        finally:
            ray.shutdown()
        files = _embedding_files(cache)
    finally:
        if old is None:
            os.environ.pop("DALA_CACHE_DIR", None)
        else:
            os.environ["DALA_CACHE_DIR"] = old
    return {"root": root, "cache": cache, "uri": uri, "outcomes": outcomes, "files": files}


@pytest.mark.slow
def test_fm_tiny_search_runs_end_to_end_and_registers_an_image_model(fm_search: dict):
    import mlflow
    from mlflow import MlflowClient

    from dala_search.model.foundation import FoundationClassifier
    from dala_search.pyfunc_model import load_torch_model
    from dala_search.runs import schema

    (outcome,) = fm_search["outcomes"]
    assert (outcome.completed + outcome.pruned, outcome.failed) == (3, 0)
    assert outcome.completed >= 1
    # one array per view the trials asked for (fm_tiny searches 0 or 1 augmented views),
    # never one per trial: the 3 trials shared them
    assert 1 <= len(fm_search["files"]) <= 2
    client = MlflowClient(fm_search["uri"])
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`{schema.TAG_HAS_MODEL}` = 'true'",
    )
    assert runs, "the best trial logs its model"
    mlflow.set_tracking_uri(fm_search["uri"])
    model = load_torch_model(runs[0].data.tags[schema.TAG_MODEL_URI])
    assert isinstance(model, FoundationClassifier)
    assert runs[0].data.params["backbone"] == "timm:test_resnet.r160_in1k"
    pre = model.preprocess  # the contract `predict` reads: squash, [0, 1], normalise
    assert pre["size"] == 32 and len(pre["mean"]) == len(pre["std"]) == 3
    logits = model.eval()(torch.rand(3, 3, pre["size"], pre["size"]))
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_predict_applies_the_registered_foundation_model_head(
    fm_search: dict, demo_root: Path, tmp_path: Path
):
    """``predict NAME`` on the fm search: the registered pyfunc (frozen backbone + head over
    images, the backbone's own preprocessing) gives each 40X image two probabilities."""
    import pandas as pd
    from click.testing import CliRunner

    from dala_search.cli import main

    images = sorted(demo_root.rglob("*-40-*.png"))[:4]
    assert images, "the demo tree has 40X images"
    out = tmp_path / "preds.csv"
    args = ["predict", "fm", *map(str, images), "--out", str(out), "--device", "cpu"]
    args += ["--patients-out", str(tmp_path / "patients.csv")]
    args += ["--runs-dir", str(fm_search["root"] / "r"), "--tracking-uri", fm_search["uri"]]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    preds = pd.read_csv(out)
    assert len(preds) == len(images)
    assert set(preds["magnification"]) == {"40X"}
    total = preds["prob_benign"] + preds["prob_malignant"]
    assert np.allclose(total, 1.0, atol=1e-5)
    assert set(preds["predicted"]) <= {"benign", "malignant"}


@pytest.mark.slow
def test_a_second_search_reuses_the_embeddings(fm_search: dict, demo_root: Path):
    import ray

    from dala_search.search.tuner import plan_search, run_search

    root = fm_search["root"]
    old = os.environ.get("DALA_CACHE_DIR")
    os.environ["DALA_CACHE_DIR"] = str(fm_search["cache"])
    try:
        plan = plan_search(
            space="fm_tiny",
            name="fm2",
            data_dir=demo_root,
            tracking_uri=fm_search["uri"],
            runs_dir=root / "r",
            trials=1,
        )
        try:
            (outcome,) = run_search(plan)
        finally:
            ray.shutdown()
    finally:
        if old is None:
            os.environ.pop("DALA_CACHE_DIR", None)
        else:
            os.environ["DALA_CACHE_DIR"] = old
    assert outcome.completed == 1
    after = _embedding_files(fm_search["cache"])
    # the first search's arrays untouched (same inode and mtime); a view the first search
    # never drew may be new, nothing else
    for name, stamp in fm_search["files"].items():
        assert after[name] == stamp, name
    assert len(after) <= 2


def test_head_trials_count_backbone_passes_and_the_model_matches_the_head(
    demo_root: Path, tmp_path: Path
):
    """In one process: the backbone runs once per view and image set, the next trial
    (another head, lr, loss) reads the cache; the kept model over images gives the test
    probabilities the head gave on the cached embeddings (the preprocessing contract)."""
    from dala_search.data import embeddings
    from dala_search.train import prepare_data, train_trial
    from dala_search.train_head import train_head_trial

    data = prepare_data(demo_root, "40X", image_size=32, cache_dir=tmp_path)
    config = TrialConfig.from_dict(TINY)
    before = embeddings.FORWARD_BATCHES
    first = train_head_trial(config, data, keep_model=True)
    passes = embeddings.FORWARD_BATCHES - before
    assert passes == -(-len(data.cache) // 32)  # one pass over the images, 32 per batch
    second = train_head_trial(config.replace(head="linear", lr=1e-2), data)
    assert embeddings.FORWARD_BATCHES - before == passes  # reused
    assert second.epochs_run == 2 and set(first.test) == set(second.test)

    model = first.model
    pre = model.preprocess
    rows = data.rows[np.asarray(data.split.test)]
    x = torch.from_numpy(np.array(data.cache.images[rows])).float().div(255)
    mean, std = torch.tensor(pre["mean"]), torch.tensor(pre["std"])
    x = ((x - mean) / std).permute(0, 3, 1, 2)
    with torch.no_grad():
        prob = torch.softmax(model.eval()(x), dim=1).numpy()
    np.testing.assert_allclose(prob, np.asarray(first.test_scores["y_prob"]), atol=1e-4)
    with pytest.raises(ConfigError, match="train_head"):  # never DALAResNet50 in its place
        train_trial(config, data)


@pytest.mark.slow
def test_gated_model_offline_fails_before_any_work_without_traceback(
    tmp_path: Path, demo_root: Path
):
    space = tmp_path / "gated.yaml"
    space.write_text(
        "fixed: {backbone: 'timm:hf-hub:MahmoodLab/UNI2-h', pretrained: imagenet, epochs: 1,"
        " image_size: 32}\nparams:\n  lr: {type: float, low: 1e-4, high: 1e-2, log: true}\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_TOKEN", None)
    proc = subprocess.run(
        [sys.executable, "-m", "dala_search.cli", "start", "--space", str(space)]
        + ["--data", str(demo_root), "--runs-dir", str(tmp_path / "runs"), "--name", "gated"]
        + ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out
    for needle in ("MahmoodLab/UNI2-h", "HF_TOKEN", "HF_HUB_OFFLINE", "hf download"):
        assert needle in out, needle
    assert not (tmp_path / "runs" / "gated").exists()  # no search folder: nothing started


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"backbone": "uni2"}, "key 'backbone'"),
        ({"backbone": "timm:"}, "key 'backbone'"),
        ({"head": "mlp"}, "key 'head'"),
        ({"embed_views": -1}, "key 'embed_views'"),
        ({"pretrained": "weights.txt"}, "key 'pretrained'"),
    ],
)
def test_bad_foundation_keys_are_named(changes: dict, needle: str):
    with pytest.raises(ConfigError, match=needle):
        TrialConfig.from_dict({**TINY, **changes})


def test_an_unknown_timm_model_is_named(tmp_path: Path):
    from dala_search.model.foundation import check_weights, load_backbone

    with pytest.raises(ConfigError, match="no_such_net"):
        check_weights("timm:no_such_net", "none")
    with pytest.raises(ConfigError, match="timm:no_such_net"):
        load_backbone(TrialConfig.from_dict({**TINY, "backbone": "timm:no_such_net"}))


@pytest.mark.slow
def test_baselines_lists_a_foundation_model_row(search_copy: dict):
    """``baselines --models timm:<name>``: a linear probe on the frozen model's embeddings,
    trained with the search's recipe on the same folds, in the table and the document."""
    import json

    from click.testing import CliRunner

    from dala_search.cli import main
    from dala_search.comparison import BASELINE_METRICS

    name = "timm:test_resnet.r160_in1k"
    args = ["baselines", search_copy["name"], "--models", name, "--folds", "2", "--epochs", "1"]
    result = CliRunner().invoke(main, args + search_copy["args"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert any(line.split()[:1] == [name] for line in result.stdout.splitlines())
    path = search_copy["runs_dir"] / search_copy["name"] / "baselines" / "40X.json"
    (row,) = json.loads(path.read_text())["rows"]
    assert row["model"] == name
    assert set(row["metrics"]) == set(BASELINE_METRICS)
    assert all(len(m["values"]) == 2 for m in row["metrics"].values())


def test_augmented_views_are_their_own_cache_entries(demo_root: Path, tmp_path: Path):
    """View 0 is the plain image whatever the augmentation; an augmented view is keyed by
    the augmentation, so changing it computes that view again and nothing else."""
    from dala_search.data import embeddings
    from dala_search.model.foundation import load_backbone
    from dala_search.train import prepare_data

    data = prepare_data(demo_root, "40X", image_size=32, cache_dir=tmp_path)
    config = TrialConfig.from_dict({**TINY, "embed_views": 1})
    backbone = load_backbone(config)
    cpu = torch.device("cpu")
    plain, view = embeddings.embedding_views(data.cache, backbone, config, cpu, progress=False)
    assert plain.shape == view.shape == (len(data.cache), backbone.num_features)
    assert not np.allclose(plain, view)  # flips, crops, jitter: other features
    before = embeddings.FORWARD_BATCHES
    other = config.replace(crop_scale=0.5)
    plain2, view2 = embeddings.embedding_views(data.cache, backbone, other, cpu, progress=False)
    assert embeddings.FORWARD_BATCHES - before == -(-len(data.cache) // 32)  # view 1 only
    np.testing.assert_array_equal(plain, plain2)
    assert len(list(tmp_path.glob("embeddings-*.npy"))) == 3
