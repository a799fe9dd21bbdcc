"""Benchmark 5: memory of 4 concurrent trials vs 1 on one node; the data held once.

Each trial is its own process (as Ray runs them) handed the pickled ``TrialData`` (as
``tune.with_parameters`` ships it: the cache re-opens its memory map by path) and runs
``train_trial``. While they run, this process samples every trial's
``/proc/<pid>/smaps``: the PSS of the cache file's mapping (pages shared by k processes
count 1/k in each, so the sum over processes is the node's real cost of the data) and
the total PSS. Goal: data PSS of 4 trials <= 1.3x that of 1 trial.

    python bench/memory.py [--quick] [--record]
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


def _trial(data, config) -> None:  # noqa: ANN001 - runs in a child process
    from dala_search.train import train_trial

    train_trial(config, data)


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


def run_concurrent(k: int, data, config) -> dict[str, float]:  # noqa: ANN001
    """Start k trial processes at once; sample until all end; peaks summed over them."""
    ctx = mp.get_context("spawn")  # a fresh interpreter per trial, like a Ray worker
    procs = [ctx.Process(target=_trial, args=(data, config)) for _ in range(k)]
    for p in procs:
        p.start()
    cache_path = str(Path(data.cache.path).resolve())
    peak_data = peak_total = 0
    while any(p.is_alive() for p in procs):
        # Only samples with every trial alive: a page's share (1/k) changes when one ends,
        # and shares read before and after that would add up to more than the page.
        if all(p.is_alive() for p in procs):
            samples = [_pss_kib(p.pid, cache_path) for p in procs]
            if all(p.is_alive() for p in procs):
                peak_data = max(peak_data, sum(s[0] for s in samples))
                peak_total = max(peak_total, sum(s[1] for s in samples))
        time.sleep(0.2)
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"a trial process failed (exit code {p.exitcode})")
    return {"data_mib": peak_data / 1024, "total_mib": peak_total / 1024}


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    args = p.parse_args()
    load0 = c.load_start()
    size = SIZES[c.size_of(args)]

    from dala_search.config import TrialConfig
    from dala_search.train import prepare_data

    base = c.work_dir(args)
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
    with tempfile.TemporaryDirectory(dir=base) as cache_dir:
        data = prepare_data(root, "all", image_size=size["px"], cache_dir=cache_dir)
        cache_mib = Path(data.cache.path).stat().st_size / 2**20
        c.log(f"{len(data.records)} images at {size['px']} px: cache file {cache_mib:.1f} MiB")
        runs: dict[str, list[dict[str, float]]] = {"1": [], "4": []}
        for r in range(size["reps"]):
            for k in (1, 4):
                out = run_concurrent(k, data, config)
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
    summary = (
        f"{len(data.records)} images at {size['px']} px (cache file {cache_mib:.1f} MiB), "
        f"trials as separate processes, CPU, median of {size['reps']}\n"
        f"data (PSS of the cache mapping, summed over trials): 1 trial {d1:.1f} MiB, "
        f"4 trials {d4:.1f} MiB -> {d4 / d1:.2f}x (goal <= 1.3x; a copy each would be 4x)\n"
        f"whole processes (PSS, summed): 1 trial {t1:.0f} MiB, 4 trials {t4:.0f} MiB "
        f"(model, optimizer and torch per process)"
    )
    c.finish("memory", args, result, summary)


if __name__ == "__main__":
    main()
