"""Hard assignment is the float64 nearest word, whatever BLAS does with the rows.

nearest_words takes its products x.c from BLAS in the descriptors' dtype, and BLAS sums
them in an order that depends on the shape it is given (kernels, blocking): a descriptor
at a near tie could get one word when its image is encoded whole and another when it is
encoded in pieces. Rows whose two best words are within the rounding of any summation
order are compared again in float64, so neither the pieces nor the dtype change a label.
"""

import numpy as np
import pytest

import reference as ref
from vladkit.kernels.nearest import nearest_words
from vladkit.kernels.products import squared_norms


def twinned(seed=0, n=4000, n_words=24, dim=16, dtype=np.float32):
    """Words, each with a twin one ``dtype`` ulp away in half its coordinates, and
    descriptors near them: the twins' distances to a descriptor differ by less than
    float32 resolves in ||c||^2 - 2 x.c (a few of them exactly tie)."""
    rng = np.random.default_rng(seed)
    words = rng.standard_normal((n_words, dim)).astype(dtype)
    away = np.where(rng.random(words.shape) < 0.5, -np.inf, np.inf).astype(dtype)
    centers = np.concatenate([words, np.nextafter(words, away)])
    X = (words[rng.integers(0, n_words, n)] + 0.5 * rng.standard_normal((n, dim))).astype(dtype)
    X[:20] = centers[rng.integers(0, 2 * n_words, 20)]  # some descriptors are words
    X[20:25] = 0.5 * (centers[:5] + centers[n_words:n_words + 5])  # between twins
    return X, centers


def pieces(n, rng):
    """Slices of range(n): rows one by one, then odd-sized chunks."""
    yield from (slice(i, i + 1) for i in range(min(n, 300)))
    start = 0
    while start < n:
        step = int(rng.choice([1, 3, 7, 63, 65, 129, 1001]))
        yield slice(start, min(start + step, n))
        start += step


def float64_truth(X, centers):
    """numpy's float64 argmin of the explicit squared differences (first on ties)."""
    distances = ref.squared_distances(X, centers)
    return distances.argmin(axis=1), distances.min(axis=1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_nearest_words_is_float64s_in_any_blocking(dtype):
    X32, centers32 = twinned()
    X, centers = X32.astype(dtype), centers32.astype(dtype)
    truth, truth_distances = float64_truth(X, centers)
    # the case is there: float32 products alone pick another word on many rows
    plain = np.argmin(squared_norms(centers32) - 2 * (X32 @ centers32.T), axis=1)
    assert (plain != truth).sum() > 50

    labels, distances = nearest_words(X, centers)
    np.testing.assert_array_equal(labels, truth)
    assert distances.dtype == dtype
    np.testing.assert_allclose(distances, truth_distances, rtol=1e-5, atol=1e-5)
    rng = np.random.default_rng(1)
    for rows in pieces(len(X), rng):
        piece_labels, piece_distances = nearest_words(X[rows], centers)
        np.testing.assert_array_equal(piece_labels, labels[rows])
        np.testing.assert_array_equal(nearest_words(X[rows], centers, with_distances=False)[0], labels[rows])
        np.testing.assert_allclose(piece_distances, distances[rows], rtol=1e-5, atol=1e-5)


def test_float64_near_ties_do_not_depend_on_the_blocking():
    """Twins a float64 ulp apart: which twin is nearer is below float64's own rounding,
    so there is no reference to match, but the answer is the same in every piece."""
    X, centers = twinned(seed=2, dtype=np.float64)
    labels, distances = nearest_words(X, centers)
    truth = float64_truth(X, centers)[0]
    # the same word up to its twin
    np.testing.assert_array_equal(labels % 24, truth % 24)
    rng = np.random.default_rng(3)
    for rows in pieces(len(X), rng):
        piece_labels, piece_distances = nearest_words(X[rows], centers)
        np.testing.assert_array_equal(piece_labels, labels[rows])
        np.testing.assert_array_equal(piece_distances, distances[rows])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_every_summation_order_gives_the_float64_word(dtype):
    """The bound behind the second look: from products summed in any order (coordinates
    permuted or reversed, numpy's pairwise sum, one row at a time, one coordinate after
    another), the row pass gives every row the float64 word, deciding the near ties again."""
    from vladkit.kernels.nearest import nearest_constants, nearest_word

    X, centers = (a.astype(dtype) for a in twinned(seed=4))
    truth = float64_truth(X, centers)[0]
    sqnorm = squared_norms(centers)
    centers64 = centers.astype(np.float64)
    constants = nearest_constants(X.dtype, centers64)
    perm = np.random.default_rng(5).permutation(X.shape[1])
    terms = X[:, None, :] * centers[None]
    orders = {
        "blas": X @ centers.T,
        "permuted": X[:, perm] @ centers[:, perm].T,
        "reversed": X[:, ::-1] @ centers[:, ::-1].T,
        "pairwise": terms.sum(axis=-1, dtype=dtype),
        "rows": np.stack([centers @ x for x in X]),
        "sequential": np.add.reduce(np.moveaxis(terms, -1, 0), axis=0),
    }
    plain = {}
    for name, products in orders.items():
        products = np.ascontiguousarray(products, dtype=dtype)
        rows = [nearest_word(x, p, sqnorm, centers64, constants) for x, p in zip(X, products)]
        labels = np.array([row[0] for row in rows])
        decided_again = np.array([row[2] for row in rows])
        np.testing.assert_array_equal(labels, truth, err_msg=name)
        plain[name] = np.argmin(sqnorm - 2 * products, axis=1)
        assert (plain[name][~decided_again] == truth[~decided_again]).all(), name
        if dtype == np.float32:
            assert decided_again.sum() > 50, name  # the near ties were there to decide
    if dtype == np.float32:  # and the orders alone disagree on some of them
        assert any((plain[a] != plain[b]).any() for a in plain for b in plain)


def test_nan_rows_and_a_single_word():
    X = np.array([[0.0, 1.0], [np.nan, 0.0], [3.0, 4.0]], dtype=np.float32)
    centers = np.array([[0.0, 0.0], [3.0, 3.0]], dtype=np.float32)
    labels, distances = nearest_words(X, centers)
    assert labels.tolist() == [0, 0, 1] and np.isnan(distances[1])
    np.testing.assert_array_equal(distances[[0, 2]], [1.0, 1.0])
    labels, distances = nearest_words(X, centers[:1])
    assert labels.tolist() == [0, 0, 0]
    np.testing.assert_array_equal(distances[[0, 2]], [1.0, 25.0])
