"""Warm starts through Optuna's API: ``--enqueue paper``/FILE and ``--warm-start``."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from dala_search.errors import ConfigError
from dala_search.search import warm_start
from dala_search.space_file import load_space
from dala_search.warm_points import check_enqueue, check_warm_start


def _plan(tmp_path: Path, **kw: object) -> SimpleNamespace:
    base = {"name": "new", "folder": str(tmp_path / "new"), "enqueue": (), "warm_start": None}
    return SimpleNamespace(**{**base, "magnifications": ("40X", "100X"), **kw})


def test_enqueue_paper_makes_trial_0_the_papers_point(tmp_path: Path) -> None:
    smoke, paper = load_space("smoke"), load_space("paper")
    study = optuna.create_study(direction="maximize")
    done = warm_start.enqueue_for(_plan(tmp_path, enqueue=("paper",)), smoke, "40X", study)
    first = smoke.suggest(study.ask())  # what Ray's OptunaSearch does with a new trial
    assert first == smoke.fixed
    trial0 = study.trials[0]
    assert trial0.number == 0
    # every searched parameter the paper fixes, at the paper's value when the space allows it
    for name in ("attention", "leaky_slope", "lr", "loss_weighting", "sampling"):
        assert trial0.params[name] == paper.fixed[name], name
    assert study.user_attrs["enqueued"] == done and done[0]["source"] == "paper"
    # the paper's fc1 (512) is outside smoke's 64..256; focal_gamma: the paper sets none
    assert done[0]["left_to_sampler"] == ["fc1", "focal_gamma"]
    assert 64 <= trial0.params["fc1"] <= 256


def test_enqueue_file_refuses_unknown_keys_and_leaves_misfits_to_the_sampler(
    tmp_path: Path,
) -> None:
    good = tmp_path / "points.yaml"
    good.write_text("- {attention: se, fc1: 128}\n- {attention: cbam, lr: 0.001}\n")
    (path,) = check_enqueue([str(good)])
    smoke = load_space("smoke")
    points = warm_start.enqueue_points((path,), smoke)
    assert points[0]["params"] == {"attention": "se", "fc1": 128}
    assert points[1]["params"] == {"lr": 0.001} and "attention" in points[1]["left_to_sampler"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {atention: se}\n")
    with pytest.raises(ConfigError, match="atention"):
        warm_start.enqueue_points((str(bad),), smoke)
    for value in (["nope.yaml"], "paper"):
        with pytest.raises(ConfigError):
            check_enqueue(value)
    assert check_warm_start("old:40x") == "old:40X"
    with pytest.raises(ConfigError):
        check_warm_start("old:50X")


def test_warm_start_enqueues_the_best_of_another_search(tmp_path: Path, monkeypatch) -> None:
    smoke = load_space("smoke")
    storage = f"sqlite:///{tmp_path / 'old.db'}"
    old = optuna.create_study(study_name="old-100X", storage=storage, direction="maximize")
    for lr, value in ((0.001, 0.6), (0.002, 0.9), (0.003, 0.7), (0.004, 0.8)):
        old.enqueue_trial({"lr": lr, "attention": "se"})
        trial = old.ask()
        smoke.suggest(trial)
        old.tell(trial, value)
    old_plan = SimpleNamespace(storage=storage, study_name=lambda mag: f"old-{mag}")
    monkeypatch.setattr(
        "dala_search.runs.plan.open_search",
        lambda name, runs_dir: SimpleNamespace(plan=old_plan) if name == "old" else None,
    )
    study = optuna.create_study(direction="maximize")
    plan = _plan(tmp_path, warm_start="old:100X")
    done = warm_start.enqueue_for(plan, smoke, "40X", study)
    assert [p["source"] for p in done] == ["old:100X#1", "old:100X#3", "old:100X#2"]
    asked = [study.ask() for _ in range(3)]
    for trial in asked:
        smoke.suggest(trial)
    assert [t.params["lr"] for t in asked] == [0.002, 0.004, 0.003]
    # this search's own magnification only once it ran
    own = _plan(tmp_path, name="new", warm_start="new:100X")
    with pytest.raises(ConfigError, match="before"):
        warm_start.check_plan(own, smoke)
