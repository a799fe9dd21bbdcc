"""The evaluation and baseline documents: ``evaluation/<mag>.json`` and ``baselines/<mag>.json``.

``dala-search evaluate`` (``evaluate.py``) writes ``EvaluationDocument``, ``dala-search
baselines`` (``comparison.py``) writes ``BaselineDocument``, ``dala-search report`` reads
both; this module is that interface (the field comments below are the format's
documentation, in one place). Files are strict JSON (undefined numbers are ``null``),
written atomically (temp file + rename). Reading validates every key and type: a malformed
or outdated file is a ``DalaError`` naming the file and the key.

Per metric (``MetricSummary``) the primary figure is the pooled out-of-fold ``estimate``
with its patient-level cluster-bootstrap interval ``ci_low``/``ci_high``
(``dala_search.intervals``; the document's ``ci`` names the method); ``mean``, ``sd`` and
``values`` are the per-fold figures (secondary). So ``mean`` is what it always was, the
mean of the fold values, and the interval is NOT centred on it: it is the interval of
``estimate``.

No ray, optuna or mlflow here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
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


def _metrics_json(metrics: Mapping[str, MetricSummary]) -> dict[str, Any]:
    return {k: m.to_json() for k, m in metrics.items()}


def _metrics_from(r: Reader, key: str) -> dict[str, MetricSummary]:
    raw = r.get(key, dict)
    if not raw:
        raise r.error("must be a non-empty object", key)
    return {
        name: MetricSummary.from_json(m, r.source, f"{r.where}{key}.{name}.")
        for name, m in raw.items()
    }


@dataclass(frozen=True, kw_only=True)
class _FoldsRecord:
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


@dataclass(frozen=True, kw_only=True)
class NestedEstimate:
    """``evaluate NAME --nested K``: the figure of the whole selection procedure.

    For each of K outer patient folds the search was run again (its space, trials, sampler,
    pruner, ``cv``; seed ``runs.plan.nested_seed``) on the outer-training patients only, and
    its best configuration tested on the outer-test patients (that inner search's best
    trial did exactly that: its test predictions are pooled here). Every patient is tested
    once, by a model whose configuration was chosen without seeing it.
    """

    k: int  # outer folds
    cv: int  # inner folds per trial of the inner searches (1: one validation split)
    searches: list[str]  # the K inner searches (own MLflow experiment and folder each)
    seeds: list[int]  # their seeds (runs.plan.nested_seed)
    best_run_ids: list[str]  # each inner search's best trial (its test predictions pooled)
    configs: list[dict[str, Any]]  # the configuration each outer fold chose (TrialConfig keys)
    splits: list[dict[str, Any]]  # the outer splits (PatientSplit.to_json): test = fold k
    n_images: int  # pooled outer-test predictions
    n_patients: int  # distinct outer-test patients (the bootstrap's clusters)
    ci: str  # how the intervals were computed (intervals.method_name)
    metrics: dict[str, MetricSummary] = field(default_factory=dict)  # as ``metrics`` above
    optimism_of: str | None = None  # which non-nested figure ``selection_optimism`` uses
    optimism_note: str | None = None  # why ``selection_optimism`` is null

    _KEYS = (
        "k",
        "cv",
        "searches",
        "seeds",
        "best_run_ids",
        "configs",
        "splits",
        "n_images",
        "n_patients",
        "ci",
        "metrics",
        "optimism_of",
        "optimism_note",
    )

    def to_json(self) -> dict[str, Any]:
        out = {key: getattr(self, key) for key in self._KEYS}
        out["metrics"] = _metrics_json(self.metrics)
        return out

    @classmethod
    def from_json(cls, data: Any, source: str, where: str = "nested.") -> NestedEstimate:
        r = Reader(data, source, where)
        r.only(*cls._KEYS)
        out = cls(
            k=r.get("k", int),
            cv=r.get("cv", int),
            searches=r.get("searches", list),
            seeds=r.get("seeds", list),
            best_run_ids=r.get("best_run_ids", list),
            configs=r.get("configs", list),
            splits=r.get("splits", list),
            n_images=r.get("n_images", int),
            n_patients=r.get("n_patients", int),
            ci=r.get("ci", str),
            metrics=_metrics_from(r, "metrics"),
            optimism_of=r.get("optimism_of", str, null=True),
            optimism_note=r.get("optimism_note", str, null=True),
        )
        if out.k < 2:
            raise r.error(f"expected at least 2, found {out.k}", "k")
        for key in ("searches", "seeds", "best_run_ids", "configs", "splits"):
            if len(getattr(out, key)) != out.k:
                raise r.error(f"expected {out.k} entries (one per outer fold)", key)
        return out


def _optimism_from(r: Reader) -> dict[str, float | None] | None:
    raw = r.get("selection_optimism", dict, null=True)
    if raw is None:
        return None
    child = r.child("selection_optimism", raw)
    return {name: child.number(name) for name in raw}


@dataclass(frozen=True, kw_only=True)
class EvaluationDocument(_FoldsRecord):
    """``<search folder>/evaluation/<mag>.json``: the best configuration retrained on K folds.

    Also logged as the artifact ``evaluation/<mag>.json`` of the magnification's parent run,
    with metrics ``test_<name>_estimate`` / ``_ci_low`` / ``_ci_high`` / ``_mean`` there.
    """

    best_run_id: str  # the MLflow run of the best trial (its trial_config.json is ``config``)
    metrics: dict[str, MetricSummary] = field(default_factory=dict)  # name ->, names in
    # evaluate.EVAL_METRICS: accuracy, balanced_accuracy, f1, gmean, iba, roc_auc (binary:
    # malignant positive), patient_accuracy. Empty ({}) only in a document that
    # ``--nested`` wrote before any ``evaluate --folds/--seeds``: the common fields then
    # describe the outer folds (protocol "folds", k = K, the outer splits, the pooled
    # outer-test predictions) and ``config``/``best_run_id`` the search's own best.
    nested: NestedEstimate | None = None  # ``evaluate --nested K`` (null until it ran)
    selection_optimism: dict[str, float | None] | None = None  # per metric: the pooled
    # non-nested ``metrics[m].estimate`` minus ``nested.metrics[m].estimate`` (null where
    # either is undefined; the whole key null without both: ``nested.optimism_note`` says)

    def to_json(self) -> dict[str, Any]:
        return {
            **self._common_json(),
            "best_run_id": self.best_run_id,
            "metrics": _metrics_json(self.metrics),
            "nested": self.nested.to_json() if self.nested else None,
            "selection_optimism": self.selection_optimism,
        }

    @classmethod
    def from_json(cls, data: Any, source: str) -> EvaluationDocument:
        r = Reader(data, source)
        r.only(*cls._COMMON, "best_run_id", "metrics", "nested", "selection_optimism")
        # Documents written before --nested existed have neither key: read as null.
        nested_raw = r.data.get("nested")
        nested = None if nested_raw is None else NestedEstimate.from_json(nested_raw, source)
        metrics = (
            _metrics_from(r, "metrics")
            if nested is None or r.data.get("metrics")
            else {**r.get("metrics", dict)}
        )
        return cls(
            **cls._common_from(r),
            best_run_id=r.get("best_run_id", str),
            metrics=metrics,
            nested=nested,
            selection_optimism=_optimism_from(r) if "selection_optimism" in r.data else None,
        )


@dataclass(frozen=True)
class ModelRow:
    """One model's row of the comparison."""

    model: str  # "resnet50", ... or "dalaresnet50" (the search's best configuration)
    metrics: dict[str, MetricSummary]  # names in comparison.BASELINE_METRICS
    tuned: dict[str, Any] | None = None  # ``baselines --tune N``: {"trials": N, "folds":
    # [{"fold", "trial", "lr", "weight_decay", "value", "run_id", "study"}, ...]}, the lr and
    # weight decay each fold chose for this model (baseline_tuning.FoldChoice); null with
    # the shared recipe (and in the evaluation's row)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "metrics": _metrics_json(self.metrics), "tuned": self.tuned}

    @classmethod
    def from_json(cls, data: Any, source: str, where: str) -> ModelRow:
        r = Reader(data, source, where)
        r.only("model", "metrics", "tuned")
        tuned = r.data.get("tuned")  # absent before --tune existed: the shared recipe
        if tuned is not None:
            tuned = r.get("tuned", dict)
            folds = r.child("tuned", tuned).get("folds", list)
            for i, f in enumerate(folds):
                fr = r.child(f"tuned.folds[{i}]", f)
                fr.number("lr", null=False)
                fr.number("weight_decay", null=False)
        return cls(model=r.get("model", str), metrics=_metrics_from(r, "metrics"), tuned=tuned)


RECIPES = ("shared", "tuned")


@dataclass(frozen=True, kw_only=True)
class BaselineDocument(_FoldsRecord):
    """``<search folder>/baselines/<mag>.json``: the paper's models on the evaluation's folds.

    ``config`` is the shared training recipe (the best configuration's). With ``recipe``
    "tuned" (``baselines --tune N``) each row's lr and weight decay are its own (the row's
    ``tuned``), everything else is ``config``'s. Also logged as the artifact
    ``baselines/<mag>.json``, with metrics ``baseline_<model>_test_<name>_...``.
    """

    rows: list[ModelRow] = field(default_factory=list)  # one per baseline model, in order
    # (with "tuned", "dalaresnet50" first: the search's architecture, tuned like the others)
    dalaresnet50: ModelRow | None = None  # the search's evaluation (evaluation/<mag>.json)
    # when it used the same protocol and k (the same folds), else null
    recipe: str = "shared"  # "shared": every model trained with the best configuration's
    # lr and weight decay (DALAResNet50's); "tuned": each model searched its own
    tuning: dict[str, Any] | None = None  # "tuned": how (baseline_tuning.Tuning.describe:
    # trials, params ranges, metric, sampler, pruner, selection, storage, mlflow_run_id)

    def to_json(self) -> dict[str, Any]:
        return {
            **self._common_json(),
            "recipe": self.recipe,
            "tuning": self.tuning,
            "rows": [r.to_json() for r in self.rows],
            "dalaresnet50": self.dalaresnet50.to_json() if self.dalaresnet50 else None,
        }

    @classmethod
    def from_json(cls, data: Any, source: str) -> BaselineDocument:
        r = Reader(data, source)
        r.only(*cls._COMMON, "recipe", "tuning", "rows", "dalaresnet50")
        rows = r.get("rows", list)
        ours = r.get("dalaresnet50", dict, null=True)
        # Documents written before --tune existed have neither key: the shared recipe.
        recipe = r.get("recipe", str) if "recipe" in r.data else "shared"
        if recipe not in RECIPES:
            raise r.error(f"expected one of {RECIPES}, found {recipe!r}", "recipe")
        tuning = r.get("tuning", dict, null=True) if "tuning" in r.data else None
        if (recipe == "tuned") != (tuning is not None):
            raise r.error(f"recipe {recipe!r} with tuning {'set' if tuning else 'null'}", "tuning")
        return cls(
            **cls._common_from(r),
            rows=[ModelRow.from_json(row, source, f"rows[{i}].") for i, row in enumerate(rows)],
            dalaresnet50=None
            if ours is None
            else ModelRow.from_json(ours, source, "dalaresnet50."),
            recipe=recipe,
            tuning=tuning,
        )
