"""Safety: weights and YAML are read as data, never run as code; the MLflow UI stays on
localhost unless told otherwise; names from the command line, configs and data never write
outside a search's folder (or the cache's).

The source scans walk the AST of every module of ``dala_search/``, so a new ``torch.load``
or ``yaml.load`` anywhere in the package is checked without being listed here; each scan
also asserts it found what it guards, so it cannot pass by finding nothing.
"""

from __future__ import annotations

import ast
import importlib
import re
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from dala_search.cli import main
from dala_search.errors import ConfigError

PACKAGE = Path(__file__).resolve().parents[1] / "dala_search"
MODULES = sorted(PACKAGE.rglob("*.py"))


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(rel.parts).removesuffix(".__init__")


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(node: ast.AST) -> str:
    """``torch.load`` for Attribute(Name('torch'), 'load'); '' for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"


TREES = {path: ast.parse(path.read_text(), filename=str(path)) for path in MODULES}


# --- weights: torch.load(weights_only=True) --------------------------------------------------

# Calls that unpickle a checkpoint: torch.load, and the torch.hub / torchvision helpers
# that call it on a downloaded file (they pass weights_only through).
WEIGHTS_HELPERS = ("load_state_dict_from_url", "get_state_dict")


def test_every_torch_load_is_weights_only() -> None:
    found = []
    for path, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "torch":
                # `from torch import load` would hide calls from the scan below.
                assert "load" not in {a.name for a in node.names}, _where(path, node)
        for call in _calls(tree):
            name = _dotted(call.func)
            if name != "torch.load" and name.rsplit(".", 1)[-1] not in WEIGHTS_HELPERS:
                continue
            found.append(_where(path, call))
            flag = _keyword(call, "weights_only")
            assert isinstance(flag, ast.Constant) and flag.value is True, (
                f"{_where(path, call)}: {name}(...) must pass weights_only=True"
            )
    # The model's pretrained-weights loaders are there: the scan is looking at real code.
    assert any("dalaresnet.py" in w for w in found), found


def test_no_plain_pickle_loading_in_the_package() -> None:
    for path, tree in TREES.items():
        for call in _calls(tree):
            name = _dotted(call.func)
            assert name not in {"pickle.load", "pickle.loads", "cloudpickle.load"}, _where(
                path, call
            )
            if name in {"np.load", "numpy.load"}:
                flag = _keyword(call, "allow_pickle")
                assert flag is None or (isinstance(flag, ast.Constant) and flag.value is False), (
                    f"{_where(path, call)}: np.load with allow_pickle"
                )


class _Evil:
    """Unpickling this writes a file: what a hostile checkpoint would do."""

    marker: Path

    def __reduce__(self):  # noqa: ANN204
        return (open, (str(self.marker), "w"))


def test_a_hostile_weights_file_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    import torch

    from dala_search.model.dalaresnet import load_backbone_weights

    evil = _Evil()
    evil.marker = tmp_path / "pwned"
    weights = tmp_path / "resnet50.pth"
    torch.save({"conv1.weight": evil}, weights)
    with pytest.raises(ConfigError, match="weights-only loader refused") as info:
        load_backbone_weights(torch.nn.Identity(), str(weights))
    assert str(weights) in str(info.value)
    assert not evil.marker.exists()


# --- YAML: safe loaders only -----------------------------------------------------------------

SAFE_YAML_CALLS = {"safe_load", "safe_load_all", "safe_dump", "safe_dump_all", "dump"}
UNSAFE_YAML_NAMES = {"Loader", "FullLoader", "UnsafeLoader", "unsafe_load", "full_load"}


def test_yaml_is_read_with_safe_loaders_only() -> None:
    loads = []
    for path, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "yaml":
                bad = {a.name for a in node.names} - {"SafeLoader", "YAMLError"}
                assert not bad, f"{_where(path, node)}: from yaml import {bad}"
            if isinstance(node, ast.Attribute) and _dotted(node).startswith("yaml."):
                assert node.attr not in UNSAFE_YAML_NAMES, f"{_where(path, node)}: yaml.{node.attr}"
        for call in _calls(tree):
            name = _dotted(call.func)
            if not name.startswith("yaml.") or name.count(".") != 1:
                continue
            fn = name.split(".")[1]
            if fn[0].isupper() or fn in ("YAMLError", "MarkedYAMLError"):
                continue  # a class reference, e.g. a subclass definition
            loads.append(_where(path, call))
            if fn == "load":
                # Allowed only with a Loader that is (a subclass of) SafeLoader.
                loader = _keyword(call, "Loader")
                assert isinstance(loader, ast.Name | ast.Attribute), _where(path, call)
                module = importlib.import_module(_module_name(path))
                cls = (
                    getattr(module, loader.id)
                    if isinstance(loader, ast.Name)
                    else getattr(yaml, loader.attr)
                )
                assert issubclass(cls, yaml.SafeLoader), f"{_where(path, call)}: {cls}"
            else:
                assert fn in SAFE_YAML_CALLS, f"{_where(path, call)}: yaml.{fn}"
    assert any("space_file.py" in w for w in loads) and any("config.py" in w for w in loads), loads


HOSTILE_YAML = "fixed: !!python/object/apply:os.system ['touch {marker}']\n"


def test_hostile_yaml_space_and_config_are_refused(tmp_path: Path) -> None:
    from dala_search.config import load_trial_config
    from dala_search.space_file import load_space

    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.yaml"
    path.write_text(HOSTILE_YAML.format(marker=marker))
    with pytest.raises(ConfigError, match="hostile.yaml"):
        load_space(path)
    with pytest.raises(ConfigError, match="hostile.yaml"):
        load_trial_config(path)
    result = CliRunner().invoke(main, ["train", "--config", str(path), "--data", str(tmp_path)])
    assert result.exit_code == 2 and "hostile.yaml" in result.output, result.output
    assert not marker.exists()


# --- the MLflow UI binds to localhost --------------------------------------------------------


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The command lines ``dala-search ui`` would run (nothing is started)."""
    from dala_search.cli import results

    calls: list[list[str]] = []
    monkeypatch.setattr(results, "serve", lambda cmd: calls.append(cmd) or 0)
    return calls


def _host(cmd: list[str]) -> str:
    return cmd[cmd.index("--host") + 1]


def test_ui_binds_localhost_by_default(tmp_path: Path, launched: list) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = CliRunner().invoke(main, ["ui", "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    [cmd] = launched
    assert cmd[:4] == [sys.executable, "-m", "mlflow", "ui"]
    assert _host(cmd) == "127.0.0.1"
    assert cmd[cmd.index("--backend-store-uri") + 1] == uri
    assert "http://127.0.0.1:5000" in result.output


def test_ui_binds_elsewhere_only_when_told(tmp_path: Path, launched: list) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = CliRunner().invoke(
        main, ["ui", "--tracking-uri", uri, "--host", "0.0.0.0", "--port", "5050"]
    )
    assert result.exit_code == 0, result.output
    [cmd] = launched
    assert _host(cmd) == "0.0.0.0" and cmd[cmd.index("--port") + 1] == "5050"


def test_ui_starts_nothing_for_a_tracking_server(launched: list) -> None:
    result = CliRunner().invoke(main, ["ui", "--tracking-uri", "http://127.0.0.1:5000"])
    assert result.exit_code == 0 and "tracking server already" in result.output
    assert launched == []


# --- names never write outside the search's folder -------------------------------------------

BAD_NAMES = ["../escaped", "a/b", "/tmp/absolute", "..", ".", "", "a\\b", "x y"]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("name", BAD_NAMES)
def test_start_refuses_a_name_that_is_a_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    before = _tree(tmp_path)
    result = CliRunner().invoke(
        main,
        ["start", "--space", "smoke", "--name", name, "--runs-dir", "runs", "--data", "nodata"],
    )
    assert result.exit_code == 2, result.output
    assert "'--name'" in result.output and "letters, digits" in result.output
    assert _tree(tmp_path) == before
    assert not (tmp_path.parent / "escaped").exists()


def test_plan_search_refuses_a_path_as_name(tmp_path: Path) -> None:
    from dala_search.search.tuner import plan_search

    with pytest.raises(ConfigError, match="'../x'"):
        plan_search(space="smoke", name="../x", runs_dir=tmp_path)


@pytest.mark.parametrize("command", ["resume", "best", "ui"])
def test_commands_taking_a_search_name_refuse_paths(tmp_path: Path, command: str) -> None:
    # A search.json outside the runs dir that `resume ../outside` would otherwise read and
    # write beside.
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "search.json").write_text("{}")
    runs = tmp_path / "runs"
    runs.mkdir()
    result = CliRunner().invoke(main, [command, "../outside", "--runs-dir", str(runs)])
    assert result.exit_code == 2, result.output
    assert "'../outside'" in result.output and "letters, digits" in result.output
    assert _tree(tmp_path) == {"outside", "outside/search.json", "runs"}


def test_a_space_name_that_is_a_path_is_refused(tmp_path: Path, monkeypatch) -> None:
    # Without --name the search is named after the space: `name: ../../x` would escape.
    monkeypatch.chdir(tmp_path)
    space = tmp_path / "s.yaml"
    space.write_text("name: ../../escaped\nfixed: {pretrained: none, epochs: 1}\n")
    result = CliRunner().invoke(main, ["start", "--space", str(space), "--runs-dir", "runs"])
    assert result.exit_code == 2, result.output
    assert str(space) in result.output and "key 'name'" in result.output
    assert _tree(tmp_path) == {"s.yaml"}


def test_cache_files_are_named_by_hash_not_by_data_file_names(tmp_path: Path) -> None:
    from PIL import Image

    from dala_search.data.breakhis import index_breakhis
    from dala_search.data.cache import build_cache

    # Folder names are the user's business and may hold anything; file names are BreakHis
    # names (the index refuses any other), and neither reaches a cache file name.
    folder = tmp_path / "data" / "odd name ; $(x) 'q'" / "40X"
    folder.mkdir(parents=True)
    for i, (slide, sub, cls) in enumerate([("14-1", "A", "B"), ("14-2", "DC", "M")], start=1):
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(
            folder / f"SOB_{cls}_{sub}-{slide}-40-001.png"
        )
    index = index_breakhis(tmp_path / "data")
    cache_dir = tmp_path / "cache"
    cache = build_cache(index.records, 32, cache_dir, workers=1)
    assert cache.images.shape == (2, 32, 32, 3)
    names = sorted(p.name for p in cache_dir.iterdir())
    assert names, "the cache wrote nothing"
    for n in names:
        assert re.fullmatch(r"images-32px-[0-9a-f]{16}\.(npy|json|lock)", n), n
    # Nothing was written anywhere else (beside the data, or above the cache folder).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "data"]
    assert {p.name for p in folder.iterdir()} == {r.path.name for r in index.records}


def test_folds_csv_file_names_are_reduced_to_base_names(tmp_path: Path) -> None:
    from dala_search.data.folds_csv import read_folds_csv

    path = tmp_path / "Folds.csv"
    path.write_text(
        "fold,mag,grp,filename\n1,40,train,../../../../etc/SOB_B_A-14-1-40-001.png\n"
        "1,40,test,/abs/dir\\SOB_M_DC-14-2-40-001.png\n"
    )
    assert [r.name for r in read_folds_csv(path)] == [
        "SOB_B_A-14-1-40-001.png",
        "SOB_M_DC-14-2-40-001.png",
    ]


def test_data_demo_never_writes_over_a_folder_that_is_not_a_demo(tmp_path: Path) -> None:
    target = tmp_path / "real-data"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    result = CliRunner().invoke(main, ["data", "demo", str(target), "--overwrite"])
    assert result.exit_code == 2, result.output
    assert "refusing" in result.output
    assert _tree(tmp_path) == {"real-data", "real-data/precious.txt"}
