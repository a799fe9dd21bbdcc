"""What every benchmark shares: data sets, machine description, interleaving, the record.

Each ``bench/<name>.py`` imports this (it sits beside them; ``python bench/<name>.py`` puts
``bench/`` on ``sys.path``), prints progress to stderr, its figures to stdout, and ONE JSON
object as its last stdout line. ``--record`` rewrites the benchmark's block between its
markers in ``bench/README.md``, so the recorded figures are the script's own output.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

# Ray's default address (None) joins a cluster that another `ray start` on this machine
# advertised in /tmp/ray/ray_current_cluster; a benchmark must start its own instance.
os.environ.setdefault("RAY_ADDRESS", "local")

BENCH_DIR = Path(__file__).resolve().parent
README = BENCH_DIR / "README.md"


def log(msg: str) -> None:
    """Progress goes to stderr so stdout ends with the JSON line."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parser(description: str) -> argparse.ArgumentParser:
    """The flags every benchmark takes; scripts add their own."""
    p = argparse.ArgumentParser(description=description)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a minute or two")
    size.add_argument("--tiny", action="store_true", help="seconds; for the tests, no figures")
    p.add_argument("--record", action="store_true", help="write the figures to bench/README.md")
    p.add_argument("--work-dir", default=None, help="data and scratch (default: a cache dir)")
    p.add_argument("--note", default="", help="a sentence the record adds (e.g. the load)")
    # One intra-op thread by default: on a machine shared with other jobs, OpenMP threads
    # that wait at barriers for a descheduled sibling run 10-20x slower than one thread
    # (measured here at load ~16 on 2 cores). Pass --threads 2 on an idle machine.
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1; pipeline.py: one per core)",
    )
    return p


def size_of(args: argparse.Namespace) -> str:
    return "tiny" if args.tiny else "quick" if args.quick else "full"


def work_dir(args: argparse.Namespace) -> Path:
    """Generated data sets are kept here between runs (they are deterministic)."""
    if args.work_dir:
        p = Path(args.work_dir)
    else:
        from dala_search.data.cache import default_cache_dir

        p = default_cache_dir() / "bench"
    p.mkdir(parents=True, exist_ok=True)
    return p.resolve()


def demo_data(
    base: Path,
    *,
    images_per_mag: int,
    width: int,
    height: int,
    patients: dict | None = None,
    seed: int = 0,
) -> Path:
    """A synthetic BreakHis tree, generated once per shape (and seed) and reused."""
    from dala_search.data.synthetic import generate_demo

    n = sum((patients or {}).values()) or "default"
    out = base / f"demo-{width}x{height}-{images_per_mag}per-{n}p{f'-seed{seed}' if seed else ''}"
    if (out / "BreaKHis_v1").is_dir():
        return out
    log(f"generating synthetic BreakHis sources {width}x{height} -> {out}")
    return generate_demo(
        out,
        images_per_mag=images_per_mag,
        width=width,
        height=height,
        patients_per_subtype=patients,
        seed=seed,
        overwrite=True,
    )


def interleave(fns: Mapping[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """Run the measurements alternately (A B A B ...): a noisy, shared machine then hurts
    every side alike instead of whichever ran during a burst of someone else's work."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(reps):
        for name, fn in fns.items():
            value = fn()
            out[name].append(value)
            log(f"rep {r + 1}/{reps} {name}: {value:.4g}")
    return out


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def machine(device: str = "cpu") -> dict[str, Any]:
    """CPU model, cores we may use, load (others' work on a shared machine), device."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "load_1m": round(os.getloadavg()[0], 2),
    }
    import torch

    info["torch"] = torch.__version__
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def finite_positive(values: Mapping[str, Any], keys: list[str]) -> None:
    """Refuse to print a figure that is not a positive finite number (a broken run)."""
    for k in keys:
        v = values[k]
        if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
            raise SystemExit(f"benchmark produced a bad value for {k}: {v!r}")


def finish(
    name: str,
    args: argparse.Namespace,
    result: dict[str, Any],
    summary: str,
    *,
    device: str = "cpu",
    block: str | None = None,
) -> None:
    """Print the summary and the JSON line; with --record, rewrite README's block
    (``block``: another block than the benchmark's own, e.g. a variant's)."""
    result = {"benchmark": name, "size": size_of(args), **result}
    result["machine"] = {**machine(device), "load_1m_at_start": result.pop("_load_start", None)}
    print(summary)
    if args.record:  # GPU figures get their own block: they never replace the CPU record
        block = block or (f"{name}-gpu" if "gpu" in result["machine"] else name)
        record(block, args, result, summary, script=name)
    print(json.dumps(result, sort_keys=False))


def record(
    name: str,
    args: argparse.Namespace,
    result: dict[str, Any],
    summary: str,
    *,
    script: str | None = None,
) -> None:
    """Replace the text between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``
    (``script``: the benchmark that wrote it, when the block is not named after it)."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = README.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{README}: markers {start} ... {end} not found")
    m = result["machine"]
    argv = " ".join(_argv_without_record_and_note())
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    block = "\n".join(
        [
            start,
            f"Recorded {time.strftime('%Y-%m-%d %H:%M %Z')} by `python bench/{script or name}.py"
            f"{' ' + argv if argv else ''} --record` on {m['cpu']}, {m['cores']} cores{gpu}, "
            f"torch {m['torch']}; 1-minute load average {m.get('load_1m_at_start')} at the "
            f"start and {m['load_1m']} at the end (the machine is shared: other jobs ran)."
            + (f" Note: {args.note}" if getattr(args, "note", "") else ""),
            "",
            "```text",
            summary.rstrip(),
            "```",
            "",
            "<details><summary>JSON</summary>",
            "",
            "```json",
            json.dumps(result, indent=1),
            "```",
            "",
            "</details>",
            end,
        ]
    )
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    README.write_text(head + block + tail)
    log(f"recorded in {README}")


def _argv_without_record_and_note() -> list[str]:
    """The command line as recorded: ``--record`` and ``--note TEXT`` left out (the note
    is written out in full beside it)."""
    out, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--note":
            skip = True
        elif a != "--record" and not a.startswith("--note="):
            out.append(a)
    return out


def load_start() -> float:
    return round(os.getloadavg()[0], 2)


# ---- seeds run as separate processes (--only-seed / --partials) ---------------------------


def add_seed_process_args(p: argparse.ArgumentParser) -> None:
    """``--only-seed S --partial FILE`` runs one seed and writes its row; ``--partials``
    combines such rows (seeds in parallel processes on a machine with cores to spare)."""
    p.add_argument("--only-seed", type=int, default=None, help="run this seed alone ...")
    p.add_argument("--partial", default=None, help="... and write its row to this file")
    p.add_argument("--partials", nargs="+", default=None, help="combine these seed rows")


def check_seed_process_args(args: argparse.Namespace) -> None:
    if (args.only_seed is None) != (args.partial is None) or (args.partials and args.partial):
        raise SystemExit("--only-seed S needs --partial FILE; --partials excludes both")


def seed_rows(
    args: argparse.Namespace, seeds: int, run_seed: Callable[[int], dict], load_start: float
) -> tuple[list[dict], float] | None:
    """Every seed's row and the run's start load; None after ``--only-seed`` wrote its row.

    ``--partials``: the rows of seeds 0..seeds-1 (refused otherwise), the start load the
    highest of theirs; else each seed runs here in turn.
    """
    if args.only_seed is not None:  # one seed of a run split over processes
        row = run_seed(args.only_seed)
        row["load_1m_at_start"] = load_start
        Path(args.partial).write_text(json.dumps(row) + "\n")
        log(f"seed {args.only_seed} written to {args.partial}")
        return None
    if not args.partials:
        return [run_seed(s) for s in range(seeds)], load_start
    per_seed = sorted(
        (json.loads(Path(f).read_text()) for f in args.partials), key=lambda r: r["seed"]
    )
    if [r["seed"] for r in per_seed] != list(range(seeds)):
        raise SystemExit(
            f"--partials hold seeds {[r['seed'] for r in per_seed]}, expected 0..{seeds - 1}"
        )
    return per_seed, max(r.pop("load_1m_at_start") for r in per_seed)
