"""Logging for entry points (CLI, gateway, demo and its ranks): the one place that decides
where library log lines go and which are shown. Library code only calls
``structlog.get_logger()``."""

from __future__ import annotations

import logging
import sys

import structlog

__all__ = ["configure_logging", "keep_lines_whole"]


def configure_logging(level: str = "info") -> None:
    """structlog for an entry point (CLI, gateway, demo): key=value lines on stderr.

    Library code only calls ``structlog.get_logger()``; this is the one place that decides
    where those lines go and which are shown.
    """
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False),
            structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # sys.stderr looked up per logger, not bound once: it may be replaced later
        logger_factory=lambda *_: structlog.PrintLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )


def keep_lines_whole() -> None:
    """In a program that has not configured structlog: keep structlog's defaults (its
    console format, on stdout) but write each line in one call, so a line the agent's thread
    logs is never cut by the program's own ``print()`` (``... url=nats://...[]`` and
    ``[]`` on no line of its own). A program's own ``structlog.configure()`` replaces it."""
    if not structlog.is_configured():
        structlog.configure(logger_factory=structlog.WriteLoggerFactory())
