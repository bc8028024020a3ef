"""Progress bars for long work: tqdm.auto (a widget in Jupyter, text in a terminal); and logging.

Modules log to ``logging.getLogger(__name__)`` (all under ``repro``): INFO for what a run computes
and its results (QAFT: every epoch's NLLs), WARNING for what a user should act on. A library caller
configures logging as usual; the ``repro`` command does (``configure_logging``; ``-v`` / ``-q``),
with timestamps, so a cluster job's log says what happened when.

``REPRO_PROGRESS=0`` turns them off. The notebook tests need that: nbval reads a kernel's
messages only after a cell has finished, so a long cell's widget updates overflow ZeroMQ's
1000-message queue, the final "idle" message is dropped and nbval fails with "Timeout of 5
seconds exceeded waiting for output" (see conftest.py at the repository root).
"""
from __future__ import annotations

import logging
import os
import sys

from tqdm.auto import tqdm

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a message is logged (a notebook or test may swap it)."""

    def emit(self, record):
        self.stream = sys.stderr
        super().emit(record)


def configure_logging(verbosity: int = 0) -> None:
    """Log ``repro``'s messages to stderr: INFO by default, DEBUG at ``verbosity`` > 0 (``-v``), WARNING
    only at < 0 (``-q``)."""
    level = logging.DEBUG if verbosity > 0 else logging.WARNING if verbosity < 0 else logging.INFO
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    logger = logging.getLogger("repro")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


def progress(iterable=None, *, enabled: bool = True, **tqdm_kwargs) -> tqdm:
    """``tqdm(iterable, **tqdm_kwargs)``, disabled when ``enabled`` is false or REPRO_PROGRESS=0."""
    disabled = not enabled or os.environ.get("REPRO_PROGRESS", "1") == "0"
    return tqdm(iterable, disable=disabled, **tqdm_kwargs)
