"""``baselines/<mag>.json``: the paper's models trained on the evaluation's folds
(``BaselineDocument``, one ``ModelRow`` per model)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dala_search.runs.document_base import FoldsRecord, MetricSummary, metrics_from, metrics_json
from dala_search.runs.json_files import Reader


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
        return {"model": self.model, "metrics": metrics_json(self.metrics), "tuned": self.tuned}

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
        return cls(model=r.get("model", str), metrics=metrics_from(r, "metrics"), tuned=tuned)


RECIPES = ("shared", "tuned")


@dataclass(frozen=True, kw_only=True)
class BaselineDocument(FoldsRecord):
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
