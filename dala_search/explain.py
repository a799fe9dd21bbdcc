"""Grad-CAM heat maps of a trained DALAResNet50 on a sample of test images of each class.

``report.py`` calls ``gradcam_for_best`` once per magnification of a search: it loads the
best model from MLflow (the registered version of that search's best trial), rebuilds the
same patient-disjoint split (same data, seed and fold as the search, so the images shown
are held-out test patients), computes Grad-CAM with the ``grad-cam`` library
(pytorch-grad-cam) and logs the overlays to the magnification's parent run under
``gradcam/<mag>/``. ``gradcam_overlays`` is the framework-free part (model + data in,
images out) and can be used on any model this package trains.

Target layer: the last bottleneck of stage 4 (``backbone.layer4[-1]``). With the default
``post`` placement that module is the bottleneck *wrapped with its attention*, so the map
shows what the attention-weighted features respond to; with ``residual`` placement the
attention sits inside it. Either way it is the last spatial feature map before pooling.

A cross-validated search registers an ensemble of its fold models
(``model.ensemble.ProbabilityEnsemble``): the map then explains the ensemble's output at
every member's target layer, and pytorch-grad-cam averages the members' maps.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dala_search.data.augment import normalize, to_float
from dala_search.data.breakhis import CLASSES, SUBTYPE_CODES
from dala_search.errors import DalaError

MANIFEST = "samples.json"
# Test images are 32-224 px; overlays are upscaled to at least this width so a 32 px tile
# is still readable in a report (bilinear for the image, the map is smooth anyway).
DISPLAY_SIZE = 192


@dataclass(frozen=True)
class GradCamSample:
    """One overlay: which test image, what the model said, which class the map explains."""

    file: str  # PNG file name (original | overlay, side by side)
    image: str  # source image path
    slide: str  # patient
    true_class: str
    predicted_class: str
    explained_class: str  # Grad-CAM target: the predicted class
    probability: float  # softmax probability of the predicted class


def target_layer(model: nn.Module) -> nn.Module:
    """The last stage-4 bottleneck (with its attention) of a DALAResNet50."""
    try:
        return model.backbone.layer4[-1]
    except (AttributeError, IndexError, TypeError):
        raise DalaError(
            f"Grad-CAM: {type(model).__name__} has no backbone.layer4 (not a DALAResNet50)"
        ) from None


def target_layers(model: nn.Module) -> list[nn.Module]:
    """The layers Grad-CAM reads: the model's own, or each member's of an ensemble."""
    members = getattr(model, "members", None)
    if members is not None:
        return [target_layer(m) for m in members]
    return [target_layer(model)]


def class_names(n_classes: int) -> tuple[str, ...]:
    """Names of the model's outputs: benign/malignant, or the 8 subtype codes."""
    return CLASSES if n_classes == len(CLASSES) else SUBTYPE_CODES[:n_classes]


def sample_test_indices(
    labels: np.ndarray, test_idx: np.ndarray, per_class: int, seed: int
) -> list:
    """Up to ``per_class`` test positions of each class present, seeded, in class order."""
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for c in np.unique(labels[test_idx]):
        pool = test_idx[labels[test_idx] == c]
        take = rng.choice(pool, size=min(per_class, len(pool)), replace=False)
        chosen.extend(int(i) for i in sorted(take))
    return chosen


def gradcam_overlays(
    model: nn.Module,
    data: Any,
    *,
    task: str = "binary",
    per_class: int = 2,
    seed: int = 0,
) -> list[tuple[GradCamSample, np.ndarray]]:
    """Grad-CAM of ``model`` on a seeded sample of ``data``'s test images of each class.

    ``data`` is a ``train.TrialData``. Returns (sample, RGB uint8 image: original | overlay).
    The map explains the predicted class of each image.
    """
    if per_class < 1:
        raise DalaError(f"Grad-CAM: per_class {per_class} must be at least 1")
    labels = data.labels(task)
    test_idx = np.asarray(data.split.test, dtype=np.int64)
    if len(test_idx) == 0:
        raise DalaError(f"Grad-CAM: the split of {data.root} has no test images")
    chosen = sample_test_indices(labels, test_idx, per_class, seed)
    images = np.ascontiguousarray(data.cache.images[data.rows[chosen]])  # uint8 NHWC
    probs, pairs = cam_pairs(model, images, normalize(to_float(torch.from_numpy(images))))
    names = class_names(probs.shape[1])
    preds = probs.argmax(axis=1)
    out: list[tuple[GradCamSample, np.ndarray]] = []
    for k, i in enumerate(chosen):
        pred = int(preds[k])
        rec = data.records[i]
        sample = GradCamSample(
            file=f"{names[labels[i]]}_{k:02d}.png",
            image=str(rec.path),
            slide=rec.slide,
            true_class=names[labels[i]],
            predicted_class=names[pred],
            explained_class=names[pred],
            probability=float(probs[k, pred]),
        )
        out.append((sample, pairs[k]))
    return out


def cam_pairs(
    model: nn.Module, images: np.ndarray, x: torch.Tensor
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Softmax probabilities of ``x`` (the normalised ``images``, uint8 NHWC) and per image
    the RGB uint8 picture ``original | Grad-CAM overlay`` of its predicted class, upscaled to
    at least ``DISPLAY_SIZE`` wide. ``dala-search predict --gradcam`` draws the same."""
    from PIL import Image
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = model.cpu().eval()
    layers = target_layers(model)
    x = x.detach().cpu().clone()
    # Gradients must reach the target layer even when every backbone stage is frozen.
    x.requires_grad_(True)
    with torch.no_grad():
        probs = torch.softmax(model(x).float(), dim=1).numpy()
    # One batched pass: the map of each image explains its own predicted class.
    preds = probs.argmax(axis=1)
    with GradCAM(model=model, target_layers=layers) as cam:
        masks = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(p)) for p in preds])
    pairs = []
    for k in range(len(images)):
        rgb = images[k].astype(np.float32) / 255.0
        overlay = show_cam_on_image(rgb, masks[k], use_rgb=True)
        side = max(DISPLAY_SIZE, rgb.shape[1])
        h = round(rgb.shape[0] * side / rgb.shape[1])
        pair = [
            np.asarray(Image.fromarray(a).resize((side, h), Image.BILINEAR))
            for a in (images[k], overlay)
        ]
        pairs.append(np.concatenate(pair, axis=1))
    return probs, pairs


def write_overlays(items: list[tuple[GradCamSample, np.ndarray]], out_dir: Path) -> list[dict]:
    """PNG per overlay plus ``samples.json`` (the manifest the report reads) in ``out_dir``."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = []
    for sample, img in items:
        Image.fromarray(img).save(out_dir / sample.file)
        manifest.append(asdict(sample))
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def gradcam_for_best(
    *,
    tracking_uri: str,
    parent_run_id: str,
    model_uri: str,
    config: Mapping[str, str],
    data_dir: str,
    magnification: str,
    seed: int,
    fold: int | None,
    out_dir: Path,
    per_class: int = 2,
    log_to_mlflow: bool = True,
    progress: bool = False,
) -> list[dict]:
    """Grad-CAM of a search's best model at one magnification; returns the manifest.

    ``config`` is the best configuration as MLflow params (strings):
    its ``image_size`` and ``task`` pick the cache and the classes; ``seed``/``fold`` are the
    search's, so the split (and so the test patients) is the one the search used. The
    overlays land in ``out_dir`` and, unless ``log_to_mlflow`` is off, on the parent run as
    artifacts ``gradcam/<mag>/``.
    """
    import mlflow

    from dala_search.pyfunc_model import load_torch_model
    from dala_search.train import prepare_data

    for key in ("image_size", "task"):
        if key not in config:
            raise DalaError(f"Grad-CAM {magnification}: the best configuration has no {key!r}")
    data = prepare_data(
        data_dir,
        magnification,
        image_size=int(config["image_size"]),
        seed=seed,
        fold=fold,
        progress=progress,
    )
    mlflow.set_tracking_uri(tracking_uri)
    model = load_torch_model(model_uri)
    items = gradcam_overlays(
        model,
        data,
        task=config["task"],
        per_class=per_class,
        seed=seed,
    )
    manifest = write_overlays(items, out_dir)
    if log_to_mlflow:
        from mlflow import MlflowClient

        MlflowClient(tracking_uri).log_artifacts(
            parent_run_id, str(out_dir), artifact_path=f"gradcam/{magnification}"
        )
    return manifest
