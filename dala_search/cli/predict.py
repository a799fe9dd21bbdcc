"""``predict``: apply a search's registered best model (or any logged image model) to images."""

from __future__ import annotations

from pathlib import Path

import click

from dala_search.cli._base import RUNS_OPT, TRACKING_OPT, main


@main.command("predict")
@click.argument("model", metavar="NAME|MODEL_URI")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option(
    "--magnification",
    "-m",
    default=None,
    help="The model of this magnification (default: the one in each BreakHis file name).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path("preds.csv"),
    show_default=True,
    help="Per image: path, slide, magnification, predicted, prob_<class>.",
)
@click.option(
    "--patients-out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path("patients.csv"),
    show_default=True,
    help="Per slide: images, mean probabilities, the patient-level call.",
)
@click.option("--tta", is_flag=True, help="Average 8 views: 4 quarter turns, each mirrored.")
@click.option(
    "--gradcam",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Write each image's Grad-CAM overlay (<DIR>/<file stem>.png).",
)
@click.option("--device", default=None, help="auto (default) | cpu | cuda | cuda:N")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=64, show_default=True)
@TRACKING_OPT
@RUNS_OPT
def predict_cmd(
    model: str,
    paths: tuple[str, ...],
    magnification: str | None,
    out: Path,
    patients_out: Path,
    tta: bool,
    gradcam: Path | None,
    device: str | None,
    batch_size: int,
    tracking_uri: str | None,
    runs_dir: Path | None,
) -> None:
    """Predict images (files or folders) with a search's registered best model (NAME: per
    magnification) or a model URI (models:/dalaresnet50-40X@best, runs:/..., a folder).

    Unreadable images are reported, skipped and counted; the exit status is non-zero only
    when no image could be predicted.
    """
    from dala_search.predict_images import predict_files

    predict_files(
        model,
        paths,
        magnification=magnification,
        out=out,
        patients_out=patients_out,
        tta=tta,
        gradcam=gradcam,
        device=device,
        batch_size=batch_size,
        runs_dir=runs_dir,
        tracking_uri=tracking_uri,
        log=lambda line: click.echo(line, err=True),
    )
