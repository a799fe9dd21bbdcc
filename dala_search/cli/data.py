"""``dala-search data``: make, inspect and split BreakHis data."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dala_search.cli._base import (
    DATA_DIR_ARG,
    JSON_OPT,
    MAG_OPT,
    PROTOCOL_OPT,
    SEED_OPT,
    ErrorGroup,
    FiniteFloatRange,
    main,
)

# ----------------------------------------------------------------------------- data


@main.group(cls=ErrorGroup)
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
@PROTOCOL_OPT
@JSON_OPT
def data_split(
    data_dir: Path,
    magnification: str,
    fold: int | None,
    seed: int | None,
    val_fraction: float,
    test_fraction: float,
    split_protocol: str,
    as_json: bool,
) -> None:
    """Show the train/val/test split of one magnification (patient-disjoint by default)."""
    from dala_search.data import protocols
    from dala_search.data.breakhis import check_magnification, index_breakhis
    from dala_search.data.splits import official_fold_split

    protocols.check_fold_protocol(fold, split_protocol)
    mag = None if magnification.lower() == "all" else check_magnification(magnification)
    protocols.check_magnifications(split_protocol, (mag or "all",))
    index = index_breakhis(data_dir, progress=not as_json)
    records = index.select(mag)
    if fold is not None:
        split = official_fold_split(index, records, fold, seed=seed or 0, val_fraction=val_fraction)
    else:
        split = protocols.make_split(
            records,
            split_protocol,
            seed=seed or 0,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
        )
    report = split.to_json(records)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{index.root} {mag or 'all'}: {split.description}")
    click.echo(f"protocol: {protocols.label(split.protocol)}")
    shared = split.shared_slides(records)
    if split.leaky:
        click.echo(
            f"LEAKY: {len(shared)} slide(s) have images on more than one side; "
            "figures from this split are inflated"
        )
    for side in ("train", "val", "test"):
        s = report[side]
        click.echo(
            f"{side:5} {s['n_images']:>6} images  {len(s['slides']):>3} slides: "
            + ", ".join(s["slides"])
        )
