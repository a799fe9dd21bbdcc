"""The benchmarks keep working: each runs at --tiny size and prints its JSON last.

Benchmarks are not timed tests: these check the JSON's shape and that the figures are
positive finite numbers, never a speed (bench/README.md holds the recorded figures).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# name -> the keys its goal's ratio and figures live under
CASES = {
    "pipeline": [
        "ours_img_s",
        "naive_img_s",
        "ratio",
        "naive_cached_img_s",
        "serve_only_img_s",
        "cache_build_s",
    ],
    "trial": ["trial_img_s", "bare_img_s", "ratio", "dala_fixed_batch_img_s"],
    "memory": ["data_pss_1_mib", "data_pss_4_mib", "ratio", "total_pss_1_mib"],
    "search": ["epochs_pruned", "epochs_unpruned", "ratio"],
    "overhead": ["search_s_per_trial", "loop_s_per_trial", "ray_init_s"],
    "intervals": ["vectorised_s_binary", "vectorised_s_subtype", "loop_s_binary", "ratio"],
    "selection": ["cost_ratio", "wall_ratio"],
    "protocol_gap": ["wall_s"],
    "fm_head": ["embed_s", "head_trials_per_min", "dala_trials_per_min", "ratio"],
    "gpu_search": ["search_img_s", "bare_img_s", "ratio", "cv_ratio"],
    "multiobjective": ["epochs_pruned", "epochs_unpruned", "epochs_random", "wall_s"],
}
# memory (five trial processes), search (two Ray searches) and overhead (a Ray search) take
# ~100 s together at --tiny on 2 cores: marked slow (CI still runs them). selection (16
# tiny trainings, a stand-in backbone pre-trained first) takes ~1-2 minutes.
# protocol_gap: 4 one-epoch trainings of 8 images each, ~30 s.
# gpu_search (four tiny Ray searches and a --cv 3 trial on the CPU) likewise.
# multiobjective: 6 two-epoch trainings of 16 images, ~35 s once the stand-in backbone
# (shared with selection) exists, ~2.5 minutes when it pre-trains it.
HEAVY = {
    "memory",
    "search",
    "overhead",
    "selection",
    "protocol_gap",
    "gpu_search",
    "multiobjective",
}


def _run(name: str, work: Path, *extra: str) -> dict:
    env = {**os.environ, "RAY_ADDRESS": "local"}
    proc = subprocess.run(
        [sys.executable, f"bench/{name}.py", "--tiny", "--work-dir", str(work), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    return json.loads(last)


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in CASES],
)
def test_benchmark_runs_and_prints_its_json_last(name: str, tmp_path_factory) -> None:
    work = tmp_path_factory.getbasetemp() / "bench-work"  # data shared between benchmarks
    # search also keeps its studies, which test_search_keep_then_replay... replays
    extra = ("--keep", str(_kept_search(tmp_path_factory))) if name == "search" else ()
    if name == "gpu_search":  # its figures are a GPU's; on the CPU only the code path runs
        extra = ("--device", "cpu")
    result = _run(name, work, *extra)
    assert result["benchmark"] == name
    assert result["size"] == "tiny"
    for key in CASES[name]:
        value = result[key]
        assert isinstance(value, int | float) and math.isfinite(value) and value > 0, (key, value)
    assert isinstance(result["goal"], str) and result["goal"]
    assert {"cpu", "cores", "torch"} <= set(result["machine"])
    if name == "selection":  # its figures follow from its per-seed scores, nested ones too
        check_selection_record(result)
    if name == "protocol_gap":
        check_protocol_gap_record(result)
    if name == "gpu_search":
        check_gpu_search_tiny(result)
    if name == "multiobjective":
        check_multiobjective_record(result)


def check_gpu_search_tiny(result: dict) -> None:
    """A CPU run samples no GPU and says so; the packing runs 1, 2, 4 trials at once; the
    images trained follow from epochs x epoch length; the cv trial trains 3 folds."""
    search = result["search"]
    assert search["gpu_busy"] is None and "CPU run" in search["gpu_busy_note"]
    assert search["trials"] == 2 and search["epochs_trained"] >= search["trials"]
    assert search["images_trained"] >= search["epochs_trained"]
    # img_s is rounded to 0.1 img/s in the JSON
    assert search["img_s"] == pytest.approx(search["images_trained"] / search["wall_s"], abs=0.06)
    assert [r["at_once"] for r in result["packing"]] == [1, 2, 4]
    assert result["packing"][0]["gain_vs_whole"] == 1.0
    assert len(result["cv"]["train_images_per_fold"]) == 3
    assert result["meets_ratio"] == (result["ratio"] >= 0.8)


def test_record_rewrites_only_its_block(tmp_path, monkeypatch) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import _common
    finally:
        sys.path.remove(str(ROOT / "bench"))
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- bench:x -->\nold\n<!-- /bench:x -->\nb\n<!-- bench:y -->\nkeep\n")
    monkeypatch.setattr(_common, "README", readme)
    result = {"ratio": 2.0, "machine": {**_common.machine(), "load_1m_at_start": 0.5}}

    class Args:
        tiny = quick = False

    _common.record("x", Args(), result, "ratio 2.0x")
    text = readme.read_text()
    assert "old" not in text and "ratio 2.0x" in text and '"ratio": 2.0' in text
    assert text.startswith("a\n<!-- bench:x -->\nRecorded ") and "keep" in text
    with pytest.raises(SystemExit, match="markers"):
        _common.record("z", Args(), result, "")


def test_gpu_search_record_on_cpu_is_refused_before_running() -> None:
    """gpu_search's block holds GPU figures only: recording a CPU run fails at once,
    naming the flags, instead of after four searches."""
    proc = subprocess.run(
        [sys.executable, "bench/gpu_search.py", "--tiny", "--device", "cpu", "--record"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--record" in proc.stderr and "--device cuda" in proc.stderr


def test_gpu_busy_without_nvidia_ml_py_says_why(monkeypatch) -> None:
    """No nvidia-ml-py: the busy fraction is None and the reason names the package."""
    gpu_search = _bench_module("gpu_search")
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    with gpu_search.GpuBusy() as busy:
        pass
    assert busy.fraction is None and "nvidia-ml-py" in busy.why


def _bench_module(name: str):  # noqa: ANN202
    import importlib

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_replay_follows_successive_halving() -> None:
    """``bench/search.py``'s replay: trials report epoch by epoch to the project's pruner,
    the budget's last epoch is never judged, a completed trial scores its best epoch."""
    search = _bench_module("search")
    curves = [  # rungs at epochs 1 and 3 (reduction factor 3); the budget is 3 epochs
        # never judged: Optuna's min_resource="auto" is learned from the first finished trial
        {"val_roc_auc": [0.1, 0.1, 0.1], "val_balanced_accuracy": [0.4, 0.4, 0.4]},
        # alone at the first rung: promoted; its last epoch is not judged: completes
        {"val_roc_auc": [0.6, 0.7, 0.8], "val_balanced_accuracy": [0.5, 0.9, 0.7]},
        # below trial 1 at epoch 1 (of two, only the best goes on): pruned after epoch 1
        {"val_roc_auc": [0.5, 0.9, 0.9], "val_balanced_accuracy": [0.95, 0.95, 0.95]},
        # the best of three at epoch 1: promoted; far below trial 1 at epoch 3, where a
        # judge would cut it, but epoch 3 is the budget's last: it completes
        {"val_roc_auc": [0.7, 0.1, 0.1], "val_balanced_accuracy": [0.6, 0.5, 0.5]},
    ]
    out = search.replay(curves, "sha", "val_roc_auc", "val_balanced_accuracy", 3)
    assert out["epochs_by_trial"] == [3, 3, 1, 3]
    assert out["states"] == ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE"]
    assert out["epochs"] == 10
    assert out["best"] == 0.9  # trial 1's best epoch; trial 2's 0.95 was pruned away
    # with a budget of 9 epochs, epoch 3 is a rung like any other: trial 3 is cut there
    out = search.replay(curves, "sha", "val_roc_auc", "val_balanced_accuracy", 9)
    assert out["states"] == ["COMPLETE", "COMPLETE", "PRUNED", "PRUNED"]
    # judged on balanced accuracy instead, trial 2 leads at epoch 1 and trial 3 is cut
    out = search.replay(curves, "sha", "val_balanced_accuracy", "val_balanced_accuracy", 3)
    assert out["epochs_by_trial"] == [3, 3, 3, 1] and out["best"] == 0.95


def test_shuffled_orders_show_what_the_order_decides() -> None:
    """``_orders``: a best trial that leads at every epoch survives any order; one that is
    worst at epoch 1 and best later survives only where the order lets it lead a rung."""
    search = _bench_module("search")
    flat = [
        {"val_roc_auc": [0.5 + 0.01 * i] * 9, "val_balanced_accuracy": [0.6] * 9} for i in range(5)
    ]
    leader = {"val_roc_auc": [0.9] * 9, "val_balanced_accuracy": [0.9] * 9}
    late = {"val_roc_auc": [0.1] + [0.95] * 8, "val_balanced_accuracy": [0.5] + [0.9] * 8}
    args = ("sha", "val_roc_auc", "val_balanced_accuracy", 9, 0.9)
    always = search._orders([*flat, leader], *args)
    assert always["orders"] == search.ORDERS
    assert always["best_kept"] == 1.0
    sometimes = search._orders([*flat, late], *args)
    assert 0.0 < sometimes["best_kept"] < 1.0
    assert 0.0 <= sometimes["meets_goal"] <= sometimes["best_kept"]
    assert 0.0 < sometimes["median_ratio"] <= 1.0


def test_replay_reproduces_the_recorded_search() -> None:
    """The committed curves replay to the measured pruned search, trial by trial (an Optuna
    upgrade that changes its pruners' decisions shows here first)."""
    search = _bench_module("search")
    source = ROOT / "bench" / "curves" / "search-pretrained-sha-roc_auc.json"
    doc = search._read_curves(source)
    out = search.replay(doc["curves"], doc["pruner"], doc["prune_on"], doc["metric"], doc["epochs"])
    assert out["epochs_by_trial"] == [len(m["values"]) for m in doc["measured"]]
    assert out["states"] == [m["state"] for m in doc["measured"]]
    # and they are the curves of the recorded block (bench/README.md's `bench:search`)
    text = (ROOT / "bench" / "README.md").read_text()
    block = text.split("<!-- bench:search -->", 1)[1].split("<!-- /bench:search -->", 1)[0]
    recorded = json.loads(block.split("```json", 1)[1].split("```", 1)[0])
    assert out["epochs"] == recorded["epochs_pruned"]
    assert max(v for c in doc["curves"] for v in c[doc["metric"]]) == recorded["best_unpruned"]


def _kept_search(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "bench-kept-search"


@pytest.mark.slow
def test_search_keep_then_replay_reproduces_the_measured_search(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """``--keep DIR`` then ``--replay DIR/curves.json``: the replay checks itself against
    the measured pruned search first; curves it does not reproduce are refused."""
    keep, work = _kept_search(tmp_path_factory), tmp_path / "work"
    env = {**os.environ, "RAY_ADDRESS": "local"}

    def bench(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "bench/search.py", "--work-dir", str(work), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )

    if not (keep / "curves.json").is_file():  # run alone: no search benchmark kept it
        ran = bench("--tiny", "--keep", str(keep))
        assert ran.returncode == 0, ran.stderr[-3000:]
    assert {"optuna-pruned.db", "optuna-unpruned.db", "mlflow.db", "result.json"} <= {
        p.name for p in keep.iterdir()
    }
    curves = json.loads((keep / "curves.json").read_text())
    assert (curves["pruner"], curves["prune_on"], curves["sampler"]) == (
        "sha",
        "val_roc_auc",
        "random",
    )
    assert curves["epochs"] == 1 and curves["unpruned_states"] == ["COMPLETE"]
    (measured,) = curves["measured"]
    assert measured["state"] == "COMPLETE" and len(measured["values"]) == 1
    (trial,) = curves["curves"]  # --tiny: one trial of one epoch, every metric recorded
    assert {k: len(v) for k, v in trial.items()} == {
        "val_balanced_accuracy": 1,
        "val_accuracy": 1,
        "val_f1": 1,
        "val_gmean": 1,
        "val_iba": 1,
        "val_roc_auc": 1,
    }
    assert measured["values"] == trial["val_roc_auc"]  # same trial on both sides
    replayed = bench("--replay", str(keep / "curves.json"))
    assert replayed.returncode == 0, replayed.stderr[-3000:]
    result = json.loads(replayed.stdout.strip().splitlines()[-1])
    assert result["reproduces_measured"]["epochs_by_trial"] == [1]
    assert {r["pruner"] for r in result["replays"]} == {"median", "percentile", "sha", "hyperband"}
    assert all(r["epochs"] == 1 for r in result["replays"])  # one trial, one epoch: no cut
    # a measured pruned search that the replay does not reproduce: refused, nothing printed
    measured["state"] = "PRUNED"
    (keep / "curves.json").write_text(json.dumps(curves))
    refused = bench("--replay", str(keep / "curves.json"))
    assert refused.returncode != 0
    assert "not a replay of that search" in refused.stderr
    assert not refused.stdout.strip()
    # curves a replay cannot be exact for are refused, naming why
    curves["sampler"] = "tpe"
    (keep / "curves.json").write_text(json.dumps(curves))
    refused = bench("--replay", str(keep / "curves.json"))
    assert refused.returncode != 0 and "sampler 'tpe'" in refused.stderr
    assert bench("--tiny", "--replay", str(keep / "curves.json")).returncode == 2


def test_selection_scores_pick_the_first_best_and_measure_against_the_truth() -> None:
    """``bench/selection.py``'s figures of one procedure: the selected configuration is the
    first of the tied best selection scores (as Optuna's best_trial); regret and optimism
    are measured on that one, rho over all."""
    selection = _bench_module("selection")

    class R:
        def __init__(self, val: float, truth: float) -> None:
            self.best = {"val_balanced_accuracy": val}
            self.test = {"balanced_accuracy": truth}

    out = selection.scores([R(0.9, 0.6), R(0.9, 0.8), R(0.7, 0.85), R(0.5, 0.5)])
    assert out["chosen"] == 0
    assert out["regret"] == pytest.approx(0.25) and out["optimism"] == pytest.approx(0.3)
    assert -1 <= out["spearman"] < 1
    out = selection.scores([R(0.6, 0.6), R(0.7, 0.7), R(0.8, 0.8)])
    assert out == {**out, "chosen": 2, "regret": 0.0, "optimism": 0.0, "spearman": 1.0}
    assert selection.scores([R(0.5, 0.6), R(0.5, 0.7)])["spearman"] is None  # all tied


def test_recorded_selection_figures_follow_from_its_scores() -> None:
    """bench/README.md's `bench:selection` block: the issue's sizes, and every rho, regret
    and optimism (per seed and the medians) recomputed from the recorded selection and
    truth scores, and ``goal_met`` from the medians."""
    text = (ROOT / "bench" / "README.md").read_text()
    block = text.split("<!-- bench:selection -->", 1)[1].split("<!-- /bench:selection -->", 1)[0]
    if "```json" not in block:
        pytest.skip("bench:selection is not recorded yet (python bench/selection.py --record)")
    rec = json.loads(block.split("```json", 1)[1].split("```", 1)[0])
    setup = rec["setup"]
    assert rec["size"] == "full" and setup["development_patients"] == 82
    assert setup["truth_patients"] >= 80 and setup["configs"] >= 16 and setup["seeds"] >= 5
    check_selection_record(rec)


def check_selection_record(rec: dict) -> None:
    """The figures of a `bench/selection.py` JSON follow from its per-seed scores."""
    selection = _bench_module("selection")

    class R:
        def __init__(self, val: float, truth: float) -> None:
            self.best = {"val_balanced_accuracy": val}
            self.test = {"balanced_accuracy": truth}

    assert len(rec["per_seed"]) == rec["setup"]["seeds"]
    for row in rec["per_seed"]:
        for side in ("single", "cv"):
            got = row[side]
            assert len(got["selection"]) == len(got["truth"]) == rec["setup"]["configs"]
            pairs = zip(got["selection"], got["truth"], strict=True)
            again = selection.scores([R(v, t) for v, t in pairs])
            sel, truth, chosen = got["selection"], got["truth"], got["chosen"]
            # The chosen one has the highest selection score; two scores apart by less than
            # the 4-digit rounding may tie here, so regret and optimism use the recorded pick.
            assert sel[chosen] == max(sel), (row["seed"], side)
            again["regret"] = max(truth) - truth[chosen]
            again["optimism"] = sel[chosen] - truth[chosen]
            # From 4-digit roundings: two truth or selection scores apart by less than 1e-4
            # tie after rounding, which moves rho over 16 configurations by a few hundredths.
            tolerance = {"regret": 3e-4, "optimism": 3e-4, "spearman": 0.05}
            for key in ("regret", "optimism", "spearman"):
                if got[key] is None:  # every selection score tied
                    assert again[key] is None
                else:
                    assert again[key] == pytest.approx(got[key], abs=tolerance[key]), (
                        row["seed"],
                        side,
                        key,
                    )
    for key in ("spearman", "regret", "optimism"):
        for side in ("single", "cv"):
            per_seed = [row[side][key] for row in rec["per_seed"]]
            assert rec[f"{key}_{side}_per_seed"] == per_seed
            assert rec[f"{key}_{side}"] == selection.med(per_seed)
    for row in rec["per_seed"]:  # the final figures: the single split's chosen one
        final = row["final"]
        assert final["chosen"] == row["single"]["chosen"]
        assert final["truth"] == pytest.approx(row["single"]["truth"][final["chosen"]], abs=1e-4)
        for kind in ("non_nested", "nested"):
            assert 0 <= final[kind] <= 1
            err = final[kind] - final["truth"]
            assert final[f"{kind}_error"] == pytest.approx(err, abs=2e-4)
    for kind in ("non_nested", "nested"):
        errors = [row["final"][f"{kind}_error"] for row in rec["per_seed"]]
        assert rec[f"error_{kind}"] == selection.med(errors)
        assert rec[f"abs_error_{kind}"] == selection.med([abs(e) for e in errors])
    rs, rc = rec["spearman_single"], rec["spearman_cv"]
    met = (
        rec["regret_cv"] <= selection.HALF * rec["regret_single"]
        and abs(rec["optimism_cv"]) <= selection.HALF * abs(rec["optimism_single"])
        and rs is not None
        and rc is not None
        and rc > rs
    )
    assert rec["goal_met"] == met


def test_recorded_protocol_gap_follows_from_its_seeds() -> None:
    """bench/README.md's `bench:protocol_gap` block: several seeds, each gap the image-level
    minus the patient-level figure of the same seed, and the summary from the seeds."""
    text = (ROOT / "bench" / "README.md").read_text()
    block = text.split("<!-- bench:protocol_gap -->", 1)[1]
    block = block.split("<!-- /bench:protocol_gap -->", 1)[0]
    if "```json" not in block:
        pytest.skip(
            "bench:protocol_gap is not recorded yet (python bench/protocol_gap.py --record)"
        )
    rec = json.loads(block.split("```json", 1)[1].split("```", 1)[0])
    assert rec["size"] == "full" and rec["setup"]["seeds"] >= 3
    check_protocol_gap_record(rec)


def check_protocol_gap_record(rec: dict) -> None:
    """The figures of a `bench/protocol_gap.py` JSON follow from its per-seed estimates."""
    import statistics

    assert [r["seed"] for r in rec["per_seed"]] == list(range(rec["setup"]["seeds"]))
    for row in rec["per_seed"]:
        assert row["patient"]["slides_on_several_sides"] == 0  # patient folds never leak
        assert row["image"]["slides_on_several_sides"] > 0
        for m in ("accuracy", "balanced_accuracy"):
            p, i = row["patient"][m], row["image"][m]
            assert 0 <= p <= 1 and 0 <= i <= 1
            assert row["gap_points"][m] == pytest.approx((i - p) * 100, abs=0.02)
    for m in ("accuracy", "balanced_accuracy"):
        gaps = [row["gap_points"][m] for row in rec["per_seed"]]
        got = rec["gap_points"][m]
        assert got["mean"] == pytest.approx(statistics.fmean(gaps), abs=0.01)
        assert (got["min"], got["max"]) == (min(gaps), max(gaps))
        if len(gaps) > 1:
            assert got["sd"] == pytest.approx(statistics.stdev(gaps), abs=0.01)
    above = sum(row["gap_points"]["accuracy"] > 0 for row in rec["per_seed"])
    assert rec["seeds_image_above_patient"] == above
    assert rec["goal_met"] == (above == len(rec["per_seed"]))


def check_multiobjective_record(rec: dict) -> None:
    """The figures of a `bench/multiobjective.py` JSON follow from its per-trial rows."""
    import statistics

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import multiobjective as bench
    finally:
        sys.path.remove(str(ROOT / "bench"))
    lo, hi = rec["settings"]["params_m_range"]
    assert 0 < lo < hi
    for arm in ("pruned", "unpruned", "random"):
        per_seed = [row[arm] for row in rec["per_seed"]]
        for side in per_seed:
            trials = side["trials"]
            assert len(trials) == rec["settings"]["trials"]
            assert side["epochs"] == sum(t["epochs"] for t in trials)
            done = [(t["val_bacc"], t["params_m"]) for t in trials if not t["pruned"]]
            assert side["hypervolume"] == pytest.approx(bench.hypervolume(done, lo, hi), abs=1e-4)
            assert 0 <= side["hypervolume"] <= 1.1
            if arm != "pruned":  # only the pruned arm may stop a trial early
                assert not any(t["pruned"] for t in trials)
                assert all(t["epochs"] == rec["settings"]["epochs"] for t in trials)
        assert rec[f"hv_{arm}"] == pytest.approx(
            statistics.median(s["hypervolume"] for s in per_seed), abs=1e-4
        )
    assert rec["epochs_saved"] == pytest.approx(rec["epochs_unpruned"] - rec["epochs_pruned"])
    # the hypervolume itself: one point at perfect accuracy on the smallest model fills
    # the box up to the reference point (1, 1.1); a point at chance adds nothing
    assert bench.hypervolume([(1.0, lo)], lo, hi) == pytest.approx(1.1)
    assert bench.hypervolume([(0.5, lo)], lo, hi) == 0.0
