"""The search's console (search/console.py, pyfunc_model._quiet): the driver's Optuna,
MLflow-store and OptunaSearch-seed lines are raised above INFO while a search runs and put
back after; ``--verbose`` leaves them; a trial's model logging drops MLflow's per-model
"Validating input example" line. (The Ray Tune banners: tests/search/test_cv.py.)"""

from __future__ import annotations

import logging

import pytest

from dala_search.pyfunc_model import _PickleNotice
from dala_search.search.console import QUIET_LOGGERS, quiet_tune


def _record(name: str, message: str) -> logging.LogRecord:
    return logging.LogRecord(name, logging.INFO, __file__, 1, message, None, None)


@pytest.mark.parametrize("verbose", [False, True])
def test_quiet_tune_raises_the_chatty_loggers_and_restores_them(verbose: bool) -> None:
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    with quiet_tune(verbose):
        inside = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
        if verbose:  # --verbose: nothing changed
            assert inside == levels
        else:
            for name, level in QUIET_LOGGERS.items():
                assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
                assert inside[name] >= level
    assert {name: logging.getLogger(name).level for name in QUIET_LOGGERS} == levels


def test_model_logging_drops_the_validation_and_pickle_notices_only() -> None:
    notice = _PickleNotice()
    assert not notice.filter(_record("mlflow.pyfunc", "Validating input example against x"))
    assert not notice.filter(_record("mlflow.pytorch", "Saved using Pickle, may be unsafe"))
    assert notice.filter(_record("mlflow.pyfunc", "Model logged to runs:/abc/model"))
