"""The command group, its error handling and the options and checks several commands share."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from dala_search.config import PROTOCOLS
from dala_search.errors import DalaError
from dala_search.runs.plan import NAME_RULE, is_valid_name
from dala_search.start_options import MAX_SEED, OPTIONS, PROTOCOL_HELP, StartOption


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


# The upper bounds are TrialConfig's (config.py): a value the CLI lets through must not be
# refused later inside every trial of a running search.
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


PROTOCOL_OPT = click.option(
    "--protocol",
    "split_protocol",
    type=click.Choice(PROTOCOLS),
    default="patient",
    show_default=True,
    help=PROTOCOL_HELP,
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


def table_option(option: StartOption) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The click option of one row of the start options' table (start_options.py).

    A space key's option defaults to None, so the space's ``search:`` value applies; a
    text option's ``parse`` runs while the command line is parsed (before anything is read,
    generated or created), and the command gets the text as typed.
    """
    types: dict[str, Any] = {
        "int": lambda: click.IntRange(option.low, option.high),
        "float": lambda: FiniteFloatRange(option.low, option.high, min_open=option.low_open),
        "choice": lambda: click.Choice(option.choices),
        "path": lambda: click.Path(path_type=Path),
        "text": lambda: None,
    }

    def check(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None and option.parse is not None:
            try:
                option.parse(value)
            except DalaError as e:
                raise click.BadParameter(str(e).removeprefix(f"{option.flag}: ")) from None
        return value

    decls = [d for d in (option.flag, option.short) if d]
    return click.option(
        *decls,
        option.name,
        type=types[option.kind](),
        default=None if option.space_key else option.default,
        show_default=option.show_default,
        help=option.help or None,
        callback=check if option.parse is not None else None,
        multiple=option.multiple,
    )


def table_options(options: Sequence[StartOption]) -> Callable[[Callable[..., Any]], Any]:
    """Every row's click option, in the table's order (``--help`` lists them so)."""

    def apply(command: Callable[..., Any]) -> Any:
        for option in reversed(options):
            command = table_option(option)(command)
        return command

    return apply


# Options other commands share with `start`: the same rows.
RUNS_OPT = table_option(OPTIONS["runs_dir"])
TRACKING_OPT = table_option(OPTIONS["tracking_uri"])
