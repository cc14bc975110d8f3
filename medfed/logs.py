"""Log output for services: human-readable text, or one JSON object per line for log shippers.

The format is chosen with ``--log-format`` on ``medfed site start`` / ``medfed aggregator start``
or with ``MEDFED_LOG_FORMAT``; the commands put the choice into the environment of the Flower
processes they start, so the ClientApp and ServerApp processes (started by the SuperNode and the
SuperLink, not by medfed) log the same way once they call :func:`configure_from_env`.

A JSON line holds ``time`` (UTC, ISO 8601), ``level``, ``logger`` and ``message``, and the
context fields ``run_id``, ``round`` and ``site_id`` when a record carries them as ``extra``.
No other ``extra`` attribute is written: whatever a caller attaches by mistake (a key, a
patient's file path) stays out of the log.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from datetime import UTC, datetime
from typing import IO, Any, Final, Literal, get_args

from medfed.errors import ConfigError

LogFormat = Literal["text", "json"]
LOG_FORMATS: Final = get_args(LogFormat)
LOG_FORMAT_ENV: Final = "MEDFED_LOG_FORMAT"
CONTEXT_FIELDS: Final = ("run_id", "round", "site_id")
# Flower logs through its own logger and handler; in a process medfed configures, its lines
# go through medfed's handler too, so that a JSON log holds only JSON lines.
_FLOWER_LOGGER = "flwr"
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value if isinstance(value, int | float | str) else str(value)
        if record.exc_info and record.exc_info[0] is not None:
            entry["error"] = record.exc_info[0].__name__
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message [run_id=... round=... site_id=...]``."""

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        context = " ".join(
            f"{name}={record.__dict__[name]}"
            for name in CONTEXT_FIELDS
            if record.__dict__.get(name) is not None
        )
        return f"{text} [{context}]" if context else text


def formatter_for(log_format: str) -> logging.Formatter:
    return JsonFormatter() if check_log_format(log_format) == "json" else TextFormatter()


def check_log_format(value: str) -> LogFormat:
    """``value`` as a :data:`LogFormat`; a :class:`ConfigError` naming the choices otherwise."""
    if value == "text":
        return "text"
    if value == "json":
        return "json"
    raise ConfigError(
        f"log format {value!r} is not one of {', '.join(LOG_FORMATS)}",
        hint=f"use --log-format text|json (or set {LOG_FORMAT_ENV})",
    )


def resolve_log_format(option: str | None) -> LogFormat:
    """The format a command uses: its option, else ``MEDFED_LOG_FORMAT``, else text."""
    return check_log_format(option or os.environ.get(LOG_FORMAT_ENV) or "text")


_URL_CREDENTIALS = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*):[^/\s@]*@")
_SECRET_QUERY = re.compile(
    r"(?i)(?P<head>[?&](?:token|access_token|api_key|apikey|key|password|passwd|secret)=)[^&\s]*"
)


def redact_secrets(text: str) -> str:
    """``text`` with the passwords of URLs (``user:***@host``) and secret query values hidden."""
    text = _URL_CREDENTIALS.sub(lambda m: f"{m['head']}:***@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['head']}***", text)


class RedactingFilter(logging.Filter):
    """Hides credentials in every record a handler prints (a tracking URI, say)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_secrets(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def configure_logging(
    *, log_format: str, level: int = logging.INFO, stream: IO[str] | None = None
) -> logging.Handler:
    """Send every record (medfed's and Flower's) to ``stream`` (stderr) in ``log_format``.

    Replaces the root logger's handlers, so calling it again changes the format instead of
    printing each line twice. Returns the handler.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter_for(log_format))
    handler.setLevel(level)  # Flower's logger passes DEBUG records on
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    # Libraries (alembic, MLflow, ...) speak up from WARNING on; medfed and Flower from level.
    root.setLevel(max(level, logging.WARNING))
    logging.getLogger("medfed").setLevel(level)
    flower = logging.getLogger(_FLOWER_LOGGER)
    for old in flower.handlers[:]:
        flower.removeHandler(old)
    flower.propagate = True
    flower.setLevel(level)
    return handler


def configure_from_env(*, level: int = logging.INFO) -> LogFormat:
    """:func:`configure_logging` in the format ``MEDFED_LOG_FORMAT`` names (text if unset).

    For processes that Flower starts: a bad value must not stop a ClientApp, so it falls back
    to text and says so.
    """
    value = os.environ.get(LOG_FORMAT_ENV) or "text"
    try:
        log_format = check_log_format(value)
    except ConfigError as exc:
        configure_logging(log_format="text", level=level)
        logging.getLogger("medfed").warning("%s; logging as text", exc.message)
        return "text"
    configure_logging(log_format=log_format, level=level)
    return log_format
