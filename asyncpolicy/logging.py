"""structlog set-up: readable key=value lines on the console, JSON lines in the run's events file.

Console lines go through `tqdm.write`, so a live progress bar is cleared, the line printed above
it, and the bar drawn again, instead of the two overwriting each other.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import IO, Any

import msgspec
import structlog
from tqdm import tqdm

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class JsonEvents:
    """A processor that appends each event as one JSON line to a stream, then passes it on.

    Without a stream yet it holds the events, and writes them when `open` is given the file: the
    CLI's run directory exists only once its inputs are checked, and a bad input leaves nothing.
    """

    def __init__(self, stream: IO[bytes] | None = None) -> None:
        self.stream = stream
        self._held: list[bytes] = []

    def open(self, path: Path) -> None:
        """Append to `path` from now on, the held events first."""
        self.stream = open(path, "ab")  # noqa: SIM115 - lives as long as the process logs
        self.stream.write(b"".join(self._held))
        self.stream.flush()
        self._held.clear()

    def __call__(self, logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        line = msgspec.json.encode(
            {k: v if isinstance(v, (int, float, str, bool, type(None))) else repr(v) for k, v in event.items()}
        )
        if self.stream is None:
            self._held.append(line + b"\n")
        else:
            self.stream.write(line + b"\n")
            self.stream.flush()
        return event


class _ConsoleLogger:
    """structlog's PrintLogger interface, writing through tqdm so a progress bar stays intact."""

    def msg(self, message: str) -> None:
        tqdm.write(message, file=sys.stderr)

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def configure_logging(level: str = "info", events: JsonEvents | None = None) -> None:
    """Console at `level`; with `events` (a tee that opens its file later), every event of that level also as JSON."""
    processors: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if events is not None:
        processors.append(events)
    # Plain tracebacks: rich's default shows every local (whole sample batches) and takes seconds.
    processors.append(
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback)
    )
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=lambda *args: _ConsoleLogger(),
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
