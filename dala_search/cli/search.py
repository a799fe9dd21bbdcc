"""``train`` (one trial), ``spaces``, ``start``, ``resume`` and ``best``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from dala_search.cli._base import (
    CACHE_OPT,
    JSON_OPT,
    MAG_OPT,
    MAX_IMAGE_SIZE,
    PROTOCOL_OPT,
    RUNS_OPT,
    SEED_OPT,
    TRACKING_OPT,
    check_search_name,
    leaky_warning,
    main,
    table_options,
)
from dala_search.runs.plan import latest_search, open_search, search_tracking_uri
from dala_search.runs.schema import best_table, check_tracking_uri
from dala_search.start_options import COMMAND_OPTIONS, MAX_EPOCHS

if TYPE_CHECKING:
    from dala_search.config import TrialConfig

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
@PROTOCOL_OPT
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
    split_protocol: str,
    cache_dir: Path | None,
    as_json: bool,
) -> None:
    """Train one configuration on one magnification and print its metrics."""
    from dala_search.train import train_trial

    leaky_warning(split_protocol)
    config = _train_config(config_path, epochs, image_size, pretrained, seed, device)
    index, data = _train_data(
        data_dir, magnification, config, fold, split_protocol, cache_dir, as_json
    )

    def show(epoch: int, m: dict[str, float]) -> None:
        if not as_json:
            click.echo(
                f"epoch {epoch:3d}  loss {m['train_loss']:.4f}  "
                f"val bal.acc {m['val_balanced_accuracy']:.4f}  "
                f"val acc {m['val_accuracy']:.4f}  ({m['epoch_time_s']:.1f}s)",
                err=True,
            )

    if config.backbone.startswith("timm:"):  # a head on a frozen backbone's embeddings
        from dala_search.train_head import train_head_trial

        result = train_head_trial(config, data, show, progress=not as_json)
    else:
        result = train_trial(config, data, show, progress=False)
    _print_train_result(result, config, data, len(index.skipped), as_json)


def _train_config(
    config_path: Path | None,
    epochs: int | None,
    image_size: int | None,
    pretrained: str | None,
    seed: int | None,
    device: str | None,
) -> TrialConfig:
    """The ``TrialConfig`` of ``train``: the YAML's (or the defaults) with the options over it."""
    from dala_search.config import TrialConfig, load_trial_config

    overrides = {
        "epochs": epochs,
        "image_size": image_size,
        "pretrained": pretrained,
        "seed": seed,
        "device": device,
    }
    if config_path is not None:
        return load_trial_config(config_path, **overrides)
    return TrialConfig.from_dict(
        {k: v for k, v in overrides.items() if v is not None}, source="command line"
    )


def _train_data(
    data_dir: Path | None,
    magnification: str,
    config: TrialConfig,
    fold: int | None,
    split_protocol: str,
    cache_dir: Path | None,
    as_json: bool,
) -> tuple[Any, Any]:
    """The data folder's index (the demo set without ``--data``) and the magnification's
    prepared data (split, decoded-image cache)."""
    from dala_search.data.breakhis import index_breakhis
    from dala_search.data.demo import ensure_demo_data
    from dala_search.train import prepare_data

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
        protocol=split_protocol,
    )
    if data.synthetic and not as_json:
        click.echo("note: training on SYNTHETIC demo data, not real BreakHis images", err=True)
    return index, data


def _print_train_result(
    result: Any, config: TrialConfig, data: Any, skipped: int, as_json: bool
) -> None:
    """The trial's best epoch and metrics: a table, or the JSON of ``--json``."""
    from dala_search.data.protocols import label

    out = {
        "protocol": data.split.protocol,
        "leaky": data.split.leaky,
        "config": config.to_dict(),
        "data": data.describe(),
        "skipped_files": skipped,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "best_val": result.best,
        "test": result.test,
    }
    if as_json:
        click.echo(json.dumps(out, indent=2, default=float))
        return
    click.echo(
        f"best epoch {result.best_epoch} of {result.epochs_run} (by val {config.select_metric}); "
        f"split protocol: {label(data.split.protocol)}"
    )
    click.echo(f"{'metric':28}{'val(best)':>12}{'test':>12}")
    for k, v in result.test.items():
        click.echo(f"{k:28}{result.best.get('val_' + k, float('nan')):>12.4f}{v:>12.4f}")


# ----------------------------------------------------------------------------- search


@main.command("spaces")
@click.option("--verbose", "-v", is_flag=True, help="Show every parameter.")
def spaces_cmd(verbose: bool) -> None:
    """List the shipped search spaces (`--space` also takes a path to your own YAML)."""
    from dala_search.space_file import list_spaces

    for sp in list_spaces():
        click.echo(f"{sp.name:10} {len(sp.params):2d} params  {sp.description}")
        if verbose:
            for line in sp.describe():
                click.echo(f"    {line}")


# A console setting, not a setting of the search: not a row of the start options' table.
VERBOSE_OPT = click.option(
    "--verbose",
    is_flag=True,
    help="Also show Ray Tune's own banners (experiment box, results folder); by default "
    "a search prints dala-search's progress lines and Ray's warnings only.",
)


@main.command("start")
@table_options(COMMAND_OPTIONS)
# Not a row of the table: what to do with an existing name, not a setting of the search.
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace the search of this --name (its folder, MLflow experiment and Optuna "
    "studies), e.g. one whose start failed; only after every other option passed its checks.",
)
@VERBOSE_OPT
def start_cmd(overwrite: bool, verbose: bool, **options: Any) -> None:
    """Start a search: one Optuna study per magnification, trials on Ray, records in MLflow."""
    from dala_search.search.tuner import check_search

    # Every option, the space, the stores, the data, the weights and the resources are
    # checked here; nothing (folder, study, MLflow record, Ray) exists before this returns.
    leaky_warning(options["protocol"] or "patient")
    checked = check_search(**options, overwrite=overwrite)
    plan = checked.plan
    if overwrite and Path(plan.folder).exists():
        from dala_search.runs.rollback import replace_search

        for what in replace_search(plan.folder, plan.name, [plan.tracking_uri]):
            click.echo(f"--overwrite: removed {what}", err=True)
    click.echo(
        f"search {plan.name}: space {plan.space}, {plan.trials} trial(s) x "
        f"{', '.join(plan.magnifications)}"
        + (f", {plan.cv} inner folds per trial" if plan.cv > 1 else "")
        + (f", {plan.protocol} protocol" if plan.protocol != "patient" else "")
        + f"; folder {plan.folder}",
        err=True,
    )
    click.echo(f"tracking: {plan.tracking_uri}   study: {plan.storage}", err=True)
    _run(plan, resume=False, index=checked.index, verbose=verbose)


@main.command("resume")
@click.argument("name", callback=check_search_name)
@RUNS_OPT
@VERBOSE_OPT
def resume_cmd(name: str, runs_dir: Path | None, verbose: bool) -> None:
    """Continue an interrupted search to its requested number of trials."""
    from dala_search.search.tuner import check_resume

    plan = open_search(name, runs_dir).plan
    _run(plan, resume=True, index=check_resume(plan), verbose=verbose)


def _run(plan: Any, *, resume: bool, index: Any = None, verbose: bool = False) -> None:
    from dala_search.search.tuner import SearchFailed, SearchInterrupted, exit_process, run_search

    try:
        outcomes = run_search(plan, resume=resume, index=index, verbose=verbose)
    except SearchInterrupted as e:
        _print_outcomes(e.outcomes)
        click.echo(f"Interrupted: continue with `dala-search resume {plan.name}`", err=True)
        exit_process(130)  # os._exit when Ray's processes were gone (stopping.py)
    except KeyboardInterrupt:  # before run_search took over the signals
        click.echo(f"Interrupted: continue with `dala-search resume {plan.name}`", err=True)
        exit_process(130)
    except SearchFailed as e:  # rolled back (stopping.roll_back): records closed, folder marked
        click.echo(f"Error: {e}", err=True)
        exit_process(2)
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
@click.argument("name", required=False, callback=check_search_name)
@TRACKING_OPT
@RUNS_OPT
@JSON_OPT
def best_cmd(
    name: str | None, tracking_uri: str | None, runs_dir: Path | None, as_json: bool
) -> None:
    """Best configuration and metrics per magnification, read back from MLflow."""
    name = name or latest_search(runs_dir)
    uri = search_tracking_uri(name, runs_dir, tracking_uri)
    # MLflow's HTTP client retries an unreachable server for minutes: say so at once.
    check_tracking_uri(uri)
    rows = best_table(uri, name)
    from dala_search.pareto import add_fronts, front_lines

    add_fronts(rows, name, runs_dir, uri)  # several objectives: each row's "pareto"
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
        for line in front_lines(r):
            click.echo(line)
