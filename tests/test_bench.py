"""The five benchmarks keep working: each runs at --tiny size and prints its JSON last.

Benchmarks are not timed tests: these check the JSON's shape and that the figures are
positive finite numbers, never a speed (bench/README.md holds the recorded figures).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# name -> the keys its goal's ratio and figures live under
CASES = {
    "pipeline": ["ours_img_s", "naive_img_s", "ratio", "serve_only_img_s", "cache_build_s"],
    "trial": ["trial_img_s", "bare_img_s", "ratio", "dala_fixed_batch_img_s"],
    "memory": ["data_pss_1_mib", "data_pss_4_mib", "ratio", "total_pss_1_mib"],
    "search": ["epochs_pruned", "epochs_unpruned", "ratio"],
    "overhead": ["search_s_per_trial", "loop_s_per_trial"],
}
# memory (five trial processes), search (two Ray searches) and overhead (a Ray search) take
# ~100 s together at --tiny on 2 cores: marked slow (CI still runs them).
HEAVY = {"memory", "search", "overhead"}


def _run(name: str, work: Path) -> dict:
    env = {**os.environ, "RAY_ADDRESS": "local"}
    proc = subprocess.run(
        [sys.executable, f"bench/{name}.py", "--tiny", "--work-dir", str(work)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    return json.loads(last)


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in CASES],
)
def test_benchmark_runs_and_prints_its_json_last(name: str, tmp_path_factory) -> None:
    work = tmp_path_factory.getbasetemp() / "bench-work"  # data shared between benchmarks
    result = _run(name, work)
    assert result["benchmark"] == name
    assert result["size"] == "tiny"
    for key in CASES[name]:
        value = result[key]
        assert isinstance(value, int | float) and math.isfinite(value) and value > 0, (key, value)
    assert isinstance(result["goal"], str) and result["goal"]
    assert {"cpu", "cores", "torch"} <= set(result["machine"])


def test_record_rewrites_only_its_block(tmp_path, monkeypatch) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import _common
    finally:
        sys.path.remove(str(ROOT / "bench"))
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- bench:x -->\nold\n<!-- /bench:x -->\nb\n<!-- bench:y -->\nkeep\n")
    monkeypatch.setattr(_common, "README", readme)
    result = {"ratio": 2.0, "machine": {**_common.machine(), "load_1m_at_start": 0.5}}

    class Args:
        tiny = quick = False

    _common.record("x", Args(), result, "ratio 2.0x")
    text = readme.read_text()
    assert "old" not in text and "ratio 2.0x" in text and '"ratio": 2.0' in text
    assert text.startswith("a\n<!-- bench:x -->\nRecorded ") and "keep" in text
    with pytest.raises(SystemExit, match="markers"):
        _common.record("z", Args(), result, "")


def test_trial_compile_record_on_cpu_is_refused_before_running() -> None:
    """The compiled figures have a GPU block only: asking to record them from a CPU run
    fails at once, naming the flags, instead of after minutes of compiling."""
    proc = subprocess.run(
        [sys.executable, "bench/trial.py", "--tiny", "--compile", "--record"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--compile --record" in proc.stderr
