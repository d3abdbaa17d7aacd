"""A context manager that raises one logger's level for a while."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def quiet(logger_name: str, level: int) -> Iterator[None]:
    """Shows only records at ``level`` or above from ``logger_name`` inside the block."""
    logger = logging.getLogger(logger_name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)
