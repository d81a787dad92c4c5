"""Structured logs (structlog): JSON lines for production, console for local use.

What is logged is chosen by the caller of `access_log`/`log`: ids, labels, figures and key
fingerprints; never a prompt, a completion, a caller key or an upstream secret.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog


def configure_logging(fmt: str = "json", level: str = "info") -> None:
    """Configure structlog once per process (the CLI calls it; tests may too)."""
    lvl = getattr(logging, level.upper())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "console":
        structlog.configure(
            processors=[*shared, structlog.dev.ConsoleRenderer(colors=False)],
            wrapper_class=structlog.make_filtering_bound_logger(lvl),
            logger_factory=structlog.PrintLoggerFactory(sys.stderr),
            cache_logger_on_first_use=False,
        )
    else:
        structlog.configure(
            processors=[
                *shared,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(serializer=orjson.dumps),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(lvl),
            logger_factory=structlog.BytesLoggerFactory(sys.stderr.buffer),
            cache_logger_on_first_use=False,
        )


def get_logger(name: str = "gateway") -> Any:
    return structlog.get_logger(name)
