"""How much does an image-level (LEAKY) split inflate the figure? Patient- vs image-level.

One configuration, evaluated as ``dala-search evaluate`` does (``folds.fold_splits``,
``evaluate.train_folds``, ``evaluate.summarise``: the pooled test estimate of K folds), once
with patient-disjoint folds (``--protocol patient``) and once with image-level stratified
folds (``--protocol image``, LEAKY: a patient's images sit in train and test). The
difference, image minus patient, in points, is the report's leakage row; this benchmark
measures it on synthetic data over several seeds (each seed: other folds and another
training seed for both protocols), so a reader sees its mean and spread, not one draw.

Why the leak exists on the synthetic data: every synthetic patient has its own stain
vectors, stain strengths and brightness (a staining batch, ``data/synthetic.py``) and one
patient-level grade (``atypia``) whose class distributions overlap. Across patients the
grade separates the classes only partly; within one patient, the stain is a fingerprint.
An image-level split lets the model meet a test image's patient in training, so a
borderline patient is classified by recognising it. Colour statistics alone identify a
patient well (a nearest-neighbour classifier on per-image colour means and percentiles does
far better on image-level folds than on patient-disjoint ones). The leak needs a model
that learns, though: after a few steps a from-scratch network often predicts one class for
a whole test side (accuracy then follows that side's class mix), so at the tests' size (2
folds of 1 epoch, ``tests/test_protocol_eval.py``) the gap's sign is not reliable; hence 3
folds of 3 epochs and 8 images per patient here.

Data: the synthetic generator's default 24 patients (8 benign, 16 malignant), 40X, sources
64x48 px trained at 32 px. Configuration: DALAResNet50 (ECA at stage 4) from scratch, the
default recipe (AdamW at lr 3e-4, cosine, inverse-frequency loss weights, augmentation with
stain jitter, precise BatchNorm), batch 16. Sizes: see ``SIZES``; ``--tiny`` (the
tests) gives no figures.

    python bench/protocol_gap.py [--quick|--tiny] [--seeds S] [--epochs E] [--folds K]
                                 [--per-patient N] [--threads T] [--record]

The seeds are independent: on a machine with spare cores, run each alone and combine:

    python bench/protocol_gap.py --only-seed 0 --partial seed0.json   # ... one per seed
    python bench/protocol_gap.py --partials seed*.json --record
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

MAG = "40X"
METRICS = ("accuracy", "balanced_accuracy")
SIDES = ("patient", "image")
TINY_PATIENTS = {"A": 2, "F": 2, "DC": 2, "MC": 2}  # 4 benign, 4 malignant patients
SIZES = {
    "tiny": dict(seeds=1, epochs=1, folds=2, per_patient=2, patients=TINY_PATIENTS),
    "quick": dict(seeds=2, epochs=3, folds=3, per_patient=8, patients=None),
    "full": dict(seeds=5, epochs=3, folds=3, per_patient=8, patients=None),
}
IMAGE_SIZE = 32
GOAL = (
    "image-level accuracy above patient-level in every seed (issue 20: the report shows the leak)"
)
DATA_SEED = 0


def evaluate_side(config, index, data, side: str, k: int, seed: int) -> dict:  # noqa: ANN001
    """``evaluate``'s figures of ``config`` under split protocol ``side``, folds seeded ``seed``."""
    from dala_search.evaluate import summarise, train_folds
    from dala_search.folds import fold_splits

    splits = fold_splits(index, data.records, "folds", k, seed=seed, split_protocol=side)
    shared = sum(len(s.shared_slides(data.records)) for s in splits)
    start = time.perf_counter()
    folds = train_folds(config, data, splits, "folds", label=f"seed {seed} {side}", log=c.log)
    wall = time.perf_counter() - start
    summary = summarise(folds, METRICS, seed=seed)
    return {
        **{m: round(summary[m].estimate, 4) for m in METRICS},
        **{f"{m}_ci": [round(summary[m].ci_low, 4), round(summary[m].ci_high, 4)] for m in METRICS},
        "slides_on_several_sides": shared,
        "wall_s": round(wall, 1),
    }


def run_seed(config, index, data, k: int, seed: int) -> dict:  # noqa: ANN001
    """Both protocols, the same configuration (trained with seed ``seed``), and the gap."""
    cfg = config.replace(seed=seed)
    row: dict = {"seed": seed}
    for side in SIDES:
        row[side] = evaluate_side(cfg, index, data, side, k, seed)
    row["gap_points"] = {m: round((row["image"][m] - row["patient"][m]) * 100, 2) for m in METRICS}
    c.log(seed_line(row))
    return row


def seed_line(row: dict) -> str:
    p, i, g = row["patient"], row["image"], row["gap_points"]
    return (
        f"seed {row['seed']}: accuracy patient {p['accuracy']:.3f} image {i['accuracy']:.3f} "
        f"gap {g['accuracy']:+.1f} pt | balanced accuracy patient {p['balanced_accuracy']:.3f} "
        f"image {i['balanced_accuracy']:.3f} gap {g['balanced_accuracy']:+.1f} pt"
    )


def spread(values: list[float]) -> dict:
    """Mean, sample SD (None for one value), min and max."""
    return {
        "mean": round(statistics.fmean(values), 2),
        "sd": round(statistics.stdev(values), 2) if len(values) > 1 else None,
        "min": round(min(values), 2),
        "max": round(max(values), 2),
    }


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=None, help="seeds (folds + training)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per training")
    p.add_argument("--folds", type=int, default=None, help="K folds per protocol")
    p.add_argument("--per-patient", type=int, default=None, help="images per patient at 40X")
    c.add_seed_process_args(p)
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate (default 3e-4)")
    args = p.parse_args()
    c.check_seed_process_args(args)
    size = dict(SIZES[c.size_of(args)])
    for key in ("seeds", "epochs", "folds", "per_patient"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    if size["seeds"] < 1 or size["epochs"] < 1 or size["folds"] < 2 or size["per_patient"] < 2:
        raise SystemExit(
            f"need --seeds >= 1, --epochs >= 1, --folds >= 2, --per-patient >= 2: {size}"
        )
    load_start = c.load_start()

    from dala_search.config import TrialConfig
    from dala_search.data.breakhis import index_breakhis
    from dala_search.train import prepare_data

    base = c.work_dir(args)
    root = c.demo_data(
        base,
        images_per_mag=size["per_patient"],
        width=64,
        height=48,
        patients=size["patients"],
        seed=DATA_SEED,
    )
    index = index_breakhis(root)
    data = prepare_data(index, MAG, image_size=IMAGE_SIZE, cache_dir=base / "cache")
    n_patients = len(set(data.slides(range(len(data.records)))))
    config = TrialConfig(
        pretrained="none",
        image_size=IMAGE_SIZE,
        epochs=size["epochs"],
        batch_size=16,
        lr=args.lr,
        device="cpu",
        num_threads=args.threads,
    )
    c.log(f"{n_patients} patients, {len(data.records)} images at {MAG}; {size}")
    rows = c.seed_rows(
        args, size["seeds"], lambda s: run_seed(config, index, data, size["folds"], s), load_start
    )
    if rows is None:  # --only-seed wrote its row (docstring)
        return
    per_seed, load_start = rows
    gaps = {m: spread([r["gap_points"][m] for r in per_seed]) for m in METRICS}
    sides = {
        side: {m: spread([r[side][m] * 100 for r in per_seed]) for m in METRICS} for side in SIDES
    }
    above = sum(r["gap_points"]["accuracy"] > 0 for r in per_seed)
    result = {
        "goal": GOAL,
        "goal_met": above == len(per_seed),
        "wall_s": round(sum(r[side]["wall_s"] for r in per_seed for side in SIDES), 1),
        "gap_points": gaps,
        "percent": sides,
        "seeds_image_above_patient": above,
        "setup": {
            "magnification": MAG,
            "patients": n_patients,
            "images": len(data.records),
            "images_per_patient": size["per_patient"],
            "source_px": "64x48",
            "image_size": IMAGE_SIZE,
            "folds": size["folds"],
            "seeds": size["seeds"],
            "epochs": size["epochs"],
            "model": "DALAResNet50 (ECA, stage 4), pretrained none, default recipe",
            "lr": args.lr,
            "batch_size": 16,
            "precise_bn": config.precise_bn,
            "threads": args.threads,
        },
        "per_seed": per_seed,
        "seeds_run_as": "parallel processes (--partials)" if args.partials else "one process",
        "_load_start": load_start,
    }

    def fmt(s: dict) -> str:
        sd = "n/a" if s["sd"] is None else f"{s['sd']:.1f}"
        return f"mean {s['mean']:+.1f} sd {sd} [{s['min']:+.1f}, {s['max']:+.1f}]"

    lines = [
        f"{n_patients} synthetic patients, {len(data.records)} images at {MAG} "
        f"({size['per_patient']} per patient, 64x48 px trained at {IMAGE_SIZE} px); "
        f"DALAResNet50 from scratch, {size['epochs']} epochs, batch 16; evaluate's "
        f"--folds {size['folds']} under --protocol patient and --protocol image (LEAKY), "
        f"{size['seeds']} seed(s)",
        *[seed_line(r) for r in per_seed],
        "image-level minus patient-level, points over seeds:",
        *[f"  {m:<18} {fmt(gaps[m])}" for m in METRICS],
        "mean over seeds, percent: "
        + "; ".join(
            f"{m} patient {sides['patient'][m]['mean']:.1f} image {sides['image'][m]['mean']:.1f}"
            for m in METRICS
        ),
        f"trainings' wall time summed over seeds and folds: {result['wall_s']:.0f} s",
        f"image-level accuracy above patient-level in {above} of {len(per_seed)} seed(s); "
        f"goal ({GOAL}): {'met' if result['goal_met'] else 'NOT met'}",
    ]
    c.finish("protocol_gap", args, result, "\n".join(lines))


if __name__ == "__main__":
    main()
