"""structlog set-up: readable key=value lines on the console, JSON lines in the run's events file."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import IO, Any

import msgspec
import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _TeeJSON:
    """A processor that appends each event as one JSON line to a file, then passes it on."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream

    def __call__(self, logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        self.stream.write(msgspec.json.encode({k: v if isinstance(v, (int, float, str, bool, type(None))) else repr(v) for k, v in event.items()}) + b"\n")
        self.stream.flush()
        return event


def configure_logging(level: str = "info", events_file: Path | None = None) -> None:
    """Console at `level`; with `events_file`, every event of that level also goes there as JSON."""
    processors: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if events_file is not None:
        processors.append(_TeeJSON(open(events_file, "ab")))
    # Plain tracebacks: rich's default shows every local (whole sample batches) and takes seconds.
    processors.append(
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback)
    )
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def quiet_unless_configured() -> None:
    """Errors only, on stderr, when nobody has configured structlog.

    Unconfigured, structlog prints every event, debug included, to stdout: an application that
    embeds a Supervisor would get a hundred lines per run it never asked for (and a warning per
    stale sample dropped, which the RunResult counts anyway). A host that
    configured structlog keeps its configuration, and `python -m asyncpolicy run` configures it
    (`configure_logging`) before any Supervisor starts, so its console is unchanged.
    """
    if not structlog.is_configured():
        configure_logging("error")
