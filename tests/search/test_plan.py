"""check_search's data preflight hands its index to the search; plan checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from dala_search.data import breakhis, preflight
from dala_search.errors import ConfigError
from dala_search.runs.plan import SearchPlan
from dala_search.search import tuner


def _plan(tmp_path: Path, demo_root: Path, tiny_space: Path, name: str, **kw: object) -> SearchPlan:
    """``plan_search`` on the tiny space and the demo data, with stores under ``tmp_path``."""
    return tuner.plan_search(
        space=str(tiny_space),
        name=name,
        data_dir=demo_root,
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        runs_dir=tmp_path / "runs",
        **kw,
    )


def test_the_check_hands_its_index_to_the_search(
    tmp_path: Path, demo_root: Path, tiny_space: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = breakhis.index_breakhis

    def counting(root, **kw):  # noqa: ANN001, ANN202
        calls.append(str(root))
        return real(root, **kw)

    monkeypatch.setattr(preflight, "index_breakhis", counting)
    monkeypatch.setattr(breakhis, "index_breakhis", counting)
    checked = tuner.check_search(
        space=str(tiny_space),
        data_dir=demo_root,
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        runs_dir=tmp_path / "runs",
    )
    assert len(calls) == 1  # the check read (and verified) every PNG once
    assert checked.index.records and str(checked.index.root) == checked.plan.data_dir
    # run_search takes that index (the CLI passes it); a resume checks and reads again.
    checked.plan.save(new=True)  # what run_search does first
    again = tuner.check_resume(checked.plan)
    assert len(calls) == 2 and len(again.records) == len(checked.index.records)


def test_prune_on_is_checked_and_kept_in_the_saved_plan(
    tmp_path: Path, demo_root: Path, tiny_space: Path
) -> None:
    def plan(name: str, prune_on: str | None) -> SearchPlan:
        return _plan(tmp_path, demo_root, tiny_space, name, prune_on=prune_on)

    with pytest.raises(ConfigError, match=r"--prune-on: unknown metric 'loss'.*roc_auc"):
        plan("bad", "loss")
    p = plan("auc", "roc_auc")
    assert (p.tune_metric, p.tune_prune_metric) == ("val_balanced_accuracy", "val_roc_auc")
    p.save(new=True)
    assert SearchPlan.load(Path(p.folder)).prune_on == "roc_auc"
    same = plan("same", p.metric)  # the searched metric itself: nothing to switch
    assert same.prune_on is None and same.tune_prune_metric == same.tune_metric


def test_protocol_is_checked_and_kept_in_the_saved_plan(
    tmp_path: Path, demo_root: Path, tiny_space: Path
) -> None:
    from click.testing import CliRunner

    from dala_search.cli import main
    from dala_search.errors import DataError

    def plan(name: str, protocol: str, **kw: object) -> SearchPlan:
        return _plan(tmp_path, demo_root, tiny_space, name, protocol=protocol, **kw)

    p = plan("leaky", "image")
    p.save(new=True)
    assert SearchPlan.load(Path(p.folder)).protocol == "image"
    # eva: 40X only, and the synthetic data lacks eva's patients (named, before anything).
    with pytest.raises(ConfigError, match="40X only"):
        plan("eva1", "eva", magnifications="40X,100X")
    with pytest.raises(DataError, match="14 of eva's 14 validation patients"):
        plan("eva2", "eva", magnifications="40X")
    with pytest.raises(ConfigError, match="--fold 1 with --protocol image"):
        plan("fold", "image", fold=1)
    result = CliRunner().invoke(main, ["start", "--protocol", "nope"])
    assert (
        result.exit_code == 2 and "'nope' is not one of 'patient', 'image', 'eva'" in result.output
    )
