"""What a trial used: MLflow's system metrics on the trial's own run.

Every trial run gets ``system/cpu_utilization_percentage``, ``system/system_memory_usage_*``
(and MLflow's disk and network figures) and, on a GPU trial with ``nvidia-ml-py``
installed (``pip install 'dala-search[gpu]'``), ``system/gpu_0_utilization_percentage``,
``system/gpu_0_memory_usage_*`` ... for the GPUs Ray gave that trial only (``gpu_0`` is
the trial's first), so the MLflow UI shows whether a trial kept its GPU busy.

MLflow's ``SystemMetricsMonitor`` samples in a thread; we change two things:

- its GPU monitor watches every GPU of the node (NVML ignores ``CUDA_VISIBLE_DEVICES``):
  ours keeps the trial's, the ids Ray gave it (a data-parallel trial: rank 0's);
- its samples since the last publish are dropped at ``finish``: ours publishes them, so a
  trial shorter than one interval still has its figures.

The interval is ``SAMPLING_INTERVAL_S`` (trials of a smoke search last seconds);
``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` in the environment of ``dala-search start``
overrides it (MLflow reads it in each trial process).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

_log = logging.getLogger(__name__)

SAMPLING_INTERVAL_S = 2.0

# One monitor per trial process: a reused process starts the next trial's after stopping
# the last one's (a pruned trial is stopped without reaching ``finish``).
_current: Any = None


def _trial_gpu_monitor(gpu_ids: Sequence[str]) -> Any | None:
    """MLflow's NVIDIA monitor limited to the trial's GPUs; None without any."""
    if not gpu_ids:
        return None
    try:
        import pynvml  # noqa: F401  (nvidia-ml-py; MLflow's GPUMonitor needs it imported)
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        monitor = GPUMonitor()
    except ImportError:
        _log.warning(
            "no GPU system metrics for this trial: nvidia-ml-py is not installed "
            "(pip install 'dala-search[gpu]')"
        )
        return None
    except Exception as e:  # NVML does not start (no NVIDIA driver on this node)
        _log.warning("no GPU system metrics for this trial: %s", e)
        return None
    monitor.gpu_handles = [_handle(g) for g in gpu_ids]
    monitor.num_gpus = len(monitor.gpu_handles)
    return monitor


def _handle(entry: str) -> Any:
    import pynvml

    # Ray's GPU ids are what it puts in the trial's CUDA_VISIBLE_DEVICES: indices or UUIDs.
    if entry.startswith(("GPU-", "MIG-")):
        return pynvml.nvmlDeviceGetHandleByUUID(entry)
    # A number is an index in CUDA's order, NVML's is the PCI bus order: the same on nodes
    # of one GPU model (CUDA breaks its fastest-first ties by PCI bus id).
    return pynvml.nvmlDeviceGetHandleByIndex(int(entry))


def start(
    tracking_uri: str, run_id: str, gpu_ids: Sequence[str] = (), *, resume: bool = False
) -> Any | None:
    """Start sampling into run ``run_id`` (the GPUs: Ray's ``gpu_ids`` of the trial); the
    monitor to hand to ``stop``, or None when MLflow's system metrics cannot run here (a
    warning says why)."""
    global _current
    stop(_current)
    # MLflow says at INFO that it starts, stops and skips GPUs, per trial: not console news.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError as e:  # psutil missing (a declared dependency: a broken install)
        _log.warning("no system metrics for this trial: %s", e)
        return None

    class TrialMonitor(SystemMetricsMonitor):
        def finish(self) -> None:
            """Stop, and publish the samples taken since the last publish."""
            if self._process is None:
                return
            self._shutdown_event.set()
            self._process.join()
            self._process = None
            if any(m._metrics for m in self.monitors):
                self.publish_metrics(self.aggregate_metrics())
            self.mlflow_logger.flush()

    monitor = TrialMonitor(
        run_id,
        sampling_interval=SAMPLING_INTERVAL_S,
        resume_logging=resume,
        tracking_uri=tracking_uri,
    )
    monitor.monitors = [m for m in monitor.monitors if not isinstance(m, GPUMonitor)]
    gpu = _trial_gpu_monitor(gpu_ids)
    if gpu is not None:
        monitor.monitors.append(gpu)
    monitor.start()
    _current = monitor
    return monitor


def stop(monitor: Any | None) -> None:
    """Stop ``monitor`` (from ``start``) and publish what it sampled; None: nothing."""
    global _current
    if monitor is None:
        return
    try:
        monitor.finish()
    except Exception as e:  # the figures are lost, the trial's record is not
        _log.warning("system metrics of run %s not published: %s", monitor._run_id, e)
    if _current is monitor:
        _current = None
