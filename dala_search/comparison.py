"""The paper's comparison models on the folds of a search's final evaluation.

``dala-search baselines NAME`` (``run_baselines``) trains each baseline
(``dala_search.model.baselines``: ResNet50, SEResNet50, DenseNet121, VGG16, ViT, Swin, ...)
with the best configuration's recipe on exactly the folds ``dala-search evaluate`` uses
(``folds.fold_splits`` with the same protocol, k and seed), and writes
``<search folder>/baselines/<mag>.json`` (format in ``dala_search/evaluate.py``'s docstring)
with DALAResNet50's row read from ``evaluation/<mag>.json`` when the protocol and k match.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dala_search.errors import ConfigError, DataError
from dala_search.evaluate import (
    Log,
    fold_data,
    fold_document,
    metric_batch,
    open_bests,
    stderr_log,
    summarise,
    tracking_client,
    train_folds,
    write_json,
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
    log: Log = stderr_log,
) -> list[dict[str, Any]]:
    """``dala-search baselines``: the paper's comparison models on the evaluation's folds.

    Each model trains with the best configuration's recipe (loss, sampling, optimiser, lr
    schedule, epochs, batch size, augmentation, weights) on ``fold_splits`` with the same
    arguments as ``evaluate_search``. ``pretrained`` overrides the config's weights.
    Returns one document per magnification (the ``baselines/<mag>.json`` content).
    """
    from dala_search.model.baselines import baseline_builder, build_baseline

    names = parse_models(models)
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
    for best in bests:
        for model in names:
            build_baseline(model, best.config)
    docs = []
    for best, data, splits in fold_data(ref, bests, protocol, k, log):
        mag = best.magnification
        rows = []
        for model in names:
            per_fold = train_folds(
                best.config,
                data,
                splits,
                protocol,
                label=f"{mag} {model}",
                build_model=baseline_builder(model),
                log=log,
            )
            rows.append({"model": model, "metrics": summarise(per_fold, BASELINE_METRICS)})
        doc = fold_document(
            ref,
            best,
            data,
            splits,
            protocol,
            k,
            rows=rows,
            dalaresnet50=_evaluation_row(ref, mag, protocol, k, log),
        )
        path = write_json(ref.folder / "baselines" / f"{mag}.json", doc)
        log(f"[{mag}] wrote {path}")
        client = tracking_client(ref.tracking_uri)
        batch = [
            m for r in rows for m in metric_batch(f"baseline_{r['model']}_test_", r["metrics"])
        ]
        for i in range(0, len(batch), 1000):  # MLflow's log_batch limit
            client.log_batch(best.parent_run_id, metrics=batch[i : i + 1000])
        client.log_dict(best.parent_run_id, doc, f"baselines/{mag}.json")
        docs.append(doc)
    return docs


def _evaluation_row(
    ref: SearchRef, mag: str, protocol: str, k: int, log: Log
) -> dict[str, Any] | None:
    """DALAResNet50's row from ``evaluation/<mag>.json``, or None when not evaluated yet."""
    path = ref.folder / "evaluation" / f"{mag}.json"
    if not path.is_file():
        log(f"[{mag}] note: no {path}; run `dala-search evaluate {ref.name}` for its row")
        return None
    try:
        ev = json.loads(path.read_text())
        row = {
            "model": "dalaresnet50",
            "protocol": ev["protocol"],
            "k": ev["k"],
            "metrics": {n: ev["metrics"][n] for n in BASELINE_METRICS if n in ev["metrics"]},
        }
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not an evaluation written by dala-search evaluate ({e})") from e
    if (row["protocol"], row["k"]) != (protocol, k):
        # Different folds are not a comparison: leave the row out rather than mislead.
        log(
            f"[{mag}] note: {path} used {row['protocol']} k={row['k']}, the baselines "
            f"{protocol} k={k}: not the same folds, so no DALAResNet50 row; run "
            f"`dala-search evaluate {ref.name} --{protocol} {k}` for it"
        )
        return None
    return row


# ---- the table ---------------------------------------------------------------------------


def _cell(s: dict[str, Any] | None) -> str:
    """ "0.8123 ± 0.0456" (the t-interval's half-width) or what is missing."""
    if not s or s.get("mean") is None:
        return "n/a"
    if s.get("ci_low") is None:
        return f"{s['mean']:.4f}"
    return f"{s['mean']:.4f} ± {(s['ci_high'] - s['ci_low']) / 2:.4f}"


# Column titles of the comparison table (the paper's names).
_LABELS = {
    "accuracy": "accuracy",
    "f1": "F1",
    "iba": "IBA",
    "gmean": "G-mean",
    "balanced_accuracy": "bal. accuracy",
    "roc_auc": "ROC AUC",
}


def baselines_table(doc: dict[str, Any]) -> list[str]:
    """Plain-text comparison table of one magnification (mean ± CI half-width)."""
    tag = " (SYNTHETIC data)" if doc["synthetic"] else ""
    lines = [f"{doc['magnification']}  search {doc['search']}, {doc['protocol']} k={doc['k']}{tag}"]
    rows = list(doc["rows"])
    if doc.get("dalaresnet50"):
        rows = [doc["dalaresnet50"], *rows]
    width = max(len(r["model"]) for r in rows)
    header = "".join(f"  {_LABELS[n]:>16}" for n in BASELINE_METRICS)
    lines.append(f"  {'model':{width}}{header}")
    for r in rows:
        cells = "".join(f"  {_cell(r['metrics'].get(n)):>16}" for n in BASELINE_METRICS)
        lines.append(f"  {r['model']:{width}}{cells}")
    lines.append("  (mean ± half-width of the 95% t-interval over the folds)")
    return lines
