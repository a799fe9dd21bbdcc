"""Benchmark 5: memory of 4 concurrent trials vs 1 on one node; the data held once.

Each trial is its own process (as Ray runs them) handed the pickled ``TrialData`` (as
``tune.with_parameters`` ships it: the cache re-opens its memory map by path) and runs
``train_trial``. While they run, this process samples every trial's
``/proc/<pid>/smaps``: the PSS of the cache file's mapping (pages shared by k processes
count 1/k in each, so the sum over processes is the node's real cost of the data) and
the total PSS. Goal: data PSS of 4 trials <= 1.3x that of 1 trial.

With ``--device cuda`` the trials share one GPU, as ``--gpus-per-trial 0.25`` packs them:
besides the host figures it reports each trial's peak GPU memory (torch's allocator), the
GPU's memory in use (NVML, all processes, contexts included) and the training throughput
of 1 trial vs the sum over 4 (each trial's median epoch after a barrier that starts their
second epochs together): what packing small trials onto one GPU gains or costs.

    python bench/memory.py [--quick] [--device cuda] [--record]
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

SIZES = {  # images per magnification (x 24 patients), px, repetitions
    "tiny": dict(per_mag=2, px=32, reps=1),
    "quick": dict(per_mag=4, px=48, reps=1),
    "full": dict(per_mag=8, px=64, reps=1),
}
# 2,880 images at 224 px (all magnifications, 1,700-odd training images per trial), as
# BreakHis-sized as one magnification; six epochs, so five run after the barrier.
GPU_SIZE = dict(per_mag=30, px=224, reps=1)
GPU_EPOCHS = 6


def _trial(data, config, out_path: str, barrier) -> None:  # noqa: ANN001 - a child process
    """Train; after epoch 1 wait for the other trials (the barrier); write what was seen."""
    import json

    import torch

    from dala_search.train import train_trial

    def after_epoch(epoch: int, metrics: dict) -> None:
        if epoch == 1:
            barrier.wait(timeout=600)

    result = train_trial(config, data, after_epoch)
    info: dict = {"img_s": [h["train_images_per_s"] for h in result.history]}
    if config.device.startswith("cuda"):
        info["gpu_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        info["gpu_max_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    Path(out_path).write_text(json.dumps(info))


def _nvml_used_mib():  # noqa: ANN202
    """A reader of GPU 0's memory in use (NVML: every process, CUDA contexts included), or
    None with the reason logged when NVML is not importable (the nvidia-ml-py package)."""
    try:
        import pynvml
    except ImportError as e:
        c.log(f"NVML not available ({e}): the GPU's memory in use is not measured")
        return None
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    return lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20


def _pss_kib(pid: int, cache_path: str) -> tuple[int, int]:
    """(PSS of the mapping of ``cache_path``, total PSS) of one process, in KiB."""
    data = total = 0
    current = ""
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):  # a mapping's header line
                    parts = line.split(None, 5)
                    current = parts[5].strip() if len(parts) > 5 else ""
                elif head == "Pss:":
                    kib = int(line.split()[1])
                    total += kib
                    if current == cache_path:
                        data += kib
    except (FileNotFoundError, ProcessLookupError):
        pass  # the process ended between samples
    return data, total


def run_concurrent(  # noqa: ANN001
    k: int, data, config, scratch: Path, gpu_used=None, *, sample: bool = True
) -> dict:
    """Start k trial processes at once; sample until all end; peaks summed over them.

    ``gpu_used``: a reader of the GPU's memory in use (MiB), sampled with the rest; the
    figure is its peak minus its value before the trials started. ``sample=False``: no
    sampling at all (reading a CUDA process's smaps slows it: throughput is measured so).
    """
    import json

    ctx = mp.get_context("spawn")  # a fresh interpreter per trial, like a Ray worker
    barrier = ctx.Barrier(k)
    outs = [scratch / f"trial-{k}-{i}.json" for i in range(k)]
    procs = [ctx.Process(target=_trial, args=(data, config, str(o), barrier)) for o in outs]
    gpu0 = gpu_used() if gpu_used else 0.0
    peak_gpu = gpu0
    for p in procs:
        p.start()
    cache_path = str(Path(data.cache.path).resolve())
    peak_data = peak_total = 0
    while sample and any(p.is_alive() for p in procs):
        # Only samples with every trial alive: a page's share (1/k) changes when one ends,
        # and shares read before and after that would add up to more than the page.
        if all(p.is_alive() for p in procs):
            samples = [_pss_kib(p.pid, cache_path) for p in procs]
            if all(p.is_alive() for p in procs):
                peak_data = max(peak_data, sum(s[0] for s in samples))
                peak_total = max(peak_total, sum(s[1] for s in samples))
        if gpu_used:
            peak_gpu = max(peak_gpu, gpu_used())
        time.sleep(0.2)
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"a trial process failed (exit code {p.exitcode})")
    trials = [json.loads(o.read_text()) for o in outs]
    # Each trial's median training speed over the epochs after the barrier (epoch 1 pays
    # cuDNN set-up and waits); summed over trials: the node's throughput with k at once.
    speeds = [c.median(t["img_s"][1:] or t["img_s"]) for t in trials]
    out = {"img_s_per_trial": [round(v, 1) for v in speeds], "img_s_sum": sum(speeds)}
    if not sample:
        return out
    out.update(data_mib=peak_data / 1024, total_mib=peak_total / 1024)
    if config.device.startswith("cuda"):
        out["gpu_reserved_per_trial_mib"] = [round(t["gpu_max_reserved_mib"]) for t in trials]
        out["gpu_allocated_per_trial_mib"] = [round(t["gpu_max_allocated_mib"]) for t in trials]
        out["gpu_used_mib"] = peak_gpu - gpu0 if gpu_used else None
    return out


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu | cuda")
    p.add_argument(
        "--image-size", type=int, default=224, help="with --device cuda: px (default 224)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="with --device cuda (default 64)")
    p.add_argument("--epochs", type=int, default=GPU_EPOCHS, help="with --device cuda")
    args = p.parse_args()
    gpu_shape = (args.image_size, args.batch_size, args.epochs) != (224, 64, GPU_EPOCHS)
    if gpu_shape and args.device != "cuda":
        p.error("--image-size, --batch-size and --epochs go with --device cuda")
    if args.epochs < 2:
        p.error("--epochs: at least 2 (the speed is read after the first)")
    load0 = c.load_start()
    size = SIZES[c.size_of(args)]
    cuda = args.device == "cuda"

    from dala_search.config import TrialConfig
    from dala_search.errors import ConfigError
    from dala_search.train import prepare_data, resolve_device

    if cuda:
        try:
            resolve_device("cuda")  # no CUDA here: say so before any work
        except ConfigError as e:
            raise SystemExit(f"bench/memory.py --device cuda: {e}") from None
        if not args.tiny:
            size = {**GPU_SIZE, "px": args.image_size}
    base = c.work_dir(args)
    if cuda:  # the model at full width, BreakHis-like batches
        root = c.demo_data(base, images_per_mag=size["per_mag"], width=256, height=168)
        config = TrialConfig(
            pretrained="none",
            image_size=size["px"],
            batch_size=args.batch_size,
            epochs=args.epochs,
            device="cuda",
        )
    else:
        root = c.demo_data(base, images_per_mag=size["per_mag"], width=128, height=84)
        config = TrialConfig(
            pretrained="none",
            image_size=size["px"],
            batch_size=32,
            epochs=1,
            fc1=32,
            fc2=16,
            device="cpu",
            num_threads=args.threads,
        )
    gpu_used = _nvml_used_mib() if cuda else None
    with tempfile.TemporaryDirectory(dir=base) as cache_dir:
        data = prepare_data(root, "all", image_size=size["px"], cache_dir=cache_dir)
        cache_mib = Path(data.cache.path).stat().st_size / 2**20
        c.log(f"{len(data.records)} images at {size['px']} px: cache file {cache_mib:.1f} MiB")
        runs: dict[str, list[dict]] = {"1": [], "4": []}
        for r in range(size["reps"]):
            for k in (1, 4):
                out = run_concurrent(k, data, config, Path(cache_dir), gpu_used)
                if cuda:  # throughput again, unobserved: the figure the summary gives
                    quiet = run_concurrent(k, data, config, Path(cache_dir), sample=False)
                    out["img_s_per_trial_sampled"] = out.pop("img_s_per_trial")
                    out["img_s_sum_sampled"] = out.pop("img_s_sum")
                    out.update(quiet)
                runs[str(k)].append(out)
                c.log(f"rep {r + 1}: {k} trial(s): {out}")

    def med(k: str, key: str) -> float:
        return c.median([o[key] for o in runs[k]])

    d1, d4, t1, t4 = (
        med("1", "data_mib"),
        med("4", "data_mib"),
        med("1", "total_mib"),
        med("4", "total_mib"),
    )
    result = {
        "data_pss_1_mib": round(d1, 2),
        "data_pss_4_mib": round(d4, 2),
        "ratio": round(d4 / d1, 3),
        "total_pss_1_mib": round(t1, 1),
        "total_pss_4_mib": round(t4, 1),
        "cache_file_mib": round(cache_mib, 2),
        "images": len(data.records),
        "image_size": size["px"],
        "reps": size["reps"],
        "runs": runs,
        "goal": "ratio <= 1.3",
        "meets_goal": d4 / d1 <= 1.3,
        "_load_start": load0,
    }
    c.finite_positive(result, ["data_pss_1_mib", "data_pss_4_mib", "ratio", "total_pss_1_mib"])
    shape = f", batch {config.batch_size}, {config.epochs} epochs" if cuda else ""
    summary = (
        f"{len(data.records)} images at {size['px']} px (cache file {cache_mib:.1f} MiB), "
        f"trials as separate processes, {args.device}, median of {size['reps']}{shape}\n"
        f"data (PSS of the cache mapping, summed over trials): 1 trial {d1:.1f} MiB, "
        f"4 trials {d4:.1f} MiB -> {d4 / d1:.2f}x (goal <= 1.3x; a copy each would be 4x)\n"
        f"whole processes (PSS, summed): 1 trial {t1:.0f} MiB, 4 trials {t4:.0f} MiB "
        f"(model, optimizer and torch per process)"
    )
    if cuda:
        summary += _gpu_figures(result, runs, med)
    # another trial shape than the default gets a GPU block of its own
    block = f"memory-gpu-{args.image_size}px-b{args.batch_size}" if gpu_shape else None
    c.finish("memory", args, result, summary, device=args.device, block=block)


def _gpu_figures(result: dict, runs: dict[str, list[dict]], med) -> str:  # noqa: ANN001
    """Add the one-GPU packing figures to ``result``; return their summary lines."""
    s1, s4 = med("1", "img_s_sum"), med("4", "img_s_sum")  # the unobserved runs
    first = {k: runs[k][0] for k in runs}  # per-trial lists: from the first repetition
    used = {k: first[k]["gpu_used_mib"] for k in first}
    result.update(
        {
            "gpu_img_s_1": round(s1, 1),
            "gpu_img_s_4_sum": round(s4, 1),
            "packing_gain": round(s4 / s1, 3),
            "packing_gain_while_sampled": round(
                med("4", "img_s_sum_sampled") / med("1", "img_s_sum_sampled"), 3
            ),
            "gpu_img_s_4_per_trial": first["4"]["img_s_per_trial"],
            "gpu_reserved_per_trial_mib_1": first["1"]["gpu_reserved_per_trial_mib"],
            "gpu_reserved_per_trial_mib_4": first["4"]["gpu_reserved_per_trial_mib"],
            "gpu_used_1_mib": None if used["1"] is None else round(used["1"]),
            "gpu_used_4_mib": None if used["4"] is None else round(used["4"]),
        }
    )
    c.finite_positive(result, ["gpu_img_s_1", "gpu_img_s_4_sum", "packing_gain"])
    each = ", ".join(f"{v:.0f}" for v in first["4"]["img_s_per_trial"])
    lines = (
        f"\none GPU, training images/s (median epoch after the barrier; a run apart, not "
        f"sampled): 1 trial {s1:.0f}; "
        f"4 trials {s4:.0f} together ({each} each) -> packing gain {s4 / s1:.2f}x"
        f"\nGPU memory reserved by torch per trial: 1 trial "
        f"{first['1']['gpu_reserved_per_trial_mib'][0]} MiB; 4 trials "
        f"{first['4']['gpu_reserved_per_trial_mib']} MiB (each holds its split on the GPU)"
    )
    if used["1"] is not None:
        lines += (
            f"\nGPU memory in use (NVML, contexts included, minus idle): 1 trial "
            f"{used['1']:.0f} MiB, 4 trials {used['4']:.0f} MiB"
        )
    return lines


if __name__ == "__main__":
    main()
