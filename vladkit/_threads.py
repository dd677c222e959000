"""How many threads: one reading of ``n_jobs`` for the whole package."""

from __future__ import annotations

import os
from contextlib import contextmanager

import numba


def effective_n_jobs(n_jobs):
    """None -> None (library defaults), -1 -> all cores, -2 -> all but one, ..."""
    if n_jobs is None:
        return None
    return n_jobs if n_jobs > 0 else max(1, (os.cpu_count() or 1) + 1 + n_jobs)


@contextmanager
def numba_threads(n_jobs):
    """Run numba's parallel kernels on ``n_jobs`` threads inside the block."""
    n = effective_n_jobs(n_jobs)
    if n is None:
        yield
        return
    previous = numba.get_num_threads()
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        numba.set_num_threads(previous)
