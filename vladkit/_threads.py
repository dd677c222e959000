"""How many threads: one reading of ``n_jobs`` for the whole package."""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
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


def ordered_map(function, items, n_threads):
    """``map(function, items)`` on ``n_threads`` threads, results in input order, computed
    at most ``n_threads`` ahead of the consumer (so at most ``n_threads + 1`` results
    exist at once: memory stays bounded when results are large and consumed slowly)."""
    if n_threads <= 1:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(max_workers=n_threads) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= n_threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
