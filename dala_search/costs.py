"""What a model costs to run: parameters, FLOPs, latency and peak memory (``objectives.py``).

Measured once per trial, on a freshly built model of the trial's configuration on the
trial's device, before training (the architecture decides the cost, not the weights).
Inference only, in ``eval()`` mode under ``torch.inference_mode()``, on random images of the
trial's image size.

Protocol of ``latency_ms`` (per image):
* batch 1 and the search's batch (``batch_size``) are timed; the reported ``latency_ms`` is
  the batch-1 figure (what a lab tiling slides one request at a time sees);
  ``latency_ms_batch`` is the search batch's time divided by its size (throughput view);
* ``WARMUP`` untimed passes first (cuDNN autotuning, allocator, lazy inits);
* then passes are timed until ``MIN_REPEATS`` were done and ``MIN_SECONDS`` have passed,
  at most ``MAX_REPEATS``; the median is reported (robust to a busy machine's outliers);
* on CUDA each pass is closed by ``torch.cuda.synchronize()`` so the kernel time counts.
Latency on a shared machine depends on what else runs there: compare trials of one search.

``peak_mem_mb`` is ``torch.cuda.max_memory_allocated`` over one search-batch inference
(after ``reset_peak_memory_stats``), minus what was allocated before it, plus the model's
weights: what a GPU must hold to serve that batch. On a CPU there is no such counter (the
process RSS mixes every trial a reused worker ran): asking for it there is refused.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dala_search.errors import ConfigError
from dala_search.objectives import COST_METRICS

WARMUP = 3
MIN_REPEATS = 5
MAX_REPEATS = 30
MIN_SECONDS = 1.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(run: Callable[[], object], device: torch.device) -> float:
    """Median wall time of ``run()`` after ``WARMUP`` passes (the protocol above)."""
    for _ in range(WARMUP):
        run()
    _sync(device)
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < MAX_REPEATS and (
        len(times) < MIN_REPEATS or time.perf_counter() - began < MIN_SECONDS
    ):
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_params_m(model: nn.Module) -> float:
    """Parameters (trainable or not), in millions."""
    return sum(p.numel() for p in model.parameters()) / 1e6


def count_gflops(model: nn.Module, image: torch.Tensor) -> float:
    """GFLOPs of one forward pass of ``image`` (batch 1), by torch's FlopCounterMode."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(image)
    return counter.get_total_flops() / 1e9


def peak_memory_mb(model: nn.Module, batch: torch.Tensor) -> float:
    """Peak CUDA memory, MB, of one inference of ``batch``, weights included."""
    device = batch.device
    if device.type != "cuda":
        raise ConfigError(
            "cost 'peak_mem_mb' is measured on CUDA only (max_memory_allocated); this trial "
            f"runs on {device}: drop it from --objective/--constraint or search on GPUs"
        )
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    _sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        model(batch)
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) - before + weights
    return peak / 2**20


def measure_costs(
    model: nn.Module,
    *,
    image_size: int,
    batch_size: int,
    device: torch.device,
    metrics: Iterable[str] = tuple(COST_METRICS),
) -> dict[str, float]:
    """The costs named in ``metrics`` (keys of ``COST_METRICS``) of ``model`` on ``device``.

    ``latency_ms`` also adds ``latency_ms_batch`` (the search batch, per image). The model
    is put in ``eval()`` mode on ``device``; the caller builds a fresh one for this.
    """
    wanted = tuple(metrics)
    unknown = sorted(set(wanted) - set(COST_METRICS))
    if unknown:
        raise ConfigError(f"unknown cost(s) {unknown}; valid: {', '.join(COST_METRICS)}")
    model = model.to(device).eval()
    one = torch.randn(1, 3, image_size, image_size, device=device)
    batch = torch.randn(batch_size, 3, image_size, image_size, device=device)
    out: dict[str, float] = {}
    if "params_m" in wanted:
        out["params_m"] = count_params_m(model)
    if "gflops" in wanted:
        out["gflops"] = count_gflops(model, one)
    if "peak_mem_mb" in wanted:
        out["peak_mem_mb"] = peak_memory_mb(model, batch)
    if "latency_ms" in wanted:
        with torch.inference_mode():
            out["latency_ms"] = 1000 * median_seconds(lambda: model(one), device)
            per_batch = median_seconds(lambda: model(batch), device)
        out["latency_ms_batch"] = 1000 * per_batch / batch_size
    return out


def measure_config_costs(config: Any, metrics: Iterable[str]) -> dict[str, float]:
    """``measure_costs`` of a fresh model of trial ``config`` (a ``TrialConfig``) on its
    device, at its image size and batch size. Built without pretrained weights: the
    architecture decides the cost, and nothing is read from disk or the network."""
    from dala_search.model.dalaresnet import build_dalaresnet
    from dala_search.train import resolve_device

    if config.num_threads:  # the thread count the trial will train with
        torch.set_num_threads(config.num_threads)
    model = build_dalaresnet(dataclasses.replace(config, pretrained="none"))
    costs = measure_costs(
        model,
        image_size=config.image_size,
        batch_size=config.batch_size,
        device=resolve_device(config.device),
        metrics=metrics,
    )
    del model
    return costs
