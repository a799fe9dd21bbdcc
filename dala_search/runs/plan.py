"""A search's plan and folder: ``<runs_dir>/<name>/search.json``, the one rule for search
names, and opening a search by name. Ray-free: evaluation, report and the CLI use it."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from dala_search.data.breakhis import MAGNIFICATIONS, check_magnification
from dala_search.errors import ConfigError, DalaError
from dala_search.runs.schema import check_tracking_uri, resolve_tracking_uri

PLAN_FILE = "search.json"
NAME_RULE = "use letters, digits, '-', '_' and '.' only"


def default_runs_dir() -> Path:
    """$DALA_RUNS_DIR, else ``dala_runs`` in the working directory."""
    return Path(os.environ.get("DALA_RUNS_DIR", "dala_runs")).resolve()


def runs_folder(runs_dir: str | Path | None) -> Path:
    """``runs_dir`` (or the default), absolute."""
    return Path(runs_dir or default_runs_dir()).resolve()


def is_valid_name(name: str) -> bool:
    """A search (or space) name becomes a folder and an MLflow experiment: letters, digits,
    '-', '_' and '.' only, so no '/', '..', spaces or absolute paths reach outside the runs
    dir."""
    return name.replace("-", "").replace("_", "").replace(".", "").isalnum()


def check_name(name: str, label: str) -> str:
    """``name`` when valid; else a ConfigError ``"<label> '<name>': use letters, ..."``."""
    if not is_valid_name(name):
        raise ConfigError(f"{label} {name!r}: {NAME_RULE}")
    return name


def study_seed(seed: int, magnification: str) -> int:
    """``seed * 1000 + i``, i the magnification's place in 40X, 100X, 200X, 400X (0..3).

    Each magnification's study explores on its own: with the search seed for all four, the
    studies proposed the same configurations and spent their random start-up on the same
    points. Deterministic, so a search re-planned with the same seed proposes the same
    sequences; 40X keeps the search seed itself (i = 0).
    """
    return seed * 1000 + MAGNIFICATIONS.index(check_magnification(magnification))


def nested_seed(seed: int, fold: int) -> int:
    """The seed of outer fold ``fold``'s inner search (``evaluate --nested``): ``seed * 1000
    + fold`` (fold 1..K).

    Each inner search then samples, splits its inner folds and seeds its studies on its own
    (its studies' seeds, ``study_seed``, are ``seed * 10**6 + fold * 1000 + i``: never one
    of the outer search's own, ``seed * 1000 + i``, for folds below 1000).
    """
    return seed * 1000 + fold


OUTER_KEYS = ("protocol", "k", "fold", "of", "seed")


@dataclass(frozen=True)
class SearchPlan:
    """Everything one search needs, resolved and checked; saved as ``search.json``."""

    name: str
    space: str  # path of the space YAML
    data_dir: str  # resolved BreakHis folder (the demo set when none was given)
    magnifications: tuple[str, ...]
    trials: int  # per magnification
    epochs: int | None  # overrides the space's epochs when set
    metric: str  # TrialConfig select_metric name, e.g. "balanced_accuracy"
    sampler: str
    pruner: str
    seed: int
    cpus_per_trial: float
    gpus_per_trial: float
    workers_per_trial: int
    max_concurrent: int  # 0: as many as the cluster's resources allow
    time_budget_s: float | None
    tracking_uri: str
    storage: str  # Optuna RDB URL
    address: str | None  # Ray cluster address; None starts a local Ray
    folder: str  # this search's folder
    fold: int | None = None  # official Folds.csv fold instead of a seeded patient split
    log_models: bool = True
    # The validation metric the pruner judges by (None: ``metric``); trials are still
    # ranked and the best chosen by ``metric``.
    prune_on: str | None = None
    # Restarts of a trial whose process or node died (Tune FailureConfig). A trial that
    # raised (a bug, NaN loss, out of memory) is not retried: see search/trainable.py.
    max_retries: int = 2
    # Inner folds per trial (``--cv``): 1 is one validation split; K >= 2 trains K models on
    # K patient-grouped folds of the non-test patients and scores their mean (train_cv.py).
    cv: int = 1
    # An inner search of a nested evaluation (``evaluate NAME --nested K``): {"protocol":
    # "folds", "k": K, "fold": k (1..K), "of": NAME, "seed": NAME's seed}. Its data split is
    # outer fold k of ``folds.fold_splits(..., "folds", K, seed=...)`` (test = that fold's
    # patients; train/val, or the ``cv`` inner folds, from the others only) instead of
    # ``patient_split``. None (default): an ordinary search.
    outer: dict | None = None
    # The split protocol (``data.protocols``, ``start --protocol``): "patient" (default),
    # "image" (image-level, LEAKY: its figures are inflated) or "eva" (40X, eva's task).
    protocol: str = "patient"
    # Several objectives (``--objective``, "metric:max|min", the first the primary) or
    # constraints (``--constraint``, "metric<=N"): a multi-objective study (objectives.py,
    # search/multiobjective.py). Both empty: one objective, ``metric`` (today's search).
    objectives: tuple[str, ...] = ()
    constraints: tuple[str, ...] = ()
    # Warm starts (search/warm_start.py): "paper" or absolute YAML paths (``--enqueue``),
    # and "SEARCH[:MAG]" (``--warm-start``); enqueued when each magnification's study starts.
    enqueue: tuple[str, ...] = ()
    warm_start: str | None = None

    @property
    def tune_metric(self) -> str:
        return f"val_{self.metric}"

    @property
    def tune_prune_metric(self) -> str:
        """The result key the pruner judges (Optuna's intermediate values)."""
        return f"val_{self.prune_on or self.metric}"

    def study_name(self, magnification: str) -> str:
        return f"{self.name}-{magnification}"

    def study_seed(self, magnification: str) -> int:
        """The seed of one magnification's Optuna sampler (see `study_seed`)."""
        return study_seed(self.seed, magnification)

    def save(self, *, new: bool = False) -> None:
        """Atomically (temp file + rename): a crash never leaves half a plan.

        ``new``: refuse when the plan file exists already (two ``start`` with one name
        racing past ``plan_search``'s check): ``os.link`` fails if the target exists.
        """
        folder = Path(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{PLAN_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2))
        try:
            if new:
                try:
                    os.link(tmp, folder / PLAN_FILE)
                except FileExistsError:
                    raise DalaError(
                        f"a search named {self.name!r} already exists in {folder}; "
                        f"continue it with `dala-search resume {self.name}`"
                    ) from None
            else:
                os.replace(tmp, folder / PLAN_FILE)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, folder: Path) -> SearchPlan:
        path = folder / PLAN_FILE
        if not path.is_file():
            raise DalaError(f"{folder}: no {PLAN_FILE}; is this a dala-search search folder?")
        raw = json.loads(path.read_text())
        raw["magnifications"] = tuple(raw["magnifications"])
        for key in ("objectives", "constraints", "enqueue"):
            raw[key] = tuple(raw.get(key, ()))
        return cls(**raw)


@dataclass(frozen=True)
class SearchRef:
    """A finished (or partly finished) search: its plan, folder and tracking store."""

    name: str
    folder: Path
    plan: SearchPlan
    tracking_uri: str


def open_search(
    name: str, runs_dir: str | Path | None = None, tracking_uri: str | None = None
) -> SearchRef:
    """Load ``<runs_dir>/<name>/search.json`` and check its tracking store can be reached.

    ``tracking_uri`` overrides the plan's store (a store that moved).
    """
    check_name(name, "search name")
    runs = runs_folder(runs_dir)
    folder = runs / name
    if not (folder / PLAN_FILE).is_file():
        raise DalaError(f"no search named {name!r} in {runs}" + _known_searches(runs))
    plan = SearchPlan.load(folder)
    uri = resolve_tracking_uri(tracking_uri or plan.tracking_uri)
    check_tracking_uri(uri)
    return SearchRef(name=name, folder=folder, plan=plan, tracking_uri=uri)


def _known_searches(runs: Path) -> str:
    known = sorted(p.parent.name for p in runs.glob(f"*/{PLAN_FILE}"))
    return f"; searches there: {', '.join(known)}" if known else " (no searches there)"


def latest_search(runs_dir: str | Path | None = None) -> str:
    """The name of the search in ``runs_dir`` whose plan was written last."""
    runs = runs_folder(runs_dir)
    plans = sorted(runs.glob(f"*/{PLAN_FILE}"), key=lambda p: p.stat().st_mtime)
    if not plans:
        raise DalaError(f"no searches in {runs}; name one or pass --runs-dir")
    return plans[-1].parent.name


def search_tracking_uri(
    name: str, runs_dir: str | Path | None = None, tracking_uri: str | None = None
) -> str:
    """The store to read search ``name`` from: ``tracking_uri``, else its plan's, else the
    default (a search whose folder is elsewhere can still be read from its store). Only
    reads: the CLI checks a name it is given (``check_name``) before it gets here."""
    folder = runs_folder(runs_dir) / name
    if tracking_uri is None and (folder / PLAN_FILE).is_file():
        tracking_uri = SearchPlan.load(folder).tracking_uri
    return resolve_tracking_uri(tracking_uri)


def parse_duration(text: str | None) -> float | None:
    """``90s``, ``45m``, ``2h``, ``1.5h`` or plain seconds -> seconds."""
    if text is None:
        return None
    t = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"--time-budget: {text!r} is not a duration like 90s, 45m or 2h")
    return value


def parse_magnifications(text: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``all`` or a comma list (``40X,100X``) -> ordered, de-duplicated magnifications."""
    items = text.split(",") if isinstance(text, str) else list(text)
    if len(items) == 1 and str(items[0]).strip().lower() == "all":
        return MAGNIFICATIONS
    mags = {check_magnification(str(i)) for i in items if str(i).strip()}
    if not mags:
        raise ConfigError("--magnification: give 'all' or a comma list like 40X,100X")
    return tuple(m for m in MAGNIFICATIONS if m in mags)
