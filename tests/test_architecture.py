"""The shape of the package: no import cycle among its modules, and the layers' boundaries.

Both checks read every module's AST (imports at module level, under ``TYPE_CHECKING`` and
inside functions alike: a function-level import is still a dependency, only a later one),
and the boundaries are checked again by importing the modules in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dala_search"
sys.path.insert(0, str(ROOT / "bench"))
import code_shape  # noqa: E402 - bench/code_shape.py: the import graph, shared with the figures

MODULES = code_shape.modules(PACKAGE)
GRAPH = code_shape.import_graph(PACKAGE)

# Evaluation, comparison and report read finished searches through the record layer
# (dala_search.runs): none of them, nor the record layer, may need Ray or the search package.
RECORD_READERS = sorted(
    m
    for m in MODULES
    if m
    in (
        "dala_search.evaluate",
        "dala_search.comparison",
        "dala_search.baseline_tuning",
        "dala_search.baseline_tuning_runs",
        "dala_search.report",
        # the registered pyfunc is loaded by `mlflow models serve`: no Ray there either
        "dala_search.predict",
        "dala_search.pyfunc_model",
        "dala_search.predict_images",
    )
    or m.startswith(("dala_search.runs", "dala_search.evaluate_", "dala_search.report_"))
)
FRAMEWORK_FREE_CORE = (
    "dala_search.train",
    "dala_search.cli",
    "dala_search.data.synthetic",
)


def test_the_graph_sees_module_and_function_level_imports() -> None:
    # So that the cycle test cannot pass by reading nothing.
    assert len(MODULES) > 40
    assert "dala_search.runs.plan" in GRAPH["dala_search.evaluate"]  # module level
    assert "dala_search.search.tuner" in GRAPH["dala_search.cli.search"]  # inside a command
    assert "dala_search.data.augment_cpu" in GRAPH["dala_search.data.augment"]  # lazy OpenCV


def test_cycle_finder_reports_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    (component,) = code_shape.find_cycles(graph)
    assert component == ["a", "b", "c"]
    assert code_shape.cycle_path(graph, component) == ["a", "b", "c", "a"]


def test_no_import_cycle_among_package_modules() -> None:
    cycles = [code_shape.cycle_path(GRAPH, c) for c in code_shape.find_cycles(GRAPH)]
    assert not cycles, "import cycle(s): " + "; ".join(" -> ".join(c) for c in cycles)


def _imports_of(module: str) -> list[code_shape.Import]:
    return code_shape.imported_names(MODULES[module], module)


def _is_under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("module", RECORD_READERS)
def test_record_readers_import_no_search_package_and_no_ray_in_source(module: str) -> None:
    bad = [
        f"{MODULES[module].relative_to(ROOT)}:{i.line}: {i.name}"
        for i in _imports_of(module)
        if _is_under(i.name, ("ray", "dala_search.search"))
    ]
    assert not bad, bad


def test_cli_imports_the_search_package_only_inside_commands() -> None:
    # `start` and `resume` launch a search: they import the tuner when they run, so every
    # other command (and `--help`) starts without Ray.
    found = []
    for module in (m for m in MODULES if m.startswith("dala_search.cli")):
        for i in _imports_of(module):
            if _is_under(i.name, ("ray", "optuna", "dala_search.search")):
                found.append(i)
                assert i.in_function, f"{module}:{i.line} imports {i.name} at module level"
                assert _is_under(i.name, ("dala_search.search.tuner",)), (module, i)
    assert found, "the CLI launches searches through dala_search.search.tuner"


def _loaded_after_import(modules: list[str] | tuple[str, ...]) -> list[str]:
    code = (
        "import importlib, json, sys\n"
        f"for m in {list(modules)!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_record_readers_load_no_search_package_and_no_ray() -> None:
    loaded = _loaded_after_import(RECORD_READERS)
    assert "dala_search.runs.plan" in loaded and "dala_search.report" in loaded
    bad = [m for m in loaded if _is_under(m, ("ray", "dala_search.search"))]
    assert not bad, bad


def test_core_and_cli_load_no_framework() -> None:
    loaded = _loaded_after_import(FRAMEWORK_FREE_CORE)
    assert "dala_search.train" in loaded
    bad = [m for m in loaded if _is_under(m, ("ray", "optuna", "mlflow", "dala_search.search"))]
    assert not bad, bad
