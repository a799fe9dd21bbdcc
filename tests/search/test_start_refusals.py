"""Every option of ``start`` with a bad value: exit 2, a message naming it, nothing touched.

The cases come from the option table (``dala_search/start_options.py``): a value out of each
number's range, an unknown choice, and for text and path options the values in ``TEXT_BAD``
(a new text option without an entry there fails ``test_every_option_has_bad_values``).
``DEEP_BAD`` adds values that pass the command line's parsing and are refused by the checks
before anything is created (``search/planning.py``): the stores, the resources, the data.

Before each case the runs folder holds a search, the MLflow store an experiment and a
run, and the Optuna storage a study; after it, every file of the three is byte-for-byte as
before (names and SHA-256), the run and experiment counts are the same, and no Ray started.
"""

from __future__ import annotations

import hashlib
import socket
import sqlite3
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from click.testing import CliRunner, Result
from mlflow import MlflowClient

from dala_search.cli import main
from dala_search.runs import schema
from dala_search.search import tuner
from dala_search.start_options import COMMAND_OPTIONS, StartOption


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Text and path options have no range to step out of: their bad values, by flag. "{x}" is
# a path of the test's world (World.paths).
TEXT_BAD: dict[str, list[str]] = {
    "--space": ["nope", "/nonexistent-dir/space.yaml", "{not_a_space}"],
    "--data": ["/nonexistent-dir/data", "{empty}"],
    "--magnification": ["50X", "", "40X,60X"],
    "--name": ["../x", "a/b", "x y"],
    "--address": ["nowhere", "ray://head:10001"],  # the second: a cluster needs an http store
    "--tracking-uri": [
        "ftp://x/y",
        "sqlite:////nonexistent-dir/mlflow.db",
        f"http://127.0.0.1:{_closed_port()}",
    ],
    "--storage": [
        "sqlite:////nonexistent-dir/o.db",
        "nonsense",
        "sqlite://",
        "sqlite:///{not_a_db}",
        f"postgresql+psycopg://u@127.0.0.1:{_closed_port()}/db",
    ],
    "--time-budget": ["2x", "0", "-5m"],
    "--runs-dir": ["/dev/null/runs"],
    "--objective": ["latency_ms:min", "val_f1:up", "speed:max"],  # a cost cannot be primary
    "--constraint": ["params_m<25", "speed<=1"],
    "--enqueue": ["nope.yaml", "{not_a_space}"],  # no such file; a file that is not points
    "--warm-start": ["a/b", "old:50X", "nosuch"],  # bad name, bad magnification, no search
}
# Values the command line accepts and the checks before anything is created refuse.
DEEP_BAD: list[tuple[str, str]] = [
    ("--name", "existing"),  # a search folder of that name exists
    ("--name", "elsewhere"),  # the MLflow store has that search, from another folder
    ("--name", "other"),  # the Optuna storage holds study other-40X
    ("--cpus-per-trial", "100000"),
    ("--gpus-per-trial", "100000"),
    ("--workers-per-trial", "100000"),
    ("--cv", "1000"),  # more inner folds than patients
    ("--fold", "1"),  # the data has no Folds.csv
]


def _typed_bad(option: StartOption) -> list[str]:
    """Values outside a number's range, an unknown choice."""
    if option.kind == "choice":
        return ["no-such-" + option.name]
    out = ["abc", "nan"] if option.kind == "float" else ["abc", "1.5"]
    if option.low is not None:
        out.append(str(option.low) if option.low_open else str(option.low - 1))
    if option.high is not None:
        out.append(str(option.high + 1))
    return out


def _cases() -> list[Any]:
    cases = []
    for option in COMMAND_OPTIONS:
        typed = option.kind in ("int", "float", "choice")
        values = _typed_bad(option) if typed else TEXT_BAD.get(option.flag or "", [])
        cases += [(option.flag, v) for v in values]
    cases += DEEP_BAD
    return [pytest.param(flag, value, id=f"{flag}={value}") for flag, value in cases]


def test_every_option_has_bad_values() -> None:
    # A new text option must say what a bad value of it is; a typed one gets its own.
    missing = [
        o.flag for o in COMMAND_OPTIONS if o.kind in ("text", "path") and not TEXT_BAD.get(o.flag)
    ]
    assert not missing, f"add bad values for {missing} to TEXT_BAD"
    covered = {p.values[0] for p in _cases()}
    assert covered == {o.flag for o in COMMAND_OPTIONS}
    assert len(COMMAND_OPTIONS) >= 22


class World:
    """A runs folder with a search, an MLflow store with runs, an Optuna storage with a study."""

    def __init__(self, root: Path, demo_root: Path, tiny_space: Path) -> None:
        self.root = root
        self.cwd = root / "work"
        self.runs = root / "runs"
        self.store = root / "store"
        self.optuna = root / "optuna"
        for folder in (self.cwd, self.store, self.optuna):
            folder.mkdir()
        self.uri = f"sqlite:///{self.store / 'mlflow.db'}"
        self.storage = f"sqlite:///{self.optuna / 'shared.db'}"
        (root / "empty").mkdir()
        (root / "not_a_db").write_text("not a database\n")
        self.paths = {
            "empty": root / "empty",
            "not_a_space": root / "not_a_db",
            "not_a_db": root / "not_a_db",
        }
        self.common = {
            "--space": str(tiny_space),
            "--data": str(demo_root),
            "--magnification": "40X",
            "--name": "fresh",
            "--runs-dir": str(self.runs),
            "--tracking-uri": self.uri,
            "--storage": self.storage,
        }
        existing = tuner.plan_search(
            space=str(tiny_space),
            name="existing",
            data_dir=demo_root,
            tracking_uri=self.uri,
            runs_dir=self.runs,
            magnifications="40X",
        )
        existing.save(new=True)
        client = MlflowClient(self.uri)
        for name, folder in (("existing", existing.folder), ("elsewhere", "/some/other/runs")):
            exp = client.create_experiment(
                schema.experiment_name(name), tags={schema.TAG_FOLDER: folder}
            )
            client.set_terminated(client.create_run(exp).info.run_id)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(study_name="other-40X", storage=self.storage)
        study.enqueue_trial({"x": 1.0})

    def args(self, **replace: str) -> list[str]:
        values = {**self.common, **replace}
        out = ["start"]
        for flag, value in values.items():
            out += [flag, value.format(**self.paths)]
        return out

    def snapshot(self) -> dict[str, Any]:
        """Every file of the three stores (path, SHA-256), MLflow's counts, the cwd."""
        files = {  # folders too (None), so an empty folder left behind shows
            str(p.relative_to(self.root)): (
                hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            )
            for folder in (self.runs, self.store, self.optuna)
            for p in sorted(folder.rglob("*"))
        }
        with sqlite3.connect(f"{(self.store / 'mlflow.db').as_uri()}?mode=ro", uri=True) as db:
            count = "select count(*) from {}".format
            counts = {t: db.execute(count(t)).fetchone()[0] for t in ("runs", "experiments")}
        return {"files": files, "counts": counts, "cwd": sorted(self.cwd.iterdir())}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, demo_root: Path, tiny_space: Path) -> World:
    return World(tmp_path_factory.mktemp("world"), demo_root, tiny_space)


@pytest.fixture
def in_world(world: World, monkeypatch: pytest.MonkeyPatch) -> World:
    monkeypatch.chdir(world.cwd)
    monkeypatch.delenv("DALA_RUNS_DIR", raising=False)
    monkeypatch.setenv("DALA_DEMO_DIR", str(world.cwd / "demo"))  # a fallback would show
    return world


def _assert_refused(world: World, result: Result, flag: str, before: dict[str, Any]) -> None:
    out = result.output
    assert result.exit_code == 2, (result.exit_code, out, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    assert "Traceback" not in out
    assert flag in out, f"{flag} not named in {out!r}"
    assert world.snapshot() == before
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()


@pytest.mark.parametrize(("flag", "value"), _cases())
def test_bad_value_refused_with_nothing_touched(in_world: World, flag: str, value: str) -> None:
    before = in_world.snapshot()
    assert before["counts"] == {"runs": 2, "experiments": 3}  # the default experiment too
    result = CliRunner().invoke(main, in_world.args(**{flag: value}))
    _assert_refused(in_world, result, flag, before)


def test_the_corrected_command_keeps_the_name(
    in_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's example: the refused command burns nothing, so the corrected one, with
    the same --name, passes every check and hands its plan to the search.

    What this proves: the name is free and every check passes; ``run_search`` itself is
    replaced here (a real search is tests/search/'s business elsewhere).
    """
    before = in_world.snapshot()
    bad = in_world.args(**{"--storage": "sqlite:////nonexistent-dir/o.db", "--name": "run1"})
    result = CliRunner().invoke(main, bad)
    _assert_refused(in_world, result, "--storage", before)
    assert "/nonexistent-dir" in result.output and "does not exist" in result.output

    started: list[Any] = []
    monkeypatch.setattr(tuner, "run_search", lambda plan, **kw: started.append((plan, kw)) or [])
    good = f"sqlite:///{in_world.optuna / 'run1.db'}"
    result = CliRunner().invoke(main, in_world.args(**{"--storage": good, "--name": "run1"}))
    assert result.exit_code == 0, (result.output, result.exception)
    ((plan, kw),) = started
    assert (plan.name, plan.storage, plan.magnifications) == ("run1", good, ("40X",))
    assert kw["resume"] is False and kw["index"].records  # the check's index, read once
    assert in_world.snapshot() == before  # the check itself created nothing


def test_imagenet_weights_unavailable_refuse_the_search_at_once(
    in_world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--space default`` (ImageNet weights) with no network and an empty torch cache: the
    search is refused before anything starts, saying where to put the weights, instead of
    every trial failing at model build."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    before = in_world.snapshot()
    result = CliRunner().invoke(main, in_world.args(**{"--space": "default"}))
    _assert_refused(in_world, result, "--space", before)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    out = " ".join(result.output.split())  # the message wraps nowhere, but be safe
    assert "fixed.pretrained" in out and "pretrained='imagenet'" in out
    assert str(cached) in out and "could not be downloaded" in out
    assert not cached.exists()


def test_missing_weights_file_refused(in_world: World, tmp_path: Path) -> None:
    space = tmp_path / "file-weights.yaml"
    weights = tmp_path / "absent" / "resnet50.pth"
    space.write_text(f"fixed: {{pretrained: {weights}, epochs: 1}}\n")
    before = in_world.snapshot()
    result = CliRunner().invoke(main, in_world.args(**{"--space": str(space)}))
    _assert_refused(in_world, result, "--space", before)
    assert f"no such file {weights}" in result.output


def test_resume_checks_before_it_starts(in_world: World, tmp_path: Path) -> None:
    """A saved plan whose data folder is gone: ``resume`` refuses before Ray or any record."""
    import dataclasses

    from dala_search.runs.plan import SearchPlan

    runs = tmp_path / "runs"
    plan = SearchPlan.load(in_world.runs / "existing")
    moved = dataclasses.replace(
        plan, folder=str(runs / "existing"), data_dir=str(tmp_path / "gone")
    )
    moved.save(new=True)
    listing = sorted(p.name for p in (runs / "existing").iterdir())
    before = in_world.snapshot()
    result = CliRunner().invoke(main, ["resume", "existing", "--runs-dir", str(runs)])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "the search's data" in result.output and str(tmp_path / "gone") in result.output
    assert sorted(p.name for p in (runs / "existing").iterdir()) == listing
    assert in_world.snapshot() == before
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()


def _no_network(url: str, dst: str, *args: object, **kwargs: object) -> None:
    import urllib.error

    raise urllib.error.URLError("[Errno -2] Name or service not known")
