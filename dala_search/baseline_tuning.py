"""``dala-search baselines NAME --tune N``: every model searches its own lr and weight decay.

Without ``--tune`` every baseline trains with the search's best DALAResNet50 recipe, lr and
weight decay included: a recipe tuned for one architecture, which tilts the table towards
it. With ``--tune N`` each model (DALAResNet50 with the search's best architecture
included, as ``dalaresnet50``) gets the same small search of ``lr`` and ``weight_decay``:

* **Honest selection, per fold.** For each fold of the comparison (``folds.fold_splits``,
  the very splits the table's figures come from) and each model, one Optuna study of N
  trials. A trial trains on the fold's training patients and is scored on the fold's
  validation patients (carved out of its training patients); the fold's test patients
  are never seen by the choice. The fold's figure is the test prediction of the trial with
  the best validation score, so the table's interval (the patient-level cluster bootstrap
  of ``evaluate.summarise``) is that of the whole procedure. The chosen lr/wd can differ
  between folds; the document records each.
* **The same for every model.** The same N, the same ranges (``lr`` log-uniform in
  [1e-5, 1e-2], ``weight_decay`` log-uniform in [1e-6, 1e-2]: the default space's), the
  same sampler (TPE, multivariate, the first ``STARTUP_TRIALS`` random; seeded per trial
  from the search's seed, the magnification, the fold and the trial number, not the
  model, so every model starts from the same random points), the same pruner (median,
  after ``STARTUP_TRIALS`` trials, from epoch 2, on the selection metric) and the same
  folds. Everything else is the shared recipe.
* **Cost.** N x K trainings per model and magnification (K folds), i.e. N times the
  shared recipe's K; pruning cuts weak trials short. No retraining: the chosen trial's
  model already made the fold's test predictions.
* **Resumable.** The studies live in ``<search folder>/baselines/tuning.db`` (SQLite); a
  study's name carries a fingerprint of everything the trials depend on (recipe, model,
  fold's patients), so the same command continues an interrupted run (finished trials are
  kept, the interrupted one is counted out and run again) and a changed recipe starts new
  studies instead of mixing. A larger N continues the studies; the choice is always made
  among the first N finished trials.
* **MLflow.** Every trial is a run (``baseline_tuning_runs.py`` says where and what).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dala_search.baseline_tuning_runs import TuningRuns
from dala_search.config import TrialConfig
from dala_search.errors import ConfigError, DalaError
from dala_search.evaluate import BestConfig, FoldOutcome, Log
from dala_search.runs.plan import SearchRef

TUNED_DALARESNET = "dalaresnet50"  # the search's best architecture, tuned like the others
LR_RANGE = (1e-5, 1e-2)
WD_RANGE = (1e-6, 1e-2)
STARTUP_TRIALS = 2  # random trials before TPE; also the median pruner's start-up
SAMPLER = f"TPE (multivariate, {STARTUP_TRIALS} random start-up trials, seeded per trial)"
PRUNER = f"median (after {STARTUP_TRIALS} trials, from epoch 2)"
SELECTION = (
    "per fold: the trial with the best validation score on the fold's validation patients "
    "(carved from its training patients; its test patients never seen)"
)
# Optuna user attribute set on a trial that ended as an outcome ("completed" | "pruned" |
# "failed"); a trial without it was interrupted (failed by the next run) and is not one of N.
OUTCOME = "outcome"


def tuning_models(names: Sequence[str]) -> tuple[str, ...]:
    """``dalaresnet50`` first, then the baselines (a ``dalaresnet50`` among them dropped)."""
    return (TUNED_DALARESNET, *(n for n in names if n != TUNED_DALARESNET))


def split_models(text: str | Sequence[str] | None) -> tuple[str | Sequence[str] | None, bool]:
    """``--models`` without ``dalaresnet50`` (always tuned) for ``comparison.parse_models``;
    and whether only it was named (then no baseline is added)."""
    if text is None:
        return None, False
    items = [i.strip() for i in (text.split(",") if isinstance(text, str) else text)]
    rest = [i for i in items if i and i != TUNED_DALARESNET]
    return rest, not rest and TUNED_DALARESNET in items


def model_builder(name: str) -> Callable[[TrialConfig], Any]:
    """``build_model`` for ``train_trial``: ``dalaresnet50`` is the search's architecture."""
    if name.startswith("timm:"):  # a foundation model's linear probe (train_folds knows it)
        from dala_search.model.foundation import LinearProbe

        return LinearProbe(name)
    if name == TUNED_DALARESNET:
        from dala_search.model.dalaresnet import build_dalaresnet

        return build_dalaresnet
    from dala_search.model.baselines import baseline_builder

    return baseline_builder(name)


def check_tune(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"--tune {n!r}: give the number of trials per model and fold (>= 1)")
    return n


@dataclass(frozen=True)
class FoldChoice:
    """The trial one fold chose for one model."""

    fold: int  # 1..K
    trial: int  # its Optuna trial number in the fold's study
    lr: float
    weight_decay: float
    value: float  # its validation score (the selection metric)
    run_id: str  # its MLflow run
    study: str  # the Optuna study (in tuning.db)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _seed(*parts: object) -> int:
    text = ":".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") & 0x7FFFFFFF


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


class Tuning:
    """One magnification's tuning: its studies (tuning.db) and its MLflow parent run."""

    def __init__(
        self,
        ref: SearchRef,
        best: BestConfig,
        data: Any,
        splits: Sequence[Any],
        protocol: str,
        n_trials: int,
        log: Log,
    ) -> None:
        self.ref, self.best, self.data, self.splits = ref, best, data, splits
        self.protocol, self.n = protocol, check_tune(n_trials)
        self.log = log
        self.metric = f"val_{best.config.select_metric}"
        self.db = ref.folder / "baselines" / "tuning.db"
        self.db.parent.mkdir(parents=True, exist_ok=True)
        self.storage = f"sqlite:///{self.db}"
        self.runs = TuningRuns(ref, best)

    def describe(self) -> dict[str, Any]:
        """The document's ``tuning`` record: how every model was tuned."""
        return {
            "trials": self.n,
            "params": {
                "lr": {"low": LR_RANGE[0], "high": LR_RANGE[1], "log": True},
                "weight_decay": {"low": WD_RANGE[0], "high": WD_RANGE[1], "log": True},
            },
            "metric": self.metric,
            "sampler": SAMPLER,
            "pruner": PRUNER,
            "selection": SELECTION,
            "storage": str(self.db),
            "mlflow_run_id": self.runs.parent_id,
        }

    def close(self) -> None:
        self.runs.close()

    # ---- one model ------------------------------------------------------------------------

    def tune(self, model: str) -> tuple[list[FoldOutcome], dict[str, Any]]:
        """Model ``model``'s study on every fold; the chosen trials' test predictions and
        the row's ``tuned`` record (the chosen lr/wd per fold)."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        folds, chosen = [], []
        for i, split in enumerate(self.splits):
            study = self._study(model, i, split)
            while len(self._counted(study)) < self.n:
                self._trial(study, model, i, split)
            pick = self._choose(study, model, i)
            chosen.append(pick)
            trial = next(t for t in study.trials if t.number == pick.trial)
            a = trial.user_attrs
            folds.append(
                FoldOutcome(
                    test={k: math.nan if v is None else v for k, v in a["test"].items()},
                    y_true=np.asarray(a["y_true"], dtype=np.int64),
                    y_prob=np.asarray(a["y_prob"], dtype=np.float64),
                    slides=self.data.slides(split.test),
                )
            )
            self.log(
                f"[{self.best.magnification} {model}] {self.protocol[:-1]} {i + 1}/"
                f"{len(self.splits)}: chose trial {pick.trial} (lr {pick.lr:.2e}, weight "
                f"decay {pick.weight_decay:.2e}, {self.metric} {pick.value:.4f})"
            )
        return folds, {"trials": self.n, "folds": [c.to_json() for c in chosen]}

    def _config(self, i: int) -> TrialConfig:
        config = self.best.config
        return config.replace(seed=config.seed + i) if self.protocol == "seeds" else config

    def _study(self, model: str, i: int, split: Any) -> Any:
        import optuna
        from optuna.trial import TrialState

        recipe = {
            k: v for k, v in self._config(i).to_dict().items() if k not in ("device", "num_threads")
        }
        key = json.dumps(
            [recipe, model, split.to_json(self.data.records), LR_RANGE, WD_RANGE, SAMPLER, PRUNER],
            sort_keys=True,
            default=str,
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        where = f"{self.protocol}{len(self.splits)}-fold{i + 1}"
        name = f"{self.best.magnification}-{model}-{where}-{digest}"
        study = optuna.create_study(
            study_name=name,
            storage=self.storage,
            direction="maximize",
            load_if_exists=True,
            pruner=optuna.pruners.MedianPruner(n_startup_trials=STARTUP_TRIALS, n_warmup_steps=1),
        )
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            # Left RUNNING by an interrupted run (one process tunes a search at a time):
            # failed without an outcome, so counted out; its MLflow run closed as interrupted.
            study.tell(t.number, state=TrialState.FAIL)
            run_id = t.user_attrs.get("mlflow_run_id")
            if run_id:
                self.runs.end(run_id, "interrupted", "KILLED")
            self.log(f"[{name}] trial {t.number} was interrupted: it runs again")
        return study

    def _counted(self, study: Any) -> list[Any]:
        """The finished trials that count towards N (interrupted ones do not), in order."""
        from optuna.trial import TrialState

        done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        return [
            t for t in study.get_trials(deepcopy=False, states=done) if t.user_attrs.get(OUTCOME)
        ][: self.n]

    def _choose(self, study: Any, model: str, i: int) -> FoldChoice:
        from optuna.trial import TrialState

        complete = [t for t in self._counted(study) if t.state == TrialState.COMPLETE]
        if not complete:
            raise DalaError(
                f"{self.best.magnification} {model}, fold {i + 1}: none of its {self.n} tuning "
                f"trials completed (pruned or failed: see MLflow run {self.runs.parent_id}); "
                "try a larger --tune"
            )
        t = max(complete, key=lambda t: (t.value, -t.number))
        return FoldChoice(
            fold=i + 1,
            trial=t.number,
            lr=t.params["lr"],
            weight_decay=t.params["weight_decay"],
            value=t.value,
            run_id=t.user_attrs["mlflow_run_id"],
            study=study.study_name,
        )

    # ---- one trial ------------------------------------------------------------------------

    def _trial(self, study: Any, model: str, i: int, split: Any) -> None:
        import optuna
        from optuna.trial import TrialState

        from dala_search.train import train_trial
        from dala_search.train_steps import NonFiniteLossError

        mag = self.best.magnification
        number = len(study.trials)
        with warnings.catch_warnings():  # multivariate TPE is "experimental" in Optuna 4/5
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # A sampler per trial, seeded by its number: a resumed run proposes what an
            # uninterrupted one would have (a seeded sampler restarts its stream).
            study.sampler = optuna.samplers.TPESampler(
                seed=_seed(self.ref.plan.seed, mag, i + 1, number),
                n_startup_trials=STARTUP_TRIALS,
                multivariate=True,
            )
        trial = study.ask()
        lr = trial.suggest_float("lr", *LR_RANGE, log=True)
        wd = trial.suggest_float("weight_decay", *WD_RANGE, log=True)
        run_id = self.runs.start(model, i + 1, trial.number, study.study_name, lr, wd)
        trial.set_user_attr("mlflow_run_id", run_id)
        label = (
            f"[{mag} {model}] {self.protocol[:-1]} {i + 1}/{len(self.splits)} trial "
            f"{len(self._counted(study)) + 1}/{self.n}: lr {lr:.2e}, weight decay {wd:.2e}"
        )
        self.log(f"{label} ...")

        def report(epoch: int, metrics: dict[str, float]) -> None:
            self.runs.log_metrics(run_id, metrics, epoch)
            value = metrics.get(self.metric)
            if value is not None and math.isfinite(value):
                trial.report(value, epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned()

        config = self._config(i).replace(lr=lr, weight_decay=wd)
        fold = dataclasses.replace(self.data, split=split)
        try:
            result = train_trial(config, fold, report, build_model=model_builder(model))
        except optuna.TrialPruned:
            trial.set_user_attr(OUTCOME, "pruned")
            study.tell(trial, state=TrialState.PRUNED)
            self.runs.end(run_id, "pruned", "KILLED")
            self.log(f"{label}: pruned")
            return
        except NonFiniteLossError as e:  # a diverging lr is an outcome of the search
            trial.set_user_attr(OUTCOME, "failed")
            study.tell(trial, state=TrialState.FAIL)
            self.runs.end(run_id, "failed", "FAILED", error=str(e))
            self.log(f"{label}: failed ({e})")
            return
        except BaseException:  # a bug or an interrupt: not an outcome, not counted
            study.tell(trial, state=TrialState.FAIL)
            self.runs.end(run_id, "interrupted", "KILLED")
            raise
        value = _finite(result.best.get(self.metric))
        trial.set_user_attr("test", {k: _finite(v) for k, v in result.test.items()})
        trial.set_user_attr("y_true", [int(y) for y in result.test_scores["y_true"]])
        trial.set_user_attr("y_prob", result.test_scores["y_prob"])
        self.runs.log_metrics(run_id, {f"test_{k}": v for k, v in result.test.items()}, 0)
        if value is None:
            trial.set_user_attr(OUTCOME, "failed")
            study.tell(trial, state=TrialState.FAIL)
            self.runs.end(run_id, "failed", "FAILED", error=f"no finite {self.metric}")
            self.log(f"{label}: failed (no finite {self.metric})")
            return
        trial.set_user_attr(OUTCOME, "completed")
        study.tell(trial, value)
        self.runs.end(run_id, "completed", "FINISHED")
        self.log(f"{label}: {self.metric} {value:.4f} (best epoch {result.best_epoch})")
