"""Bad inputs through the real CLI: exit 2, a message naming the thing, nothing started.

Every case runs ``dala-search`` in-process with click's ``CliRunner`` from an empty working
directory, then checks that nothing was started or half-written: no search folder (no
``search.json``, no ``optuna.db``), no MLflow experiment or run in the tracking store, no
Ray session, no demo data set generated. The library-level refusals (every bad space key,
every bad Folds.csv row) are tested in ``tests/test_space.py`` and ``tests/data/``; this
file proves the command line reaches them before anything starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import socket
import sqlite3
import sys
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from dala_search.cli import main
from dala_search.data.breakhis import SUBTYPES

# --- helpers ---------------------------------------------------------------------------------

# slide -> subtype; 3 benign + 3 malignant patients: the fewest a train/val/test split takes.
SIX_PATIENTS = {
    "14-1001": "A",
    "14-1002": "F",
    "14-1003": "TA",
    "14-2001": "DC",
    "14-2002": "LC",
    "14-2003": "MC",
}


def write_tree(
    root: Path,
    patients: dict[str, str] = SIX_PATIENTS,
    mags: tuple[str, ...] = ("40X",),
    per_mag: int = 2,
) -> list[Path]:
    """A tiny BreakHis tree in the official layout (16x16 random PNGs); returns the files."""
    rng = np.random.default_rng(0)
    paths = []
    for slide, sub in patients.items():
        cls, folder = SUBTYPES[sub]
        letter = cls[0].upper()
        for mag in mags:
            for seq in range(1, per_mag + 1):
                path = (
                    root / "BreaKHis_v1" / "histology_slides" / "breast" / cls / "SOB" / folder
                    / f"SOB_{letter}_{sub}_{slide}" / mag
                    / f"SOB_{letter}_{sub}-{slide}-{mag[:-1]}-{seq:03d}.png"
                )  # fmt: skip
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(path)
                paths.append(path)
    return paths


def write_folds(root: Path, rows: list[tuple[object, ...]], header: str = "fold,mag,grp,filename"):
    lines = [header] + [",".join(str(c) for c in row) for row in rows]
    (root / "Folds.csv").write_text("\n".join(lines) + "\n")


def fold_rows(files: list[Path], root: Path, fold: int = 1) -> list[tuple[object, ...]]:
    """A patient-disjoint fold: the first 2 patients of each class train, the third tests."""
    test_slides = {"14-1003", "14-2003"}
    rows = []
    for p in files:
        slide = p.parent.parent.name.split("_", 3)[3]
        grp = "test" if slide in test_slides else "train"
        rows.append((fold, p.parent.name[:-1], grp, p.relative_to(root).as_posix()))
    return rows


class Env:
    """An empty working directory, its runs dir, a sqlite tracking store, and the CLI."""

    def __init__(self, tmp: Path, db: Path) -> None:
        self.cwd = tmp / "work"
        self.cwd.mkdir()
        self.runs = self.cwd / "runs"
        self.db = db
        self.uri = f"sqlite:///{self.db}"

    def run(self, *args: object) -> Result:
        return CliRunner().invoke(main, [str(a) for a in args])

    def start(self, *args: object, data: Path | None = None, space: object = "smoke") -> Result:
        """``start`` with our runs dir and store; ``--data`` unless the test gives none."""
        extra = ["--data", data] if data is not None else []
        return self.run(
            "start", "--space", space, "--runs-dir", self.runs, "--tracking-uri", self.uri,
            *extra, *args,
        )  # fmt: skip

    def assert_refused(self, result: Result, *fragments: str) -> str:
        """Exit 2, every fragment in the message, and nothing started or written."""
        out = result.output
        assert result.exit_code == 2, (result.exit_code, out, result.exception)
        for fragment in fragments:
            assert fragment in out, f"{fragment!r} not in {out!r}"
        self.assert_nothing_started()
        return out

    def assert_nothing_started(self) -> None:
        # No search folder of any kind (search.json, optuna.db, ray/).
        assert not self.runs.exists() or not any(self.runs.iterdir()), list(self.runs.rglob("*"))
        # Nothing else in the working directory (e.g. dala_runs/, a default mlflow.db).
        assert {p.name for p in self.cwd.iterdir()} <= {"runs"}
        # The tracking store may exist (the name check opens it), but holds no search.
        if self.db.exists():
            with sqlite3.connect(self.db) as db:
                names = [r[0] for r in db.execute("select name from experiments")]
                runs = db.execute("select count(*) from runs").fetchone()[0]
            assert not [n for n in names if n.startswith("dala-search/")], names
            assert runs == 0
        ray = sys.modules.get("ray")  # Ray cannot run in this process without being imported
        assert ray is None or not ray.is_initialized()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One sqlite tracking store for the module: creating MLflow's schema takes seconds.

    Sharing it is safe because no case here may create an experiment or a run in it, which
    every case checks.
    """
    return tmp_path_factory.mktemp("store") / "mlflow.db"


@pytest.fixture
def env(tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    e = Env(tmp_path, store)
    # `start` and `resume` route SIGTERM to SIGINT for the search; keep pytest's handler.
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    monkeypatch.chdir(e.cwd)
    monkeypatch.delenv("DALA_RUNS_DIR", raising=False)
    # Were a command to fall back to the demo data set, it would be made here (and fail
    # the "nothing written" check), never in the user's cache.
    monkeypatch.setenv("DALA_DEMO_DIR", str(e.cwd / "demo"))
    return e


@pytest.fixture(scope="module")
def good_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six patients at 40X only, with a patient-disjoint Folds.csv (fold 1)."""
    root = tmp_path_factory.mktemp("good")
    files = write_tree(root)
    write_folds(root, fold_rows(files, root))
    return root


# --- search spaces ---------------------------------------------------------------------------

BASE = "fixed: {pretrained: none, epochs: 2}\n"
SPACES = {
    "empty file": ("", ["empty"]),
    "yaml syntax error": ("fixed:\n  epochs: 2\n   pretrained: none\n", ["YAML syntax", "line 3"]),
    "unknown parameter": (
        BASE + "params:\n  lrr: {type: float, low: 0.1, high: 0.2}\n",
        ["params.lrr", "did you mean 'lr'"],
    ),
    "wrong type": ("fixed: {pretrained: none, epochs: ten}\n", ["'epochs'", "'ten'"]),
    "wrong bound type": (
        BASE + "params:\n  lr: {type: float, low: abc, high: 0.2}\n",
        ["params.lr.low", "'abc'"],
    ),
    "low above high": (
        BASE + "params:\n  lr: {type: float, low: 0.5, high: 0.1}\n",
        ["params.lr", "low 0.5", "high 0.1"],
    ),
    "log with zero low": (
        BASE + "params:\n  dropout: {type: float, low: 0, high: 0.5, log: true}\n",
        ["params.dropout.low", "log"],
    ),
    "log with negative low": (
        BASE + "params:\n  lr: {type: float, low: -0.1, high: 0.5, log: true}\n",
        ["params.lr.low", "-0.1"],
    ),
    "empty choices": (
        BASE + "params:\n  attention: {type: categorical, choices: []}\n",
        ["params.attention.choices", "non-empty"],
    ),
    "unknown attention": (
        BASE + "params:\n  attention: {type: categorical, choices: [se, foo]}\n",
        ["params.attention", "'foo'", "cbam, eca, none, se, simam"],
    ),
    "unknown loss": (
        BASE + "params:\n  loss_weighting: {type: categorical, choices: [none, balanced]}\n",
        ["params.loss_weighting", "'balanced'"],
    ),
    "unknown data sampler": (
        "fixed: {pretrained: none, epochs: 2, sampling: smote}\n",
        ["'sampling'", "'smote'"],
    ),
    "unknown optuna sampler": ("search: {sampler: bayes}\n" + BASE, ["search.sampler", "'bayes'"]),
    "unknown pruner": ("search: {pruner: early}\n" + BASE, ["search.pruner", "'early'"]),
    "condition on a missing parameter": (
        BASE + "params:\n  focal_gamma: {type: float, low: 1, high: 2, "
        "condition: {loss_weighting: focal}}\n",
        ["params.focal_gamma.condition.loss_weighting", "not a searched parameter"],
    ),
    "required value unset": ("fixed: {epochs: 2}\n", ["'pretrained'", "must be stated"]),
    "image size searched": (
        BASE + "params:\n  image_size: {type: int, low: 32, high: 64}\n",
        ["'image_size'", "fixed"],
    ),
}


@pytest.mark.parametrize("case", list(SPACES), ids=list(SPACES))
def test_bad_space_refused_by_start(env: Env, good_tree: Path, case: str) -> None:
    text, fragments = SPACES[case]
    path = env.cwd.parent / "space.yaml"
    path.write_text(text)
    env.assert_refused(env.start(data=good_tree, space=path), str(path), *fragments)


def test_unknown_space_name_lists_the_shipped_ones(env: Env, good_tree: Path) -> None:
    env.assert_refused(env.start(data=good_tree, space="nope"), "'nope'", "smoke")


# --- data ------------------------------------------------------------------------------------


def test_missing_data_directory(env: Env, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    env.assert_refused(env.start(data=missing), str(missing), "no such directory")


def test_directory_without_breakhis_images(env: Env, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "holiday.png")
    (folder / "notes.txt").write_text("not an image")
    env.assert_refused(env.start(data=folder), str(folder), "no BreakHis images", "holiday.png")


@pytest.mark.parametrize(
    "command", [["data", "check"], ["data", "split"], ["train", "--pretrained", "none", "--data"]]
)
@pytest.mark.parametrize("kind", ["missing", "no images"])
def test_other_commands_refuse_unusable_data(
    env: Env, tmp_path: Path, command: list, kind: str
) -> None:
    folder = tmp_path / "data"
    if kind == "no images":
        folder.mkdir()
        (folder / "readme.txt").write_text("no images here")
    message = "does not exist" if kind == "missing" else "no BreakHis images"
    env.assert_refused(env.run(*command, folder), str(folder), message)


def test_magnification_without_images(env: Env, good_tree: Path) -> None:
    out = env.assert_refused(
        env.start("-m", "40X,100X", data=good_tree), str(good_tree), "magnification 100X"
    )
    assert "40X: 12" in out  # what the folder does hold


@pytest.mark.parametrize(
    ("patients", "fragments"),
    [
        ({"14-1001": "A", "14-1002": "F", "14-1003": "TA"}, ["'malignant'", "only 0"]),
        (
            {"14-1001": "A", "14-1002": "F", "14-2001": "DC", "14-2002": "LC"},
            ["at least 3 patient(s)", "only 2"],
        ),
    ],
    ids=["one class only", "too few patients"],
)
def test_split_impossible(env: Env, tmp_path: Path, patients: dict, fragments: list) -> None:
    root = tmp_path / "few"
    write_tree(root, patients)
    env.assert_refused(env.start(data=root), str(root), "magnification 40X", *fragments)


def corrupt(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:40])  # a truncated download


def test_unreadable_images_skipped_counted_and_the_search_starts(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "damaged"
    files = write_tree(root)
    corrupt(files[0])
    report = json.loads(env.run("data", "check", root, "--json").output)
    assert [s["path"] for s in report["skipped"]] == [str(files[0])]
    assert "readable PNG" in report["skipped"][0]["reason"]
    assert report["n_images"] == len(files) - 1

    # `start` passes its data check and hands the plan to the search (stubbed here: a real
    # search is tests/search/'s business); the training itself is the next test.
    from dala_search.search import tuner

    started = []
    monkeypatch.setattr(tuner, "run_search", lambda plan, resume, **_: started.append(plan) or [])
    result = env.start("-m", "40X", "--name", "damaged", data=root)
    assert result.exit_code == 0, result.output
    assert [p.data_dir for p in started] == [str(root.resolve())]


@pytest.mark.slow
def test_unreadable_image_skipped_while_a_trial_trains(env: Env, tmp_path: Path) -> None:
    root = tmp_path / "damaged"
    files = write_tree(root, per_mag=3)
    corrupt(files[1])
    result = env.run(
        "train", "--data", root, "-m", "40X", "--epochs", "1", "--image-size", "32",
        "--pretrained", "none", "--device", "cpu", "--cache-dir", tmp_path / "cache", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, (result.output, result.exception)
    out = json.loads(result.output[result.output.index("{") :])
    assert out["skipped_files"] == 1
    assert out["epochs_run"] == 1
    sides = out["data"]["n_train"] + out["data"]["n_val"] + out["data"]["n_test"]
    assert sides == len(files) - 1
    assert math.isfinite(out["test"]["accuracy"])


def test_official_fold_ok_passes_the_data_check(env: Env, good_tree: Path, monkeypatch) -> None:
    # The control for the Folds.csv cases below: the same tree and fold are accepted.
    from dala_search.search import tuner

    monkeypatch.setattr(tuner, "run_search", lambda plan, resume, **_: [])
    result = env.start("--fold", "1", "-m", "40X", "--name", "fold-ok", data=good_tree)
    assert result.exit_code == 0, result.output


def _fold_tree(tmp_path: Path) -> tuple[Path, list[tuple[object, ...]]]:
    root = tmp_path / "kaggle"
    files = write_tree(root)
    return root, fold_rows(files, root)


def test_leaky_folds_csv(env: Env, tmp_path: Path) -> None:
    root, rows = _fold_tree(tmp_path)
    rows[0] = (*rows[0][:2], "test", rows[0][3])  # one image of a train patient into test
    write_folds(root, rows)
    env.assert_refused(
        env.start("--fold", "1", "-m", "40X", data=root), "Folds.csv", "both train and test"
    )


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (lambda rows: [(1, 40, "train")] + rows, ["line 2", "expected 4 columns"]),
        (lambda rows: [("one", *rows[0][1:])] + rows[1:], ["line 2", "fold 'one'"]),
        (lambda rows: [(1, 50, *rows[0][2:])] + rows[1:], ["line 2", "mag '50'"]),
        (lambda rows: [(1, 40, "holdout", rows[0][3])] + rows[1:], ["line 2", "'holdout'"]),
    ],
    ids=["short row", "fold not a number", "unknown mag", "unknown group"],
)
def test_malformed_folds_csv(env: Env, tmp_path: Path, edit, fragments: list) -> None:
    root, rows = _fold_tree(tmp_path)
    write_folds(root, edit(rows))
    env.assert_refused(env.start("--fold", "1", "-m", "40X", data=root), "Folds.csv", *fragments)


def test_folds_csv_without_its_columns(env: Env, tmp_path: Path) -> None:
    root, rows = _fold_tree(tmp_path)
    write_folds(root, rows, header="fold,magnification,group,file")
    env.assert_refused(
        env.start("--fold", "1", "-m", "40X", data=root), "Folds.csv", "missing column"
    )


def test_folds_csv_naming_missing_files(env: Env, tmp_path: Path) -> None:
    root, rows = _fold_tree(tmp_path)
    ghost = (
        "BreaKHis_v1/histology_slides/breast/benign/SOB/adenosis/x/40X/SOB_B_A-14-9999-40-001.png"
    )
    write_folds(root, [*rows, (1, 40, "train", ghost)])
    env.assert_refused(
        env.start("--fold", "1", "-m", "40X", data=root),
        "Folds.csv",
        "not found",
        "SOB_B_A-14-9999-40-001.png",
    )


def test_fold_without_folds_csv(env: Env, tmp_path: Path) -> None:
    root = tmp_path / "plain"
    write_tree(root)
    env.assert_refused(env.start("--fold", "1", "-m", "40X", data=root), "no Folds.csv")


def test_data_split_command_refuses_a_leaky_fold(env: Env, tmp_path: Path) -> None:
    root, rows = _fold_tree(tmp_path)
    rows[0] = (*rows[0][:2], "test", rows[0][3])
    write_folds(root, rows)
    env.assert_refused(env.run("data", "split", root, "--fold", "1"), "both train and test")


# --- CLI: every numeric option of every command ----------------------------------------------

# Options where 0 is a meaningful value (a seed, "no limit", "no GPU", "no retries",
# "no Grad-CAM figures").
ZERO_OK = {"--seed", "--max-concurrent", "--gpus-per-trial", "--max-retries", "--gradcam-per-class"}
NONSENSE = ("-1", "0", "nan", "inf", "-inf", "abc", "1e999")


def _commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


def _numeric_options() -> list[tuple[tuple[str, ...], str, click.ParamType]]:
    out = []
    for path, cmd in _commands(main):
        for p in cmd.params:
            if isinstance(p, click.Option) and isinstance(
                p.type, click.types.IntParamType | click.types.FloatParamType
            ):
                out.append((path, max(p.opts, key=len), p.type))
    return out


NUMERIC = _numeric_options()


def test_the_numeric_options_are_the_ones_we_expect() -> None:
    # Guards the parametrization below from silently covering nothing.
    found = {(" ".join(path), opt) for path, opt, _ in NUMERIC}
    for expected in [
        ("start", "--trials"),
        ("start", "--epochs"),
        ("start", "--gpus-per-trial"),
        ("start", "--cpus-per-trial"),
        ("start", "--max-concurrent"),
        ("start", "--seed"),
        ("train", "--image-size"),
        ("data split", "--val-fraction"),
        ("data demo", "--width"),
        ("ui", "--port"),
    ]:
        assert expected in found


def _cases():
    for path, opt, _ in NUMERIC:
        for value in NONSENSE:
            if value == "0" and opt in ZERO_OK:
                continue
            yield pytest.param(path, opt, value, id=f"{' '.join(path)} {opt}={value}")


@pytest.mark.parametrize(("path", "opt", "value"), list(_cases()))
def test_nonsense_numeric_option_refused(env: Env, path, opt: str, value: str) -> None:
    # A value for each required argument (a data folder, a search name...): the option must
    # be refused whatever they are, and nothing is made under the name.
    command = dict(_commands(main))[path]
    positional = ["nothing" for p in command.params if isinstance(p, click.Argument) and p.required]
    common = {
        ("start",): ["--runs-dir", env.runs, "--tracking-uri", env.uri, "--data", env.cwd],
        ("ui",): ["--runs-dir", env.runs, "--tracking-uri", env.uri],
    }.get(path, [])
    result = env.run(*path, *positional, *common, f"{opt}={value}")
    out = env.assert_refused(result, opt)
    # click shows the value as given, or as converted ("1e999" -> inf) for a range error.
    shown = {value} | ({str(float(value))} if value != "abc" else set())
    assert any(v in out for v in shown), out


@pytest.mark.parametrize("value", ["0", "-5m", "nan", "inf", "abc", "2x"])
def test_nonsense_time_budget_refused(env: Env, good_tree: Path, value: str) -> None:
    env.assert_refused(
        env.start("--time-budget", value, data=good_tree), "'--time-budget'", repr(value)
    )


@pytest.mark.parametrize("value", ["50X", "40X,60X", "", ","])
def test_unknown_magnification_refused_by_start(env: Env, good_tree: Path, value: str) -> None:
    env.assert_refused(env.start("-m", value, data=good_tree), "'--magnification'")


@pytest.mark.parametrize("command", [["train", "--data"], ["data", "split"]])
def test_unknown_magnification_refused_before_reading_data(env: Env, command: list) -> None:
    # --data names a folder that does not exist: the magnification must fail first, and
    # without --data `train` would first generate the demo set.
    result = env.run(*command, env.cwd / "nodata", "-m", "50X")
    env.assert_refused(result, "'--magnification'", "'50X'", "40X, 100X, 200X, 400X")


def test_train_unknown_magnification_makes_no_demo_data(env: Env) -> None:
    env.assert_refused(env.run("train", "-m", "3X"), "'3X'")
    assert not (env.cwd / "demo").exists()


@pytest.mark.parametrize(
    ("option", "value"), [("--sampler", "bayes"), ("--pruner", "early"), ("--sampler", "")]
)
def test_unknown_sampler_or_pruner(env: Env, good_tree: Path, option: str, value: str) -> None:
    env.assert_refused(
        env.start(option, value, data=good_tree),
        f"'{option}'",
        "tpe" if option == "--sampler" else "median",
    )


# --- CLI: tracking store ---------------------------------------------------------------------


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_fails_fast(env: Env, good_tree: Path) -> None:
    import time

    url = f"http://127.0.0.1:{closed_port()}"
    t0 = time.monotonic()
    result = env.run(
        "start", "--space", "smoke", "--data", good_tree, "--runs-dir", env.runs,
        "--tracking-uri", url,
    )  # fmt: skip
    env.assert_refused(result, "cannot reach the MLflow tracking server", url)
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [("sqlite:////no/such/folder/mlflow.db", "/no/such/folder"), ("ftp://x/y", "unsupported")],
)
def test_unusable_tracking_uri(env: Env, good_tree: Path, uri: str, fragment: str) -> None:
    result = env.run(
        "start", "--space", "smoke", "--data", good_tree, "--runs-dir", env.runs,
        "--tracking-uri", uri,
    )  # fmt: skip
    env.assert_refused(result, fragment)


def test_resume_with_an_unreachable_server_starts_nothing(env: Env, good_tree: Path) -> None:
    from dala_search.search.tuner import plan_search

    plan = plan_search(space="smoke", name="s", data_dir=good_tree, tracking_uri=env.uri,
                       runs_dir=env.runs, magnifications="40X")  # fmt: skip
    url = f"http://127.0.0.1:{closed_port()}"
    dataclasses.replace(plan, tracking_uri=url).save()
    result = env.run("resume", "s", "--runs-dir", env.runs)
    assert result.exit_code == 2, result.output
    assert url in result.output and "cannot reach" in result.output
    assert sorted(p.name for p in (env.runs / "s").iterdir()) == ["search.json"]
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()


def test_best_with_an_unreachable_server_fails_fast(env: Env) -> None:
    import time

    url = f"http://127.0.0.1:{closed_port()}"
    t0 = time.monotonic()
    result = env.run("best", "x", "--tracking-uri", url, "--runs-dir", env.runs)
    env.assert_refused(result, "cannot reach", url)
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("url", ["nonsense", "foo://host/db", "mysql+nodriver://u@h/d", ""])
def test_unusable_optuna_storage_refused_before_anything(
    env: Env, good_tree: Path, url: str
) -> None:
    env.assert_refused(env.start("--storage", url, data=good_tree), "'--storage'", repr(url))
