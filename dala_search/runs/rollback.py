"""What a search leaves when it stops early: no MLflow run left RUNNING, a folder that says
it failed, and ``start --overwrite`` to reuse its name.

Ray-free (the record layer): the driver's signal path calls ``close_open_runs`` when Ray's
own processes are already gone, and the CLI replaces a search before anything of the new
one exists.
"""

from __future__ import annotations

import json
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

from dala_search.runs import schema

FAILED_FILE = "failed.json"  # in a search's folder: its start or resume failed (why, when)


def close_open_runs(uri: str, search: str, *, error: str | None = None) -> int:
    """End every RUNNING run of search ``search``; returns how many were ended.

    Trial runs become KILLED with ``dala.state=interrupted`` (``resume`` reopens a trial
    run by its Ray trial id and trains it again). The magnifications' parent runs become
    KILLED, or FAILED with ``dala.error`` when ``error`` says why the search stopped.
    Only MLflow's client: it works when Ray's processes are gone.
    """
    client = schema.client(uri)
    exp = client.get_experiment_by_name(schema.experiment_name(search))
    if exp is None:
        return 0
    runs = client.search_runs(
        [exp.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=5000
    )
    for run in runs:
        run_id = run.info.run_id
        if run.data.tags.get(schema.TAG_ROLE) == "trial":
            schema.retry(client.set_tag, run_id, schema.TAG_STATE, "interrupted")
            schema.retry(client.set_terminated, run_id, "KILLED")
        else:
            if error:
                schema.retry(client.set_tag, run_id, schema.TAG_ERROR, error[:4000])
            schema.retry(client.set_terminated, run_id, "FAILED" if error else "KILLED")
    return len(runs)


def mark_failed(folder: str | Path, error: BaseException) -> Path:
    """Write ``failed.json`` (the error, its traceback, the time) into the search folder."""
    path = Path(folder) / FAILED_FILE
    path.write_text(
        json.dumps(
            {
                "error": f"{type(error).__name__}: {error}",
                "traceback": "".join(traceback.format_exception(error)),
                "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            },
            indent=2,
        )
    )
    return path


def failure(folder: str | Path) -> dict[str, Any] | None:
    """The ``failed.json`` of a search folder, or None when it holds none."""
    path = Path(folder) / FAILED_FILE
    if not path.is_file():
        return None
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {"error": f"{path} is unreadable"}


def clear_failed(folder: str | Path) -> None:
    (Path(folder) / FAILED_FILE).unlink(missing_ok=True)


def existing_search_message(folder: Path, name: str) -> str:
    """Why ``start --name NAME`` is refused when the folder holds a search, and what to do."""
    failed = failure(folder)
    state = f" (its start or resume failed: {failed.get('error', '?')})" if failed else ""
    return (
        f"a search named {name!r} already exists in {folder}{state}; continue it with "
        f"`dala-search resume {name}`, replace it (its folder, MLflow experiment and Optuna "
        "studies) with --overwrite, or choose another --name"
    )


def replace_search(folder: str | Path, name: str, tracking_uris: list[str]) -> list[str]:
    """Remove search ``name`` for ``start --overwrite``; returns what was removed, in words.

    Its folder is deleted; its MLflow experiment, in each of ``tracking_uris`` (the old
    plan's and the new one's), is renamed ``<experiment>.replaced-<time>`` and deleted
    (MLflow keeps it in its trash, restorable); its Optuna studies on a storage outside the
    folder are deleted. The caller has validated the new search first.
    """
    import optuna

    from dala_search.runs.plan import PLAN_FILE, SearchPlan

    folder = Path(folder)
    removed: list[str] = []
    uris = list(tracking_uris)
    if (folder / PLAN_FILE).is_file():
        old = SearchPlan.load(folder)
        uris.insert(0, old.tracking_uri)
        if not old.storage.startswith(f"sqlite:///{folder}/"):
            for mag in old.magnifications:
                try:
                    optuna.delete_study(study_name=old.study_name(mag), storage=old.storage)
                    removed.append(f"Optuna study {old.study_name(mag)!r}")
                except KeyError:  # never created
                    pass
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for uri in dict.fromkeys(uris):
        client = schema.client(uri)
        exp = client.get_experiment_by_name(schema.experiment_name(name))
        if exp is None or exp.tags.get(schema.TAG_FOLDER) not in (None, str(folder)):
            continue  # another folder's search: never touched (plan_search refuses it)
        moved = f"{exp.name}.replaced-{stamp}"
        client.rename_experiment(exp.experiment_id, moved)
        client.delete_experiment(exp.experiment_id)
        removed.append(f"MLflow experiment {exp.name!r} (deleted as {moved!r} in {uri})")
    if folder.exists():
        shutil.rmtree(folder)
        removed.append(f"folder {folder}")
    return removed
