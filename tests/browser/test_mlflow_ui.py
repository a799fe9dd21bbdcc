"""In a real browser: the MLflow UI's run comparison of a search, and the search's report."""

from __future__ import annotations

import json
import re

import pytest

from dala_search.report import SECTIONS, build_report

pytestmark = pytest.mark.slow


def test_mlflow_compare_view_shows_trial_params_and_metrics(
    browser, server_search: dict, screenshot
):
    from mlflow import MlflowClient

    from dala_search.runs.schema import experiment_name

    client = MlflowClient(server_search["uri"])
    exp = client.get_experiment_by_name(experiment_name(server_search["name"]))
    trials = client.search_runs(
        [exp.experiment_id], filter_string="tags.`dala.role` = 'trial'", max_results=50
    )
    assert len(trials) == 2
    ids = [r.info.run_id for r in trials]
    url = (
        f"{server_search['uri']}/#/compare-runs?runs={json.dumps(ids)}"
        f"&experiments={json.dumps([exp.experiment_id])}"
    )
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        # Not "networkidle": the UI keeps polling the server.
        page.goto(url, wait_until="domcontentloaded", timeout=60_000)
        # The compare table renders after its API calls: wait for a trial's own value.
        page.get_by_text(trials[0].data.params["lr"], exact=True).first.wait_for(timeout=60_000)
        text = page.inner_text("body")
        shot = screenshot(page, "mlflow_compare_runs.png")
    finally:
        page.close()
    assert "Comparing 2 Runs" in text
    for name in ("lr", "fc1", "attention", "loss_weighting", "image_size"):
        assert re.search(rf"^{name}\b", text, re.M), f"parameter {name} not shown"
    for r in trials:
        assert r.info.run_id in text or r.info.run_name in text
        for name in ("lr", "fc1", "attention"):
            assert r.data.params[name] in text, (name, r.data.params[name])
    for metric in ("best_val_balanced_accuracy", "best_val_accuracy", "best_epoch"):
        assert metric in text, f"metric {metric} not shown"
    assert shot.stat().st_size > 10_000


def test_report_opens_with_every_section_filled(
    browser, server_search: dict, write_result_jsons, screenshot
):
    from mlflow import MlflowClient

    folder = server_search["runs_dir"] / server_search["name"]
    write_result_jsons(folder, "40X")
    path = build_report(server_search["name"], runs_dir=server_search["runs_dir"], progress=False)

    # The Grad-CAM overlays went to the parent run on the server, manifest included.
    client = MlflowClient(server_search["uri"])
    exp = client.get_experiment_by_name(f"dala-search/{server_search['name']}")
    (parent,) = client.search_runs(
        [exp.experiment_id], filter_string="tags.`dala.role` = 'magnification'"
    )
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "gradcam/40X")}
    assert "gradcam/40X/samples.json" in logged and any(p.endswith(".png") for p in logged)

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        page.goto(path.as_uri(), wait_until="load")
        shot = screenshot(page, "report.png")
        broken = page.evaluate(
            "[...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).length"
        )
        filled = {}
        for sid in SECTIONS:
            sec = page.locator(f"section#{sid}")
            assert sec.is_visible(), sid
            filled[sid] = sec.locator("table, img").count()
            notes = sec.locator(".missing").all_inner_texts()
            assert all(n.startswith("Parameter importances: not computable") for n in notes), (
                sid,
                notes,
            )
        n_images = page.locator("img").count()
        title = page.title()
    finally:
        page.close()
    assert broken == 0
    assert all(filled.values()), filled
    assert n_images >= 6 and title == f"dala-search report: {server_search['name']}"
    assert shot.stat().st_size > 10_000


def test_ui_link_opens_the_runs_table_with_readable_names(
    browser, server_search: dict, screenshot, monkeypatch
):
    """Issue 22: `dala-search ui NAME --open` opens the search's runs table (MLflow's model
    training view, not its GenAI overview), sorted by the metric that picks the best trial;
    the parent run is named by magnification, trial runs by their Optuna number."""
    import webbrowser

    from click.testing import CliRunner
    from mlflow import MlflowClient

    from dala_search.cli import main
    from dala_search.runs import schema

    client = MlflowClient(server_search["uri"])
    exp = client.get_experiment_by_name(schema.experiment_name(server_search["name"]))
    assert exp.tags[schema.TAG_EXPERIMENT_KIND] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags[schema.TAG_ROLE] == "magnification"]
    trials = [r for r in runs if r.data.tags[schema.TAG_ROLE] == "trial"]
    assert parent.info.run_name == "40X"
    names = sorted(r.info.run_name for r in trials)
    numbers = sorted(int(r.data.tags[schema.TAG_OPTUNA_NUMBER]) for r in trials)
    assert names == [f"40X-{n:03d}" for n in numbers] == ["40X-000", "40X-001"]
    for r in trials:  # the Ray id is kept, as a tag
        assert r.data.tags[schema.TAG_RAY_ID] not in r.info.run_name

    opened: list[str] = []
    monkeypatch.setattr(webbrowser, "open", lambda url, *a, **k: opened.append(url))
    args = ["ui", server_search["name"], "--runs-dir", str(server_search["runs_dir"]), "--open"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (url,) = opened
    assert url in result.output and url.startswith(server_search["uri"])
    assert "sort by best_val_balanced_accuracy, highest first" in result.output

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(url, wait_until="domcontentloaded", timeout=60_000)
        # The runs table renders after its API calls: wait for a trial's row.
        page.get_by_role("link", name="40X-000", exact=True).wait_for(timeout=60_000)
        rows = {
            name: page.get_by_role("link", name=name, exact=True).count()
            for name in ("40X", "40X-000", "40X-001")
        }
        text = page.inner_text("body")
        shot = screenshot(page, "mlflow_runs_table.png")
    finally:
        page.close()
    assert rows == {"40X": 1, "40X-000": 1, "40X-001": 1}, rows
    assert "Run Name" in text and "Sort: best_val_balanced_accuracy" in text
    # Not the GenAI overview (what the experiment's plain URL opens in MLflow 3.17).
    for genai in ("Token Usage", "Tokens per Trace", "Cost Breakdown"):
        assert genai not in text, genai
    assert shot.stat().st_size > 10_000
