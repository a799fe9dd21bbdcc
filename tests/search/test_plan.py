"""plan_search's data preflight and run_search share one index of the data folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from dala_search.data import breakhis, preflight
from dala_search.search import tuner


def test_run_search_takes_the_preflight_index_once(
    tmp_path: Path, demo_root: Path, tiny_space: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = breakhis.index_breakhis

    def counting(root, **kw):  # noqa: ANN001, ANN202
        calls.append(str(root))
        return real(root, **kw)

    monkeypatch.setattr(preflight, "index_breakhis", counting)
    monkeypatch.setattr(breakhis, "index_breakhis", counting)
    plan = tuner.plan_search(
        space=str(tiny_space),
        data_dir=demo_root,
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        runs_dir=tmp_path / "runs",
    )
    assert len(calls) == 1  # the preflight read (and verified) every PNG
    index = tuner.search_index(plan)
    assert len(calls) == 1 and index.records  # ... and run_search takes that index
    again = tuner.search_index(plan)  # a second run (resume) of this plan reads the folder
    assert len(calls) == 2 and len(again.records) == len(index.records)
