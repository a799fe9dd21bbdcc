"""The Ray (and Optuna) private attributes the search relies on still exist, and only
``search/ray_internals.py`` touches them: a Ray upgrade that moved one fails here, loudly,
instead of a search misreporting its trials."""

from __future__ import annotations

import ast
import re
from importlib.metadata import version
from pathlib import Path

import optuna
import pytest
import ray
from packaging.requirements import Requirement

from dala_search.search import ray_internals

ROOT = Path(__file__).resolve().parents[2]
SEARCH = ROOT / "dala_search" / "search"
# Names no class of ours defines (``_storage``, ``_mode``... are ours too, on our classes).
RAY_ONLY = ("_ot_study", "_ot_trials", "_completed_trials", "_time_attr", "_max_t", "_trial_id")


def test_the_private_attributes_exist_in_the_installed_ray() -> None:
    gone = ray_internals.missing()
    assert not gone, (
        f"ray {ray.__version__} / optuna {optuna.__version__} no longer has "
        f"{', '.join(gone)}: update dala_search/search/ray_internals.py and the ray pin"
    )


def test_a_moved_attribute_is_named_with_the_versions() -> None:
    class Searcher:  # an OptunaSearch without Ray's attributes
        pass

    message = rf"Searcher\._ot_trials is gone in ray {re.escape(ray.__version__)}"
    with pytest.raises(ray_internals.RayInternalsMoved, match=message):
        ray_internals.trials(Searcher())


def test_only_the_adapter_touches_them() -> None:
    found = []
    for path in sorted(SEARCH.glob("*.py")):
        if path.name == "ray_internals.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in RAY_ONLY:
                found.append(f"{path.name}:{node.lineno}: .{node.attr}")
    assert not found, found
    adapter = (SEARCH / "ray_internals.py").read_text()
    assert all(name in adapter for name in RAY_ONLY)


def test_the_installed_ray_is_inside_the_pin() -> None:
    # The pin's upper bound is the first minor not checked: a newer Ray must come with a
    # run of this file (and a new bound), not by accident.
    pyproject = (ROOT / "pyproject.toml").read_text()
    line = next(m for m in re.findall(r'"(ray\[[^"]+)"', pyproject))
    spec = Requirement(line).specifier
    assert any(s.operator == "<" for s in spec), f"ray has no upper bound in pyproject: {line}"
    assert spec.contains(version("ray")), f"installed ray {version('ray')} outside {line}"
