"""The ``medfed`` command line: one typer app, sub-apps per area.

Heavy libraries (torch, MONAI, Opacus) are imported inside the commands that need them so that
``medfed --help`` stays instant. Every :class:`~medfed.errors.MedfedError` becomes one line on
stderr and the error's exit code (the table is :mod:`medfed.errors`); a traceback means a bug
in medfed, not a user mistake.
"""

from __future__ import annotations

import sys

import typer

from medfed.cli import audit_cmd, data_cmd, federation_cmd, privacy_cmd, provision_cmd, site_cmd
from medfed.errors import INTERRUPTED_EXIT_CODE, MedfedError

app = typer.Typer(
    name="medfed",
    help="Privacy-preserving federated medical image segmentation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data_cmd.app, name="data")
app.add_typer(privacy_cmd.app, name="privacy")
app.add_typer(audit_cmd.app, name="audit")
app.add_typer(site_cmd.app, name="site")
app.add_typer(federation_cmd.aggregator_app, name="aggregator")
app.command("provision")(provision_cmd.provision)
app.command("run")(federation_cmd.run)
app.command("demo")(federation_cmd.demo)


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
