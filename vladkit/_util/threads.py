"""How many threads: one reading of ``n_jobs`` for the whole package."""

from __future__ import annotations

import os
import threading
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numba

try:
    # Recent threadpoolctl keeps its scan of the loaded libraries (~10 ms a block
    # otherwise) until a module is imported: limiting costs ~0.2 ms.
    from threadpoolctl import get_cached_controller as _controller
except ImportError:  # pragma: no cover - older threadpoolctl: a scan per block
    from threadpoolctl import ThreadpoolController as _controller
try:
    from threadpoolctl import OpenBLASController

    _release_openblas = OpenBLASController.clear_controlling_thread
    # The same threadpoolctl release limits an OpenBLAS built on OpenMP through
    # omp_set_num_threads (the calling thread's), no longer openblas_set_num_threads.
    _OPENBLAS_OPENMP_PER_THREAD = True
except (ImportError, AttributeError):  # pragma: no cover - older threadpoolctl: any thread sets it
    def _release_openblas():
        pass

    _OPENBLAS_OPENMP_PER_THREAD = False


def effective_n_jobs(n_jobs):
    """None -> None (library defaults), -1 -> all cores, -2 -> all but one, ..."""
    if n_jobs is None:
        return None
    return n_jobs if n_jobs > 0 else max(1, (os.cpu_count() or 1) + 1 + n_jobs)


@contextmanager
def limit_threads(n_jobs):
    """BLAS, OpenMP and numba threads bounded to ``n_jobs`` inside the block (``None``: as
    they are, at no cost). Safe when several threads are inside such blocks at once.

    The three kinds of limit differ in scope, so they are set differently:

    * numba's ``set_num_threads`` and OpenMP's ``omp_set_num_threads`` (libgomp, libomp;
      also how recent threadpoolctl limits an OpenBLAS built on OpenMP) set a value of
      the *calling thread*: each block sets and restores its own thread's;
    * other BLAS libraries, such as OpenBLAS built on pthreads, have one process-wide
      thread pool and limit: a block that saved the limit on entry and restored it on
      exit would, overlapping with a block of another thread, save the other's limit and
      restore it last, leaving BLAS capped for the rest of the process. So the limit is shared
      (:class:`_SharedBlasLimit`): the first block to enter saves the original limits, the
      last to leave restores them, and meanwhile the limit is the smallest ``n_jobs`` of
      the blocks inside (each asked for at most that many threads).
    """
    n = effective_n_jobs(n_jobs)
    if n is None:
        yield
        return
    controller = _controller()
    per_thread = [lib.filepath for lib in controller.lib_controllers if _per_thread(lib)]
    shared = [lib.filepath for lib in controller.lib_controllers if not _per_thread(lib)]
    with controller.select(filepath=per_thread).limit(limits=n):
        _SHARED_BLAS_LIMIT.acquire(n, controller.select(filepath=shared))
        try:
            with numba_threads(n_jobs):
                yield
        finally:
            _SHARED_BLAS_LIMIT.release(n)


def _per_thread(lib):
    """Whether threadpoolctl limits library ``lib`` for the calling thread only."""
    if lib.user_api == "openmp":
        return True
    return (_OPENBLAS_OPENMP_PER_THREAD and lib.internal_api == "openblas"
            and getattr(lib, "threading_layer", None) == "openmp")


class _SharedBlasLimit:
    """The process-wide BLAS thread limit, shared by the :func:`limit_threads` blocks of
    all threads: a count of the blocks inside per ``n_jobs``, under a lock."""

    def __init__(self):
        self._lock = threading.Lock()
        self._inside = Counter()  # limit -> blocks inside that asked for it
        self._blas = None  # the BLAS libraries' controller while a block is inside
        self._original = None  # the limiter remembering the limits before the first block
        self._current = None

    def acquire(self, n, controller):
        """Enter a block limiting BLAS to ``n`` threads (``controller``: a
        ``threadpoolctl.ThreadpoolController`` of the process-wide BLAS libraries, or a
        function returning one, called only when the limits change)."""
        with self._lock:
            if not self._inside or n < self._current:
                try:
                    if not self._inside:
                        self._blas = controller() if callable(controller) else controller
                        self._original = self._blas.limit(limits=n)
                    else:
                        self._blas.limit(limits=n)
                    self._current = n
                finally:
                    # Recent threadpoolctl lets only the thread that last set a pthreads
                    # OpenBLAS's limit set it again until that thread lets go; the thread
                    # restoring the limit is often not the one that set it.
                    _release_openblas()
            self._inside[n] += 1

    def release(self, n):
        """Leave a block entered with ``acquire(n, ...)``."""
        with self._lock:
            self._inside[n] -= 1
            if not self._inside[n]:
                del self._inside[n]
            if not self._inside:
                try:
                    self._original.restore_original_limits()
                finally:
                    self._blas = self._original = self._current = None
                    _release_openblas()
            elif min(self._inside) != self._current:
                try:
                    self._current = min(self._inside)
                    self._blas.limit(limits=self._current)
                finally:
                    _release_openblas()


_SHARED_BLAS_LIMIT = _SharedBlasLimit()


@contextmanager
def single_threaded_blas():
    """BLAS on one thread inside the block, process-wide: vladkit's own thread pool only.

    vladkit's kernels parallelise over blocks of rows on numba's threads, and each thread
    makes its block's matrix products by BLAS (numba calls scipy's). Two pools on the same
    cores fight: an OpenBLAS built on pthreads keeps its threads spinning for
    ``OPENBLAS_THREAD_TIMEOUT`` after each call (2^28 cycles, ~0.1 s, unless the variable
    was set before the library loaded, which depends on what the user imported first),
    and a multi-threaded BLAS called from several threads at once serialises them on its
    level-3 lock. With BLAS at one thread, each call runs in the thread that makes it,
    wakes no pool, and the speed no longer depends on import order (issue 30). Blocks
    nest and may overlap across threads (the shared count of :func:`limit_threads`: the
    last to leave restores the limits); re-entering costs a lock and a counter.
    BLAS calls of other threads of the process during the block run on one thread too.
    OpenMP-layered BLAS libraries are left alone: called inside numba's OpenMP parallel
    region, they run on the calling thread already.
    """
    _SHARED_BLAS_LIMIT.acquire(1, _process_wide_blas)
    try:
        yield
    finally:
        _SHARED_BLAS_LIMIT.release(1)


@contextmanager
def kernel_threads(n_jobs):
    """The threads of vladkit's kernels: numba's pool bounded to ``n_jobs`` (all cores
    for None), BLAS on one thread inside it (:func:`limit_threads` and
    :func:`single_threaded_blas`)."""
    with limit_threads(n_jobs), single_threaded_blas():
        yield


def _process_wide_blas():
    """The threadpoolctl controller of the BLAS libraries whose thread limit is
    process-wide (not :func:`_per_thread`)."""
    controller = _controller()
    return controller.select(filepath=[lib.filepath for lib in controller.lib_controllers
                                       if lib.user_api == "blas" and not _per_thread(lib)])


@contextmanager
def numba_threads(n_jobs):
    """Run numba's parallel kernels on ``n_jobs`` threads inside the block.

    ``numba.set_num_threads`` sets the calling thread's own value (numba keeps it in a
    thread-local variable of its threading layer), so blocks of concurrent threads do not
    see each other's, and this save-and-restore is safe under concurrency."""
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
