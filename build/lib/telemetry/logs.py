"""structlog configuration, in one place: JSON lines when serving, console in the CLI."""

from __future__ import annotations

import logging

import structlog


def configure_logging(*, json: bool, level: int = logging.INFO) -> None:
    """Configure structlog for this process (idempotent)."""
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=False,
    )
