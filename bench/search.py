"""Benchmark 3: Optuna pruning on vs off, same sampler, seed and trial count.

Two real searches (``plan_search`` + ``run_search``, Ray Tune, Optuna, MLflow) of
``bench/search_space.yaml`` on one synthetic data set, in one Ray session: one with the
space's pruner (successive halving by default), one with ``--pruner none``. Figures:
epochs consumed (intermediate values reported to each Optuna study) and the best
validation balanced accuracy of a completed trial (what the search would pick).
Goal: <= 40% of the epochs, best within 1 point (0.01). ``--metric roc_auc`` searches
another validation metric instead, ``--sampler tpe`` samples with another sampler than the
space's, ``--prune-on balanced_accuracy`` prunes on another metric than the space's
``prune_on`` (variants, each recorded in a block of its own). ``--keep DIR`` copies both
sides' Optuna studies and the MLflow store (every epoch's metrics) into DIR, with
``curves.json``: the unpruned side's learning curves and the pruned side's epochs per trial.
``--replay FILE`` trains nothing: it replays every pruner of the project on such curves
(exact here: one trial at a time, a seeded random sampler, deterministic trials), after
checking that replaying the measured pruner reproduces the measured pruned search.

The space prunes on validation ROC AUC while searching balanced accuracy: after an epoch or
two a random-init ResNet50 at 32 px predicts one class for most trials, so their balanced
accuracy ties at exactly 0.5 and successive halving promotes every tie; ROC AUC ranks them.

The space samples at random (seeded): both sides then train the same 24 configurations in
the same order, so the comparison measures what pruning costs and saves. With TPE the two
sides' later proposals depend on what each side saw, and the best of each mixes the
sampler's luck into the pruner's effect (``--sampler tpe`` measures that).

    python bench/search.py [--quick] [--pruner sha|...] [--metric roc_auc|...]
                           [--sampler tpe|...] [--prune-on METRIC] [--trials N]
                           [--keep DIR] [--record]
    python bench/search.py --replay bench/curves/search-pretrained-sha-roc_auc.json [--record]
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

from dala_search.config import SELECT_METRICS  # noqa: E402

SPACE = Path(__file__).resolve().parent / "search_space.yaml"
# The two searches' names; their 40X studies are "<name>-40X" (SearchPlan.study_name).
SIDES = {"pruned": "bench-pruned", "unpruned": "bench-unpruned"}
PRUNED_STUDY = f"{SIDES['pruned']}-40X"
GOAL_SHARE, GOAL_GAP = 0.40, 0.01  # the goal: <= 40% of the epochs, best within 1 point
SIZES = {  # trials, epochs (None: the space's), images per magnification (x 24 patients)
    "tiny": dict(trials=1, epochs=1, per_mag=2),
    "quick": dict(trials=4, epochs=4, per_mag=3),
    # 8 images per slide and magnification: a validation split of ~40 images, so balanced
    # accuracy moves in steps small enough to separate trials early (with ~12 images most
    # trials tie at 0.5 for epochs, and a tie is never pruned).
    "full": dict(trials=None, epochs=None, per_mag=8),
}


def _study_trials(plan) -> list:  # noqa: ANN001
    import optuna

    study = optuna.load_study(study_name=plan.study_name("40X"), storage=plan.storage)
    return study.get_trials(deepcopy=True)


def _same_trials(pruned: list, unpruned: list) -> dict:
    """Whether the two sides trained the same configurations to the same values: trial by
    trial, the same parameters and equal intermediate values on the epochs both ran (the
    premise of comparing them; a seeded random sampler and seeded trials should give it)."""
    pairs = list(zip(pruned, unpruned, strict=False))
    common = [
        (a.intermediate_values[e], b.intermediate_values[e])
        for a, b in pairs
        for e in a.intermediate_values
        if e in b.intermediate_values
    ]
    best = max(
        (t for t in unpruned if t.state.name == "COMPLETE"), key=lambda t: t.value, default=None
    )
    return {
        "trials_compared": len(pairs),
        "same_params": all(a.params == b.params for a, b in pairs),
        "equal_epoch_values": sum(x == y for x, y in common),
        "common_epoch_values": len(common),
        # the unpruned search's best trial, as the pruned search treated it
        "unpruned_best_trial": None if best is None else best.number,
        "its_fate_when_pruning": None
        if best is None
        else f"{pruned[best.number].state.name} after "
        f"{len(pruned[best.number].intermediate_values)} epochs",
    }


def _early_signal(unpruned: list) -> dict[str, float | None]:
    """How well each epoch's value of the pruning metric ranks the trials the way their final
    value (best over epochs of the searched metric) does: Spearman's rho over the unpruned
    search's trials, epoch by epoch. A pruner judging at epoch e can only keep the best if
    this is high at e; near 0, no pruning rule can tell the eventual best apart yet."""
    from scipy.stats import spearmanr

    done = [t for t in unpruned if t.state.name == "COMPLETE" and t.value is not None]
    epochs = sorted({e for t in done for e in t.intermediate_values})
    out: dict[str, float | None] = {}
    for e in epochs:
        pairs = [(t.intermediate_values[e], t.value) for t in done if e in t.intermediate_values]
        rho = spearmanr(*zip(*pairs, strict=True)).statistic if len(pairs) > 2 else None
        out[str(e)] = None if rho is None or rho != rho else round(float(rho), 2)  # NaN: ties
    return out


def _keep(url: str, dest: Path) -> None:
    """Copy a SQLite database (a side's Optuna study, the MLflow store with every epoch's
    metrics) to ``dest`` with SQLite's online backup: a consistent copy."""
    import sqlite3
    from contextlib import closing

    dest.parent.mkdir(parents=True, exist_ok=True)
    with (
        closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as a,
        closing(sqlite3.connect(dest)) as b,
    ):
        a.backup(b)
    c.log(f"kept {url} as {dest}")


def _study_figures(trials: list) -> dict:
    ran = [len(t.intermediate_values) for t in trials]
    return {
        "epochs": sum(ran),
        "states": {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED")},
        # how many trials stopped after each number of epochs (the pruner's rungs)
        "trials_by_epochs": {str(e): ran.count(e) for e in sorted(set(ran))},
    }


PRETRAIN_MAGS = ("400X", "200X", "100X", "40X")  # one after another, each from the last
PRETRAIN_EPOCHS = 3  # per magnification


def _pretrained_backbone(base: Path, size: dict, threads: int) -> Path:
    """A ResNet50 backbone trained on a second synthetic set (other patients: seed 1),
    standing in for the ImageNet weights real searches start from (not downloadable here).

    Trained once per data shape and kept in the work folder: ``train_trial`` (attention
    none, so the backbone's state dict is a torchvision ResNet50's minus ``fc``) on each
    magnification in turn, each stage starting from the last stage's weights.
    """
    import torch

    from dala_search.config import TrialConfig
    from dala_search.train import prepare_data, train_trial

    out = base / f"backbone-32px-{size['per_mag']}per-seed1-{PRETRAIN_EPOCHS}x4ep.pth"
    if out.is_file():
        return out
    root = c.demo_data(base, images_per_mag=size["per_mag"], width=96, height=64, seed=1)
    weights = "none"
    with tempfile.TemporaryDirectory(dir=base) as scratch:
        for mag in PRETRAIN_MAGS:
            config = TrialConfig(
                pretrained=weights,
                attention="none",
                image_size=32,
                epochs=PRETRAIN_EPOCHS,
                batch_size=16,
                fc1=64,
                fc2=16,
                lr=1e-3,
                sampling="oversample",
                # the stand-in's recipe stays as first made (2026-11-26), so the trials'
                # starting point does not move when trial training changes
                precise_bn=0,
                device="cpu",
                num_threads=threads,
            )
            data = prepare_data(root, mag, image_size=32, cache_dir=scratch)
            result = train_trial(config, data, keep_model=True)
            c.log(
                f"backbone pre-training on {mag} (seed-1 patients): best val balanced "
                f"accuracy {result.best['val_balanced_accuracy']:.3f}"
            )
            stage = Path(scratch) / f"{mag}.pth"
            torch.save(result.model.backbone.state_dict(), stage)
            weights = str(stage)
        Path(weights).replace(out)  # a rename in one folder: whole or not at all
    return out


CURVES_FORMAT = 2


def _write_curves(keep: Path, settings: dict) -> Path:
    """``keep/curves.json``: what ``--replay`` needs and checks itself against.

    ``settings``: the searched ``metric``, the pruned side's ``pruner`` and ``prune_on``,
    the ``sampler`` and the epoch budget ``epochs``. ``curves``: every epoch's validation
    metrics of each trial of the kept unpruned search (its MLflow store), in trial order.
    ``measured``: each trial of the measured pruned search (its kept study): final state and
    the values its pruner judged, epoch by epoch.
    """
    import optuna
    from mlflow import MlflowClient

    from dala_search.runs import schema

    client = MlflowClient(f"sqlite:///{keep / 'mlflow.db'}")
    exp = client.get_experiment_by_name(schema.experiment_name(SIDES["unpruned"]))
    if exp is None:
        raise SystemExit(f"{keep / 'mlflow.db'}: no {SIDES['unpruned']} search recorded there")
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{schema.TAG_ROLE}` = 'trial'"
    )
    curves: dict[int, dict[str, list[float]]] = {}
    for run in runs:
        number = int(run.data.tags[schema.TAG_OPTUNA_NUMBER])
        if number in curves:
            raise SystemExit(f"{keep / 'mlflow.db'}: two runs of Optuna trial {number}")
        curves[number] = {
            f"val_{m}": [
                h.value
                for h in sorted(client.get_metric_history(run.info.run_id, f"val_{m}"), key=_step)
            ]
            for m in SELECT_METRICS
        }
    unpruned = optuna.load_study(
        study_name=f"{SIDES['unpruned']}-40X", storage=f"sqlite:///{keep / 'optuna-unpruned.db'}"
    ).get_trials(deepcopy=False)
    measured = optuna.load_study(
        study_name=PRUNED_STUDY, storage=f"sqlite:///{keep / 'optuna-pruned.db'}"
    ).get_trials(deepcopy=False)
    doc = {
        "format": CURVES_FORMAT,
        **settings,
        "curves": [curves.get(t.number, {}) for t in unpruned],
        "unpruned_states": [t.state.name for t in unpruned],
        "measured": [
            {"state": t.state.name, "values": [v for _, v in sorted(t.intermediate_values.items())]}
            for t in measured
        ],
    }
    out = keep / "curves.json"
    out.write_text(json.dumps(doc))
    return out


def _step(m) -> int:  # noqa: ANN001
    return m.step


def replay(
    curves: list[dict[str, list[float]]],
    pruner: str,
    prune_metric: str,
    metric: str,
    epochs: int,
) -> dict:
    """What ``pruner`` judging ``prune_metric`` would have done to the recorded trials.

    Exact for the benchmark's searches: one trial at a time, sampled independently of
    results (seeded random sampler) and trained deterministically, so a pruned search is
    the unpruned one cut short. Each trial reports its epochs in order to an in-memory
    Optuna study with the project's pruner (``make_pruner``), under the search's study name
    (Hyperband's brackets hash it); as in a search, no pruner judges epoch ``epochs`` (the
    budget; a trial that stopped early on patience is judged at its last epoch), and a
    completed trial's value is its best epoch of ``metric`` (FAIL if it has none).
    Returns epochs and final state per trial, their sum, and the best completed value.
    """
    import optuna

    from dala_search.search.optuna_study import _best
    from dala_search.search.pruning import make_pruner

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(
        study_name=PRUNED_STUDY, direction="maximize", pruner=make_pruner(pruner)
    )
    ran: list[int] = []
    states: list[str] = []
    best = None
    for number, curve in enumerate(curves):
        if not curve.get(prune_metric):
            raise SystemExit(f"replay: trial {number} has no {prune_metric} values")
        trial = study.ask()
        state = "COMPLETE"
        for epoch, value in enumerate(curve[prune_metric], start=1):
            trial.report(value, epoch)
            frozen = study.get_trials(deepcopy=False)[trial.number]
            if epoch < epochs and study.pruner.prune(study, frozen):
                state = "PRUNED"
                break
        ran.append(epoch)
        if state == "PRUNED":
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif math.isnan(value := _best(curve[metric][:epoch], "max")):
            state = "FAIL"
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, value)
            best = value if best is None else max(best, value)
        states.append(state)
    return {"epochs": sum(ran), "best": best, "epochs_by_trial": ran, "states": states}


ORDERS = 200  # seeded shuffles of the trial order per replayed pruner


def _orders(
    curves: list[dict[str, list[float]]],
    pruner: str,
    prune_metric: str,
    metric: str,
    epochs: int,
    best: float,
) -> dict:
    """The same replay over ``ORDERS`` seeded shuffles of the trial order.

    A seeded random sampler could as well have proposed the same configurations in another
    order, and what successive halving keeps depends on the order (the first trials lead
    their rungs unopposed): this says how much of a single search's verdict is that luck.
    Returns the share of orders that keep the best within 1 point and that meet both goals,
    and the median share of epochs.
    """
    import numpy as np

    rng = np.random.default_rng(0)
    full = sum(len(c[metric]) for c in curves)
    kept = met = 0
    shares = []
    for _ in range(ORDERS):
        shuffled = [curves[i] for i in rng.permutation(len(curves))]
        r = replay(shuffled, pruner, prune_metric, metric, epochs)
        ok = best - (r["best"] if r["best"] is not None else 0.0) <= GOAL_GAP
        shares.append(r["epochs"] / full)
        kept += ok
        met += ok and r["epochs"] / full <= GOAL_SHARE
    return {
        "orders": ORDERS,
        "best_kept": round(kept / ORDERS, 3),
        "meets_goal": round(met / ORDERS, 3),
        "median_ratio": round(float(np.median(shares)), 3),
    }


def _read_curves(source: Path) -> dict:
    """A ``curves.json`` that ``--keep`` wrote, refused (SystemExit naming the file and what
    is wrong) where a replay of it could not be exact."""
    from dala_search.search.pruning import PRUNERS

    try:
        doc = json.loads(source.read_text())
        fmt = doc.get("format")
        keys = (doc["metric"], doc["pruner"], doc["prune_on"], doc["sampler"], doc["epochs"])
        curves, states, measured = doc["curves"], doc["unpruned_states"], doc["measured"]
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise SystemExit(f"--replay {source}: not a curves.json written by --keep ({e})") from e
    metric, pruner, _, sampler, _ = keys
    why = None
    if fmt != CURVES_FORMAT:
        why = f"format {fmt!r}, this script reads format {CURVES_FORMAT}"
    elif pruner not in PRUNERS or pruner == "none":
        why = f"its pruned side used pruner {pruner!r}; a replay covers Optuna pruners only"
    elif sampler != "random":
        why = (
            f"sampler {sampler!r}: only a seeded random sampler proposes the same trials "
            "whatever the pruner did"
        )
    elif not curves:
        why = "no trials recorded"
    elif bad := [i for i, s in enumerate(states) if s != "COMPLETE"]:
        why = f"unpruned trials {bad} did not complete: their curves are not whole"
    elif len(measured) != len(curves):
        why = f"{len(measured)} measured pruned trials against {len(curves)} recorded curves"
    elif any(not c.get(metric) for c in curves):
        why = f"a trial without {metric} values"
    if why:
        raise SystemExit(f"--replay {source}: {why}")
    return doc


def _replays(args, source: Path, load0: float) -> None:  # noqa: ANN001
    """``--replay FILE`` (a ``curves.json`` that ``--keep`` wrote): every pruner of the
    project, judging the measured search's pruning metric or the searched one, replayed on
    the recorded learning curves of its unpruned side. First the measured pruned search
    itself, which the replay must reproduce trial by trial (the same epochs, judged values
    and final states), else nothing is printed."""
    from dala_search.search.pruning import PRUNERS

    doc = _read_curves(source)
    metric, pruner, prune_on, budget = doc["metric"], doc["pruner"], doc["prune_on"], doc["epochs"]
    curves, measured = doc["curves"], doc["measured"]
    check = replay(curves, pruner, prune_on, metric, budget)
    for number, (m, n, state, curve) in enumerate(
        zip(measured, check["epochs_by_trial"], check["states"], curves, strict=True)
    ):
        if (m["state"], m["values"]) != (state, curve[prune_on][:n]):
            raise SystemExit(
                f"--replay {source}: trial {number} of the measured pruned search ended "
                f"{m['state']} after {len(m['values'])} epochs judged on {m['values']}; the "
                f"replay of {pruner!r} on {prune_on} gives {state} after {n} epochs of "
                f"{curve[prune_on][:n]}: not a replay of that search"
            )
    full = sum(len(c[metric]) for c in curves)
    best = max(v for c in curves for v in c[metric] if not math.isnan(v))
    rows = []
    for name in (n for n in PRUNERS if n != "none"):
        for judged in dict.fromkeys((prune_on, metric)):
            r = replay(curves, name, judged, metric, budget)
            gap = best - (r["best"] if r["best"] is not None else 0.0)
            rows.append(
                {
                    "pruner": name,
                    "prune_on": judged,
                    "epochs": r["epochs"],
                    "ratio": round(r["epochs"] / full, 3),
                    "best": r["best"],
                    "best_gap_points": round(100 * gap, 2),
                    "meets_goal": r["epochs"] / full <= GOAL_SHARE and gap <= GOAL_GAP,
                    "shuffled": _orders(curves, name, judged, metric, budget, best),
                }
            )
    values = [c[metric] for c in curves]
    # balanced accuracy exactly 0.5: one class predicted for every validation image
    chance = {
        "epochs_at_0_5": sum(v == 0.5 for vs in values for v in vs),
        "trials_at_0_5_throughout": sum(all(v == 0.5 for v in vs) for vs in values),
        "mean_trial_best": round(sum(max(vs) for vs in values) / len(values), 4),
    }
    lines = [
        f"replayed on the {len(curves)} recorded trials of the unpruned search in {source} "
        f"({full} epochs, best {metric} {best:.4f}); replaying {pruner!r} on {prune_on} "
        f"reproduces the measured pruned search trial by trial ({check['epochs']} epochs)",
        f"the curves: {chance['epochs_at_0_5']} of {full} epochs at {metric} exactly 0.5, "
        f"{chance['trials_at_0_5_throughout']} trials at 0.5 in every epoch, mean of the "
        f"trials' best {chance['mean_trial_best']:.4f}",
        f"last columns: over {ORDERS} seeded shuffles of the trial order, the share of "
        "orders that keep the best within 1 point, that meet both goals, and the median "
        "share of epochs",
        f"{'pruner':12}{'judges':24}{'epochs':>8}{'share':>8}{'best':>9}{'gap':>8}"
        f"{'kept':>8}{'met':>7}{'median':>8}",
    ]
    for r in rows:
        o = r["shuffled"]
        lines.append(
            f"{r['pruner']:12}{r['prune_on']:24}{r['epochs']:8d}{100 * r['epochs'] / full:7.0f}%"
            f"{_fmt(r['best']):>9}{r['best_gap_points']:+8.1f}"
            f"{100 * o['best_kept']:7.0f}%{100 * o['meets_goal']:6.0f}%"
            f"{100 * o['median_ratio']:7.0f}%"
        )
    result = {
        "replayed_from": str(source),
        "trials": len(curves),
        "epochs_unpruned": full,
        "best_unpruned": best,
        "metric": metric,
        "curves": chance,
        "reproduces_measured": {"pruner": pruner, "prune_on": prune_on, **check},
        "replays": rows,
        "goal": "ratio <= 0.40 and best within 1 point",
        "_load_start": load0,
    }
    block = f"search-replay-{source.stem}"
    c.finish("search", args, result, "\n".join(lines), block=block)


def _fmt(value: float | None) -> str:
    return "none completed" if value is None else f"{value:.4f}"


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--pruner", default=None, help="pruned side's pruner (default: the space's)")
    p.add_argument(
        "--metric",
        default=None,
        choices=SELECT_METRICS,
        help="the searched validation metric (default: the space's, balanced_accuracy)",
    )
    p.add_argument("--sampler", default=None, help="both sides' sampler (default: the space's)")
    p.add_argument(
        "--prune-on",
        default=None,
        choices=SELECT_METRICS,
        help="the metric the pruner judges epochs by (default: the space's prune_on)",
    )
    p.add_argument(
        "--init",
        default="pretrained",
        choices=("pretrained", "none"),
        help="trials start from a backbone pre-trained on other synthetic patients "
        "(default), or from random weights",
    )
    p.add_argument(
        "--trials",
        type=int,
        default=None,
        help="trials on each side (default: the space's 24; --quick 4, --tiny 1)",
    )
    p.add_argument(
        "--keep",
        default=None,
        metavar="DIR",
        help="copy both sides' Optuna studies and the MLflow store (every epoch's metrics) "
        "into DIR, for later analysis",
    )
    p.add_argument(
        "--replay",
        default=None,
        metavar="FILE",
        help="train nothing: replay every pruner on the learning curves in FILE (the "
        "curves.json that --keep wrote; checked against the measured pruned search)",
    )
    args = p.parse_args()
    load0 = c.load_start()
    size = SIZES[c.size_of(args)]

    import ray

    from dala_search.search.tuner import plan_search, run_search
    from dala_search.space_file import load_space

    space = load_space(SPACE)
    settings = space.settings
    pruner = args.pruner or settings.pruner
    metric = args.metric or settings.metric
    sampler = args.sampler or settings.sampler
    space_prune_on = settings.prune_on or metric  # unset: the searched metric itself
    prune_on = args.prune_on or space_prune_on
    if args.replay:
        given = [
            f"--{k.replace('_', '-')}"
            for k in ("pruner", "metric", "sampler", "prune_on", "trials", "keep")
            if getattr(args, k) is not None
        ]
        given += [f"--{k}" for k in ("quick", "tiny") if getattr(args, k)]
        given += ["--init"] if args.init != "pretrained" else []
        if given:
            p.error(f"--replay takes its settings from the file; drop {' '.join(given)}")
        _replays(args, Path(args.replay), load0)
        return
    best_key = f"best_val_{metric}"
    base = c.work_dir(args)
    root = c.demo_data(base, images_per_mag=size["per_mag"], width=96, height=64)
    backbone = _pretrained_backbone(base, size, args.threads) if args.init != "none" else None
    figures = {}
    studies: dict[str, list] = {}
    with tempfile.TemporaryDirectory(dir=base) as scratch:
        s = Path(scratch)
        uri = f"sqlite:///{s / 'mlflow.db'}"
        # The same space, searching another metric and with the trials' initial weights.
        text = SPACE.read_text().replace(f"metric: {settings.metric}", f"metric: {metric}")
        if backbone is not None:
            text = text.replace("pretrained: none", f"pretrained: {backbone}")
        space_file = s / "space.yaml"
        space_file.write_text(text)
        try:
            for side, name in ((pruner, "pruned"), ("none", "unpruned")):
                plan = plan_search(
                    space=str(space_file),
                    name=SIDES[name],
                    data_dir=root,
                    trials=args.trials or size["trials"],
                    epochs=size["epochs"],
                    pruner=side,
                    sampler=sampler,
                    prune_on=prune_on,
                    seed=0,
                    tracking_uri=uri,
                    runs_dir=s / "runs",
                    cpus_per_trial=args.threads,
                )
                c.log(f"search with pruner {side!r}: {plan.trials} trials")
                start = time.perf_counter()
                outcome = run_search(plan)[0]
                wall = time.perf_counter() - start
                studies[name] = _study_trials(plan)
                if args.keep:
                    _keep(plan.storage, Path(args.keep) / f"optuna-{name}.db")
                figures[name] = {
                    "pruner": side,
                    best_key: outcome.best_value,
                    "wall_s": round(wall, 1),
                    **_study_figures(studies[name]),
                }
                c.log(f"{name}: {figures[name]}")
                trials, epochs = plan.trials, plan.epochs or int(space.fixed["epochs"])
            if args.keep:
                _keep(uri, Path(args.keep) / "mlflow.db")
                _write_curves(
                    Path(args.keep),
                    {
                        "metric": f"val_{metric}",
                        "pruner": pruner,
                        "prune_on": f"val_{prune_on}",
                        "sampler": sampler,
                        "epochs": size["epochs"] or int(space.fixed["epochs"]),
                    },
                )
        finally:
            ray.shutdown()

    on, off = figures["pruned"], figures["unpruned"]
    share = on["epochs"] / off["epochs"]
    gap = (off[best_key] or 0.0) - (on[best_key] or 0.0)
    result = {
        "epochs_pruned": on["epochs"],
        "epochs_unpruned": off["epochs"],
        "ratio": round(share, 3),
        "metric": f"val_{metric}",
        "best_pruned": on[best_key],
        "best_unpruned": off[best_key],
        "best_gap_points": round(100 * gap, 2),
        "pruner": pruner,
        "sampler": sampler,
        "prune_on": f"val_{prune_on}",
        "init": "random" if backbone is None else f"pre-trained backbone {backbone.name}",
        "trials": trials,
        "epochs_per_trial": epochs,
        "sides": figures,
        "comparison": (cmp := _same_trials(studies["pruned"], studies["unpruned"])),
        "early_rank_correlation": (early := _early_signal(studies["unpruned"])),
        "goal": "ratio <= 0.40 and best within 1 point",
        "meets_epochs": share <= GOAL_SHARE,
        "meets_best": gap <= GOAL_GAP,
        "_load_start": load0,
    }
    c.finite_positive(result, ["epochs_pruned", "epochs_unpruned", "ratio"])
    summary = (
        f"{trials} trials x up to {epochs} epochs at 40X, sampler {sampler!r} seed 0, "
        f"one trial at a time; the pruner judges val_{prune_on}; trials start from "
        f"{'random weights' if backbone is None else 'a backbone pre-trained on other patients'}\n"
        f"pruner {pruner!r}: {on['epochs']:4d} epochs, best val {metric} "
        f"{_fmt(on[best_key])}, {on['states']}, by epochs run {on['trials_by_epochs']}, "
        f"{on['wall_s']} s\n"
        f"pruner 'none':  {off['epochs']:4d} epochs, best val {metric} "
        f"{_fmt(off[best_key])}, {off['states']}, {off['wall_s']} s\n"
        f"epochs consumed with pruning: {100 * share:.0f}% (goal <= 40%); best "
        f"{'within' if gap <= GOAL_GAP else 'NOT within'} 1 point (gap {100 * gap:+.1f} points)\n"
        f"same configurations on both sides: {cmp['same_params']}; equal per-epoch values on "
        f"the epochs both ran: {cmp['equal_epoch_values']}/{cmp['common_epoch_values']}; the "
        f"unpruned best (trial {cmp['unpruned_best_trial']}) when pruning: "
        f"{cmp['its_fate_when_pruning']}\n"
        f"Spearman rho, each epoch's val_{prune_on} vs the trial's final best val {metric} "
        f"(unpruned trials): {early}"
    )
    # another metric or sampler than the space's is a variant with a block of its own
    variant = [
        v for v, default in ((metric, settings.metric), (sampler, settings.sampler)) if v != default
    ]
    if prune_on != space_prune_on:
        variant.append(f"prune_on_{prune_on}")
    if args.init == "none":
        variant.append("init_none")
    if args.trials and args.trials != settings.trials:
        variant.append(f"trials{args.trials}")
    if args.keep:  # what the kept studies were measured with, beside them
        (Path(args.keep) / "result.json").write_text(json.dumps(result, indent=1))
    c.finish(
        "search", args, result, summary, block="-".join(["search", *variant]) if variant else None
    )


if __name__ == "__main__":
    main()
