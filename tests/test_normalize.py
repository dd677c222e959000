"""The normalisations of encoded vectors (vladkit.encoders.normalize), against the formulas written
out in numpy, one row and one element at a time."""

import numpy as np
import pytest

from vladkit.encoders.normalize import NORM_FLOOR, intra_normalize, l1_normalize, l2_normalize, power_normalize


def _rows(dtype, seed=0):
    """Signed values over several orders of magnitude, exact zeros, and an all-zero row."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((5, 12)) * 10.0 ** rng.integers(-4, 3, (5, 12))
    X[1, ::3] = 0
    X[3] = 0
    return X.astype(dtype)


def _power(X, alpha):
    return np.array([[np.sign(v) * abs(v) ** alpha for v in row] for row in X.astype(np.float64)])


def _scaled(X, norm):
    return np.array([row / max(norm(row), NORM_FLOOR) for row in X.astype(np.float64)])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("alpha", [0.5, 0.2, 0.75, 1.0, 2.0])
def test_power_normalize_is_the_signed_power(alpha, dtype):
    X = _rows(dtype)
    out = power_normalize(X, alpha)
    assert out is X and out.dtype == dtype  # in place
    rtol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(out, _power(_rows(dtype), alpha), rtol=rtol, atol=0)
    assert not out[3].any() and np.array_equal(np.sign(out), np.sign(_rows(dtype)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_l2_and_l1_normalize_rows_and_leave_zero_rows_zero(dtype):
    rtol = 1e-6 if dtype == np.float32 else 1e-13
    for normalize, norm in ((l2_normalize, lambda r: np.sqrt((r * r).sum())),
                            (l1_normalize, lambda r: np.abs(r).sum())):
        X = _rows(dtype)
        out = normalize(X)
        assert out is X and out.dtype == dtype
        np.testing.assert_allclose(out, _scaled(_rows(dtype), norm), rtol=rtol, atol=0)
        assert not out[3].any() and np.isfinite(out).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_intra_normalize_scales_each_block(dtype):
    X = _rows(dtype)
    X[0, 4:8] = 0  # an empty word inside a row
    expected = np.array([np.concatenate([block / max(np.sqrt((block * block).sum()), NORM_FLOOR)
                                         for block in np.split(row, 3)])
                         for row in X.astype(np.float64)])
    out = intra_normalize(X, 3)
    assert out is X
    np.testing.assert_allclose(out, expected, rtol=1e-6 if dtype == np.float32 else 1e-13, atol=0)
    assert not out[0, 4:8].any()
