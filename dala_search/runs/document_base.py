"""What the evaluation and baseline documents share (``documents.py`` is the format's
overview): the per-metric figures (``MetricSummary``), the fields that say how a
document's figures were made (``FoldsRecord``) and where a document lives
(``document_path``)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from dala_search.errors import DalaError
from dala_search.runs.json_files import Reader, write_json

PROTOCOLS = ("folds", "seeds")
# The split protocols (data/protocols.py); "image" is the leaky one.
SPLIT_PROTOCOLS = ("patient", "image", "eva")


def document_path(folder: Path, kind: str, magnification: str, split_protocol: str) -> Path:
    """``<folder>/<kind>/<mag>.json`` for the patient protocol, ``<mag>.<protocol>.json``
    for another (``evaluation/40X.image.json`` sits beside ``evaluation/40X.json``)."""
    if split_protocol not in SPLIT_PROTOCOLS:
        raise DalaError(f"unknown split protocol {split_protocol!r}; valid: {SPLIT_PROTOCOLS}")
    suffix = "" if split_protocol == "patient" else f".{split_protocol}"
    return Path(folder) / kind / f"{magnification}{suffix}.json"


T = TypeVar("T")


@dataclass(frozen=True)
class MetricSummary:
    """One metric over the folds: the pooled figure with its interval, and the fold figures.

    Every number is in the metric's range ([0, 1] for all of ``metrics.py``) or ``null``
    (undefined: e.g. ROC AUC where the test patients hold one class).
    """

    estimate: float | None  # the metric on all folds' test predictions pooled (primary)
    ci_low: float | None  # 95% interval of ``estimate`` (method: the document's ``ci``)
    ci_high: float | None  # both null when there is no interval (``ci_note`` says why)
    mean: float | None  # mean of the defined per-fold values (secondary)
    sd: float | None  # their sample SD (ddof 1); null with fewer than 2 defined values
    values: tuple[float | None, ...]  # one per fold/seed; null where undefined in that fold
    n_undefined: int = 0  # bootstrap resamples where the metric was undefined (dropped)
    ci_note: str | None = None  # why ci_low/ci_high are null

    def to_json(self) -> dict[str, Any]:
        return {
            "estimate": self.estimate,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "mean": self.mean,
            "sd": self.sd,
            "values": list(self.values),
            "n_undefined": self.n_undefined,
            "ci_note": self.ci_note,
        }

    @classmethod
    def from_json(cls, data: Any, source: str, where: str = "") -> MetricSummary:
        r = Reader(data, source, where)
        r.only("estimate", "ci_low", "ci_high", "mean", "sd", "values", "n_undefined", "ci_note")
        values = r.get("values", list)
        for i, v in enumerate(values):
            if v is not None and (
                isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
            ):
                raise r.error(f"expected numbers or null, found {json.dumps(v)} at {i}", "values")
        out = cls(
            estimate=r.number("estimate"),
            ci_low=r.number("ci_low"),
            ci_high=r.number("ci_high"),
            mean=r.number("mean"),
            sd=r.number("sd"),
            values=tuple(None if v is None else float(v) for v in values),
            n_undefined=r.get("n_undefined", int),
            ci_note=r.get("ci_note", str, null=True),
        )
        if (out.ci_low is None) != (out.ci_high is None):
            raise r.error("ci_low and ci_high must both be numbers or both null", "ci_low")
        if out.ci_low is not None and not out.ci_low <= out.ci_high:  # type: ignore[operator]
            raise r.error(f"{out.ci_low} > ci_high {out.ci_high}", "ci_low")
        return out

    def cell(self, digits: int = 4) -> str:
        """``0.8123 [0.7801, 0.8445]``: the estimate and its interval, as tables show it."""
        if self.estimate is None:
            return "n/a"
        text = f"{self.estimate:.{digits}f}"
        if self.ci_low is not None and self.ci_high is not None:
            text += f" [{self.ci_low:.{digits}f}, {self.ci_high:.{digits}f}]"
        return text


def metrics_json(metrics: Mapping[str, MetricSummary]) -> dict[str, Any]:
    """Each metric's JSON, by name."""
    return {k: m.to_json() for k, m in metrics.items()}


def metrics_from(r: Reader, key: str) -> dict[str, MetricSummary]:
    """The non-empty object ``key`` of ``r``, read as one ``MetricSummary`` per name."""
    raw = r.get(key, dict)
    if not raw:
        raise r.error("must be a non-empty object", key)
    return {
        name: MetricSummary.from_json(m, r.source, f"{r.where}{key}.{name}.")
        for name, m in raw.items()
    }


@dataclass(frozen=True, kw_only=True)
class FoldsRecord:
    """What every per-magnification document records about how its figures were made."""

    magnification: str  # "40X"
    search: str  # the search's name
    protocol: str  # "folds" | "seeds" (folds.py)
    k: int  # number of folds / seeded repetitions
    config: dict[str, Any]  # the TrialConfig every fold trained with (TrialConfig keys)
    synthetic: bool  # the data were synthetic (procedural tiles, not patients)
    code_version: str  # dala-search version that wrote it, "0.1.0+abc123"
    ci: str  # how the intervals were computed (intervals.method_name)
    splits: list[dict[str, Any]]  # one per fold: {"description", "train"|"val"|"test":
    # {"slides", "n_images"}} (PatientSplit.to_json)
    n_images: int  # pooled test predictions (with "seeds", a patient tested by several
    # repetitions contributes each repetition's predictions)
    n_patients: int  # distinct test patients among them (the bootstrap's clusters)
    split_protocol: str = "patient"  # how the folds were cut (data/protocols.py): "patient",
    # "image" (image-level: LEAKY, figures inflated) or "eva"; absent in older files: patient
    leaky: bool = False  # true exactly for "image"

    _COMMON = (
        "magnification",
        "search",
        "protocol",
        "k",
        "config",
        "synthetic",
        "code_version",
        "ci",
        "splits",
        "n_images",
        "n_patients",
        "split_protocol",
        "leaky",
    )

    def _common_json(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self._COMMON}

    @staticmethod
    def _common_from(r: Reader) -> dict[str, Any]:
        out = {
            "magnification": r.get("magnification", str),
            "search": r.get("search", str),
            "protocol": r.get("protocol", str),
            "k": r.get("k", int),
            "config": r.get("config", dict),
            "synthetic": r.get("synthetic", bool),
            "code_version": r.get("code_version", str),
            "ci": r.get("ci", str),
            "splits": r.get("splits", list),
            "n_images": r.get("n_images", int),
            "n_patients": r.get("n_patients", int),
            # Files written before --protocol existed were all patient-level.
            "split_protocol": r.get("split_protocol", str)
            if "split_protocol" in r.data
            else "patient",
            "leaky": r.get("leaky", bool) if "leaky" in r.data else False,
        }
        if out["split_protocol"] not in SPLIT_PROTOCOLS:
            raise r.error(
                f"expected one of {SPLIT_PROTOCOLS}, found {out['split_protocol']!r}",
                "split_protocol",
            )
        if out["leaky"] != (out["split_protocol"] == "image"):
            raise r.error(
                f"must be {out['split_protocol'] == 'image'} for split_protocol "
                f"{out['split_protocol']!r}",
                "leaky",
            )
        if out["protocol"] not in PROTOCOLS:
            raise r.error(f"expected one of {PROTOCOLS}, found {out['protocol']!r}", "protocol")
        if out["k"] < 2:
            raise r.error(f"expected at least 2, found {out['k']}", "k")
        return out

    def write(self, path: Path) -> Path:
        """Write the document to ``path`` atomically."""
        return write_json(path, self.to_json())  # type: ignore[attr-defined]

    @classmethod
    def read(cls: type[T], path: Path, magnification: str | None = None) -> T:
        """Read and validate ``path``; ``magnification``: the one it must be about."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DalaError(f"{path}: cannot read it as JSON ({e})") from None
        doc = cls.from_json(data, str(path))  # type: ignore[attr-defined]
        if magnification is not None and doc.magnification != magnification:
            raise DalaError(
                f"{path}: key 'magnification' is {doc.magnification!r}, expected {magnification!r}"
            )
        return doc
