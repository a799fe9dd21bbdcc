"""Fault injection for the reliability tests: real faults, raised in real trial processes.

Off unless ``$DALA_FAULTS`` is set (the search forwards it to every trial process). Its
value is a JSON list of faults, each::

    {"kind": "raise" | "oom" | "oom_batch" | "nan" | "sigkill" | "barrier", "epoch": 1,
     "once": "/tmp/token", "delay_s": 0.5, "dir": "/tmp/arrivals", "count": 4,
     "timeout_s": 120, "above": 8}

- ``raise``: a RuntimeError after epoch ``epoch`` is reported (a bug in a trial);
- ``oom``: ``torch.cuda.OutOfMemoryError`` after epoch ``epoch`` (what a GPU that is full
  raises; the class exists on CPU builds too);
- ``oom_batch``: every training forward pass of more than ``above`` images raises
  ``torch.OutOfMemoryError``, as a GPU with room for ``above`` images would (the first
  attempt at the full batch fails, a micro-batch of ``above`` or fewer succeeds:
  ``micro_batch.py``); in every trial process (``once`` is ignored);
- ``nan``: the training loss becomes NaN from the first batch (``train_trial``'s own
  non-finite check must end the trial);
- ``sigkill``: the trial process SIGKILLs itself ``delay_s`` seconds after epoch
  ``epoch`` is reported, i.e. in the middle of the next epoch;
- ``barrier``: after epoch ``epoch`` the trial process leaves a file in ``dir`` and waits
  until ``count`` processes have (then all go on), or raises a RuntimeError after
  ``timeout_s`` seconds: proof that ``count`` trials ran at the same time.

``once`` names a token file: only the first process that creates it gets the fault, so one
trial of a search is hit and a restarted trial is not hit again. Core module: no framework
imports (torch only where a fault needs it).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any

ENV_VAR = "DALA_FAULTS"
KINDS = ("raise", "oom", "oom_batch", "nan", "sigkill", "barrier")


def _faults() -> list[dict[str, Any]]:
    raw = os.environ.get(ENV_VAR)
    if not raw:
        return []
    faults = json.loads(raw)
    for f in faults:
        if f.get("kind") not in KINDS:
            raise ValueError(f"${ENV_VAR}: unknown fault kind {f.get('kind')!r}; one of {KINDS}")
    return faults


def _claim(fault: dict[str, Any]) -> bool:
    """True for the one process that gets a ``once`` fault (atomic O_EXCL create)."""
    token = fault.get("once")
    if not token:
        return True
    try:
        fd = os.open(token, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def before_forward(images: int) -> None:
    """Before a training forward pass of ``images`` images: the oom_batch fault."""
    if not os.environ.get(ENV_VAR):  # the common case: no JSON parsed per micro-batch
        return
    for f in _faults():
        if f["kind"] == "oom_batch" and images > int(f["above"]):
            import torch

            raise torch.OutOfMemoryError(
                f"CUDA out of memory (injected fault: {images} images, room for {f['above']})"
            )


def after_epoch(epoch: int) -> None:
    """After a trial's epoch is reported: the raise, oom, sigkill and barrier faults."""
    for f in _faults():
        if f["kind"] in ("nan", "oom_batch") or int(f.get("epoch", 1)) != epoch or not _claim(f):
            continue
        if f["kind"] == "raise":
            raise RuntimeError(f"injected fault: a bug after epoch {epoch}")
        if f["kind"] == "oom":
            import torch

            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory (injected fault after epoch {epoch})"
            )
        if f["kind"] == "barrier":
            _barrier(f["dir"], int(f["count"]), float(f.get("timeout_s", 120)))
        if f["kind"] == "sigkill":
            timer = threading.Timer(
                float(f.get("delay_s", 0.5)), os.kill, args=(os.getpid(), signal.SIGKILL)
            )
            timer.daemon = True
            timer.start()


def _barrier(folder: str, count: int, timeout_s: float) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, str(os.getpid())), "w"):
        pass
    deadline = time.monotonic() + timeout_s
    while (arrived := len(os.listdir(folder))) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"injected barrier: {arrived} of {count} trial processes arrived within "
                f"{timeout_s:g} s: they did not run at the same time"
            )
        time.sleep(0.1)


def wrap_loss(loss_fn: Any) -> Any:
    """The loss, or under a ``nan`` fault one whose every value is NaN."""
    faults = [f for f in _faults() if f["kind"] == "nan"]
    if not faults or not any(_claim(f) for f in faults):
        return loss_fn

    def nan_loss(*args: Any, **kwargs: Any) -> Any:
        return loss_fn(*args, **kwargs) * float("nan")

    return nan_loss
