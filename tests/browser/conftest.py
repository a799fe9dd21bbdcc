"""A real headless Chromium (Debian's ``chromium``) driven by Playwright, and a real
``mlflow server`` on 127.0.0.1 with a tiny search logged to it.

Playwright's own browser download is never used (no internet in CI): the Debian binary is
launched by path. ``.ci/run`` installs it; without it these tests FAIL under CI (``CI`` set)
and are skipped elsewhere, with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Screenshots are kept here (pytest's cache folder is git-ignored and survives the run).
ARTIFACTS = Path(__file__).resolve().parents[2] / ".pytest_cache" / "artifacts"


def _unavailable(why: str) -> None:
    msg = f"{why}; install it with `apt-get install -y chromium` (.ci/run does)"
    if os.environ.get("CI"):
        pytest.fail(f"browser tests need Chromium: {msg}")
    pytest.skip(msg)


@pytest.fixture(scope="session")
def browser() -> Iterator:
    """A headless Chromium (Playwright ``Browser``)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install -e '.[dev]')")
    if not CHROMIUM.is_file():
        _unavailable(f"{CHROMIUM} does not exist")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def screenshot():  # noqa: ANN201
    """``screenshot(page, name)``: a full-page PNG kept under .pytest_cache/artifacts/."""

    def take(page, name: str) -> Path:  # noqa: ANN001
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path

    return take


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, start_mlflow_server) -> Iterator[str]:
    """``mlflow server`` on a free 127.0.0.1 port, sqlite store and artifacts in tmp."""
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow_server"))
    yield server.uri
    server.stop()


@pytest.fixture(scope="module")
def server_search(mlflow_server: str, tiny_space: Path, demo_root: Path, tmp_path_factory) -> dict:
    """A tiny search (2 trials, 1 epoch, 40X) whose trials log to the server."""
    import ray

    from dala_search.search.tuner import plan_search, run_search

    runs = tmp_path_factory.mktemp("server_search") / "runs"
    plan = plan_search(
        space=str(tiny_space),
        name="ui",
        data_dir=demo_root,
        trials=2,
        epochs=1,
        tracking_uri=mlflow_server,
        runs_dir=runs,
    )
    try:
        outcomes = run_search(plan)
    finally:
        ray.shutdown()
    assert outcomes[0].completed >= 1 and outcomes[0].registered_version is not None
    return {"name": plan.name, "runs_dir": runs, "uri": mlflow_server, "plan": plan}
