"""The MLflow model a search registers: a pyfunc that takes image bytes.

``log_image_model`` logs a trained ``nn.Module`` (a DALAResNet50, or the ensemble of a
``--cv`` trial) as an ``mlflow.pyfunc`` model whose input is a DataFrame with a column
``image`` of PNG/JPEG bytes (base64 strings over REST, which the scoring server decodes
because the signature says ``binary``), any size, and whose output is ``prob_<class>`` per
class and ``predicted`` per image. So ``mlflow.pyfunc.load_model(uri).predict(df)`` and
``mlflow models serve -m models:/dalaresnet50-40X@best`` work without this package's code
in the caller's head (the package itself must be installed where the model is loaded).

Inside the model directory:
- ``artifacts/torch_model``: the module as an ``mlflow.pytorch`` model (``load_torch_model``
  returns it: Grad-CAM and the tests use the module itself);
- ``artifacts/dala_model.json``: magnification, task, class names, preprocessing (image
  size, mean, std) and the training config; the same (less the config) is the MLmodel
  file's ``metadata``, visible in the MLflow UI.

The numbers come from ``predict.py``, the same functions ``dala-search predict`` uses.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from dala_search.errors import DalaError
from dala_search.predict import (
    Preprocess,
    class_names,
    decode,
    prediction_rows,
    preprocessing_of,
    probabilities,
)

META_FILE = "dala_model.json"
TORCH_ARTIFACT = "torch_model"
META_ARTIFACT = "dala_model"
IMAGE_COLUMN = "image"
PIP_REQUIREMENTS = ["torch", "torchvision", "pillow", "pandas", "dala-search"]


def model_metadata(model: Any, config: Mapping[str, Any], magnification: str) -> dict[str, Any]:
    """What travels with a logged model (``dala_model.json``)."""
    for key in ("task", "image_size"):
        if key not in config:
            raise DalaError(f"logging a model: the training config has no {key!r}")
    pre = preprocessing_of(model, int(config["image_size"]))
    return {
        "magnification": magnification,
        "task": config["task"],
        "class_names": list(class_names(config["task"])),
        "image_size": pre.size,
        "preprocess": pre.to_dict(),
        "amp": bool(config.get("amp", False)),
        "input": f"DataFrame column {IMAGE_COLUMN!r}: PNG/JPEG bytes (base64 over REST)",
        "config": dict(config),
    }


class DalaImageModel(PythonModel):
    """Image bytes in, class probabilities out (see the module docstring).

    ``params={"tta": True}`` averages the 8 flips and quarter turns (``predict.TTA_VIEWS``).
    """

    def load_context(self, context: Any) -> None:
        import mlflow.pytorch
        import torch

        from dala_search.train import resolve_device

        self.meta = json.loads(Path(context.artifacts[META_ARTIFACT]).read_text())
        self.pre = Preprocess.from_dict(self.meta["preprocess"], META_FILE)
        self.names = tuple(self.meta["class_names"])
        self.device = resolve_device("auto")
        model = mlflow.pytorch.load_model(context.artifacts[TORCH_ARTIFACT], map_location="cpu")
        self.model: torch.nn.Module = model.to(self.device).eval()

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        if IMAGE_COLUMN not in model_input.columns:
            raise DalaError(
                f"the model takes a DataFrame with a column {IMAGE_COLUMN!r} of PNG/JPEG "
                f"bytes; got columns {list(model_input.columns)}"
            )
        images = []
        for i, value in enumerate(model_input[IMAGE_COLUMN]):
            try:
                images.append(decode(_as_bytes(value), self.pre))
            except Exception as e:  # PIL's many error types: name the row
                raise DalaError(f"row {i}: not a readable image ({type(e).__name__}: {e})") from e
        stack = np.stack(images) if images else np.zeros((0, self.pre.size, self.pre.size, 3))
        probs = probabilities(
            self.model,
            stack.astype(np.uint8),
            self.pre,
            device=self.device,
            tta=bool((params or {}).get("tta", False)),
            amp=bool(self.meta.get("amp", False)),
        )
        return pd.DataFrame(prediction_rows(probs.reshape(-1, len(self.names)), self.names))


def _as_bytes(value: Any) -> bytes:
    """Bytes as given; a str is base64 (what a JSON client sends for an image)."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        return base64.b64decode(value)
    raise DalaError(f"an image must be bytes or a base64 string, not {type(value).__name__}")


def example_png(size: tuple[int, int] = (70, 46)) -> bytes:
    """A small seeded RGB PNG (BreakHis's 700x460 shape, shrunk): the logged input example."""
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def signature(names: tuple[str, ...]) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, IMAGE_COLUMN)]),
        outputs=Schema(
            [ColSpec(DataType.double, f"prob_{n}") for n in names]
            + [ColSpec(DataType.string, "predicted")]
        ),
        params=ParamSchema([ParamSpec("tta", DataType.boolean, False)]),
    )


def log_image_model(
    model: Any, config: Mapping[str, Any], magnification: str, name: str = "model"
) -> Any:
    """Log ``model`` as the image pyfunc into the active run; returns MLflow's ModelInfo.

    MLflow checks the logged model on its input example (it loads it and predicts), so a
    model that cannot answer an image is found when it is logged, not when it is served.
    """
    import mlflow.pytorch

    meta = model_metadata(model, config, magnification)
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        torch_dir = Path(tmp) / TORCH_ARTIFACT
        # pickle format: pt2 would need a traced example
        mlflow.pytorch.save_model(
            model, str(torch_dir), serialization_format="pickle", pip_requirements=[]
        )
        meta_path = Path(tmp) / META_FILE
        meta_path.write_text(json.dumps(meta, indent=2, default=str))
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=DalaImageModel(),
            artifacts={TORCH_ARTIFACT: str(torch_dir), META_ARTIFACT: str(meta_path)},
            signature=signature(tuple(meta["class_names"])),
            input_example=pd.DataFrame({IMAGE_COLUMN: [example_png()]}),
            pip_requirements=PIP_REQUIREMENTS,
            metadata={k: v for k, v in meta.items() if k != "config"},
        )


class _PickleNotice(logging.Filter):
    """Drops MLflow's "serialized using pickle/CloudPickle" notice (it warns on every call,
    and what it would load is this package's own model class) and its "Validating input
    example" line (an INFO per logged model, forwarded by Ray into the search's console)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "Pickle" not in message and "Validating input example" not in message


@contextmanager
def _quiet() -> Iterator[None]:
    """While a trial logs its model: no pickle notices, no artifact progress bars (the
    input-example check downloads the model it just logged) in the trial's output."""
    import os

    loggers = [logging.getLogger(n) for n in ("mlflow.pytorch", "mlflow.pyfunc")]
    notice = _PickleNotice()
    for lg in loggers:
        lg.addFilter(notice)
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(notice)
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def load_image_model(model_uri: str) -> DalaImageModel:
    """The pyfunc's Python object (torch module on ``.model``, metadata on ``.meta``)."""
    loaded = mlflow.pyfunc.load_model(model_uri)
    inner = loaded.unwrap_python_model()
    if not isinstance(inner, DalaImageModel):
        raise DalaError(
            f"{model_uri} is not a dala-search image model (a {type(inner).__name__}); "
            "models logged before the pyfunc wrapper load with mlflow.pytorch.load_model"
        )
    return inner


def load_torch_model(model_uri: str) -> Any:
    """The ``nn.Module`` inside a logged image model, on the CPU (Grad-CAM, tests)."""
    return load_image_model(model_uri).model.cpu()
