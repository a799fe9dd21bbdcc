"""The ``dala-search`` command line: each command a few lines calling the library.

Any ``DalaError`` (bad file, key or value) is printed as one clear line and exits 2.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import click

from dala_search.config import SELECT_METRICS
from dala_search.errors import DalaError


class FiniteFloatRange(click.FloatRange):
    """click's FloatRange, refusing NaN and infinity.

    click compares the bounds only, and every comparison with NaN is false: ``--cpus-per-trial
    nan`` would pass, and ``inf`` passes any range without a maximum.
    """

    name = "finite float range"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


# The upper bounds below are TrialConfig's (config.py): a value the CLI lets through must
# not be refused later inside every trial of a running search.
MAX_SEED = 2**31 - 1
MAX_EPOCHS = 10000
MAX_IMAGE_SIZE = 1024


def _search_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A search name becomes a folder under the runs dir: no '/', '..' or absolute paths.

    Same rule as ``plan_search`` (letters, digits, '-', '_', '.'), checked for ``resume``,
    ``best`` and ``ui`` too: they join the name onto the runs dir and read (resume: write)
    there, so ``../x`` would reach outside it.
    """
    if value is None:
        return None
    if not value.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise click.BadParameter(f"{value!r}: use letters, digits, '-', '_' and '.' only")
    return value


def _storage(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Parse ``--storage`` (and find its SQLAlchemy dialect) while parsing the command line.

    Optuna opens the storage only when the first study starts, after the search folder,
    the MLflow experiment and Ray exist; a typo must fail before those.
    """
    if value is None:
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(value).get_dialect()  # NoSuchModuleError (an ArgumentError): unknown dialect
    except ArgumentError as e:
        raise click.BadParameter(
            f"{value!r} is not a database URL Optuna can use ({e}); e.g. "
            "sqlite:////abs/path/optuna.db or postgresql://user:pass@host/db"
        ) from None
    return value


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Check ``--time-budget`` while parsing, before the demo data or anything else is made."""
    from dala_search.search.tuner import parse_duration

    try:
        parse_duration(value)
    except DalaError as e:
        raise click.BadParameter(str(e).removeprefix("--time-budget: ")) from None
    return value


DATA_DIR_ARG = click.argument("data_dir", type=click.Path(path_type=Path))
JSON_OPT = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
SEED_OPT = click.option(
    "--seed", type=click.IntRange(0, MAX_SEED), default=None, help="Random seed."
)


def _magnification(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """One magnification or 'all', checked while parsing: before any data is made or read."""
    from dala_search.data.breakhis import check_magnification

    if value.strip().lower() == "all":
        return value
    try:
        return check_magnification(value)
    except DalaError as e:
        raise click.BadParameter(str(e)) from None


def _magnifications(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``start``'s comma list or 'all', checked while parsing (plan_search takes the text)."""
    from dala_search.search.tuner import parse_magnifications

    if value is None:
        return None
    try:
        parse_magnifications(value)
    except DalaError as e:
        raise click.BadParameter(str(e).removeprefix("--magnification: ")) from None
    return value


MAG_OPT = click.option(
    "--magnification",
    "-m",
    default="40X",
    callback=_magnification,
    show_default=True,
    help="40X, 100X, 200X, 400X, or 'all' to pool the four.",
)
CACHE_OPT = click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Decoded-image cache folder (default: $DALA_CACHE_DIR or ~/.cache/dala-search).",
)


class _Group(click.Group):
    """Turns user errors into one line on stderr and exit code 2 (click's usage-error code)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DalaError as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="dala-search")
def main() -> None:
    """Hyperparameter search for DALAResNet50 on BreakHis (Ray Tune, Optuna, MLflow)."""


# ----------------------------------------------------------------------------- data


@main.group(cls=_Group)
def data() -> None:
    """Make, inspect and split BreakHis data."""


@data.command("demo")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--images-per-mag", type=click.IntRange(min=1), default=6, show_default=True)
@click.option(
    "--patients-per-subtype",
    type=click.IntRange(min=1),
    default=None,
    help="Same number of patients for all 8 subtypes (default: a mix with the real 31/69 balance).",
)
@click.option("--width", type=click.IntRange(min=16), default=700, show_default=True)
@click.option("--height", type=click.IntRange(min=16), default=460, show_default=True)
@click.option("--layout", type=click.Choice(["official", "kaggle"]), default="official")
@click.option("--folds", is_flag=True, help="Also write a patient-disjoint Folds.csv (kaggle).")
@click.option("--overwrite", is_flag=True, help="Replace a previous demo set in OUT_DIR.")
@SEED_OPT
def data_demo(
    out_dir: Path,
    images_per_mag: int,
    patients_per_subtype: int | None,
    width: int,
    height: int,
    layout: str,
    folds: bool,
    overwrite: bool,
    seed: int | None,
) -> None:
    """Write a SYNTHETIC BreakHis-layout data set (procedural H&E-like tiles) to OUT_DIR."""
    from dala_search.data.breakhis import SUBTYPES
    from dala_search.data.synthetic import generate_demo

    per = {k: patients_per_subtype for k in SUBTYPES} if patients_per_subtype else None
    root = generate_demo(
        out_dir,
        patients_per_subtype=per,
        images_per_mag=images_per_mag,
        width=width,
        height=height,
        seed=seed or 0,
        layout=layout,
        folds=folds,
        overwrite=overwrite,
        progress=True,
    )
    click.echo(f"wrote a synthetic BreakHis-layout data set to {root} (not real patient data)")


@data.command("check")
@DATA_DIR_ARG
@JSON_OPT
def data_check(data_dir: Path, as_json: bool) -> None:
    """Count images per magnification, class and subtype; list skipped files."""
    from dala_search.data.breakhis import index_breakhis

    index = index_breakhis(data_dir, progress=not as_json)
    report = index.to_json()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    kind = "SYNTHETIC demo data" if index.synthetic else "data"
    click.echo(f"{index.root}: {kind}, {report['n_images']} images, {report['n_slides']} slides")
    click.echo(f"{'':6}{'benign':>8}{'malignant':>11}  subtypes")
    for mag, c in report["counts"].items():
        subs = " ".join(f"{k}:{v}" for k, v in report["subtypes"][mag].items() if v)
        click.echo(f"{mag:6}{c['benign']:>8}{c['malignant']:>11}  {subs}")
    if index.folds_csv:
        click.echo(f"Folds.csv: {index.folds_csv}")
    if report["skipped"]:
        click.echo(f"skipped {len(report['skipped'])} file(s):")
        for s in report["skipped"][:20]:
            click.echo(f"  {s['path']}: {s['reason']}")


@data.command("split")
@DATA_DIR_ARG
@MAG_OPT
@click.option("--fold", type=click.IntRange(1, 5), default=None, help="Official fold (Folds.csv).")
@SEED_OPT
@click.option(
    "--val-fraction", type=FiniteFloatRange(0, 1, min_open=True, max_open=True), default=0.15
)
@click.option(
    "--test-fraction", type=FiniteFloatRange(0, 1, min_open=True, max_open=True), default=0.2
)
@JSON_OPT
def data_split(
    data_dir: Path,
    magnification: str,
    fold: int | None,
    seed: int | None,
    val_fraction: float,
    test_fraction: float,
    as_json: bool,
) -> None:
    """Show the patient-disjoint train/val/test split of one magnification."""
    from dala_search.data.breakhis import check_magnification, index_breakhis
    from dala_search.data.splits import official_fold_split, patient_split

    index = index_breakhis(data_dir, progress=not as_json)
    mag = None if magnification.lower() == "all" else check_magnification(magnification)
    records = index.select(mag)
    if fold is not None:
        split = official_fold_split(index, records, fold, seed=seed or 0, val_fraction=val_fraction)
    else:
        split = patient_split(
            records, seed=seed or 0, val_fraction=val_fraction, test_fraction=test_fraction
        )
    report = split.to_json(records)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{index.root} {mag or 'all'}: {split.description}")
    for side in ("train", "val", "test"):
        s = report[side]
        click.echo(
            f"{side:5} {s['n_images']:>6} images  {len(s['slides']):>3} slides: "
            + ", ".join(s["slides"])
        )


# ----------------------------------------------------------------------------- train


@main.command("train")
@click.option(
    "--data",
    "data_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="BreakHis folder (default: the synthetic demo set, generated once).",
)
@MAG_OPT
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Trial config YAML (TrialConfig keys); defaults apply without it.",
)
@click.option("--epochs", type=click.IntRange(1, MAX_EPOCHS), default=None)
@click.option("--image-size", type=click.IntRange(32, MAX_IMAGE_SIZE), default=None)
@click.option("--pretrained", default=None, help="imagenet | none | path/to/resnet50.pth")
@SEED_OPT
@click.option("--device", default=None, help="auto | cpu | cuda | cuda:N")
@click.option("--fold", type=click.IntRange(1, 5), default=None, help="Official fold (Folds.csv).")
@CACHE_OPT
@JSON_OPT
def train_cmd(
    data_dir: Path | None,
    magnification: str,
    config_path: Path | None,
    epochs: int | None,
    image_size: int | None,
    pretrained: str | None,
    seed: int | None,
    device: str | None,
    fold: int | None,
    cache_dir: Path | None,
    as_json: bool,
) -> None:
    """Train one configuration on one magnification and print its metrics."""
    from dala_search.config import TrialConfig, load_trial_config
    from dala_search.data.breakhis import index_breakhis
    from dala_search.data.demo import ensure_demo_data
    from dala_search.train import prepare_data, train_trial

    overrides = {
        "epochs": epochs,
        "image_size": image_size,
        "pretrained": pretrained,
        "seed": seed,
        "device": device,
    }
    if config_path is not None:
        config = load_trial_config(config_path, **overrides)
    else:
        config = TrialConfig.from_dict(
            {k: v for k, v in overrides.items() if v is not None}, source="command line"
        )
    root = data_dir if data_dir is not None else ensure_demo_data()
    index = index_breakhis(root, progress=not as_json)
    if index.skipped and not as_json:
        # Unreadable files are left out, never a crash; say how many, and where to see them.
        click.echo(
            f"note: {len(index.skipped)} unreadable or non-BreakHis file(s) skipped "
            f"(`dala-search data check {root}` lists them)",
            err=True,
        )
    data = prepare_data(
        index,
        magnification,
        image_size=config.image_size,
        seed=config.seed,
        fold=fold,
        cache_dir=cache_dir,
        progress=not as_json,
    )
    if data.synthetic and not as_json:
        click.echo("note: training on SYNTHETIC demo data, not real BreakHis images", err=True)

    def show(epoch: int, m: dict[str, float]) -> None:
        if not as_json:
            click.echo(
                f"epoch {epoch:3d}  loss {m['train_loss']:.4f}  "
                f"val bal.acc {m['val_balanced_accuracy']:.4f}  "
                f"val acc {m['val_accuracy']:.4f}  ({m['epoch_time_s']:.1f}s)",
                err=True,
            )

    result = train_trial(config, data, show, progress=False)
    out = {
        "config": config.to_dict(),
        "data": data.describe(),
        "skipped_files": len(index.skipped),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "best_val": result.best,
        "test": result.test,
    }
    if as_json:
        click.echo(json.dumps(out, indent=2, default=float))
        return
    click.echo(
        f"best epoch {result.best_epoch} of {result.epochs_run} (by val {config.select_metric})"
    )
    click.echo(f"{'metric':28}{'val(best)':>12}{'test':>12}")
    for k, v in result.test.items():
        click.echo(f"{k:28}{result.best.get('val_' + k, float('nan')):>12.4f}{v:>12.4f}")


# ----------------------------------------------------------------------------- search

RUNS_OPT = click.option(
    "--runs-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where search folders live (default: $DALA_RUNS_DIR or ./dala_runs).",
)
TRACKING_OPT = click.option(
    "--tracking-uri",
    default=None,
    help="MLflow tracking URI (default: sqlite mlflow.db in the working directory).",
)


@main.command("spaces")
@click.option("--verbose", "-v", is_flag=True, help="Show every parameter.")
def spaces_cmd(verbose: bool) -> None:
    """List the shipped search spaces (`--space` also takes a path to your own YAML)."""
    from dala_search.space import list_spaces

    for sp in list_spaces():
        click.echo(f"{sp.name:10} {len(sp.params):2d} params  {sp.description}")
        if verbose:
            for line in sp.describe():
                click.echo(f"    {line}")


@main.command("start")
@click.option("--space", default="default", show_default=True, help="Space name or YAML path.")
@click.option(
    "--data",
    "data_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="BreakHis folder (default: the synthetic demo set, generated once).",
)
@click.option(
    "--magnification",
    "-m",
    default=None,
    callback=_magnifications,
    help="Comma list (40X,100X) or 'all'.",
)
@click.option("--trials", type=click.IntRange(min=1), default=None, help="Per magnification.")
@click.option("--epochs", type=click.IntRange(1, MAX_EPOCHS), default=None)
@click.option(
    "--name",
    default=None,
    callback=_search_name,
    help="Search name (default: <space>-<date>-<time>).",
)
@click.option("--address", default=None, help="Ray cluster: auto | ray://HOST:10001.")
@TRACKING_OPT
@click.option(
    "--storage",
    default=None,
    callback=_storage,
    help="Optuna RDB URL (default: sqlite in the folder).",
)
@click.option("--sampler", type=click.Choice(["tpe", "random", "cmaes", "gp"]), default=None)
@click.option(
    "--pruner",
    default=None,
    type=click.Choice(["median", "percentile", "sha", "hyperband", "asha", "none"]),
)
@click.option(
    "--prune-on",
    type=click.Choice(SELECT_METRICS),
    default=None,
    help="Validation metric the pruner judges epochs by (default: the searched metric).",
)
@click.option(
    "--gpus-per-trial",
    type=FiniteFloatRange(min=0),
    default=None,
    help="GPUs per trial; a fraction packs trials on one GPU (default: 1 if any).",
)
@click.option(
    "--cpus-per-trial", type=FiniteFloatRange(min=0, min_open=True), default=1.0, show_default=True
)
@click.option("--workers-per-trial", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--max-concurrent",
    type=click.IntRange(min=0),
    default=None,
    help="Trials at once (0: as resources allow).",
)
@click.option(
    "--time-budget", default=None, callback=_duration, help="Wall-clock budget, e.g. 45m or 2h."
)
@click.option("--fold", type=click.IntRange(1, 5), default=None, help="Official fold (Folds.csv).")
@click.option(
    "--max-retries",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Restarts of a trial whose process or node died (a trial that raised is not retried).",
)
@SEED_OPT
@RUNS_OPT
def start_cmd(
    space: str,
    data_dir: Path | None,
    magnification: str | None,
    trials: int | None,
    epochs: int | None,
    name: str | None,
    address: str | None,
    tracking_uri: str | None,
    storage: str | None,
    sampler: str | None,
    pruner: str | None,
    prune_on: str | None,
    gpus_per_trial: float | None,
    cpus_per_trial: float,
    workers_per_trial: int,
    max_concurrent: int | None,
    time_budget: str | None,
    fold: int | None,
    max_retries: int,
    seed: int | None,
    runs_dir: Path | None,
) -> None:
    """Start a search: one Optuna study per magnification, trials on Ray, records in MLflow."""
    from dala_search.search.tuner import plan_search

    plan = plan_search(
        space=space,
        name=name,
        data_dir=data_dir,
        magnifications=magnification,
        trials=trials,
        epochs=epochs,
        sampler=sampler,
        pruner=pruner,
        prune_on=prune_on,
        seed=seed or 0,
        cpus_per_trial=cpus_per_trial,
        gpus_per_trial=gpus_per_trial,
        workers_per_trial=workers_per_trial,
        max_concurrent=max_concurrent,
        time_budget=time_budget,
        tracking_uri=tracking_uri,
        storage=storage,
        address=address,
        runs_dir=runs_dir,
        fold=fold,
        max_retries=max_retries,
    )
    click.echo(
        f"search {plan.name}: space {plan.space}, {plan.trials} trial(s) x "
        f"{', '.join(plan.magnifications)}; folder {plan.folder}",
        err=True,
    )
    click.echo(f"tracking: {plan.tracking_uri}   study: {plan.storage}", err=True)
    _run(plan, resume=False)


@main.command("resume")
@click.argument("name", callback=_search_name)
@RUNS_OPT
def resume_cmd(name: str, runs_dir: Path | None) -> None:
    """Continue an interrupted search to its requested number of trials."""
    from dala_search.search import tuner

    folder = Path(runs_dir or tuner.default_runs_dir()).resolve() / name
    plan = tuner.SearchPlan.load(folder)
    tuner.tracking.check_tracking_uri(plan.tracking_uri)
    _run(plan, resume=True)


def _run(plan: Any, *, resume: bool) -> None:
    from dala_search.search.tuner import SearchInterrupted, run_search

    try:
        outcomes = run_search(plan, resume=resume)
    except SearchInterrupted as e:
        _print_outcomes(e.outcomes)
        click.echo(f"Interrupted: continue with `dala-search resume {plan.name}`", err=True)
        sys.exit(130)
    except KeyboardInterrupt:  # before Tune took over the signal (indexing, caching)
        click.echo(f"Interrupted: continue with `dala-search resume {plan.name}`", err=True)
        sys.exit(130)
    _print_outcomes(outcomes)
    click.echo(
        f"done. Compare trials with `dala-search ui` (MLflow: {plan.tracking_uri}); "
        f"best per magnification: `dala-search best {plan.name}`"
    )


def _print_outcomes(outcomes: list[Any]) -> None:
    click.echo(f"{'mag':6}{'trials':>7}{'done':>6}{'pruned':>8}{'failed':>8}  best")
    for o in outcomes:
        best = f"{o.best_value:.4f}" if o.best_value is not None else "-"
        click.echo(
            f"{o.magnification:6}{o.finished:>7}{o.completed:>6}{o.pruned:>8}{o.failed:>8}  {best}"
        )


@main.command("best")
@click.argument("name", required=False, callback=_search_name)
@TRACKING_OPT
@RUNS_OPT
@JSON_OPT
def best_cmd(
    name: str | None, tracking_uri: str | None, runs_dir: Path | None, as_json: bool
) -> None:
    """Best configuration and metrics per magnification, read back from MLflow."""
    from dala_search.search import tracking
    from dala_search.search.tuner import SearchPlan, default_runs_dir

    runs = Path(runs_dir or default_runs_dir()).resolve()
    if name is None:
        plans = sorted(runs.glob("*/search.json"), key=lambda p: p.stat().st_mtime)
        if not plans:
            raise DalaError(f"no searches in {runs}; name one or pass --runs-dir")
        name = plans[-1].parent.name
    uri = tracking_uri
    if uri is None and (runs / name / "search.json").is_file():
        uri = SearchPlan.load(runs / name).tracking_uri
    uri = tracking.resolve_tracking_uri(uri)
    # MLflow's HTTP client retries an unreachable server for minutes: say so at once.
    tracking.check_tracking_uri(uri)
    rows = tracking.best_table(uri, name)
    if as_json:
        click.echo(json.dumps({"search": name, "magnifications": rows}, indent=2))
        return
    click.echo(f"search {name}")
    for r in rows:
        m = r["metrics"]
        tag = " (SYNTHETIC data)" if r["synthetic"] else ""
        if not r["best_run_id"]:
            click.echo(f"{r['magnification']:6} no completed trial yet")
            continue
        nan = float("nan")
        shown = [
            ("val bal.acc", "best_val_balanced_accuracy"),
            ("test acc", "best_test_accuracy"),
            ("test F1", "best_test_f1"),
            ("test IBA", "best_test_iba"),
            ("test G-mean", "best_test_gmean"),
        ]
        figures = "  ".join(f"{label} {m.get(key, nan):.4f}" for label, key in shown)
        click.echo(f"{r['magnification']:6} {figures}{tag}")
        cfg = r["config"]
        keys = (
            "attention",
            "attention_stages",
            "fc1",
            "fc2",
            "leaky_slope",
            "loss_weighting",
            "sampling",
            "lr",
        )
        click.echo("       " + "  ".join(f"{k}={cfg[k]}" for k in keys if k in cfg))


# ----------------------------------------------------------------------------- evaluation

FOLDS_OPT = click.option(
    "--folds",
    type=int,
    default=None,
    help="K patient-disjoint folds (default 5; the official Folds.csv folds when present).",
)
SEEDS_OPT = click.option(
    "--seeds", type=int, default=None, help="K seeded patient-disjoint splits instead of folds."
)
EVAL_MAG_OPT = click.option(
    "--magnification", "-m", default=None, help="Comma list or 'all' (default: the search's)."
)
EVAL_EPOCHS_OPT = click.option(
    "--epochs",
    type=click.IntRange(1, MAX_EPOCHS),
    default=None,
    help="Override the best configuration's epochs.",
)
DEVICE_OPT = click.option("--device", default=None, help="auto (default) | cpu | cuda | cuda:N")


def _protocol(folds: int | None, seeds: int | None) -> tuple[str, int]:
    """--folds K or --seeds K (not both); folds 5 by default. The library checks K >= 2."""
    from dala_search.errors import ConfigError

    if folds is not None and seeds is not None:
        raise ConfigError("--folds and --seeds exclude each other: choose one protocol")
    return ("seeds", seeds) if seeds is not None else ("folds", 5 if folds is None else folds)


@main.command("evaluate")
@click.argument("name", callback=_search_name)
@FOLDS_OPT
@SEEDS_OPT
@EVAL_MAG_OPT
@EVAL_EPOCHS_OPT
@DEVICE_OPT
@TRACKING_OPT
@RUNS_OPT
@JSON_OPT
def evaluate_cmd(
    name: str,
    folds: int | None,
    seeds: int | None,
    magnification: str | None,
    epochs: int | None,
    device: str | None,
    tracking_uri: str | None,
    runs_dir: Path | None,
    as_json: bool,
) -> None:
    """Retrain each best configuration on K folds; test metrics with 95% CIs (evaluation/)."""
    from dala_search.evaluate import evaluate_search, evaluation_table

    protocol, k = _protocol(folds, seeds)
    docs = evaluate_search(
        name,
        protocol=protocol,
        k=k,
        magnifications=magnification,
        epochs=epochs,
        device=device,
        runs_dir=runs_dir,
        tracking_uri=tracking_uri,
    )
    if as_json:
        click.echo(json.dumps({"search": name, "magnifications": docs}, indent=2))
        return
    for doc in docs:
        click.echo("\n".join(evaluation_table(doc)))


@main.command("baselines")
@click.argument("name", callback=_search_name)
@click.option(
    "--models",
    default=None,
    help="Comma list (default: resnet50,seresnet50,densenet121,vgg16,vit_b_16,swin_t).",
)
@FOLDS_OPT
@SEEDS_OPT
@EVAL_MAG_OPT
@EVAL_EPOCHS_OPT
@DEVICE_OPT
@click.option("--pretrained", default=None, help="imagenet | none (default: the search's).")
@TRACKING_OPT
@RUNS_OPT
@JSON_OPT
def baselines_cmd(
    name: str,
    models: str | None,
    folds: int | None,
    seeds: int | None,
    magnification: str | None,
    epochs: int | None,
    device: str | None,
    pretrained: str | None,
    tracking_uri: str | None,
    runs_dir: Path | None,
    as_json: bool,
) -> None:
    """Train the paper's comparison models on the evaluation's folds and budget (baselines/)."""
    from dala_search.evaluate import baselines_table, run_baselines

    protocol, k = _protocol(folds, seeds)
    docs = run_baselines(
        name,
        models=models,
        protocol=protocol,
        k=k,
        magnifications=magnification,
        epochs=epochs,
        device=device,
        pretrained=pretrained,
        runs_dir=runs_dir,
        tracking_uri=tracking_uri,
    )
    if as_json:
        click.echo(json.dumps({"search": name, "magnifications": docs}, indent=2))
        return
    for doc in docs:
        click.echo("\n".join(baselines_table(doc)))


@main.command("ui")
@click.argument("name", required=False, callback=_search_name)
@TRACKING_OPT
@RUNS_OPT
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Bind address (keep 127.0.0.1 unless you mean to share it).",
)
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
def ui_cmd(
    name: str | None, tracking_uri: str | None, runs_dir: Path | None, host: str, port: int
) -> None:
    """Start the MLflow UI against the search's tracking store."""
    import subprocess

    from dala_search.search import tracking
    from dala_search.search.tuner import SearchPlan, default_runs_dir

    uri = tracking_uri
    if uri is None and name:
        uri = SearchPlan.load(Path(runs_dir or default_runs_dir()).resolve() / name).tracking_uri
    uri = tracking.resolve_tracking_uri(uri)
    if uri.startswith(("http://", "https://")):
        click.echo(f"{uri} is a tracking server already: open it in a browser")
        return
    click.echo(f"MLflow UI on http://{host}:{port} for {uri} (Ctrl-C stops it)")
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
    ]
    sys.exit(subprocess.call(cmd))


@main.command("report")
@click.argument("name", callback=_search_name)
@RUNS_OPT
@TRACKING_OPT
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="HTML file to write (default: <search folder>/report/report.html).",
)
@click.option(
    "--gradcam-per-class",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Test images per class for Grad-CAM (0: no Grad-CAM).",
)
def report_cmd(
    name: str,
    runs_dir: Path | None,
    tracking_uri: str | None,
    out: Path | None,
    gradcam_per_class: int,
) -> None:
    """Write a self-contained HTML report of a search (figures beside it and inlined)."""
    from dala_search.report import build_report

    path = build_report(
        name,
        runs_dir=runs_dir,
        out=out,
        tracking_uri=tracking_uri,
        gradcam_per_class=gradcam_per_class,
    )
    click.echo(f"report: {path} (open it in a browser; works offline)")


if __name__ == "__main__":  # pragma: no cover
    main()
