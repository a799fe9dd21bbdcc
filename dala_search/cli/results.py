"""``evaluate``, ``baselines``, ``ui`` and ``report``: what a finished search gives."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from dala_search.cli._base import (
    JSON_OPT,
    PROTOCOL_OPT,
    RUNS_OPT,
    TRACKING_OPT,
    check_search_name,
    main,
)
from dala_search.start_options import MAX_EPOCHS

# ----------------------------------------------------------------------------- evaluation

FOLDS_OPT = click.option(
    "--folds",
    type=int,
    default=None,
    help="K patient-disjoint folds (default 5; the official Folds.csv folds when present).",
)
SEEDS_OPT = click.option(
    "--seeds", type=int, default=None, help="K seeded patient-disjoint splits instead of folds."
)
EVAL_MAG_OPT = click.option(
    "--magnification", "-m", default=None, help="Comma list or 'all' (default: the search's)."
)
EVAL_EPOCHS_OPT = click.option(
    "--epochs",
    type=click.IntRange(1, MAX_EPOCHS),
    default=None,
    help="Override the best configuration's epochs.",
)
DEVICE_OPT = click.option("--device", default=None, help="auto (default) | cpu | cuda | cuda:N")
# `baselines --tune` alone: trials per model and fold (baseline_tuning.py; README says the cost)
TUNE_DEFAULT = 4


def _protocol(folds: int | None, seeds: int | None) -> tuple[str, int]:
    """--folds K or --seeds K (not both); folds 5 by default. The library checks K >= 2."""
    from dala_search.errors import ConfigError

    if folds is not None and seeds is not None:
        raise ConfigError("--folds and --seeds exclude each other: choose one protocol")
    return ("seeds", seeds) if seeds is not None else ("folds", 5 if folds is None else folds)


@main.command("evaluate")
@click.argument("name", callback=check_search_name)
@FOLDS_OPT
@SEEDS_OPT
@click.option(
    "--nested",
    type=int,
    default=None,
    help="Nested evaluation: run the search again on K outer patient folds (K searches) and "
    "test each fold's best on its held-out patients; writes 'nested' and "
    "'selection_optimism'. Re-run to continue an interrupted one.",
)
@EVAL_MAG_OPT
@EVAL_EPOCHS_OPT
@DEVICE_OPT
@PROTOCOL_OPT
@TRACKING_OPT
@RUNS_OPT
@JSON_OPT
def evaluate_cmd(
    name: str,
    folds: int | None,
    seeds: int | None,
    nested: int | None,
    split_protocol: str,
    magnification: str | None,
    epochs: int | None,
    device: str | None,
    tracking_uri: str | None,
    runs_dir: Path | None,
    as_json: bool,
) -> None:
    """Retrain each best configuration on K folds; test metrics with 95% CIs (evaluation/)."""
    from dala_search.evaluate import evaluate_search, evaluation_table

    if nested is not None:
        _refuse_with_nested(
            name,
            nested,
            {
                "--folds": folds,
                "--seeds": seeds,
                "--epochs": epochs,
                "--device": device,
                "--protocol": None if split_protocol == "patient" else split_protocol,
            },
        )
        docs = _nested_run(name, nested, magnification, tracking_uri, runs_dir)
        if as_json:
            click.echo(json.dumps({"search": name, "magnifications": docs}, indent=2))
            return
        for doc in docs:
            click.echo("\n".join(evaluation_table(doc)))
        return
    protocol, k = _protocol(folds, seeds)
    docs = evaluate_search(
        name,
        protocol=protocol,
        k=k,
        magnifications=magnification,
        epochs=epochs,
        device=device,
        runs_dir=runs_dir,
        tracking_uri=tracking_uri,
        split_protocol=split_protocol,
    )
    if as_json:
        click.echo(json.dumps({"search": name, "magnifications": docs}, indent=2))
        return
    for doc in docs:
        click.echo("\n".join(evaluation_table(doc)))


def _refuse_with_nested(name: str, k: int, options: dict[str, object]) -> None:
    """--nested re-runs the search as planned: it takes none of evaluate's retraining options."""
    from dala_search.errors import ConfigError
    from dala_search.nested import check_k

    check_k(k)
    given = [opt for opt, value in options.items() if value is not None]
    if given:
        raise ConfigError(
            f"--nested {k} with {', '.join(given)}: a nested evaluation re-runs search "
            f"{name!r} as it was planned (its epochs and resources, K outer folds); drop "
            f"{', '.join(given)}"
        )


def _nested_run(
    name: str, k: int, magnification: str | None, tracking_uri: str | None, runs_dir: Path | None
) -> list[dict]:
    from dala_search.nested import nested_evaluate
    from dala_search.search.tuner import SearchInterrupted, exit_process

    try:
        return nested_evaluate(
            name, k=k, magnifications=magnification, runs_dir=runs_dir, tracking_uri=tracking_uri
        )
    except (SearchInterrupted, KeyboardInterrupt):
        click.echo(
            f"Interrupted: continue with `dala-search evaluate {name} --nested {k}` "
            "(finished inner searches are kept)",
            err=True,
        )
        exit_process(130)  # os._exit when a stop signal left Ray behind (search/stopping.py)


@main.command("baselines")
@click.argument("name", callback=check_search_name)
@click.option(
    "--models",
    default=None,
    help="Comma list (default: resnet50,seresnet50,densenet121,vgg16,vit_b_16,swin_t).",
)
@FOLDS_OPT
@SEEDS_OPT
@EVAL_MAG_OPT
@EVAL_EPOCHS_OPT
@DEVICE_OPT
@click.option(
    "--pretrained",
    default=None,
    help="imagenet | none | path/to/weights.pth (a ResNet50 or DINOv2 state dict; "
    "dinov2_vitb14: imagenet = its LVD-142M weights). Default: the search's.",
)
@click.option(
    "--tune",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help=f"Give every model (dalaresnet50 included) its own lr/weight-decay search: N trials "
    f"per fold (e.g. {TUNE_DEFAULT}), chosen on each fold's validation patients; N times "
    "the shared recipe's training. Default: the shared recipe (DALAResNet50's lr/wd for "
    "every model).",
)
@PROTOCOL_OPT
@TRACKING_OPT
@RUNS_OPT
@JSON_OPT
def baselines_cmd(
    name: str,
    models: str | None,
    folds: int | None,
    seeds: int | None,
    magnification: str | None,
    epochs: int | None,
    device: str | None,
    pretrained: str | None,
    tune: int | None,
    split_protocol: str,
    tracking_uri: str | None,
    runs_dir: Path | None,
    as_json: bool,
) -> None:
    """Train the paper's comparison models on the evaluation's folds and budget (baselines/)."""
    from dala_search.comparison import baselines_table, run_baselines

    protocol, k = _protocol(folds, seeds)
    docs = run_baselines(
        name,
        models=models,
        protocol=protocol,
        k=k,
        magnifications=magnification,
        epochs=epochs,
        device=device,
        pretrained=pretrained,
        runs_dir=runs_dir,
        tracking_uri=tracking_uri,
        tune=tune,
        split_protocol=split_protocol,
    )
    if as_json:
        out = {
            "search": name,
            "magnifications": docs,
            "comparison": _comparison(name, docs, runs_dir),
        }
        click.echo(json.dumps(out, indent=2))
        return
    for doc in docs:
        click.echo("\n".join(baselines_table(doc)))


def _comparison(name: str, docs: list[dict], runs_dir: Path | None) -> list[dict]:
    """The report's comparison rows of the magnifications just run (every protocol's
    documents in the search folder, the published figures, the leakage rows)."""
    from dala_search.comparison_table import comparison_json
    from dala_search.runs.plan import runs_folder

    return comparison_json(runs_folder(runs_dir) / name, [d["magnification"] for d in docs])


@main.command("ui")
@click.argument("name", required=False, callback=check_search_name)
@TRACKING_OPT
@RUNS_OPT
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Bind address (keep 127.0.0.1 unless you mean to share it).",
)
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
@click.option(
    "--open", "open_browser", is_flag=True, help="Open the search's runs page in a browser."
)
def ui_cmd(
    name: str | None,
    tracking_uri: str | None,
    runs_dir: Path | None,
    host: str,
    port: int,
    open_browser: bool,
) -> None:
    """Start the MLflow UI against the search's tracking store; print the search's page."""
    import webbrowser

    from dala_search import ui_links
    from dala_search.runs.plan import SearchPlan, runs_folder
    from dala_search.runs.schema import resolve_tracking_uri

    plan = SearchPlan.load(runs_folder(runs_dir) / name) if name else None
    uri = resolve_tracking_uri(tracking_uri or (plan.tracking_uri if plan else None))
    remote = uri.startswith(("http://", "https://"))
    server = uri if remote else f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
    url = server
    if plan is not None:
        metric = ui_links.sort_metric(plan.tune_metric)
        url = ui_links.runs_page_url(server, ui_links.search_experiment_id(uri, plan.name), metric)
        click.echo(f"search {plan.name}: {url}")
        click.echo(f"sort by {metric}, highest first (the link does): best trials on top")
    if remote:
        if open_browser:
            webbrowser.open(url)
        elif plan is None:
            click.echo(f"{uri} is a tracking server already: open it in a browser")
        return
    click.echo(f"MLflow UI on http://{host}:{port} for {uri} (Ctrl-C stops it)")
    if open_browser:
        ui_links.open_when_up(server, url)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
    ]
    sys.exit(serve(cmd))


def serve(cmd: list[str]) -> int:
    """Run the server ``cmd`` in a process group of its own; SIGTERM, SIGINT or SIGHUP to
    this process stop that whole group, and this process waits for it.

    ``mlflow ui`` forwards a signal to its direct child only, and this wrapper, killed by a
    supervisor's SIGTERM, would leave the server and its workers holding the port. Whatever
    of the group outlives the server (a worker, MLflow's job runner) is stopped after it.
    Returns the server's exit code (128 + N when signal N ended it, as a shell says).
    """
    import contextlib
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, start_new_session=True)

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {s: signal.signal(s, forward) for s in stops}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        # the group's id is the server's pid, kept while any member lives
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                os.killpg(proc.pid, 0)  # ProcessLookupError: the group is gone
                time.sleep(0.1)
            os.killpg(proc.pid, signal.SIGKILL)
    return 128 - code if code < 0 else code


@main.command("report")
@click.argument("name", callback=check_search_name)
@RUNS_OPT
@TRACKING_OPT
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="HTML file to write (default: <search folder>/report/report.html).",
)
@click.option(
    "--gradcam-per-class",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Test images per class for Grad-CAM (0: no Grad-CAM).",
)
def report_cmd(
    name: str,
    runs_dir: Path | None,
    tracking_uri: str | None,
    out: Path | None,
    gradcam_per_class: int,
) -> None:
    """Write a self-contained HTML report of a search (figures beside it and inlined)."""
    from dala_search.report import build_report

    path = build_report(
        name,
        runs_dir=runs_dir,
        out=out,
        tracking_uri=tracking_uri,
        gradcam_per_class=gradcam_per_class,
    )
    click.echo(f"report: {path} (open it in a browser; works offline)")
