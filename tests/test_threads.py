"""Thread limits of encoders used from several threads at once (issue 12, finding 3).

BLAS thread pools such as OpenBLAS's (pthreads build, numpy's) are limited process-wide:
overlapping ``transform`` calls that each saved and restored the limit left it at 1.
"""

import random
import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from vladkit import BoFEncoder


def _limits():
    """{library path: num_threads} of every BLAS and OpenMP library, as this thread sees them."""
    return {info["filepath"]: info["num_threads"] for info in threadpool_info()}


def _process_wide(limits):
    """The entries of ``_limits()`` for process-wide BLAS pools (OpenBLAS on pthreads)."""
    return {info["filepath"]: limits[info["filepath"]] for info in threadpool_info()
            if info["internal_api"] == "openblas" and info.get("threading_layer") == "pthreads"}


def _restore(limits):
    """Put the limits back (so that a failure does not slow down the rest of the session)."""
    threadpool_limits(limits=[{"filepath": path, "num_threads": n} for path, n in limits.items()])
    try:
        from threadpoolctl import OpenBLASController
        OpenBLASController.clear_controlling_thread()
    except (ImportError, AttributeError):
        pass


@pytest.fixture(scope="module")
def encoder_and_sets():
    rng = np.random.default_rng(0)
    sets = [rng.random((n, 16), dtype=np.float32) for n in (40, 70, 100)]
    return BoFEncoder(4, random_state=0, n_jobs=1).fit(sets), sets


def test_concurrent_transforms_restore_the_blas_limit(encoder_and_sets):
    encoder, sets = encoder_and_sets
    before = _limits()
    if not any(n > 1 for n in _process_wide(before).values()):
        pytest.skip("no process-wide BLAS pool above 1 thread: a cap to 1 would not show")
    expected = encoder.transform(sets)
    n_threads, rounds = 4, 40
    barrier = threading.Barrier(n_threads)
    errors = []

    def work(seed):
        # Every round starts together (the barrier); then each thread runs a random
        # number of transforms of random sizes, so that the blocks overlap differently.
        draw = random.Random(seed)
        try:
            for _ in range(rounds):
                barrier.wait()
                for _ in range(draw.randint(1, 4)):
                    count = draw.randint(1, len(sets))
                    np.testing.assert_array_equal(encoder.transform(sets[:count]), expected[:count])
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(n_threads - 1)]
    try:
        for thread in threads:
            thread.start()
        work(n_threads - 1)  # the main thread too: its own OpenMP and numba limits must come back
        for thread in threads:
            thread.join()
        assert not [e for e in errors if not isinstance(e, threading.BrokenBarrierError)], errors
        after = _limits()
        assert after == before, {path: (n, after.get(path)) for path, n in before.items() if after.get(path) != n}
    finally:
        if _limits() != before:
            _restore(before)


def test_blas_limit_is_the_smallest_n_jobs_inside():
    from vladkit._util.threads import limit_threads

    before = _limits()
    shared = _process_wide(before)
    if not shared or max(shared.values()) < 2:
        pytest.skip("no process-wide BLAS pool above 1 thread")
    high = max(shared.values())
    entered, leave = threading.Event(), threading.Event()

    def hold():
        with limit_threads(1):
            entered.set()
            leave.wait(30)

    other = threading.Thread(target=hold)
    try:
        with limit_threads(high):
            assert set(_process_wide(_limits()).values()) == {high}
            other.start()
            assert entered.wait(30)
            # The other thread's block asks for 1 thread: the shared limit is the smaller.
            assert set(_process_wide(_limits()).values()) == {1}
            leave.set()
            other.join()
            # It left, this block is still inside: back to this block's limit.
            assert set(_process_wide(_limits()).values()) == {high}
        assert _limits() == before
    finally:
        leave.set()
        if other.is_alive():
            other.join()
        if _limits() != before:
            _restore(before)
