"""The ``medfed`` command line: one typer app, sub-apps per area.

Heavy libraries (torch, MONAI, Opacus) are imported inside the commands that need them so that
``medfed --help`` stays instant. Every :class:`~medfed.errors.MedfedError` becomes one line on
stderr and the error's exit code (the table is :mod:`medfed.errors`); a traceback means a bug
in medfed, not a user mistake.

Help must show every option name whole on an 80-column terminal (the rich layout cuts a name
that does not fit its column): commands give their flags one name each (``--resume``, not
``--resume/--no-resume``), and ``tests/unit/cli/test_cli_help.py`` renders every command's help
at 80 columns.
"""

from __future__ import annotations

import sys
from typing import Annotated

import click
import typer

from medfed.cli import (
    audit_cmd,
    data_cmd,
    federation_cmd,
    privacy_cmd,
    provision_cmd,
    simulate_cmd,
    site_cmd,
)
from medfed.errors import INTERRUPTED_EXIT_CODE, MedfedError

app = typer.Typer(
    name="medfed",
    help="Privacy-preserving federated medical image segmentation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # click 8.2 names the command meant for a mistyped one itself; typer's own suggestion
    # would repeat it.
    suggest_commands=not hasattr(click.exceptions, "NoSuchCommand"),
)
app.add_typer(data_cmd.app, name="data")
app.add_typer(privacy_cmd.app, name="privacy")
app.add_typer(audit_cmd.app, name="audit")
app.add_typer(site_cmd.app, name="site")
app.add_typer(federation_cmd.aggregator_app, name="aggregator")
app.command("provision")(provision_cmd.provision)
app.command("run")(federation_cmd.run)
app.command("demo")(federation_cmd.demo)
app.command("simulate")(simulate_cmd.simulate)


def _print_version(value: bool) -> None:
    if value:
        from medfed import __version__

        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print medfed's version and exit.",
        ),
    ] = False,
) -> None:
    """Privacy-preserving federated medical image segmentation."""


@app.command()
def version() -> None:
    """Print medfed's version."""
    from medfed import __version__

    typer.echo(__version__)


def main() -> None:
    """Console-script entry point."""
    try:
        app()  # standalone mode: typer reports usage errors and exits on its own
    except MedfedError as exc:
        print(exc.one_line(), file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)
