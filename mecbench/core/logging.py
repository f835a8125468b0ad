"""structlog set-up shared by every service: JSON lines when stderr is not a terminal, readable
console output when it is, and context (run id, node, experiment, RPC) carried in contextvars."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


class _CurrentStderr:
    """Whatever sys.stderr is when a line is written, not when logging was configured: a
    process (a test run, an embedding program) may swap and close the stream in between."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class _NamedPrintLogger(structlog.PrintLogger):
    """structlog's PrintLogger with the name it was asked for, which add_logger_name reads."""

    def __init__(self, name: str) -> None:
        super().__init__(_CurrentStderr())  # type: ignore[arg-type]
        self.name = name


def _named_print_logger(*args: Any) -> _NamedPrintLogger:
    return _NamedPrintLogger(str(args[0]) if args else "")


def configure_logging(level: str = "info", json_output: bool | None = None) -> None:
    """Configure structlog and the stdlib root logger once per process."""
    if json_output is None:
        json_output = not sys.stderr.isatty()
    numeric_level = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    renderer: Any = (
        structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer()
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.add_logger_name,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=_named_print_logger,
        cache_logger_on_first_use=True,
    )
    # Libraries log through the standard library (kubernetes, urllib3, grpc's Python parts, the
    # SDK): their records are rendered by the same processors, so every line of a service is
    # in one format, with the library's logger name.
    handler = logging.StreamHandler(_CurrentStderr())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric_level, logging.WARNING))


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A logger whose lines carry `logger` = `name` (the module's place in the system). Made
    lazily: the configuration is read on the first line, not at import."""
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger
