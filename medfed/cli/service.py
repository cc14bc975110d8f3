"""What the long-running commands share (`medfed aggregator start`, `medfed site start`): the
log format option, the console, and waiting in the foreground until a service manager stops
them."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import typer

from medfed.errors import ConfigError, MedfedError
from medfed.logs import LOG_FORMAT_ENV, configure_logging

if TYPE_CHECKING:
    from medfed.transport.processes import ManagedProcess

# How long a stopping node gives a round in progress to abort cleanly (the ClientApp commits
# the steps it took to the ledger) before what is left is killed; the systemd unit's
# TimeoutStopSec is longer.
STOP_GRACE_S = 30.0

LogFormatOption = Annotated[
    str | None,
    typer.Option(
        "--log-format",
        envvar=LOG_FORMAT_ENV,
        help="text | json (one JSON object per line, for log shippers); also reaches the "
        "Flower app processes. Default: text.",
        show_envvar=True,
    ),
]


class _Signalled(KeyboardInterrupt):
    """A stop signal from a service manager, handled like Ctrl-C and remembered by name."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _interrupt(signum: int, frame: Any) -> None:
    # SIGTERM from a service manager stops the processes the same way Ctrl-C does.
    raise _Signalled(signal.Signals(signum).name)


def rich_console() -> Any:
    from rich.console import Console

    # What medfed prints holds brackets and colons of its own ("[dp]", "error[config]"):
    # none of it is rich markup or emoji.
    return Console(highlight=False, markup=False, emoji=False)


def reporter(log_format: str, logger: str) -> Callable[..., None]:
    """How a service command reports: console lines, or JSON log lines on stderr."""
    if log_format == "json":
        configure_logging(log_format="json")
        named = logging.getLogger(logger)

        def say_json(message: str, **context: Any) -> None:
            named.info("%s", message.strip(), extra=context)

        return say_json
    out = rich_console()

    def say_text(message: str, **context: Any) -> None:
        out.print(message)

    return say_text


class Watch(Protocol):
    """Reads a service's log as it runs: says what changed, and why it exited."""

    def tick(self) -> None: ...

    def exit_error(self, code: int | None) -> MedfedError: ...


def serve(
    say: Callable[..., None],
    process: ManagedProcess,
    *,
    what: str,
    stopping: str,
    watch: Watch | None = None,
) -> str:
    """Wait in the foreground until Ctrl-C or SIGTERM (a service manager), then stop it all.

    Returns the name of the signal that stopped it. The process ending by itself is an error:
    a service must be restarted, not left down; ``watch`` names its cause.
    """
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while process.running():
            if watch is not None:
                watch.tick()
            time.sleep(1.0)
        if watch is not None:
            raise watch.exit_error(process.poll())
        raise ConfigError(
            f"{what} exited with code {process.poll()}",
            hint=f"see {process.log_file}: {process.log_tail(3)}",
        )
    except KeyboardInterrupt as exc:
        say(stopping)
        return exc.name if isinstance(exc, _Signalled) else "SIGINT"
    finally:
        # A second signal must not cut the stop short: the round's abort is what it waits for.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
        process.stop(grace_s=STOP_GRACE_S)
