"""Benchmark 8: the GPU over a whole search, at the size of one BreakHis magnification.

The ``default`` space (``search_spaces/default.yaml``) at 224 px with ``pretrained: none``
(no download; the compute is the same as from ImageNet weights), its TPE sampler and median
pruner, on a synthetic magnification of BreakHis's size (``per_mag`` images per patient at
40X, ~2,000 in all, from 700x460 PNG sources), one GPU. All figures come from this run:

- ``search_img_s``: images trained per second over the whole search, from ``run_search``'s
  call to its return on a fresh Ray (gaps between trials, validation, precise BatchNorm,
  MLflow logging and Ray scheduling included; the one-off decode into the image cache is
  done before, as a data set's first search does it once: ``cache_build_s``), divided by
  ``bare_img_s``: torchvision's resnet50 stepping AdamW on one in-memory batch of 64 at the
  same size (bf16 autocast, channels_last, as a CUDA trial), measured before and after the
  search. Images trained = each trial's epochs run (its MLflow ``train_loss`` history) times
  its epoch's length under its ``sampling`` (``data.sampling.epoch_indices``). Goal >= 0.8.
- ``gpu_busy``: NVML's GPU utilisation sampled every 0.5 s over the search (optional:
  needs ``nvidia-ml-py``; without it the figure is None and the summary says why).
- ``packing``: one short search (seeded random sampler, no pruning: the same configurations
  each time) with a whole GPU per trial, ``--gpus-per-trial 0.5`` and ``0.25``: images
  trained per second of each. On a CPU (``--tiny``, the tests) the three run with no GPU
  and 1, 2 and 4 trials at once, only to keep the code path working.
- ``cv``: one configuration trained with ``--cv 3`` (``train_cv_trial``: the folds share one
  resident copy of the non-test images) vs on the single split (``train_trial``), seconds
  per trial, interleaved; peak GPU memory of each. Goal <= 3.2x.

    python bench/gpu_search.py --device cuda [--quick] [--data DIR] [--record]
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "search_spaces" / "default.yaml"
# per_mag: images per patient and magnification (x ~25 synthetic patients at 40X);
# pack_*: the packing searches; cv_epochs: the --cv 3 vs single-split trials; bare_*: the
# fixed-batch ResNet50 (batch, timed steps); reps: cv comparisons
SIZES = {
    "tiny": dict(per_mag=2, width=96, height=64, px=32, trials=2, epochs=2, pack_trials=2,
                 pack_epochs=1, cv_epochs=1, bare_batch=8, bare_steps=2, reps=1),
    "quick": dict(per_mag=84, width=700, height=460, px=224, trials=16, epochs=3,
                  pack_trials=4, pack_epochs=1, cv_epochs=1, bare_batch=64, bare_steps=20,
                  reps=1),
    "full": dict(per_mag=84, width=700, height=460, px=224, trials=16, epochs=6,
                 pack_trials=8, pack_epochs=2, cv_epochs=2, bare_batch=64, bare_steps=30,
                 reps=2),
}  # fmt: skip
PACKING = (1.0, 0.5, 0.25)  # GPUs per trial
CV_GOAL, RATIO_GOAL = 3.2, 0.8


class GpuBusy:
    """NVML utilisation of GPU 0 sampled on a thread while the block runs.

    ``fraction``: the mean of the samples / 100, or None with ``why`` saying why (no
    ``nvidia-ml-py``, no driver, no sample)."""

    def __init__(self, period_s: float = 0.5, *, gpu: bool = True) -> None:
        self.period_s, self.samples, self.fraction, self.why = period_s, [], None, ""
        self._stop = threading.Event()
        self._nvml = self._handle = self._thread = None
        self.gpu = gpu

    def __enter__(self) -> GpuBusy:
        if not self.gpu:
            self.why = "a CPU run: no GPU to sample"
            return self
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except ImportError:
            self.why = "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
        except Exception as error:  # NVMLError: no driver, no device
            self.why = f"NVML unavailable: {error}"
        if self._handle is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.period_s):
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._nvml.nvmlShutdown()
            if self.samples:
                self.fraction = round(sum(self.samples) / len(self.samples) / 100, 3)
            else:
                self.why = "no NVML sample (the block ended within one period)"


def write_space(out: Path, *, px: int, trials: int, epochs: int, packing: bool) -> Path:
    """The default space with ``pretrained: none`` at ``px``, one magnification (40X);
    ``packing``: a seeded random sampler and no pruner, so each packing search trains the
    same configurations."""
    import yaml

    doc = yaml.safe_load(SPACE.read_text())
    doc["name"] = "default-bench-packing" if packing else "default-bench"
    doc["fixed"].update(pretrained="none", image_size=px, epochs=epochs)
    doc["search"].update(trials=trials, magnifications=["40X"])
    if packing:
        doc["search"].update(sampler="random", pruner="none")
    path = out / f"{doc['name']}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def images_trained(uri: str, name: str, data) -> tuple[int, int]:  # noqa: ANN001
    """(images, epochs) the search's trials trained: epochs run x the epoch's length."""
    from mlflow import MlflowClient

    from dala_search.data.sampling import epoch_indices
    from dala_search.runs import schema

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(schema.experiment_name(name))
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{schema.TAG_ROLE}` = 'trial'"
    )
    import numpy as np

    train_labels = data.labels("binary")[np.asarray(data.split.train, dtype=np.int64)]
    images = epochs = 0
    for run in runs:
        ran = len(client.get_metric_history(run.info.run_id, "train_loss"))
        length = len(epoch_indices(train_labels, run.data.params["sampling"], seed=1))
        images, epochs = images + ran * length, epochs + ran
    return images, epochs


def run_one_search(space: Path, name: str, root: Path, scratch: Path, data, **options):  # noqa: ANN001, ANN003, ANN201
    """A search on a fresh Ray, timed from ``run_search``'s call to its return, with NVML
    sampling; returns its figures."""
    import ray

    from dala_search.search.tuner import plan_search, run_search

    scratch.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{scratch / 'mlflow.db'}"
    plan = plan_search(
        space=str(space), name=name, data_dir=root, tracking_uri=uri, runs_dir=scratch / "runs",
        seed=0, **options,
    )  # fmt: skip
    ray.shutdown()  # each search starts its own Ray, as `dala-search start` does
    with GpuBusy(gpu=options.get("gpus_per_trial", 1) != 0) as busy:
        start = time.perf_counter()
        (outcome,) = run_search(plan)
        wall = time.perf_counter() - start
    ray.shutdown()
    if outcome.failed:
        raise SystemExit(f"search {name}: {outcome.failed} trial(s) failed")
    images, epochs = images_trained(uri, plan.name, data)
    c.log(f"search {name}: {outcome.finished} trials, {epochs} epochs, {wall:.1f} s")
    return {
        "wall_s": round(wall, 2),
        "images_trained": images,
        "epochs_trained": epochs,
        "img_s": round(images / wall, 1),
        "trials": outcome.finished,
        "completed": outcome.completed,
        "pruned": outcome.pruned,
        "gpu_busy": busy.fraction,
        "gpu_busy_note": busy.why or None,
    }


def bare_img_s(device, size: dict) -> float:  # noqa: ANN001
    import torch
    import torchvision
    from trial import fixed_batch_img_s

    torch.manual_seed(0)
    return fixed_batch_img_s(
        torchvision.models.resnet50(num_classes=2),
        device=device,
        batch_size=size["bare_batch"],
        px=size["px"],
        steps=size["bare_steps"],
        lr=1e-3,
        amp=device.type == "cuda",
    )


def cv_vs_single(data, device, size: dict) -> dict:  # noqa: ANN001
    """Seconds per trial, ``--cv 3`` vs the single split, one configuration, interleaved;
    peak GPU memory of each (the folds share one resident copy of the images)."""
    import torch

    from dala_search.config import TrialConfig
    from dala_search.data import protocols
    from dala_search.train import train_trial
    from dala_search.train_cv import train_cv_trial

    config = TrialConfig(
        pretrained="none",
        image_size=size["px"],
        batch_size=size["bare_batch"],
        epochs=size["cv_epochs"],
        device=str(device),
    )
    folds = protocols.protocol_inner_folds(data.records, data.split, 3, seed=0, protocol="patient")
    peaks: dict[str, float] = {}

    def timed(name: str, fn) -> float:  # noqa: ANN001
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peaks[name] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        return time.perf_counter() - start

    def single() -> float:
        return timed("single", lambda: train_trial(config, data))

    def cv3() -> float:
        return timed("cv3", lambda: train_cv_trial(config, data, folds))

    single()  # warm-up: cuDNN/cuBLAS set-up, allocator, first torch ops
    runs = c.interleave({"single": single, "cv3": cv3}, size["reps"])
    s, k = c.median(runs["single"]), c.median(runs["cv3"])
    return {
        "single_s": round(s, 2),
        "cv3_s": round(k, 2),
        "cv_ratio": round(k / s, 3),
        "epochs": size["cv_epochs"],
        "train_images_single": len(data.split.train),
        "train_images_per_fold": [len(f.train) for f in folds],
        "peak_gib": peaks or None,
        "runs_s": {n: [round(v, 2) for v in vs] for n, vs in runs.items()},
    }


def packing(space: Path, root: Path, scratch: Path, data, cuda: bool) -> list[dict]:  # noqa: ANN001
    """The packing search at each of PACKING (on a CPU: no GPU, 1/fraction trials at once)."""
    out = []
    for fraction in PACKING:
        at_once = round(1 / fraction)
        options = (
            {"gpus_per_trial": fraction}
            if cuda
            else {"gpus_per_trial": 0, "max_concurrent": at_once}
        )
        name = f"packing-{at_once}"
        figures = run_one_search(space, name, root, scratch, data, **options)
        out.append({"gpus_per_trial": fraction if cuda else None, "at_once": at_once, **figures})
    return out


def _pack_line(r: dict) -> str:
    where = f"GPUs per trial {r['gpus_per_trial']:g}" if r["gpus_per_trial"] else "no GPU"
    busy = f"{r['gpu_busy']:.1%}" if r["gpu_busy"] is not None else "not measured"
    return (
        f"  {where}, {r['at_once']} at once at most: {r['img_s']:.1f} img/s "
        f"({r['gain_vs_whole']:.2f}x the whole GPU's), {r['wall_s']:.1f} s, GPU busy {busy}"
    )


def finish_record(args, size, data, cache_build_s, bare, search, packed, cv, load0, device):  # noqa: ANN001, ANN201
    """The JSON, the summary, and with --record the ``bench:gpu_search`` block."""
    bare_s = c.median(bare)
    ratio = search["img_s"] / bare_s
    whole = packed[0]["img_s"]
    result = {
        "search_img_s": search["img_s"],
        "bare_img_s": round(bare_s, 1),
        "ratio": round(ratio, 3),
        "gpu_busy": search["gpu_busy"],
        "cv_ratio": cv["cv_ratio"],
        "search": search,
        "bare_runs_img_s": [round(v, 1) for v in bare],
        "packing": [{**r, "gain_vs_whole": round(r["img_s"] / whole, 3)} for r in packed],
        "cv": cv,
        "images": len(data.records),
        "train_images": len(data.split.train),
        "image_size": size["px"],
        "source": f"{size['width']}x{size['height']} PNG",
        "cache_build_s": round(cache_build_s, 2),
        "space": "default (pretrained: none, 40X)",
        "trials": size["trials"],
        "epochs": size["epochs"],
        "device": str(device),
        "goal": f"ratio >= {RATIO_GOAL}; cv_ratio <= {CV_GOAL}",
        "meets_ratio": ratio >= RATIO_GOAL,
        "meets_cv": cv["cv_ratio"] <= CV_GOAL,
        "_load_start": load0,
    }
    c.finite_positive(result, ["search_img_s", "bare_img_s", "ratio", "cv_ratio"])
    busy = (
        f"{search['gpu_busy']:.1%}"
        if search["gpu_busy"] is not None
        else f"not measured ({search['gpu_busy_note']})"
    )
    pack_lines = "\n".join(_pack_line(r) for r in result["packing"])
    summary = (
        f"{len(data.records)} images at 40X ({size['width']}x{size['height']} PNG -> "
        f"{size['px']} px), {len(data.split.train)} training; default space, pretrained none\n"
        f"search of {search['trials']} trials x <= {size['epochs']} epochs ({search['completed']} "
        f"completed, {search['pruned']} pruned; {search['epochs_trained']} epochs, "
        f"{search['images_trained']} images trained) in {search['wall_s']:.1f} s: "
        f"{search['img_s']:.1f} img/s\n"
        f"bare resnet50, batch {size['bare_batch']} in memory, before/after: "
        + " / ".join(f"{v:.1f}" for v in bare)
        + f" img/s\nratio search/bare: {ratio:.3f} (goal >= {RATIO_GOAL})\n"
        f"GPU busy over the search (NVML, every 0.5 s): {busy}\n"
        f"packing, {size['pack_trials']} trials x {size['pack_epochs']} epoch(s), random "
        f"sampler, no pruning:\n{pack_lines}\n"
        f"--cv 3 trial vs single split ({cv['epochs']} epoch(s), median of {size['reps']}): "
        f"{cv['cv3_s']:.1f} s vs {cv['single_s']:.1f} s = {cv['cv_ratio']:.2f}x "
        f"(goal <= {CV_GOAL}); peak GPU memory {cv['peak_gib'] or 'n/a'} GiB\n"
        f"one-off cache build (decode + resize, before the search): {cache_build_s:.1f} s"
    )
    c.finish("gpu_search", args, result, summary, device=str(device), block="gpu_search")


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cuda (the figures) | cpu (--tiny, the tests)")
    p.add_argument("--data", default=None, help="a synthetic BreakHis tree made beforehand")
    args = p.parse_args()
    if args.device is None:  # deferred: importing torch for a refused --record is slow
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.record and not args.device.startswith("cuda"):
        p.error("--record: bench/gpu_search.py records GPU figures only; use --device cuda")
    load0 = c.load_start()
    size = SIZES[c.size_of(args)]

    import torch

    from dala_search.train import prepare_data

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --tiny --device cpu)")
    torch.set_num_threads(args.threads)
    base = c.work_dir(args)
    root = (
        Path(args.data)
        if args.data
        else c.demo_data(
            base, images_per_mag=size["per_mag"], width=size["width"], height=size["height"]
        )
    )
    cpu_options = {} if cuda else {"gpus_per_trial": 0, "max_concurrent": 1}
    with tempfile.TemporaryDirectory(dir=base) as scratch_dir:
        scratch = Path(scratch_dir)
        # The one-off decode into the image cache (the default cache dir, which the
        # search's own prepare_data finds), outside the timed search.
        t0 = time.perf_counter()
        data = prepare_data(root, "40X", image_size=size["px"])
        cache_build_s = time.perf_counter() - t0
        c.log(f"{len(data.records)} images at 40X, cache ready in {cache_build_s:.1f} s")
        bare = [bare_img_s(device, size)]
        space = write_space(
            scratch, px=size["px"], trials=size["trials"], epochs=size["epochs"], packing=False
        )
        search = run_one_search(
            space, "whole", root, scratch / "whole", data,
            **({"gpus_per_trial": 1.0} if cuda else cpu_options),
        )  # fmt: skip
        bare.append(bare_img_s(device, size))
        c.log(f"bare resnet50 before and after the search: {bare}")
        pack_space = write_space(
            scratch, px=size["px"], trials=size["pack_trials"], epochs=size["pack_epochs"],
            packing=True,
        )  # fmt: skip
        packed = packing(pack_space, root, scratch / "packing", data, cuda)
        cv = cv_vs_single(data, device, size)
    finish_record(args, size, data, cache_build_s, bare, search, packed, cv, load0, device)


if __name__ == "__main__":
    main()
