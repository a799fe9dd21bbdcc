"""Everything a search needs, checked before anything is created.

``check_search`` (``dala-search start``) and ``check_resume`` (``dala-search resume``) run
every check that can fail before the search folder, the Optuna study, the MLflow
experiment or the Ray session exist: the options (the table in start_options.py), the
space, the name, the runs folder, the tracking store, the Optuna storage, the resources,
the data and the pretrained weights. Each refusal is a DalaError naming the option (the
CLI prints it and exits 2) and nothing is left behind. docs/reliability.md lists them.

Cheap checks first: the data (every PNG verified) and the weights (a download, or a
100 MB file read) come last.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from dala_search import start_options
from dala_search.config import TIMM_PREFIX
from dala_search.data import protocols
from dala_search.data.breakhis import BreakHisIndex
from dala_search.data.demo import default_demo_dir, ensure_demo_data
from dala_search.data.preflight import check_search_data
from dala_search.errors import ConfigError, DalaError
from dala_search.model import foundation
from dala_search.model.dalaresnet import check_backbone_weights
from dala_search.objectives import plan_objectives
from dala_search.runs import rollback, schema
from dala_search.runs.plan import PLAN_FILE, SearchPlan, parse_duration, runs_folder
from dala_search.runs.storage import check_storage
from dala_search.search import distributed, ray_internals, tracking, warm_start
from dala_search.search.pruning import make_pruner, make_sampler
from dala_search.space import SearchSpace
from dala_search.space_file import load_space


@dataclass(frozen=True)
class CheckedSearch:
    """A plan that passed every check, and the data's index the check read (every PNG
    verified), so the search does not read the data set a second time."""

    plan: SearchPlan
    index: BreakHisIndex


def check_search(*, overwrite: bool = False, **options: Any) -> CheckedSearch:
    """Resolve and check a new search; creates nothing (no folder, study, run or Ray).

    ``options``: the keywords of start_options.START_OPTIONS (None: not given, so the
    space's value or the row's default applies). Raises DalaError naming the option.
    ``overwrite``: a search of that name may exist (``start --overwrite`` replaces it with
    ``runs.rollback.replace_search`` once this check passed); its studies are not refused.
    """
    with _naming("--space"):
        space = load_space(options.get("space") or start_options.OPTIONS["space"].default)
    values = start_options.resolve(options, space.settings)
    with _naming("--objective"):
        values.update(
            plan_objectives(
                values,
                options.get("sampler") is not None,
                start_options.OPTIONS["sampler"].default,
                cuda_here=torch.cuda.is_available(),
            )
        )
    _check_combinations(values, space)
    plan = _make_plan(values, space)
    _check_search_algorithms(plan)
    warm_start.check_plan(plan, space)
    folder = Path(plan.folder)
    if (folder / PLAN_FILE).exists() and not overwrite:
        raise DalaError(rollback.existing_search_message(folder, plan.name))
    with _naming("--runs-dir"):
        _check_writable_folder(folder.parent)
    _check_tracking(plan)
    # The default storage lives in the new folder (checked above); a study file left there
    # by an earlier attempt must not hold this search's studies.
    if values["storage"] is not None or (folder / "optuna.db").exists():
        with _naming("--storage"):
            studies = [] if overwrite else [plan.study_name(m) for m in plan.magnifications]
            check_storage(plan.storage, studies, new=not overwrite)
    check_resources(plan)
    if values["data_dir"] is None:
        ensure_demo_data(Path(plan.data_dir))
    index = _check_data(plan, "--data")
    check_weights(space)
    return CheckedSearch(plan, index)


def plan_search(**options: Any) -> SearchPlan:
    """``check_search(**options).plan``: for callers that let ``run_search`` index the data."""
    return check_search(**options).plan


def check_resume(plan: SearchPlan) -> BreakHisIndex:
    """The checks of ``check_search`` that a saved plan can still fail: its space, Optuna
    storage, resources, data and weights (``open_search`` checked the tracking store)."""
    with _naming("the search's space"):
        space = load_space(plan.space)
    with _naming("the search's Optuna storage"):
        check_storage(plan.storage, [], new=False)
    check_resources(plan)
    index = _check_data(plan, "the search's data")
    check_weights(space, "the search's space")
    return index


def _check_combinations(values: Mapping[str, Any], space: SearchSpace) -> None:
    """What one row cannot check alone."""
    if "image_size" in space.params:
        raise ConfigError(
            f"--space: {space.path}: key 'image_size' must be fixed, not searched "
            "(the decoded-image cache is built once per size)"
        )
    with _naming("--protocol"):
        protocols.check_fold_protocol(values["fold"], values["protocol"])
        protocols.check_magnifications(values["protocol"], values["magnifications"])
    cv, workers = values["cv"], values["workers_per_trial"]
    timm = [
        b for b in foundation.search_backbones(space.fixed, space.params) if b != "dalaresnet50"
    ]
    if timm and (cv > 1 or workers > 1):
        raise ConfigError(
            f"--space: {space.path}: backbone {timm[0]!r} trains heads on cached embeddings: "
            "--cv and --workers-per-trial are not supported with it (use 1)"
        )
    if cv > 1 and workers > 1:
        raise ConfigError(
            f"--cv {cv} with --workers-per-trial {workers}: a cross-validated trial "
            "trains its folds in one process; use one worker per trial (concurrent trials "
            "already spread over the GPUs)"
        )


def _check_search_algorithms(plan: SearchPlan) -> None:
    """Build the sampler and the pruner once: a name the table knows whose Optuna class
    cannot be made (a missing optional package) fails here, not when the study starts."""
    with _naming("--sampler"):
        make_sampler(plan.sampler, seed=plan.seed)
    if plan.pruner != "asha":  # Ray's scheduler, no Optuna pruner
        with _naming("--pruner"):
            make_pruner(plan.pruner)


def _make_plan(values: Mapping[str, Any], space: SearchSpace) -> SearchPlan:
    name = values["name"] or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    with _naming("--name"):
        start_options.OPTIONS["name"].check(name)  # a space's name may start it
    folder = runs_folder(values["runs_dir"]) / name
    if values["data_dir"] is None:
        data_dir = default_demo_dir().expanduser()  # generated once the cheap checks pass
    else:
        data_dir = Path(values["data_dir"]).expanduser().resolve()
        if not data_dir.is_dir():
            raise DalaError(f"--data {values['data_dir']}: no such directory")
    prune_on = values["prune_on"]
    gpus = values["gpus_per_trial"]
    return SearchPlan(
        name=name,
        space=str(space.path),
        data_dir=str(data_dir),
        magnifications=values["magnifications"],
        trials=values["trials"],
        epochs=values["epochs"],
        metric=values["metric"],
        sampler=values["sampler"],
        pruner=values["pruner"],
        seed=values["seed"],
        cpus_per_trial=values["cpus_per_trial"],
        gpus_per_trial=-1.0 if gpus is None else gpus,  # -1: one GPU if there is any
        workers_per_trial=values["workers_per_trial"],
        max_concurrent=values["max_concurrent"],
        time_budget_s=parse_duration(values["time_budget"]),
        tracking_uri=schema.resolve_tracking_uri(values["tracking_uri"]),
        storage=values["storage"] or f"sqlite:///{folder / 'optuna.db'}",
        address=values["address"],
        folder=str(folder),
        fold=values["fold"],
        max_retries=values["max_retries"],
        prune_on=None if prune_on == values["metric"] else prune_on,  # None: the metric
        objectives=values["objectives"],
        constraints=values["constraints"],
        enqueue=values["enqueue"],
        warm_start=values["warm_start"],
        cv=values["cv"],
        protocol=values["protocol"],
    )


def _check_tracking(plan: SearchPlan) -> None:
    """The store reachable, writable, and the name free there; a cluster needs a server.

    A sqlite store that does not exist yet holds no search: it is not opened (MLflow would
    create it, and a refused search must leave nothing behind).
    """
    uri = plan.tracking_uri
    if plan.address and plan.address != "auto" and not uri.startswith(("http://", "https://")):
        raise ConfigError(
            "--address: a Ray cluster needs an MLflow tracking server (--tracking-uri "
            f"http://HEAD:5000): trials on other nodes cannot write to {uri}"
        )
    with _naming("--tracking-uri"):
        schema.check_tracking_uri(uri)
        if uri.startswith("sqlite:///"):
            db = Path(uri.removeprefix("sqlite:///"))
            _check_writable_folder(db.parent)
            if not db.exists():
                return
        tracking.check_experiment_free(uri, plan.name, plan.folder)


def _check_writable_folder(folder: Path) -> None:
    """``folder`` exists and is writable, or can be made: its nearest existing ancestor is
    a writable directory. Nothing is created."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{folder}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{folder}: {existing} is not writable")


def check_resources(plan: SearchPlan) -> None:
    """Refuse trials the Ray this search will use can never hold (Tune would wait forever).

    That Ray is the one already started in this process, else a local one the size of
    this machine. A cluster named by ``--address`` may grow (an autoscaler): not checked.
    """
    if ray.is_initialized():
        total = ray.cluster_resources()
        cpus, gpus, where = total.get("CPU", 0.0), total.get("GPU", 0.0), "this Ray has"
    elif plan.address is None:
        cpus, gpus = ray_internals.local_cpus(), float(torch.cuda.device_count())
        where = "this machine has"
    else:
        return
    gpu = plan.gpus_per_trial if plan.gpus_per_trial >= 0 else float(gpus > 0)
    if plan.workers_per_trial > 1:
        layout = distributed.WorkerLayout(plan.workers_per_trial, plan.cpus_per_trial, gpu)
        distributed.check_fits(layout, {"CPU": cpus, "GPU": gpus})
        return
    for flag, need, have, unit in (
        ("--cpus-per-trial", plan.cpus_per_trial, cpus, "CPU"),
        ("--gpus-per-trial", gpu, gpus, "GPU"),
    ):
        if need > have + 1e-9:
            raise ConfigError(
                f"{flag} {need:g}: one trial needs {need:g} {unit} but {where} {have:g}; "
                "ask for less, or run on a cluster (--address)"
            )


def _check_data(plan: SearchPlan, label: str) -> BreakHisIndex:
    """Index the data and make every magnification's split (data/preflight.py)."""
    with _naming(label):
        return check_search_data(
            plan.data_dir,
            plan.magnifications,
            seed=plan.seed,
            fold=plan.fold,
            cv=plan.cv,
            protocol=plan.protocol,
        )


def check_weights(space: SearchSpace, label: str = "--space") -> None:
    """Every pretrained value a trial can get, resolved once (downloaded if need be) now.

    Without this, each trial of a search whose weights cannot be found (no network, a
    wrong path) failed at model build, one after the other, for hours. On a cluster the
    other nodes need them too: this checks the driver's machine only.
    """
    spec = space.params.get("pretrained")
    values = spec.choices if spec is not None else (space.fixed["pretrained"],)
    where = "params" if spec is not None else "fixed"
    backbones = foundation.search_backbones(space.fixed, space.params)
    for value in dict.fromkeys(values or ()):
        try:
            for backbone in backbones:  # a timm: backbone's weights, or DALAResNet50's
                if backbone.startswith(TIMM_PREFIX):
                    foundation.check_weights(backbone, str(value))
                else:
                    check_backbone_weights(str(value))
        except ConfigError as e:
            raise ConfigError(
                f"--space: {space.path}: {where}.pretrained: every trial needs these weights; {e}"
            ) from None


@contextmanager
def _naming(label: str) -> Iterator[None]:
    """A DalaError raised inside starts with ``label`` (the option) unless it starts with
    an option already (``--cv 40: --data ...``)."""
    try:
        yield
    except DalaError as e:
        if str(e).startswith(("--", label)):
            raise
        raise type(e)(f"{label}: {e}") from None
