"""Logging for entry points (CLI, gateway, demo and its ranks): the one place that decides
where library log lines go and which are shown. Library code only calls
``structlog.get_logger()``."""

from __future__ import annotations

import logging
import sys

import structlog

__all__ = ["configure_logging"]


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
