"""How a search driver stops when told (SIGTERM, SIGINT), within seconds, in every state.

``timeout``, Slurm and systemd send SIGTERM to the driver's whole process group, and Ctrl+C
sends SIGINT to it: Ray's own processes (GCS, raylet, trial workers), started by the driver,
get the same signal and die with it. Ray Tune then blocks for a minute in its cleanup
waiting for the dead GCS, and ``ray.shutdown`` for seconds more; Slurm kills the job 30 s
after its SIGTERM. So:

- ``DriverStop`` handles both signals for the whole of ``run_search``. Inside
  ``Tuner.fit`` it asks Tune to stop (Tune's own stop signal, SIGUSR1: Tune writes its
  experiment state one last time and leaves the running trials resumable); outside it,
  the driver stops at its next ``check`` point (``KeyboardInterrupt``, which
  ``run_search`` turns into ``SearchInterrupted``).
- A watchdog thread, started by the first signal, ends the process itself: inside
  ``Tuner.fit``, once the driver is only waiting on Ray after Tune's final state was
  written (``ray_internals.parked_in_ray``) and Ray's GCS no longer answers, or
  ``PARKED_S`` later if it does; outside it (reading data, decoding the image cache),
  ``OUTSIDE_S`` after the signal when no ``check`` point was reached (nothing there needs
  saving); whatever the state, ``HARD_S`` after the signal. Before it exits it ends the search's
  RUNNING MLflow runs through MLflow's client (``runs.rollback.close_open_runs``, no
  Ray) and prints how to resume. A second signal does the same at once.
- ``release_ray`` shuts Ray down only when its GCS answers, in a thread, bounded; when it
  cannot, ``exit_process`` leaves with ``os._exit`` (Python's exit would run Ray's atexit
  shutdown, and the interpreter crashed on a driver whose GCS was gone).
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, NoReturn

import ray

from dala_search.errors import DalaError
from dala_search.runs import rollback
from dala_search.runs.plan import SearchPlan
from dala_search.search import ray_internals

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
TUNE_STOP = signal.SIGUSR1  # Tune's handler for it sets its "experiment interrupted" flag
TUNE_SIGINT_ENV = "TUNE_DISABLE_SIGINT_HANDLER"  # SIGINT is ours, not Tune's
OUTSIDE_S = 5.0  # outside Tuner.fit (data, records): time to reach a ``check`` point
PARKED_S = 3.0  # parked in Ray (final state written) with the GCS answering: end it anyway
HARD_S = 25.0  # after the signal, whatever the state
CLOSE_S = 15.0  # at most this long to end the runs in MLflow before exiting

_ray_abandoned = False  # Ray could not be shut down: leave with os._exit


def resume_command(plan: SearchPlan) -> str:
    """The command that continues ``plan`` (a nested evaluation's inner search: the
    evaluation)."""
    if plan.outer is not None:
        return f"dala-search evaluate {plan.outer['of']} --nested {plan.outer['k']}"
    return f"dala-search resume {plan.name}"


def gcs_address() -> str | None:
    """The connected Ray's GCS as ``host:port`` (None when Ray is not initialized)."""
    if not ray.is_initialized():
        return None
    return str(ray.get_runtime_context().gcs_address)


def gcs_answers(address: str | None, timeout_s: float = 1.0) -> bool:
    """Whether Ray's GCS accepts a TCP connection (a refused one: its process is gone)."""
    if not address:
        return False
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError):
        return False
    return True


def _not_tune(signum: int, frame: Any) -> None:
    """SIGUSR1 before Tune installed its handler: ignored (the watchdog sends it again)."""


class DriverStop:
    """SIGTERM/SIGINT handling of one ``run_search`` (module docstring). ``install`` after
    ``ray.init`` (whose SIGTERM handler exits the process), ``uninstall`` when it ends."""

    def __init__(self, plan: SearchPlan) -> None:
        self.plan = plan
        self.stopped_at: float | None = None
        self.signal_name = ""
        self._gcs = gcs_address()
        self._main = threading.main_thread().ident
        self._lock = threading.RLock()  # the handler may run while the main thread holds it
        self._in_fit = False
        self._told_tune = False
        self._exiting = False
        self._previous: dict[int, Any] = {}
        self._env: str | None = None

    @property
    def requested(self) -> bool:
        return self.stopped_at is not None

    def install(self) -> DriverStop:
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach the main thread only; its owner handles them
        self._previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        self._env = os.environ.get(TUNE_SIGINT_ENV)
        os.environ[TUNE_SIGINT_ENV] = "1"
        return self

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            if handler is not None:  # None: not installed from Python (nothing to restore)
                signal.signal(s, handler)
        if self._previous:
            if self._env is None:
                os.environ.pop(TUNE_SIGINT_ENV, None)
            else:
                os.environ[TUNE_SIGINT_ENV] = self._env
        self._previous = {}

    @contextmanager
    def fit(self) -> Iterator[None]:
        """Around ``Tuner.fit``: a stop signal asks Tune to stop instead of raising."""
        if self.requested:
            raise KeyboardInterrupt
        own = threading.current_thread() is threading.main_thread()
        previous = signal.signal(TUNE_STOP, _not_tune) if own else None
        with self._lock:
            self._in_fit, self._told_tune = True, False
        try:
            yield
        finally:
            with self._lock:  # no SIGUSR1 from the watchdog once the handler is restored
                self._in_fit = False
                if own and previous is not None:
                    signal.signal(TUNE_STOP, previous)

    def check(self) -> None:
        """A safe point of the driver: raise ``KeyboardInterrupt`` once a stop was asked.

        The signal handler itself never raises: an exception at an arbitrary point broke
        MLflow's SQL parser for the rest of the process (seen: every later query refused).
        """
        if self.requested:
            raise KeyboardInterrupt

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Nothing here raises or writes to stderr (a handler that prints while the main
        # thread prints raises "reentrant call"); the watchdog thread says what happens.
        if self.requested:  # a second signal: the user insists
            threading.Thread(target=self.exit_now, args=("a second signal",)).start()
            return
        self.stopped_at = time.monotonic()
        self.signal_name = signal.Signals(signum).name
        threading.Thread(target=self._watch, name="dala-stop-watchdog", daemon=True).start()
        self._tell_tune()

    def _tell_tune(self) -> None:
        """SIGUSR1 to this process once Tune's handler for it is installed."""
        with self._lock:
            if not self._in_fit or self._told_tune:
                return
            if signal.getsignal(TUNE_STOP) in (_not_tune, signal.SIG_DFL, signal.SIG_IGN, None):
                return
            self._told_tune = True
            os.kill(os.getpid(), TUNE_STOP)

    def _watch(self) -> None:
        """Runs from the first signal until the process ends (the CLI ends it at once)."""
        assert self.stopped_at is not None
        print(
            f"\n{self.signal_name}: stopping search {self.plan.name!r} (send it again to "
            "stop at once); the records are closed and the search can be resumed",
            file=sys.stderr,
            flush=True,
        )
        while True:
            time.sleep(0.2)
            self._tell_tune()
            waited = time.monotonic() - self.stopped_at
            if not self._in_fit and waited > OUTSIDE_S:
                self.exit_now(f"the driver reached no stopping point within {OUTSIDE_S:.0f} s")
            if ray_internals.parked_in_ray(self._main):
                if not gcs_answers(self._gcs):
                    self.exit_now("Ray's processes are gone (they got the signal too)")
                if waited > PARKED_S:
                    self.exit_now(f"Ray did not stop within {PARKED_S:.0f} s")
            if waited > HARD_S:
                self.exit_now(f"the search did not stop within {HARD_S:.0f} s")

    def exit_now(self, reason: str) -> NoReturn:
        """End the search's RUNNING runs (MLflow only, bounded), say how to resume, leave."""
        with self._lock:
            if self._exiting:  # another thread is on its way out
                time.sleep(CLOSE_S + 5)
                os._exit(130)
            self._exiting = True
        print(f"stopping now: {reason}", file=sys.stderr, flush=True)
        closer = threading.Thread(
            target=rollback.close_open_runs,
            args=(self.plan.tracking_uri, self.plan.name),
            daemon=True,
        )
        closer.start()
        closer.join(CLOSE_S)
        if closer.is_alive():
            print(
                f"the MLflow store {self.plan.tracking_uri} did not answer within "
                f"{CLOSE_S:.0f} s: runs of this search may still show RUNNING",
                file=sys.stderr,
            )
        print(f"Interrupted: continue with `{resume_command(self.plan)}`", file=sys.stderr)
        _flush()
        os._exit(130)


def release_ray(timeout_s: float = 10.0) -> bool:
    """Shut Ray down when its GCS answers, within ``timeout_s``; False when it could not
    (then ``abandon_ray``)."""
    if not ray.is_initialized():
        return True
    if gcs_answers(gcs_address()):
        worker = threading.Thread(target=ray.shutdown, name="dala-ray-shutdown", daemon=True)
        worker.start()
        worker.join(timeout_s)
        if not worker.is_alive():
            return True
    abandon_ray()
    return False


def abandon_ray() -> None:
    """Leave Ray as it is; ``exit_process`` then ends the process with ``os._exit``.

    For a driver that was told to stop: the Ray processes it started share its fate (Ray
    ends them when the driver's process ends; checked by hand on Ray 2.60), a cluster ends
    the driver's job, and ``ray.shutdown`` would wait seconds on a GCS the signal killed.
    """
    global _ray_abandoned
    if ray.is_initialized():
        _ray_abandoned = True
        atexit.unregister(ray.shutdown)


def exit_process(code: int) -> NoReturn:
    """``sys.exit(code)``, or ``os._exit`` after flushing when Ray was abandoned."""
    if _ray_abandoned:
        _flush()
        os._exit(code)
    sys.exit(code)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):
            stream.flush()


def end_interrupted(plan: SearchPlan, stop: DriverStop, started_ray: bool) -> None:
    """An interrupted driver: no run of the search left RUNNING; Ray abandoned after a stop
    signal (``abandon_ray``), else shut down when this search started it."""
    rollback.close_open_runs(plan.tracking_uri, plan.name)
    if stop.requested:
        abandon_ray()
    elif started_ray:
        release_ray()


class SearchFailed(DalaError):
    """A search failed after it started; its records are kept, closed and marked failed."""

    def __init__(self, plan: SearchPlan, error: str, closed: str, marker: Path) -> None:
        again = (
            f"run `{resume_command(plan)}` again"
            if plan.outer is not None
            else f"continue it with `dala-search resume {plan.name}`, or start it afresh "
            f"under the same name with `dala-search start --name {plan.name} --overwrite` "
            "(and your other options)"
        )
        super().__init__(
            f"search {plan.name!r} failed after it started: {error}\n{closed}; Ray was shut "
            f"down; its folder {plan.folder} is kept and marked failed ({marker.name}, with "
            f"the traceback). Once the cause is fixed, {again}"
        )


def roll_back(plan: SearchPlan, error: Exception, started_ray: bool) -> SearchFailed:
    """A search that failed after its folder and records exist: Ray shut down (the trial
    processes stop first), its RUNNING runs ended (the parents FAILED with the error), the
    folder marked failed. Returns the error to raise."""
    if started_ray:
        release_ray()
    text = f"{type(error).__name__}: {error}"
    try:
        ended = rollback.close_open_runs(plan.tracking_uri, plan.name, error=text)
        closed = f"{ended} running MLflow run(s) were ended (none is left RUNNING)"
    except Exception as e:  # the store itself may be what failed
        closed = f"its MLflow runs could not be ended ({type(e).__name__}: {e})"
    marker = rollback.mark_failed(plan.folder, error)
    return SearchFailed(plan, text, closed, marker)
