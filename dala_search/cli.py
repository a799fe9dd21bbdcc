"""The ``dala-search`` command line: each command a few lines calling the library.

Any ``DalaError`` (bad file, key or value) is printed as one clear line and exits 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from dala_search.errors import DalaError

DATA_DIR_ARG = click.argument("data_dir", type=click.Path(path_type=Path))
JSON_OPT = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
SEED_OPT = click.option("--seed", type=click.IntRange(min=0), default=None, help="Random seed.")
MAG_OPT = click.option(
    "--magnification",
    "-m",
    default="40X",
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
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True), default=0.15)
@click.option("--test-fraction", type=click.FloatRange(0, 1, min_open=True), default=0.2)
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
@click.option("--epochs", type=click.IntRange(min=1), default=None)
@click.option("--image-size", type=click.IntRange(min=32), default=None)
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
    data = prepare_data(
        root,
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


if __name__ == "__main__":  # pragma: no cover
    main()
