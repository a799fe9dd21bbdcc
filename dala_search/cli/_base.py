"""The command group, its error handling and the options and checks several commands share."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import click

from dala_search.errors import DalaError
from dala_search.runs.plan import NAME_RULE, is_valid_name, parse_duration, parse_magnifications


class FiniteFloatRange(click.FloatRange):
    """click's FloatRange, refusing NaN and infinity.

    click compares the bounds only, and every comparison with NaN is false: ``--cpus-per-trial
    nan`` would pass, and ``inf`` passes any range without a maximum.
    """

    name = "finite float range"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


# The upper bounds below are TrialConfig's (config.py): a value the CLI lets through must
# not be refused later inside every trial of a running search.
MAX_SEED = 2**31 - 1
MAX_EPOCHS = 10000
MAX_IMAGE_SIZE = 1024


def check_search_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A search name becomes a folder under the runs dir: no '/', '..' or absolute paths.

    The rule of ``runs.plan.is_valid_name``, checked for ``resume``, ``best`` and ``ui``
    too: they join the name onto the runs dir and read (resume: write) there, so ``../x``
    would reach outside it.
    """
    if value is None:
        return None
    if not is_valid_name(value):
        raise click.BadParameter(f"{value!r}: {NAME_RULE}")
    return value


def check_storage(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Parse ``--storage`` (and find its SQLAlchemy dialect) while parsing the command line.

    Optuna opens the storage only when the first study starts, after the search folder,
    the MLflow experiment and Ray exist; a typo must fail before those.
    """
    if value is None:
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(value).get_dialect()  # NoSuchModuleError (an ArgumentError): unknown dialect
    except ArgumentError as e:
        raise click.BadParameter(
            f"{value!r} is not a database URL Optuna can use ({e}); e.g. "
            "sqlite:////abs/path/optuna.db or postgresql://user:pass@host/db"
        ) from None
    return value


def check_duration(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Check ``--time-budget`` while parsing, before the demo data or anything else is made."""
    try:
        parse_duration(value)
    except DalaError as e:
        raise click.BadParameter(str(e).removeprefix("--time-budget: ")) from None
    return value


DATA_DIR_ARG = click.argument("data_dir", type=click.Path(path_type=Path))
JSON_OPT = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
SEED_OPT = click.option(
    "--seed", type=click.IntRange(0, MAX_SEED), default=None, help="Random seed."
)


def check_one_magnification(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """One magnification or 'all', checked while parsing: before any data is made or read."""
    from dala_search.data.breakhis import check_magnification

    if value.strip().lower() == "all":
        return value
    try:
        return check_magnification(value)
    except DalaError as e:
        raise click.BadParameter(str(e)) from None


def check_magnifications(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> str | None:
    """``start``'s comma list or 'all', checked while parsing (plan_search takes the text)."""
    if value is None:
        return None
    try:
        parse_magnifications(value)
    except DalaError as e:
        raise click.BadParameter(str(e).removeprefix("--magnification: ")) from None
    return value


PROTOCOL_OPT = click.option(
    "--protocol",
    "split_protocol",
    type=click.Choice(("patient", "image", "eva")),
    default="patient",
    show_default=True,
    help="Split protocol: patient-disjoint; image-level (LEAKY: inflated figures, only to "
    "measure the leak); eva (kaiko-ai/eva's BreakHis task: 40X, TA/MC/F/DC, its fixed "
    "validation patients as test).",
)


def leaky_warning(protocol: str) -> None:
    """One line on stderr for every command run under a leaky protocol."""
    from dala_search.data.protocols import LEAKY_NOTE, is_leaky

    if is_leaky(protocol):
        click.echo(f"WARNING: --protocol {protocol} is {LEAKY_NOTE}", err=True)


MAG_OPT = click.option(
    "--magnification",
    "-m",
    default="40X",
    callback=check_one_magnification,
    show_default=True,
    help="40X, 100X, 200X, 400X, or 'all' to pool the four.",
)
CACHE_OPT = click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Decoded-image cache folder (default: $DALA_CACHE_DIR or ~/.cache/dala-search).",
)


class ErrorGroup(click.Group):
    """Turns user errors into one line on stderr and exit code 2 (click's usage-error code)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DalaError as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(2)


@click.group(cls=ErrorGroup)
@click.version_option(package_name="dala-search")
def main() -> None:
    """Hyperparameter search for DALAResNet50 on BreakHis (Ray Tune, Optuna, MLflow)."""


RUNS_OPT = click.option(
    "--runs-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where search folders live (default: $DALA_RUNS_DIR or ./dala_runs).",
)
TRACKING_OPT = click.option(
    "--tracking-uri",
    default=None,
    help="MLflow tracking URI (default: sqlite mlflow.db in the working directory).",
)
