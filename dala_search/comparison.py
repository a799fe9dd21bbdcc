"""The paper's comparison models on the folds of a search's final evaluation.

``dala-search baselines NAME`` (``run_baselines``) trains each baseline
(``dala_search.model.baselines``: ResNet50, SEResNet50, DenseNet121, VGG16, ViT, Swin, ...)
with the best configuration's recipe on exactly the folds ``dala-search evaluate`` uses
(``folds.fold_splits`` with the same protocol, k and seed), and writes
``<search folder>/baselines/<mag>.json`` (``runs.documents.BaselineDocument``) with
DALAResNet50's row read from ``evaluation/<mag>.json`` when the protocol and k match.
Every model's figures are those of ``evaluate.summarise``: the pooled out-of-fold estimate
with its patient-level cluster-bootstrap interval, and the per-fold mean and SD, so the
rows are comparable with each other and with the evaluation.

``--tune N`` (``baseline_tuning.py``) replaces the shared recipe's lr and weight decay by
each model's own small search (DALAResNet50 included), chosen on each fold's validation
patients; the document says which recipe (``recipe``: "shared" | "tuned").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dala_search.errors import ConfigError
from dala_search.evaluate import (
    BestConfig,
    Log,
    fold_cell,
    fold_data,
    fold_record,
    metric_batch,
    open_bests,
    stderr_log,
    summarise,
    tracking_client,
    train_folds,
)
from dala_search.runs.documents import (
    BaselineDocument,
    EvaluationDocument,
    MetricSummary,
    ModelRow,
    document_path,
)
from dala_search.runs.plan import SearchRef

# The paper's table (accuracy, F1, IBA, G-mean) first, then the two we add.
BASELINE_METRICS: tuple[str, ...] = (
    "accuracy",
    "f1",
    "iba",
    "gmean",
    "balanced_accuracy",
    "roc_auc",
    "patient_accuracy",
)


def parse_models(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """Comma list (or sequence) of baseline names -> checked tuple; None -> all of them."""
    from dala_search.model.baselines import available_baselines, check_baseline

    if text is None:
        return available_baselines()
    items = text.split(",") if isinstance(text, str) else list(text)
    names = tuple(dict.fromkeys(i.strip() for i in items if i.strip()))
    if not names:
        raise ConfigError(f"--models: name at least one of {', '.join(available_baselines())}")
    return tuple(check_baseline(n) for n in names)


def run_baselines(
    name: str,
    *,
    models: str | Sequence[str] | None = None,
    protocol: str = "folds",
    k: int = 5,
    magnifications: str | None = None,
    epochs: int | None = None,
    device: str | None = None,
    pretrained: str | None = None,
    runs_dir: str | Path | None = None,
    tracking_uri: str | None = None,
    tune: int | None = None,
    log: Log = stderr_log,
    split_protocol: str = "patient",
) -> list[dict[str, Any]]:
    """``dala-search baselines``: the paper's comparison models on the evaluation's folds.

    ``split_protocol`` other than patient writes ``baselines/<mag>.<protocol>.json`` and
    metrics ``baseline_<protocol>_<model>_test_...`` (beside the patient ones).

    Each model trains with the best configuration's recipe (loss, sampling, optimiser, lr
    schedule, epochs, batch size, augmentation, weights) on ``fold_splits`` with the same
    arguments as ``evaluate_search``. ``pretrained`` overrides the config's weights.
    ``tune``: N trials of lr/weight decay per model and fold instead of the shared
    recipe's (``baseline_tuning.py``); ``dalaresnet50`` is then tuned too, first.
    Returns one document per magnification (the ``baselines/<mag>.json`` content).
    """
    from dala_search import baseline_tuning as bt

    names = _model_names(models, tune)
    ref, bests = open_bests(
        name,
        protocol=protocol,
        k=k,
        magnifications=magnifications,
        epochs=epochs,
        device=device,
        runs_dir=runs_dir,
        tracking_uri=tracking_uri,
    )
    if pretrained is not None:
        bests = [
            dataclasses.replace(b, config=b.config.replace(pretrained=pretrained)) for b in bests
        ]
    # Build each model once up front (tiny cost next to training): a ViT that cannot take
    # the image size, or missing ImageNet weights, fails before hours of training.
    # A model that adapts itself to the data (DINOv2's resize to a multiple of 14) says how.
    for best in bests:
        for model in names:
            note = getattr(bt.model_builder(model)(best.config), "note", None)
            if note:
                log(f"[{best.magnification}] note: {note}")
    docs = []
    for best, data, splits in fold_data(ref, bests, protocol, k, log, split_protocol):
        mag = best.magnification
        rows, record, tuning = _train_rows(ref, best, data, splits, protocol, k, names, tune, log)
        doc = BaselineDocument(
            **record,
            rows=rows,
            dalaresnet50=_evaluation_row(ref, mag, protocol, k, log, split_protocol),
            recipe="shared" if tuning is None else "tuned",
            tuning=None if tuning is None else tuning.describe(),
        )
        path = doc.write(document_path(ref.folder, "baselines", mag, split_protocol))
        log(f"[{mag}] wrote {path}")
        client = tracking_client(ref.tracking_uri)
        sp = "" if split_protocol == "patient" else f"{split_protocol}_"
        batch = [m for r in rows for m in metric_batch(f"baseline_{sp}{r.model}_test_", r.metrics)]
        for i in range(0, len(batch), 1000):  # MLflow's log_batch limit
            client.log_batch(best.parent_run_id, metrics=batch[i : i + 1000])
        client.log_dict(best.parent_run_id, doc.to_json(), f"baselines/{path.name}")
        docs.append(doc.to_json())
    return docs


def _model_names(models: str | Sequence[str] | None, tune: int | None) -> tuple[str, ...]:
    """The rows' models: ``--models``, with ``--tune`` also ``dalaresnet50`` (first)."""
    from dala_search import baseline_tuning as bt

    if tune is None:
        return parse_models(models)
    bt.check_tune(tune)
    raw = models.split(",") if isinstance(models, str) else list(models or ())
    if any(str(m).strip().startswith("timm:") for m in raw):
        raise ConfigError("--tune: a timm: model (linear probe) cannot be tuned yet; drop --tune")
    rest, only_ours = bt.split_models(models)
    return bt.tuning_models(() if only_ours else parse_models(rest))


def _train_rows(
    ref: SearchRef,
    best: BestConfig,
    data: Any,
    splits: Sequence[Any],
    protocol: str,
    k: int,
    names: Sequence[str],
    tune: int | None,
    log: Log,
) -> tuple[list[ModelRow], dict[str, Any], Any]:
    """One magnification's rows (shared recipe, or each model tuned: ``tune``), the fold
    record, and the ``baseline_tuning.Tuning`` (None with the shared recipe), closed."""
    from dala_search import baseline_tuning as bt

    mag = best.magnification
    rows, record, tuned = [], None, None
    tuning = None if tune is None else bt.Tuning(ref, best, data, splits, protocol, tune, log)
    for model in names:
        if tuning is None:
            folds = train_folds(
                best.config,
                data,
                splits,
                protocol,
                label=f"{mag} {model}",
                build_model=bt.model_builder(model),
                log=log,
            )
        else:
            folds, tuned = tuning.tune(model)
        summary = summarise(folds, BASELINE_METRICS, seed=ref.plan.seed)
        rows.append(ModelRow(model, summary, tuned=tuned))
        # The same folds for every model: the test images (and so these counts) agree.
        record = fold_record(ref, best, data, splits, protocol, k, folds)
    assert record is not None  # parse_models refuses an empty list
    if tuning is not None:
        tuning.close()
    return rows, record, tuning


def _evaluation_row(
    ref: SearchRef, mag: str, protocol: str, k: int, log: Log, split_protocol: str = "patient"
) -> ModelRow | None:
    """DALAResNet50's row from ``evaluation/<mag>.json`` (``<mag>.<protocol>.json``), or
    None when not evaluated yet under the same split protocol."""
    path = document_path(ref.folder, "evaluation", mag, split_protocol)
    if not path.is_file():
        how = "" if split_protocol == "patient" else f" --protocol {split_protocol}"
        log(f"[{mag}] note: no {path}; run `dala-search evaluate {ref.name}{how}` for its row")
        return None
    ev = EvaluationDocument.read(path, mag)
    if (ev.protocol, ev.k) != (protocol, k):
        # Different folds are not a comparison: leave the row out rather than mislead.
        log(
            f"[{mag}] note: {path} used {ev.protocol} k={ev.k}, the baselines "
            f"{protocol} k={k}: not the same folds, so no DALAResNet50 row; run "
            f"`dala-search evaluate {ref.name} --{protocol} {k}` for it"
        )
        return None
    metrics = {n: ev.metrics[n] for n in BASELINE_METRICS if n in ev.metrics}
    return ModelRow("dalaresnet50", metrics)


# ---- the table ---------------------------------------------------------------------------


def _cell(s: MetricSummary | None) -> str:
    """ "0.8123 [0.78, 0.84]": the pooled estimate and its interval, or what is missing."""
    if s is None or s.estimate is None:
        return "n/a"
    if s.ci_low is None or s.ci_high is None:
        return f"{s.estimate:.4f}"
    return f"{s.estimate:.4f} [{s.ci_low:.2f}, {s.ci_high:.2f}]"


# The secondary per-fold column of the table: one metric, to keep the table readable.
FOLD_METRIC = "balanced_accuracy"
FOLD_LABEL = "bal. acc. fold mean ± sd"

# Column titles of the comparison table (the paper's names).
_LABELS = {
    "accuracy": "accuracy",
    "f1": "F1",
    "iba": "IBA",
    "gmean": "G-mean",
    "balanced_accuracy": "bal. accuracy",
    "roc_auc": "ROC AUC",
    "patient_accuracy": "patient acc.",
}


def baselines_table(doc: BaselineDocument | dict[str, Any]) -> list[str]:
    """Plain-text comparison table of one magnification: per model and metric the pooled
    estimate [95% interval], then the per-fold mean ± SD of the headline metric."""
    if not isinstance(doc, BaselineDocument):
        doc = BaselineDocument.from_json(doc, "baselines document")
    from dala_search.data.protocols import described

    tag = " (SYNTHETIC data)" if doc.synthetic else ""
    lines = [
        f"{doc.magnification}  search {doc.search}, {doc.protocol} k={doc.k}{tag}; "
        f"split protocol: {described(doc.split_protocol)}"
    ]
    rows = ([doc.dalaresnet50] if doc.dalaresnet50 else []) + list(doc.rows)
    labels = [r.model for r in rows]
    if doc.dalaresnet50 and doc.recipe == "tuned":
        labels[0] = EVALUATION_LABEL  # beside the tuned dalaresnet50 row: say which is which
    width = max(len(label) for label in labels)
    cells = [[_cell(r.metrics.get(n)) for n in BASELINE_METRICS] for r in rows]
    widths = [
        max(len(_LABELS[n]), *(len(c[i]) for c in cells)) for i, n in enumerate(BASELINE_METRICS)
    ]
    folds = [fold_cell(r.metrics[FOLD_METRIC]) if FOLD_METRIC in r.metrics else "n/a" for r in rows]
    fold_width = max(len(FOLD_LABEL), *(len(f) for f in folds))
    header = "".join(f"  {_LABELS[n]:>{w}}" for n, w in zip(BASELINE_METRICS, widths, strict=True))
    lines.append(f"  {'model':{width}}{header}  {FOLD_LABEL:>{fold_width}}")
    for label, cell, f in zip(labels, cells, folds, strict=True):
        row = "".join(f"  {c:>{w}}" for c, w in zip(cell, widths, strict=True))
        lines.append(f"  {label:{width}}{row}  {f:>{fold_width}}")
    lines.append(f"  (pooled out-of-fold estimate [95% interval]: {doc.ci})")
    return lines + recipe_lines(doc)


EVALUATION_LABEL = "dalaresnet50 (evaluate)"
SHARED_RECIPE = "shared recipe (DALAResNet50's tuned lr/wd)"


def recipe_lines(doc: BaselineDocument) -> list[str]:
    """How the rows were trained: the shared recipe, or each model's own lr/wd per fold."""
    if doc.recipe != "tuned" or doc.tuning is None:
        lr, wd = doc.config.get("lr"), doc.config.get("weight_decay")
        if lr is None or wd is None:  # a config that does not say (never written by us)
            return [f"  recipe: {SHARED_RECIPE} for every model"]
        return [f"  recipe: {SHARED_RECIPE}: lr {lr:.2e}, weight decay {wd:.2e} for every model"]
    t = doc.tuning
    lines = [
        f"  recipe: tuned: each model its own lr/weight decay, {t['trials']} trial(s) per fold; "
        f"{t['sampler']}; {t['pruner']} pruner; chosen {t['selection']}"
    ]
    if doc.dalaresnet50:
        lines.append(
            f"  ({EVALUATION_LABEL}: the search's best configuration as `evaluate` scored it, "
            "outside this tuning)"
        )
    for r in doc.rows:
        if r.tuned:
            chosen = "; ".join(
                f"fold {f['fold']} lr {f['lr']:.2e} wd {f['weight_decay']:.2e}"
                for f in r.tuned["folds"]
            )
            lines.append(f"    {r.model}: {chosen}")
    return lines
