"""The driver's progress line counts what is really running."""

from __future__ import annotations

from types import SimpleNamespace

from dala_search.search.callbacks import SearchCallback


def test_status_does_not_count_the_trial_being_ended_as_running() -> None:
    cb = SearchCallback(
        tracking_uri="sqlite:///unused.db",
        search="s",
        storage="sqlite:///unused.db",
        study_name="s-40X",
        magnification="40X",
        metric="val_balanced_accuracy",
        total=4,
    )
    ending = SimpleNamespace(status="RUNNING")
    other = SimpleNamespace(status="RUNNING")
    done = SimpleNamespace(status="TERMINATED")
    cb.counts["completed"] = 3
    cb.best = 0.75
    line = cb.status([ending, other, done], ended=ending)
    assert line.startswith("[40X] 3/4 trials done (3 completed, 0 pruned, 0 failed), 1 running")
    assert "best val_balanced_accuracy 0.7500" in line
    assert "2 running" in cb.status([ending, other, done])
