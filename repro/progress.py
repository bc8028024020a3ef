"""Progress bars for long work: tqdm.auto (a widget in Jupyter, text in a terminal).

``REPRO_PROGRESS=0`` turns them off. The notebook tests need that: nbval reads a kernel's
messages only after a cell has finished, so a long cell's widget updates overflow ZeroMQ's
1000-message queue, the final "idle" message is dropped and nbval fails with "Timeout of 5
seconds exceeded waiting for output" (see notebooks/conftest.py).
"""
from __future__ import annotations

import os

from tqdm.auto import tqdm


def progress(iterable=None, *, enabled: bool = True, **tqdm_kwargs) -> tqdm:
    """``tqdm(iterable, **tqdm_kwargs)``, disabled when ``enabled`` is false or REPRO_PROGRESS=0."""
    disabled = not enabled or os.environ.get("REPRO_PROGRESS", "1") == "0"
    return tqdm(iterable, disable=disabled, **tqdm_kwargs)
