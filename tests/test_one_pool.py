"""The kernels' one thread pool (issue 30): BLAS products made block by block on numba's
threads with BLAS on one thread, the fused encoder kernels, and batches streamed from
the extractor into the encoder. Speed itself is the benchmark's business
(benchmarks/bench_encoders.py); these tests hold the mechanisms and the numbers."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from threadpoolctl import threadpool_info

from conftest import textured_image
from vladkit import DenseSIFT, FisherEncoder, GMMVocabulary, VLADEncoder
from vladkit._util.threads import single_threaded_blas
from vladkit.pipeline.budget import StreamedBatch, iter_batches
from vladkit.kernels.encoding import _exp_rows
from vladkit.pipeline.image_encoder import encode_batches
from vladkit.kernels.accumulate import add_task_rows, all_finite
from vladkit.kernels.products import matmul


def _blas_threads():
    """{path: threads} of the BLAS libraries whose limit is process-wide."""
    return {info["filepath"]: info["num_threads"] for info in threadpool_info()
            if info["user_api"] == "blas" and info.get("threading_layer") != "openmp"}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(0, 5, 3), (1, 5, 3), (7, 0, 3), (5000, 17, 9), (3000, 130, 1100)])
def test_matmul_is_numpys_product(dtype, shape):
    n, d, m = shape
    rng = np.random.default_rng(n + d + m)
    X, W = rng.standard_normal((n, d)).astype(dtype), rng.standard_normal((d, m)).astype(dtype)
    with single_threaded_blas():
        out = matmul(X, W)
    assert out.dtype == dtype and out.shape == (n, m)
    np.testing.assert_allclose(out, X.astype(np.float64) @ W, rtol=0, atol=1e-4 if dtype == np.float32 else 1e-10)


def test_blas_runs_on_one_thread_inside_an_encoder_and_comes_back(monkeypatch):
    before = _blas_threads()
    if not any(n > 1 for n in before.values()):
        pytest.skip("no process-wide BLAS pool above 1 thread: one thread would not show")
    rng = np.random.default_rng(0)
    sets = [rng.random((300, 8), dtype=np.float32) for _ in range(3)]
    encoder = VLADEncoder(4, random_state=0).fit(sets)
    seen = []
    add = type(encoder)._add

    def spy(self, X, segments, acc):
        seen.append(_blas_threads())
        return add(self, X, segments, acc)

    monkeypatch.setattr(type(encoder), "_add", spy)
    encoder.transform(sets)
    assert seen and all(set(s.values()) == {1} for s in seen)
    assert _blas_threads() == before


def test_the_exponential_is_within_one_ulp_of_libm():
    x = -np.concatenate([np.linspace(0, 708, 200_001), [0.0, 5e-324, 1e-300, math.log(2) / 2, 707.9]])
    out = x.copy()
    _exp_rows(out, np.empty_like(out))
    truth = np.array([math.exp(v) for v in x])
    assert np.all(np.abs(out - truth) <= np.spacing(truth))
    assert out[0] == 1.0


def test_all_finite():
    assert all_finite(np.zeros((0, 4), np.float32)) and all_finite(np.array([[1, -7]], np.int64))
    for bad in (np.nan, np.inf, -np.inf):
        X = np.ones((3000, 5), np.float32)
        X[2999, 4] = bad
        assert not all_finite(X) and not all_finite(X[1:]) and all_finite(X[:2999])
    assert all_finite(np.full((10, 10), np.finfo(np.float32).max, np.float32))


def test_task_rows_add_as_numpy_does():
    rng = np.random.default_rng(1)
    images = np.array([0, 0, 2, 1, 1, 1, 0, 2], np.int64)  # runs; image 0 comes back
    values = rng.standard_normal((len(images), 37))
    target = rng.standard_normal((3, 37))
    expected = target.copy()
    np.add.at(expected, images, values)
    add_task_rows(target, images, values)
    np.testing.assert_allclose(target, expected, rtol=1e-15, atol=1e-15)


def test_fisher_statistics_equal_the_dense_float64_formula():
    """The fused kernel (projection, float64 log-densities, branch-free posteriors, sums
    over the kept words) against the formula written densely in numpy, float64."""
    rng = np.random.default_rng(2)
    centres = rng.standard_normal((6, 12)) * 2
    X = np.concatenate([c + 0.4 * rng.standard_normal((700, 12)) for c in centres]).astype(np.float32)
    gmm = GMMVocabulary(6, pca=8, max_iter=20, random_state=0).fit([X])
    gmm.weights_[3] = 1e-7  # a component below the threshold: skipped, zero blocks
    gmm.weights_ /= gmm.weights_.sum()
    for fast in (False, True):
        encoder = FisherEncoder(vocabulary=gmm, improved=False, power=None, l2=False, fast=fast).fit([X])
        ours = encoder.transform([X])[0].astype(np.float64)
        P = gmm.project(X).astype(np.float64)
        means, variances, weights = gmm.means_, gmm.covariances_, gmm.weights_
        with np.errstate(divide="ignore"):
            prior = np.log(np.where(weights < 1e-6, 0, weights))
        log = (prior[None] - 0.5 * np.log(2 * np.pi * variances).sum(1)[None]
               - 0.5 * (((P[:, None, :] - means[None]) ** 2) / variances[None]).sum(-1))
        q = np.exp(log - log.max(1, keepdims=True))
        q /= q.sum(1, keepdims=True)
        if fast:
            q = (q == q.max(1, keepdims=True)) * 1.0
        q[q < 1e-6] = 0
        z = (P[:, None, :] - means[None]) / np.sqrt(variances)[None]
        u = (q[:, :, None] * z).sum(0) / (len(X) * np.sqrt(weights)[:, None])
        v = (q[:, :, None] * (z**2 - 1)).sum(0) / (len(X) * np.sqrt(2 * weights)[:, None])
        u[weights < 1e-6] = v[weights < 1e-6] = 0
        expected = np.concatenate([u.ravel(), v.ravel()])
        assert not ours[3 * 8:4 * 8].any()
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6 * np.abs(expected).max())


def _images(tmp_path):
    paths = []
    for seed in range(6):
        image = cv2.resize(textured_image(seed, (30, 40)), (160, 120), interpolation=cv2.INTER_CUBIC)
        path = tmp_path / f"{seed}.png"
        cv2.imwrite(str(path), image)
        paths.append(str(path))
    # A JPEG cut short: its header is read (it joins a batch), its pixels are not.
    ok, data = cv2.imencode(".jpg", cv2.resize(textured_image(9, (30, 40)), (160, 120)))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(data.tobytes()[:len(data) // 3])
    paths.insert(3, str(broken))
    return paths


def test_a_streamed_batch_gives_the_images_as_a_list_does_and_skips_the_unreadable(tmp_path):
    paths = _images(tmp_path)
    extractor = DenseSIFT(step=8, sizes=(8,), root=True, n_jobs=2)
    readable = [p for p in paths if "broken" not in p]
    encoder = VLADEncoder(4, random_state=0).fit(extractor.transform(readable))
    results = {}
    for streamed in (False, True):
        skipped = []
        batches = list(iter_batches(extractor, paths, max_memory=1 << 30, encoder=encoder, streamed=streamed,
                                    on_unreadable=lambda index, error: skipped.append(index)))
        assert len(batches) == 1 and isinstance(batches[0], StreamedBatch) == streamed
        out = [(indices, vectors) for indices, vectors in encode_batches(encoder, batches)]
        assert skipped == [3]
        assert out[0][0] == [0, 1, 2, 4, 5, 6]
        results[streamed] = out[0][1]
    np.testing.assert_array_equal(results[True], results[False])
    np.testing.assert_allclose(results[True], encoder.transform(extractor.transform(readable)), atol=1e-6)


def test_a_streamed_batch_raises_the_unreadable_without_a_handler(tmp_path):
    from vladkit.features.images import ImageReadError

    paths = _images(tmp_path)
    extractor = DenseSIFT(step=8, sizes=(8,), n_jobs=2)
    batch = next(iter_batches(extractor, paths, max_memory=1 << 30, streamed=True))
    with pytest.raises(ImageReadError, match="broken"):
        for _ in batch:
            pass


_IDLE_BURN = """
import os, sys, time
import numpy as np
X = np.random.default_rng(0).random((2000, 400)).astype(np.float32)
if sys.argv[1] == "vladkit":
    import vladkit  # after numpy: its OpenBLAS read no OPENBLAS_THREAD_TIMEOUT when it loaded
for _ in range(3):
    product = X @ X.T
assert np.allclose(product[:5, :5], X[:5].astype(np.float64) @ X[:5].T.astype(np.float64), rtol=1e-4)
start = time.process_time()
time.sleep(0.3)
print(time.process_time() - start)
"""


def test_an_openblas_loaded_before_vladkit_gets_its_thread_timeout():
    """numpy imported first: after vladkit's import, numpy's OpenBLAS workers sleep after
    a product instead of spinning ~0.1 s on the cores numba's threads need next."""
    import os
    import subprocess
    import sys

    # Two OpenBLAS threads whatever this process was given (Dask's nanny, started by other
    # tests, sets OPENBLAS_NUM_THREADS=1 and OMP_NUM_THREADS=1 in os.environ).
    limits = ("OPENBLAS_THREAD_TIMEOUT", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "GOTO_NUM_THREADS")
    env = {key: value for key, value in os.environ.items() if key not in limits}
    env["OPENBLAS_NUM_THREADS"] = "2"

    def idle_cpu(mode):
        run = subprocess.run([sys.executable, "-c", _IDLE_BURN, mode], env=env, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr
        return float(run.stdout.split()[-1])

    spinning = idle_cpu("numpy")
    if spinning < 0.03:
        pytest.skip(f"numpy's OpenBLAS does not spin here ({spinning:.3f} s of CPU while idle: one core?)")
    assert idle_cpu("vladkit") < 0.02
