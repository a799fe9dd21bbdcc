"""``dala-search predict``: a registered model applied to image files, two CSV files out.

``predict_files`` walks the given files and folders, picks each image's model (one model
URI for all, or a search's registered best for the image's magnification: ``-m``, else the
one in its BreakHis file name), decodes and predicts in batches on the device through
``predict.py`` (the numbers the served pyfunc gives), and writes:

- ``preds.csv``: ``path, slide, magnification, predicted, prob_<class>...`` per image;
- ``patients.csv``: per (magnification, slide), the image count, the mean probability of
  each class and the patient-level call of ``metrics.patient_predictions`` (the rule the
  evaluation scores patients with). Images whose name gives no slide have no patient row.

An unreadable image, or one without a model, is reported, skipped and counted; only when
no image could be predicted is that an error.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from dala_search.data.breakhis import check_magnification, parse_filename
from dala_search.errors import DalaError
from dala_search.metrics import patient_predictions
from dala_search.predict import TTA_VIEWS, decode, normalized, probabilities

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
Log = Callable[[str], None]


@dataclass
class Outcome:
    """What ``predict_files`` did: rows written, files skipped (path, reason)."""

    predicted: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    patients: int = 0


def collect_images(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given; folders walked (sorted) for image files. A missing path is an error."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(
                sorted(
                    f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
                )
            )
        elif p.exists():
            out.append(p)
        else:
            raise DalaError(f"PATH {p}: no such file or folder")
    if not out:
        raise DalaError(
            f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, paths))}"
        )
    return out


def name_fields(path: Path) -> tuple[str, str | None]:
    """(slide, magnification) from a BreakHis file name; ("", None) for any other name."""
    try:
        parsed = parse_filename(path.name)
    except ValueError:
        return "", None
    return parsed.slide, parsed.magnification


def is_model_uri(model: str) -> bool:
    """``models:/...``, ``runs:/...``, any ``scheme:/`` URI or a local model folder."""
    return ":/" in model or (Path(model) / "MLmodel").is_file()


def search_models(
    name: str, runs_dir: str | Path | None, tracking_uri: str | None
) -> tuple[str, dict[str, str]]:
    """The search's tracking URI and ``{magnification: models:/<name>/<version>}`` of the
    versions it registered (the alias ``best`` may since point at another search's)."""
    from dala_search.runs.plan import open_search
    from dala_search.runs.schema import best_table

    ref = open_search(name, runs_dir, tracking_uri)
    found = {
        row["magnification"]: f"models:/{row['registered_model']}"
        for row in best_table(ref.tracking_uri, name)
        if row.get("registered_model")
    }
    if not found:
        raise DalaError(f"search {name!r} registered no model (no trial completed with one)")
    return ref.tracking_uri, found


def plan_models(
    files: Sequence[Path], model: str, magnification: str | None, by_mag: dict[str, str] | None
) -> tuple[dict[str, list[int]], list[tuple[str, str]]]:
    """``{model URI: file positions}`` and the files no model applies to, with why."""
    mag = check_magnification(magnification) if magnification else None
    groups: dict[str, list[int]] = {}
    skipped: list[tuple[str, str]] = []
    for i, f in enumerate(files):
        if by_mag is None:
            groups.setdefault(model, []).append(i)
            continue
        m = mag or name_fields(f)[1]
        if m is None:
            skipped.append((str(f), "no magnification in the file name; pass -m/--magnification"))
        elif m not in by_mag:
            have = ", ".join(sorted(by_mag))
            skipped.append((str(f), f"search {model!r} has no registered model for {m} ({have})"))
        else:
            groups.setdefault(by_mag[m], []).append(i)
    return groups, skipped


def predict_files(
    model: str,
    paths: Sequence[str | Path],
    *,
    magnification: str | None = None,
    out: Path = Path("preds.csv"),
    patients_out: Path = Path("patients.csv"),
    tta: bool = False,
    gradcam: Path | None = None,
    device: str | None = None,
    batch_size: int = 64,
    runs_dir: str | Path | None = None,
    tracking_uri: str | None = None,
    log: Log = print,
) -> Outcome:
    """Predict every image of ``paths`` with ``model`` (a search NAME or a model URI)."""
    import mlflow

    from dala_search.pyfunc_model import load_image_model
    from dala_search.runs.schema import resolve_tracking_uri
    from dala_search.train import resolve_device

    files = collect_images(paths)
    dev = resolve_device(device or "auto")
    by_mag = None
    if is_model_uri(model):
        uri = resolve_tracking_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    else:
        uri, by_mag = search_models(model, runs_dir, tracking_uri)
    mlflow.set_tracking_uri(uri)
    groups, skipped = plan_models(files, model, magnification, by_mag)
    if tta:
        log(
            f"TTA: each image's probabilities are the mean over {TTA_VIEWS} views "
            "(4 quarter turns, each also mirrored)"
        )
    frames: list[pd.DataFrame] = []
    cam_names: set[str] = set()  # Grad-CAM files written, so equal stems do not overwrite
    with tqdm(total=len(files), unit="img", desc="predict", file=sys.stderr) as bar:
        bar.update(len(skipped))
        for model_uri, positions in groups.items():
            loaded = load_image_model(model_uri)
            if magnification and by_mag is None:
                _check_magnification(model_uri, loaded.meta, magnification)
            loaded.model.to(dev)
            part = [files[i] for i in positions]
            frames.append(
                _predict_group(loaded, part, dev, batch_size, tta, gradcam, skipped, bar, cam_names)
            )
    result = Outcome(predicted=sum(len(f) for f in frames), skipped=skipped)
    for path, why in skipped:
        log(f"skipped {path}: {why}")
    if result.predicted == 0:
        raise DalaError(f"nothing could be predicted: all {len(files)} image(s) skipped")
    preds = pd.concat(frames, ignore_index=True)
    patients = patient_table(preds)
    out.parent.mkdir(parents=True, exist_ok=True)
    patients_out.parent.mkdir(parents=True, exist_ok=True)
    preds.to_csv(out, index=False)
    patients.to_csv(patients_out, index=False)
    result.patients = len(patients)
    log(
        f"predicted {result.predicted} image(s), skipped {len(skipped)}; wrote {out} and "
        f"{patients_out} ({result.patients} patient(s))"
    )
    return result


def _check_magnification(model_uri: str, meta: dict[str, Any], requested: str) -> None:
    if meta.get("magnification") != check_magnification(requested):
        raise DalaError(
            f"-m/--magnification {requested}: the model {model_uri} was trained on "
            f"{meta.get('magnification')}"
        )


def _predict_group(
    loaded: Any,
    files: list[Path],
    dev: Any,
    batch_size: int,
    tta: bool,
    gradcam: Path | None,
    skipped: list[tuple[str, str]],
    bar: tqdm,
    cam_names: set[str],
) -> pd.DataFrame:
    """One model's images, ``batch_size`` at a time: decoded, predicted, (Grad-CAM) drawn."""
    names = tuple(loaded.meta["class_names"])
    rows: list[dict[str, Any]] = []
    for lo in range(0, len(files), batch_size):
        images, kept = [], []
        for f in files[lo : lo + batch_size]:
            try:
                images.append(decode(f, loaded.pre))
                kept.append(f)
            except Exception as e:  # PIL raises many types for a bad file: report, go on
                skipped.append((str(f), f"unreadable image ({type(e).__name__}: {e})"))
        bar.update(len(files[lo : lo + batch_size]))
        if not kept:
            continue
        batch = np.stack(images)
        probs = probabilities(
            loaded.model,
            batch,
            loaded.pre,
            device=dev,
            batch_size=batch_size,
            tta=tta,
            amp=bool(loaded.meta.get("amp", False)),
        )
        if gradcam is not None:
            _draw_gradcam(loaded, batch, kept, gradcam, dev, cam_names)
        for f, p in zip(kept, probs, strict=True):
            slide, _ = name_fields(f)
            rows.append(
                {
                    "path": str(f),
                    "slide": slide,
                    "magnification": loaded.meta["magnification"],
                    "predicted": names[int(p.argmax())],
                    **{f"prob_{n}": float(p[k]) for k, n in enumerate(names)},
                }
            )
    return pd.DataFrame(rows)


def _draw_gradcam(
    loaded: Any, batch: np.ndarray, files: list[Path], folder: Path, dev: Any, used: set[str]
) -> None:
    """``<folder>/<file stem>.png``: original | Grad-CAM overlay, as the report draws them.
    ``used``: the names this call wrote so far."""
    import torch
    from PIL import Image

    from dala_search.explain import cam_pairs

    folder.mkdir(parents=True, exist_ok=True)
    x = normalized(torch.from_numpy(batch), loaded.pre)
    try:
        _, pairs = cam_pairs(loaded.model, batch, x)
    finally:
        loaded.model.to(dev)  # cam_pairs explains on the CPU
    for f, pair in zip(files, pairs, strict=True):
        name = f"{f.stem}.png"
        if name in used:  # one stem in several folders: keep each, numbered
            name = f"{f.stem}-{len(used)}.png"
        used.add(name)
        Image.fromarray(pair).save(folder / name)


def patient_table(preds: pd.DataFrame) -> pd.DataFrame:
    """Per (magnification, slide): images, mean probability per class, the patient call."""
    rows = []
    prob_cols = [c for c in preds.columns if c.startswith("prob_")]
    named = preds[preds["slide"] != ""]
    for mag, part in named.groupby("magnification", sort=True):
        cols = [c for c in prob_cols if part[c].notna().all()]
        names = [c.removeprefix("prob_") for c in cols]
        probs = part[cols].to_numpy(dtype=float)
        slides = part["slide"].tolist()
        # Only the calls are used: no true labels here, so the predictions stand in for them.
        ids, _, calls, _ = patient_predictions(probs.argmax(axis=1), probs, slides)
        for k, slide in enumerate(ids):
            mine = part[part["slide"] == slide]
            rows.append(
                {
                    "slide": slide,
                    "magnification": mag,
                    "n_images": len(mine),
                    **{f"mean_prob_{n}": float(mine[f"prob_{n}"].mean()) for n in names},
                    "predicted": names[int(calls[k])],
                }
            )
    return pd.DataFrame(
        rows, columns=None if rows else ["slide", "magnification", "n_images", "predicted"]
    )
