"""The Ray session of a search: starting Ray, the trial processes' environment, and the
resources one trial takes and how many run at once."""

from __future__ import annotations

import os

import ray

from dala_search.errors import ConfigError
from dala_search.faults import ENV_VAR
from dala_search.runs.plan import SearchPlan


def init_ray(plan: SearchPlan) -> bool:
    """Start a Ray of the search's own (or join ``--address``) unless one is running in
    this process; True when this call started it (the search then shuts it down)."""
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(
            # No --address: a Ray of our own ("local"), never a `ray start` cluster that
            # happens to run on this host (address=None would join it); "auto" joins one.
            address=plan.address or "local",
            runtime_env={"env_vars": worker_env(plan)},
            # Data-parallel trials: Ray Train's placement-group cleaner asks the state API,
            # which the dashboard serves (distributed.py frees the workers either way).
            include_dashboard=plan.workers_per_trial > 1,
            log_to_driver=True,
            logging_level="WARNING",
        )
    return started_ray


def check_cluster_tracking(plan: SearchPlan) -> None:
    """Trials on other nodes cannot write to a local tracking store: refuse before any
    record exists (``plan_search`` cannot tell what ``--address auto`` joins)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and not plan.tracking_uri.startswith(("http://", "https://")):
        ray.shutdown()
        raise ConfigError(
            f"the Ray cluster has {len(nodes)} nodes: trials on other nodes cannot write to "
            f"{plan.tracking_uri}; pass --tracking-uri http://HEAD:5000 (an MLflow server)"
        )


def worker_env(plan: SearchPlan) -> dict[str, str]:
    """Environment of every trial process: the tracking store, one malloc arena, and the
    fault-injection switch when a test set it (``dala_search/faults.py``).

    One arena: a reused trial process runs each trial in a new thread (Tune's function
    trainables), and glibc gives a new thread a new arena, so every trial faulted in fresh
    pages for its model and batches instead of reusing the last trial's freed memory (the
    cost: bench/README.md). ``$MALLOC_ARENA_MAX`` of the driver, when set, wins.
    """
    env = {
        "MLFLOW_TRACKING_URI": plan.tracking_uri,
        "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "1"),
    }

    if os.environ.get(ENV_VAR):
        env[ENV_VAR] = os.environ[ENV_VAR]
    return env


def resources(plan: SearchPlan) -> dict[str, float]:
    """The CPUs and GPUs of one trial (``--gpus-per-trial`` below 0: auto)."""
    gpus = plan.gpus_per_trial
    if gpus < 0:  # auto: a whole GPU per trial when the cluster has any
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    return {"cpu": plan.cpus_per_trial, "gpu": gpus}


def max_concurrent(plan: SearchPlan, res: dict[str, float]) -> int:
    """Explicit, or what the cluster's resources allow (so TPE isn't asked far ahead)."""
    if plan.max_concurrent:
        return plan.max_concurrent
    total = ray.cluster_resources()
    by_cpu = int(total.get("CPU", 1) // max(res["cpu"], 1e-9))
    by_gpu = int(total.get("GPU", 0) // res["gpu"]) if res["gpu"] > 0 else by_cpu
    return max(1, min(by_cpu, by_gpu))
