"""The best configuration of each magnification of a finished search, read back from
MLflow: the magnification's parent run names the best trial (``dala.best_run_id``) and
that run's ``trial_config.json`` artifact is the exact config it trained with."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dala_search.config import TrialConfig
from dala_search.errors import ConfigError, DalaError
from dala_search.folds import check_protocol
from dala_search.runs import schema
from dala_search.runs.plan import SearchRef, open_search, parse_magnifications


def tracking_client(uri: str) -> Any:
    """An ``MlflowClient`` on ``uri``."""
    return schema.client(uri)


def select_magnifications(ref: SearchRef, requested: str | None) -> tuple[str, ...]:
    """The search's magnifications, or the requested subset of them (comma list or 'all')."""
    if requested is None or requested.strip().lower() == "all":
        return tuple(ref.plan.magnifications)
    mags = parse_magnifications(requested)
    missing = [m for m in mags if m not in ref.plan.magnifications]
    if missing:
        raise ConfigError(
            f"--magnification: search {ref.name!r} has no {', '.join(missing)}; "
            f"it searched {', '.join(ref.plan.magnifications)}"
        )
    return mags


@dataclass(frozen=True)
class BestConfig:
    """The best trial of one magnification, as MLflow recorded it."""

    magnification: str
    parent_run_id: str
    best_run_id: str
    registered_model: str | None  # "dalaresnet50-40X/3"
    config: TrialConfig


def best_config(
    ref: SearchRef,
    magnification: str,
    *,
    epochs: int | None = None,
    device: str | None = None,
) -> BestConfig:
    """Read the best configuration of ``magnification`` back from MLflow.

    The parent run's ``dala.best_run_id`` names the trial; its ``trial_config.json``
    artifact is the config it trained with (params are strings; the artifact is typed).
    ``epochs`` and ``device`` (default ``auto``) override it; a warmup longer than the new
    epochs is shortened to fit (the written config shows it); the search's CPU thread
    count is dropped (torch's default for this process).
    """
    client = tracking_client(ref.tracking_uri)
    exp = client.get_experiment_by_name(schema.experiment_name(ref.name))
    if exp is None:
        raise DalaError(f"no search named {ref.name!r} in the MLflow store {ref.tracking_uri}")
    parents = client.search_runs(
        [exp.experiment_id],
        filter_string=(
            f"tags.`{schema.TAG_ROLE}` = 'magnification' and "
            f"tags.`{schema.TAG_MAG}` = '{magnification}'"
        ),
    )
    if not parents:
        raise DalaError(f"search {ref.name!r} has no MLflow run for {magnification} yet")
    parent = parents[0]
    best_run_id = parent.data.tags.get(schema.TAG_BEST_RUN)
    if not best_run_id:
        raise DalaError(
            f"search {ref.name!r}, {magnification}: no completed trial yet (nothing to evaluate)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(best_run_id, "trial_config.json", tmp)
        except Exception as e:
            raise DalaError(
                f"search {ref.name!r}, {magnification}: cannot read trial_config.json of the "
                f"best trial's run {best_run_id} in {ref.tracking_uri}: {e}"
            ) from e
        raw = json.loads(Path(path).read_text())
    source = f"trial_config.json of run {best_run_id}"
    config = TrialConfig.from_dict(raw, source=source)
    changes: dict[str, Any] = {"num_threads": 0, "device": device or "auto"}
    if epochs is not None:
        changes["epochs"] = epochs
        # A warmup as long as the shortened run would leave no decay: keep it shorter.
        changes["warmup_epochs"] = min(config.warmup_epochs, epochs - 1)
    try:
        config = config.replace(**changes)
    except ConfigError as e:
        raise ConfigError(f"{source} with --epochs/--device: {e}") from None
    return BestConfig(
        magnification=magnification,
        parent_run_id=parent.info.run_id,
        best_run_id=best_run_id,
        registered_model=parent.data.tags.get(schema.TAG_REGISTERED),
        config=config,
    )


def open_bests(
    name: str,
    *,
    protocol: str,
    k: int,
    magnifications: str | None,
    epochs: int | None,
    device: str | None,
    runs_dir: str | Path | None,
    tracking_uri: str | None,
) -> tuple[SearchRef, list[BestConfig]]:
    """The search and each chosen magnification's best configuration, all read before any
    training (a bad protocol, magnification or search fails at once)."""
    check_protocol(protocol, k)
    ref = open_search(name, runs_dir, tracking_uri)
    mags = select_magnifications(ref, magnifications)
    return ref, [best_config(ref, m, epochs=epochs, device=device) for m in mags]
