"""Several objectives: hypervolume after N trials, NSGA-II with and without pruning, random.

Two objectives, as ``--objective val_balanced_accuracy:max --objective params_m:min`` asks:
the best-epoch validation balanced accuracy (the primary) and the model's parameters in
millions (``costs.measure_config_costs``; deterministic, unlike latency on a shared machine).
Three arms, each one Optuna study of N trials driven here directly (one trial at a time,
no Ray), each trial trained by ``train_trial`` on the same data:

- ``pruned``: NSGA-II (``make_sampler("nsga2")``) and the space's pruner (successive
  halving judged on validation ROC AUC, ``bench/search_space.yaml``) through the search's
  own bridge: every epoch's ROC AUC is kept in the trial's ``primary_intermediate``
  attribute and ``search.multiobjective.judge_primary`` asks the pruner on the study's
  single-objective view, exactly as ``MultiObjectiveOptunaSearch`` does; a pruned trial is
  told PRUNED (no values: never on the front);
- ``unpruned``: the same NSGA-II (same seed), every trial trained to its last epoch;
- ``random``: Optuna's seeded random sampler, no pruning.

Hypervolume (``optuna._hypervolume.compute_hypervolume``, Optuna's own) of each arm's
completed trials, on normalised losses: ``(1 - balanced accuracy) / 0.5`` (0 perfect, 1
chance) and ``(params_m - smallest) / (largest - smallest)`` over the space's models
(attention none/eca x fc1 16..64). Reference point (1, 1.1): chance-level balanced
accuracy and the largest model plus a tenth of the range, so a trial at chance adds
nothing and the largest model still can. 0 is no better than chance; the ideal box is
1.1. Epochs saved: epochs trained by ``unpruned`` minus by ``pruned``.

Data: the synthetic BreakHis generator's default 24 patients at 40X, 64x48 sources trained
at 32 px, batch 16, stem and stages 1-3 of the stand-in pre-trained backbone frozen (as
``bench/selection.py``); the space's attention, fc1, lr and loss weighting are searched.

    python bench/multiobjective.py [--quick|--tiny] [--trials N] [--epochs E] [--seeds S]
                                   [--threads T] [--record]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

SPACE = Path(__file__).resolve().parent / "search_space.yaml"
MAG = "40X"
PRIMARY = "balanced_accuracy"
FREEZE_STAGES = 3
REFERENCE = (1.0, 1.1)  # normalised (loss, params); see the docstring
ARMS = ("pruned", "unpruned", "random")
TINY_PATIENTS = {"A": 2, "F": 2, "DC": 2, "MC": 2}
SIZES = {
    "tiny": dict(trials=2, epochs=2, seeds=1, population=2, per_patient=2, patients=TINY_PATIENTS),
    "quick": dict(trials=8, epochs=4, seeds=1, population=4, per_patient=4, patients=None),
    "full": dict(trials=16, epochs=6, seeds=2, population=4, per_patient=4, patients=None),
}
# The stand-in backbone of bench/search.py, by the size of its pre-training set.
BACKBONE_PER_MAG = {"tiny": 2, "quick": 8, "full": 8}


class _Pruned(Exception):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch


def param_range(space, overrides: dict) -> tuple[float, float]:  # noqa: ANN001
    """Parameters (millions) of the space's smallest and largest models."""
    from dala_search.costs import measure_config_costs

    fc1 = space.params["fc1"]
    sizes = [
        measure_config_costs(
            space.trial_config({"attention": a, "fc1": f}, **overrides), ["params_m"]
        )["params_m"]
        for a in ("none", "eca")
        for f in (fc1.low, fc1.high)
    ]
    return min(sizes), max(sizes)


def hypervolume(points: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Normalised hypervolume of (balanced accuracy, params_m) points (docstring)."""
    import numpy as np
    from optuna._hypervolume import compute_hypervolume

    losses = [((1 - acc) / 0.5, (p - lo) / (hi - lo)) for acc, p in points]
    inside = [x for x in losses if x[0] < REFERENCE[0] and x[1] < REFERENCE[1]]
    if not inside:
        return 0.0
    return float(compute_hypervolume(np.array(inside), np.array(REFERENCE)))


def run_arm(arm: str, seed: int, space, data, overrides: dict, size: dict) -> dict:  # noqa: ANN001
    """N trials of one arm; per trial its objectives (or PRUNED) and epochs trained."""
    import optuna

    from dala_search.costs import measure_config_costs
    from dala_search.search.multiobjective import judge_primary
    from dala_search.search.optuna_study import PRIMARY_INTERMEDIATE_ATTR
    from dala_search.search.pruning import make_pruner, make_sampler
    from dala_search.train import train_trial

    settings = space.settings
    if arm == "random":
        sampler = make_sampler("random", seed=seed)
    else:
        sampler = make_sampler("nsga2", seed=seed, population_size=size["population"])
    pruner = make_pruner(settings.pruner) if arm == "pruned" else optuna.pruners.NopPruner()
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler, pruner=pruner)
    prune_key = f"val_{settings.prune_on or PRIMARY}"
    rows, began = [], time.perf_counter()
    for i in range(size["trials"]):
        trial = study.ask()
        space.suggest(trial)  # samples onto the trial; returns only the fixed values
        cfg = space.trial_config(trial.params, seed=seed * 1000 + i, **overrides)
        params_m = measure_config_costs(cfg, ["params_m"])["params_m"]

        def reporter(epoch: int, metrics: dict, trial=trial) -> None:  # noqa: ANN001
            if arm != "pruned":
                return
            kept = dict(trial.user_attrs.get(PRIMARY_INTERMEDIATE_ATTR) or {})
            kept.setdefault(str(epoch), float(metrics[prune_key]))
            trial.set_user_attr(PRIMARY_INTERMEDIATE_ATTR, kept)
            if judge_primary(study, trial.number, "maximize"):
                raise _Pruned(epoch)

        try:
            result = train_trial(cfg, data, reporter)
        except _Pruned as stop:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            rows.append({"pruned": True, "epochs": stop.epoch, "params_m": round(params_m, 6)})
        else:
            acc = float(result.best[f"val_{PRIMARY}"])
            study.tell(trial, [acc, params_m])
            rows.append(
                {"pruned": False, "epochs": result.epochs_run, "val_bacc": round(acc, 4),
                 "params_m": round(params_m, 6)}
            )  # fmt: skip
        c.log(f"seed {seed} {arm} trial {i}: {rows[-1]}")
    return {"trials": rows, "wall_s": round(time.perf_counter() - began, 1)}


def seed_row(seed: int, space, data, overrides: dict, size: dict, lo: float, hi: float) -> dict:  # noqa: ANN001
    row: dict = {"seed": seed}
    for arm in ARMS:
        out = run_arm(arm, seed, space, data, overrides, size)
        done = [(t["val_bacc"], t["params_m"]) for t in out["trials"] if not t["pruned"]]
        row[arm] = {
            **out,
            "hypervolume": round(hypervolume(done, lo, hi), 4),
            "epochs": sum(t["epochs"] for t in out["trials"]),
            "pruned_trials": sum(t["pruned"] for t in out["trials"]),
        }
    return row


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=None, help="trials per arm (N)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial")
    p.add_argument("--seeds", type=int, default=None, help="repeats with other sampler seeds")
    args = p.parse_args()
    size = dict(SIZES[c.size_of(args)])
    for key in ("trials", "epochs", "seeds"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    if size["trials"] < 2 or size["epochs"] < 1 or size["seeds"] < 1:
        raise SystemExit(f"need --trials >= 2, --epochs >= 1, --seeds >= 1: {size}")
    load_start = c.load_start()
    import optuna
    from search import _pretrained_backbone

    from dala_search.space_file import load_space
    from dala_search.train import prepare_data

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = c.work_dir(args)
    backbone = _pretrained_backbone(
        base, {"per_mag": BACKBONE_PER_MAG[c.size_of(args)]}, args.threads
    )
    root = c.demo_data(
        base, images_per_mag=size["per_patient"], width=64, height=48, patients=size["patients"]
    )
    data = prepare_data(root, MAG, image_size=32, cache_dir=base / "cache")
    space = load_space(SPACE)
    overrides = dict(
        pretrained=str(backbone),
        epochs=size["epochs"],
        batch_size=16,
        freeze_stages=FREEZE_STAGES,
        device="cpu",
        num_threads=args.threads,
    )
    # Rounded as recorded, so the JSON's hypervolumes follow from its own numbers.
    lo, hi = (round(v, 6) for v in param_range(space, {**overrides, "pretrained": "none"}))
    c.log(f"params_m of the space's models: {lo:.4f} .. {hi:.4f}")
    rows = [seed_row(s, space, data, overrides, size, lo, hi) for s in range(size["seeds"])]

    def med(arm: str, key: str) -> float:
        return round(float(statistics.median(r[arm][key] for r in rows)), 4)

    result = {f"hv_{arm}": med(arm, "hypervolume") for arm in ARMS}
    result.update({f"epochs_{arm}": med(arm, "epochs") for arm in ARMS})
    result["epochs_saved"] = round(result["epochs_unpruned"] - result["epochs_pruned"], 4)
    result["pruned_trials"] = med("pruned", "pruned_trials")
    result["wall_s"] = round(sum(r[a]["wall_s"] for r in rows for a in ARMS), 1)
    result["settings"] = {
        **{k: v for k, v in size.items() if k != "patients"},
        "pruner": space.settings.pruner,
        "prune_on": space.settings.prune_on,
        "reference_point": list(REFERENCE),
        "params_m_range": [lo, hi],
    }
    result["per_seed"] = rows
    result["goal"] = (
        "pruned NSGA-II reaches the unpruned NSGA-II's hypervolume (and beats random) on "
        "fewer epochs"
    )
    result["_load_start"] = load_start
    lines = [
        f"{size['trials']} trials x {size['seeds']} seed(s), {size['epochs']} epochs each; "
        f"objectives val balanced accuracy (max), params_m (min); pruner "
        f"{space.settings.pruner} on val {space.settings.prune_on or PRIMARY}",
        f"hypervolume (median over seeds; ref {REFERENCE}, ideal 1.1): NSGA-II pruned "
        f"{result['hv_pruned']:.4f}, unpruned {result['hv_unpruned']:.4f}, random "
        f"{result['hv_random']:.4f}",
        f"epochs: pruned {result['epochs_pruned']:g}, unpruned {result['epochs_unpruned']:g}, "
        f"random {result['epochs_random']:g}; saved by pruning {result['epochs_saved']:g} "
        f"({result['pruned_trials']:g} trials pruned)",
    ]
    for r in rows:
        lines.append(
            f"seed {r['seed']}: "
            + "; ".join(
                f"{a} hv {r[a]['hypervolume']:.4f}, {r[a]['epochs']} epochs, {r[a]['wall_s']} s"
                for a in ARMS
            )
        )
    c.finish("multiobjective", args, result, "\n".join(lines))


if __name__ == "__main__":
    main()
