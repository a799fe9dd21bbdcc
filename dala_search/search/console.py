"""A console that is ours: a search prints dala-search's progress lines, not Ray Tune's.

Ray Tune's "new output" engine (``RAY_AIR_NEW_OUTPUT``, on by default in Ray 2.60) prints
a banner when each magnification's experiment starts, whatever ``RunConfig.verbose`` says:
the "Configuration for experiment" box, "View detailed results here: <ray folder>" and a
TensorBoard hint for logs we do not use (``ray/tune/tune.py`` calls ``experiment_started``
on its progress reporter before looking at the verbosity). Its older reporter prints
nothing at ``verbose=0``, which every search's ``RunConfig`` sets (and a resumed
experiment keeps), so ``quiet_tune`` selects the older one for the driver's ``Tuner.fit``
calls. ``--verbose`` leaves Ray's default and its banners.

What matters still reaches the user: ``callbacks.SearchCallback`` prints a line per trial
that ends (completed, pruned, failed) and per trial Tune restarts after its process or
node was lost; Ray's own warnings and errors go through its loggers (``logging_level``
WARNING), which this does not touch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

NEW_OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"  # read by ray.tune.experimental.output at each fit

# Driver-side lines that repeat what our own lines say, or warn about what we do on
# purpose, raised to the level below while a search runs (``--verbose`` keeps them):
QUIET_LOGGERS = {
    "optuna": logging.WARNING,  # "[I ...] A new study created in RDB": our header names it
    "mlflow.store.db.utils": logging.WARNING,  # "Creating initial MLflow database tables"
    # "You passed an initialized sampler ... seed ... ignored": our samplers are seeded
    # (make_sampler); OptunaSearch's own seed is a no-op we pass for its records.
    "ray.tune.search.optuna.optuna_search": logging.ERROR,
}


@contextmanager
def quiet_tune(verbose: bool) -> Iterator[None]:
    """Around a search's ``Tuner.fit`` calls: Ray Tune's banners only when ``verbose``."""
    if verbose:
        yield
        return
    previous = os.environ.get(NEW_OUTPUT_ENV)
    os.environ[NEW_OUTPUT_ENV] = "0"
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(max(level, logging.getLogger(name).level))
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if previous is None:
            os.environ.pop(NEW_OUTPUT_ENV, None)
        else:
            os.environ[NEW_OUTPUT_ENV] = previous
