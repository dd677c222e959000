"""The functional API (vladkit.vlad_encode, vladkit.fisher_encode) against VLFeat's
vl_vlad_encode / vl_fisher_encode (through ctypes), cyvlfeat's own test cases, and the
public vocabulary constructors (KMeansVocabulary.from_centers,
GMMVocabulary.from_parameters)."""

import itertools

import numpy as np
import pytest
import scipy.sparse as sp

import vladkit
from vladkit import (
    FisherEncoder,
    GMMVocabulary,
    KMeansVocabulary,
    VLADEncoder,
    fisher_encode,
    load_vocabulary,
    vlad_encode,
)
from vladkit._util import vlfeat as vl

needs_vlfeat = pytest.mark.skipif(
    vl.load() is None, reason="VLFeat's libvl is not installed (apt-get install libvlfeat-dev)")

VLAD_FLAGS = list(itertools.product([False, True], repeat=4))  # unnormalized, components, sqrt, mass
VLAD_IDS = ["".join(name for name, on in zip(("U", "C", "S", "M"), flags) if on) or "plain"
            for flags in VLAD_FLAGS]


def _vlad_flags(unnormalized, normalize_components, square_root, normalize_mass):
    return ((vl.VLAD_UNNORMALIZED if unnormalized else 0)
            | (vl.VLAD_NORMALIZE_COMPONENTS if normalize_components else 0)
            | (vl.VLAD_SQUARE_ROOT if square_root else 0)
            | (vl.VLAD_NORMALIZE_MASS if normalize_mass else 0))


def _assert_close(ours, theirs, tolerance, square_root=False):
    """max |ours - theirs| <= tolerance * max(1, max |theirs|), element-wise. A signed
    square root is undone first on both sides (sqrt near 0 amplifies round-off:
    |sqrt a - sqrt b| <= sqrt |a - b|)."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape
    if square_root:
        ours, theirs = np.sign(ours) * ours**2, np.sign(theirs) * theirs**2
    scale = max(1.0, float(np.abs(theirs).max(initial=0)))
    error = float(np.abs(ours - theirs).max(initial=0))
    assert error <= tolerance * scale, f"largest error {error:.3g} at scale {scale:.3g}"


# ------------------------------------------------------------------------------- VLAD


N, K, D = 300, 12, 20


@pytest.fixture(scope="module")
def vlad_data():
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 1, (K, D))
    labels = rng.integers(0, K, N)
    X = centers[labels] + 0.5 * rng.standard_normal((N, D)) + 0.3
    dense = rng.uniform(0, 1, (N, K))
    dense[rng.uniform(size=(N, K)) < 0.6] = 0          # mostly zeros
    dense[rng.uniform(size=(N, K)) < 0.05] = -0.5      # negative weights: VLFeat ignores them
    dense[:, 3] = 0                                    # a word nothing is assigned to
    sparse = sp.random(N, K, density=0.15, random_state=1, format="csr")
    sparse.data[::7] *= -1                             # stored negative entries, ignored too
    sparse = sparse.tolil()
    sparse[5, :] = 0                                   # a descriptor with no weight
    sparse[:, 7] = 0                                   # a word with no weight
    return {"X": X, "centers": centers, "dense": dense, "sparse": sparse.tocsr()}


def _vlad_both(data, kind, dtype, flags):
    """Our vector and VLFeat's (double and, for float32, float) on the same inputs."""
    X, centers = data["X"].astype(dtype), data["centers"].astype(dtype)
    weights = data[kind].astype(dtype)
    dense = weights.toarray() if sp.issparse(weights) else weights
    unnormalized, components, square_root, mass = flags
    ours = vlad_encode(X, centers, weights, unnormalized=unnormalized,
                       normalize_components=components, square_root=square_root,
                       normalize_mass=mass)
    code = _vlad_flags(*flags)
    # VLFeat double on the very inputs we were given (float32 values, exactly in float64):
    # the correctly rounded answer our float32 output is compared with.
    truth = vl.vlad_encode(X.astype(np.float64), centers.astype(np.float64),
                           dense.astype(np.float64), code)
    theirs = vl.vlad_encode(X, centers, dense, code)
    return ours, truth, theirs


@needs_vlfeat
@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.parametrize("flags", VLAD_FLAGS, ids=VLAD_IDS)
def test_vlad_encode_float64_equals_vl_vlad_encode_double(vlad_data, kind, flags):
    ours, truth, _ = _vlad_both(vlad_data, kind, np.float64, flags)
    assert ours.dtype == np.float64 and ours.shape == (K * D,)
    _assert_close(ours, truth, 1e-12, square_root=flags[2])


@needs_vlfeat
@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.parametrize("flags", VLAD_FLAGS, ids=VLAD_IDS)
def test_vlad_encode_float32_equals_vl_vlad_encode(vlad_data, kind, flags):
    ours, truth, theirs = _vlad_both(vlad_data, kind, np.float32, flags)
    assert ours.dtype == np.float32 and ours.shape == (K * D,)
    # Sums in float64, rounded once: within ~2 float32 ulps of VLFeat's double result
    # (measured <= 0.6 ulp), and at least as close to it as VLFeat's own float code.
    _assert_close(ours, truth, 2.5e-7, square_root=flags[2])
    _assert_close(ours, theirs, 2e-6, square_root=flags[2])


@needs_vlfeat
@pytest.mark.parametrize("form", ["csc", "coo", "csr_array", "dense_as_sparse", "one_hot"])
def test_vlad_encode_any_sparse_form_and_hard_assignment(vlad_data, form):
    X, centers = vlad_data["X"], vlad_data["centers"]
    weights = vlad_data["sparse"]
    if form == "csc":
        weights = weights.tocsc()
    elif form == "coo":  # duplicate entries are summed, as toarray() does
        coo = weights.tocoo()
        weights = sp.coo_matrix((np.r_[coo.data, 0.25 * np.ones(10)],
                                 (np.r_[coo.row, np.arange(10)], np.r_[coo.col, np.zeros(10, int)])),
                                shape=coo.shape)
    elif form == "csr_array":
        weights = sp.csr_array(weights)
    elif form == "dense_as_sparse":
        weights = sp.csr_matrix(vlad_data["dense"])
    else:  # hard assignment: integer one-hot rows
        labels = ((X[:, None, :] - centers[None]) ** 2).sum(-1).argmin(1)
        weights = sp.csr_matrix((np.ones(N, dtype=np.int64), (np.arange(N), labels)), shape=(N, K))
    dense = weights.toarray().astype(np.float64)
    for flags in VLAD_FLAGS:
        ours = vlad_encode(X, centers, weights, unnormalized=flags[0], normalize_components=flags[1],
                           square_root=flags[2], normalize_mass=flags[3])
        _assert_close(ours, vl.vlad_encode(X, centers, dense, _vlad_flags(*flags)), 1e-12, flags[2])
        _assert_close(ours, vlad_encode(X, centers, dense, unnormalized=flags[0],
                                        normalize_components=flags[1], square_root=flags[2],
                                        normalize_mass=flags[3]), 1e-12, flags[2])


def test_vlad_encode_layout_is_word_after_word():
    """VLFeat's column-major D x K encoding is the row-major (K, D) blocks flattened."""
    X = np.array([[1.0, 10.0], [2.0, 20.0], [4.0, 40.0]])
    centers = np.array([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    weights = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0]])
    out = vlad_encode(X, centers, weights, unnormalized=True)
    np.testing.assert_array_equal(out, [1, 10, 1 + 3, 19 + 39, 0, 0])  # word 2: no mass, zeros
    if vl.load() is not None:
        np.testing.assert_array_equal(out, vl.vlad_encode(X, centers, weights, vl.VLAD_UNNORMALIZED))


def test_vlad_encode_is_the_encoders_kernel():
    """VLADEncoder's output is vlad_encode given the encoder's own hard weights."""
    rng = np.random.default_rng(3)
    centers = rng.normal(0, 1, (6, 8)).astype(np.float32)
    X = (centers[rng.integers(0, 6, 200)] + 0.4 * rng.standard_normal((200, 8))).astype(np.float32)
    vocabulary = KMeansVocabulary.from_centers(centers)
    encoded = VLADEncoder(vocabulary=vocabulary, normalize_mass=True).fit([X]).transform([X])[0]
    labels = vocabulary.predict(X)
    weights = sp.csr_matrix((np.ones(len(X)), (np.arange(len(X)), labels)), shape=(len(X), 6))
    ours = vlad_encode(X, centers, weights, normalize_components=True, square_root=True,
                       normalize_mass=True)
    np.testing.assert_allclose(ours, encoded, atol=1e-7)


def test_vlad_encode_dtypes_empty_set_and_errors():
    centers = np.zeros((3, 2))
    assert vlad_encode(np.zeros((0, 2)), centers, np.zeros((0, 3))).tolist() == [0.0] * 6
    assert vlad_encode(np.zeros((0, 2)), centers, sp.csr_matrix((0, 3))).tolist() == [0.0] * 6
    X32 = np.ones((2, 2), np.float32)
    assert vlad_encode(X32, centers.astype(np.float32), np.ones((2, 3))).dtype == np.float32
    assert vlad_encode(X32, centers, np.ones((2, 3), np.float32)).dtype == np.float64
    assert vlad_encode(np.ones((2, 2), np.uint8), centers.astype(np.float32), np.ones((2, 3))).dtype == np.float64
    with pytest.raises(ValueError, match=r"assignments has shape \(2, 4\), expected \(N, K\) = \(2, 3\)"):
        vlad_encode(np.ones((2, 2)), centers, np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"assignments has shape \(3, 3\)"):
        vlad_encode(np.ones((2, 2)), centers, sp.csr_matrix(np.ones((3, 3))))
    with pytest.raises(ValueError, match="X has 3 columns"):
        vlad_encode(np.ones((2, 3)), centers, np.ones((2, 3)))
    with pytest.raises(ValueError, match="X must be a 2-D"):
        vlad_encode(np.ones(2), centers, np.ones((1, 3)))
    with pytest.raises(ValueError, match="X contains NaN"):
        vlad_encode(np.array([[np.nan, 0.0]]), centers, np.ones((1, 3)))
    with pytest.raises(ValueError, match="assignments contains NaN"):
        vlad_encode(np.ones((1, 2)), centers, np.array([[np.inf, 0, 0]]))
    with pytest.raises(ValueError, match="centers contains NaN"):
        vlad_encode(np.ones((1, 2)), np.full((3, 2), np.nan), np.ones((1, 3)))
    with pytest.raises(TypeError, match="centers must be an array of real numbers"):
        vlad_encode(np.ones((1, 2)), np.ones((3, 2), complex), np.ones((1, 3)))


# ----------------------------------------------------------------------------- Fisher

FK, FD = 8, 16
FISHER_FLAGS = list(itertools.product([False, True], repeat=4))  # improved, normalized, sqrt, fast
FISHER_IDS = ["".join(name for name, on in zip(("I", "N", "S", "F"), flags) if on) or "plain"
              for flags in FISHER_FLAGS]


@pytest.fixture(scope="module")
def fisher_data():
    # As tests/test_encoders.py's data: a skipped component, descriptors around the means.
    rng = np.random.default_rng(0)
    means = rng.normal(0, 1, (FK, FD))
    variances = rng.uniform(0.2, 1.0, (FK, FD))
    priors = rng.dirichlet(np.ones(FK))
    priors[2] = 1e-7  # below 1e-6: VLFeat skips the component (zero blocks)
    priors /= priors.sum()
    X = means[rng.integers(0, FK, 400)] + 0.6 * rng.standard_normal((400, FD))
    return X, means, variances, priors


def _fisher_flags(improved, normalized, square_root, fast):
    return ((vl.FISHER_IMPROVED if improved else 0) | (vl.FISHER_NORMALIZED if normalized else 0)
            | (vl.FISHER_SQUARE_ROOT if square_root else 0) | (vl.FISHER_FAST if fast else 0))


@needs_vlfeat
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("flags", FISHER_FLAGS, ids=FISHER_IDS)
def test_fisher_encode_equals_vl_fisher_encode(fisher_data, dtype, flags):
    X, means, variances, priors = (a.astype(dtype) for a in fisher_data)
    improved, normalized, square_root, fast = flags
    ours = fisher_encode(X, means, variances, priors, improved=improved, normalized=normalized,
                         square_root=square_root, fast=fast)
    assert ours.dtype == dtype and ours.shape == (2 * FK * FD,)
    assert not ours[2 * FD:3 * FD].any() and not ours[(FK + 2) * FD:(FK + 3) * FD].any()
    code = _fisher_flags(*flags)
    theirs = vl.fisher_encode(X, means, variances, priors, code)
    rooted = (improved or square_root) and not (improved or normalized)
    if dtype == np.float64:
        # Exact log-densities and a softmax that leaves out only the words more than
        # log(K) + 40 nats below a row's best (fisher.MARGIN): round-off.
        _assert_close(ours, theirs, 1e-13, rooted)
    else:
        # As tests/test_encoders.py's float32 Fisher tests.
        _assert_close(ours, theirs, 1e-5, rooted)
        truth = vl.fisher_encode(*(a.astype(np.float64) for a in (X, means, variances, priors)), code)
        _assert_close(ours, truth, 1e-5, rooted)


def test_fisher_encode_is_the_encoders_accumulation(fisher_data):
    X, means, variances, priors = (a.astype(np.float32) for a in fisher_data)
    vocabulary = GMMVocabulary.from_parameters(means, variances, priors)
    for options, flags in [(dict(improved=True), dict(improved=True)),
                           (dict(improved=False, power=None, l2=False, fast=True), dict(fast=True))]:
        encoded = FisherEncoder(vocabulary=vocabulary, **options).fit([X]).transform([X])[0]
        np.testing.assert_array_equal(fisher_encode(X, means, variances, priors, **flags), encoded)


def test_fisher_encode_dtypes_empty_set_and_errors(fisher_data):
    X, means, variances, priors = fisher_data
    assert not fisher_encode(X[:0], means, variances, priors, improved=True).any()
    assert fisher_encode(X.astype(np.float32), means, variances, priors).dtype == np.float64
    assert fisher_encode(X, *(a.astype(np.float32) for a in (means, variances, priors))).dtype == np.float64
    with pytest.raises(ValueError, match="covariances must be positive"):
        fisher_encode(X, means, np.zeros_like(variances), priors)
    with pytest.raises(ValueError, match="priors must be >= 0"):
        fisher_encode(X, means, variances, -priors)
    with pytest.raises(ValueError, match=r"priors has shape \(7,\), expected \(8,\)"):
        fisher_encode(X, means, variances, priors[:-1])
    with pytest.raises(ValueError, match=r"covariances has shape \(8, 15\), expected \(8, 16\)"):
        fisher_encode(X, means, variances[:, 1:], priors)
    with pytest.raises(ValueError, match="X has 15 columns"):
        fisher_encode(X[:, 1:], means, variances, priors)
    with pytest.raises(ValueError, match="X contains NaN"):
        fisher_encode(np.full((2, FD), np.nan), means, variances, priors)


# -------------------------------------------------------------- cyvlfeat's test cases
#
# Ported from cyvlfeat (github.com/menpo/cyvlfeat, BSD licence): the cases of
# cyvlfeat/vlad/tests/vlad_test.py and cyvlfeat/fisher/tests/fisher_test.py, with their
# inputs and expected values, run against vladkit's functional API. cyvlfeat takes the
# same row-major (N, D) / (K, D) / (N, K) arrays as vladkit and returns the same flat
# vectors; its reference functions work on MATLAB-style transposes, rewritten here on
# the row-major arrays. Its random inputs are unseeded there and seeded here. (Its
# get_fake_data ignores its dtype argument, so its float32 loops test float64 twice;
# here the float32 runs get float32 inputs and a float32 tolerance.)


def _cyvlfeat_fake_data(dtype, seed):
    rng = np.random.RandomState(seed)
    x = rng.randn(256, 128)
    mu = rng.randn(16, 128)
    assignments = rng.uniform(size=(256, 16))
    assignments = assignments * (1 / assignments.sum(axis=1, keepdims=True))
    return x.astype(dtype), mu.astype(dtype), assignments.astype(dtype)


def _cyvlfeat_simple_vlad(x, mu, assignments):
    """cyvlfeat's simple_vlad (from VLFeat's vl_test_vlad): per word k,
    X^T q_k - (sum q_k) mu_k, concatenated (in float64)."""
    x, mu, assignments = (a.astype(np.float64) for a in (x, mu, assignments))
    return (assignments.T @ x - assignments.sum(axis=0)[:, None] * mu).ravel()


def _cyvlfeat_close(observed, expected, dtype):
    # cyvlfeat: assert_allclose(..., rtol=1e-7) (float64 throughout). float32: 2 ulps of
    # the largest value (entries near 0 have no relative precision to speak of).
    if dtype == np.float64:
        np.testing.assert_allclose(observed, expected, rtol=1e-7, atol=1e-12)
    else:
        np.testing.assert_allclose(observed, expected, rtol=1e-6, atol=2.5e-7 * np.abs(expected).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cyvlfeat_vlad_basic(dtype):
    x = np.array([[1], [2], [3]]).astype(dtype)
    mu = np.zeros(shape=(3, 1), dtype=dtype)
    observed = vlad_encode(x, mu, np.eye(3, dtype=dtype), unnormalized=True)
    assert observed.dtype == dtype
    np.testing.assert_array_equal(observed, np.array([1, 2, 3], dtype=dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", ["rand", "norm", "sqrt", "individual", "mass"])
def test_cyvlfeat_vlad_cases(dtype, case):
    x, mu, assignments = _cyvlfeat_fake_data(dtype, seed=["rand", "norm", "sqrt", "individual", "mass"].index(case))
    expected = _cyvlfeat_simple_vlad(x, mu, assignments)
    if case == "rand":
        observed = vlad_encode(x, mu, assignments, unnormalized=True)
    elif case == "norm":
        expected = expected / np.linalg.norm(expected)
        observed = vlad_encode(x, mu, assignments)
    elif case == "sqrt":
        expected = np.sign(expected) * np.sqrt(np.abs(expected))
        expected = expected / np.linalg.norm(expected)
        observed = vlad_encode(x, mu, assignments, square_root=True)
    elif case == "individual":
        blocks = expected.reshape(-1, x.shape[1])
        expected = (blocks / np.linalg.norm(blocks, axis=1, keepdims=True)).ravel()
        observed = vlad_encode(x, mu, assignments, unnormalized=True, normalize_components=True)
    else:
        blocks = expected.reshape(-1, x.shape[1])
        expected = (blocks / assignments.astype(np.float64).sum(axis=0)[:, None]).ravel()
        observed = vlad_encode(x, mu, assignments, unnormalized=True, normalize_mass=True)
    assert observed.dtype == dtype
    _cyvlfeat_close(observed, expected, dtype)


def test_cyvlfeat_vlad_dimension():
    rng = np.random.RandomState(0)
    n, k, d = 1000, 512, 128
    x = rng.uniform(size=(n, d)).astype(np.float32)
    means = rng.uniform(size=(k, d)).astype(np.float32)
    assignments = rng.uniform(size=(n, k)).astype(np.float32)
    assert len(vlad_encode(x, means, assignments)) == k * d


def test_cyvlfeat_fisher_dimension():
    # cyvlfeat's priors are divided by their L2 norm, so they do not sum to 1: VLFeat
    # accepts them, and so does fisher_encode (not GMMVocabulary.from_parameters).
    rng = np.random.RandomState(0)
    n, k, d = 1000, 512, 128
    x = rng.uniform(size=(n, d)).astype(np.float32)
    means = rng.uniform(size=(k, d)).astype(np.float32)
    covariances = rng.uniform(size=(k, d)).astype(np.float32)
    priors = rng.uniform(size=(k,)).astype(np.float32)
    priors /= np.linalg.norm(priors)
    enc = fisher_encode(x, means, covariances, priors)
    assert len(enc) == 2 * k * d
    with pytest.raises(ValueError, match="weights must sum to 1"):
        GMMVocabulary.from_parameters(means, covariances, priors)


def _cyvlfeat_fisher_reference(X, means, covariances, priors):
    """cyvlfeat's _fisher_encoding: every posterior kept (no 1e-6 threshold), averages
    over the N descriptors."""
    z = (X[:, None] - means[None]) / np.sqrt(covariances)                 # (N, K, D)
    log_q = (np.log(priors) - 0.5 * ((z ** 2).sum(-1) + np.log(covariances).sum(-1)
                                     + X.shape[1] * np.log(2 * np.pi)))
    q = np.exp(log_q - log_q.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    u = (q[..., None] * z).mean(0) / np.sqrt(priors)[:, None]
    v = (q[..., None] * (z ** 2 - 1)).mean(0) / np.sqrt(2 * priors)[:, None]
    return np.concatenate([u.ravel(), v.ravel()])


def test_cyvlfeat_fisher_encoding():
    np.random.seed(1)  # cyvlfeat's inputs, drawn as it draws them
    X = np.random.randn(1000, 2)
    X[500:] *= (2, 3)
    X[500:] += (4, 4)
    mu = np.asarray([[0., 0.], [4., 4.]])
    sigma2 = np.asarray([[1.0, 1.0], [2.0, 3.0]])
    prior = np.asarray([0.6, 0.4])
    expected = _cyvlfeat_fisher_reference(X, mu, sigma2, prior)
    observed = fisher_encode(X, mu, sigma2, prior)
    assert observed.dtype == np.float64
    np.testing.assert_allclose(expected, observed, rtol=1e-4)
    observed = fisher_encode(*(a.astype("float32") for a in (X, mu, sigma2, prior)))
    np.testing.assert_allclose(expected, observed, rtol=1e-4)
    assert observed.dtype == "float32"


# ------------------------------------------------------------------- the constructors


def _blobs(n=3000, dim=12, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 4, (10, dim))
    return (centers[rng.integers(0, 10, n)] + rng.standard_normal((n, dim))).astype(np.float32)


@pytest.mark.parametrize("pca", [None, 6])
def test_from_centers_round_trips_a_fitted_vocabulary(pca, tmp_path):
    X = _blobs()
    fitted = KMeansVocabulary(8, pca=pca, random_state=0).fit(X)
    made = KMeansVocabulary.from_centers(fitted.centers_, pca_mean=fitted.pca_mean_,
                                         pca_components=fitted.pca_components_)
    assert (made.n_clusters, made.pca, made.descriptor_dim_) == (8, pca, 12)
    for name in ("centers_", "pca_mean_", "pca_components_"):
        np.testing.assert_array_equal(getattr(made, name), getattr(fitted, name))
        assert getattr(made, name) is None or getattr(made, name).dtype == np.float32
    np.testing.assert_array_equal(made.predict(X), fitted.predict(X))
    np.testing.assert_array_equal(made.transform(X[:50]), fitted.transform(X[:50]))
    sets = np.array_split(X, 5)
    np.testing.assert_array_equal(VLADEncoder(vocabulary=made).fit(sets).transform(sets),
                                  VLADEncoder(vocabulary=fitted).fit(sets).transform(sets))
    made.save(tmp_path / "v.npz")
    loaded = load_vocabulary(tmp_path / "v.npz")
    np.testing.assert_array_equal(loaded.centers_, fitted.centers_)
    np.testing.assert_array_equal(loaded.predict(X), fitted.predict(X))


@pytest.mark.parametrize("pca", [None, 6])
def test_from_parameters_round_trips_a_fitted_vocabulary(pca, tmp_path):
    X = _blobs()
    fitted = GMMVocabulary(5, pca=pca, random_state=0).fit(X)
    made = GMMVocabulary.from_parameters(fitted.means_, fitted.covariances_, fitted.weights_,
                                         pca_mean=fitted.pca_mean_, pca_components=fitted.pca_components_,
                                         descriptor_type="blobs")
    assert (made.n_components, made.pca, made.descriptor_dim_, made.descriptor_type) == (5, pca, 12, "blobs")
    for name in ("means_", "covariances_", "weights_", "pca_mean_", "pca_components_"):
        np.testing.assert_array_equal(getattr(made, name), getattr(fitted, name))
    np.testing.assert_array_equal(made.predict_proba(X[:100]), fitted.predict_proba(X[:100]))
    sets = np.array_split(X, 5)
    np.testing.assert_array_equal(FisherEncoder(vocabulary=made).fit(sets).transform(sets),
                                  FisherEncoder(vocabulary=fitted).fit(sets).transform(sets))
    made.save(tmp_path / "g.npz")
    loaded = load_vocabulary(tmp_path / "g.npz")
    for name in ("means_", "covariances_", "weights_", "pca_mean_", "pca_components_"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(fitted, name))


def test_constructors_copy_and_choose_a_dtype():
    centers = np.ones((3, 2), np.float32)
    made = KMeansVocabulary.from_centers(centers)
    centers[0] = 5
    assert made.centers_[0, 0] == 1 and made.centers_.dtype == np.float32
    assert KMeansVocabulary.from_centers([[0, 1], [2, 3]]).centers_.dtype == np.float64
    mixed = GMMVocabulary.from_parameters(np.zeros((2, 3), np.float32), np.ones((2, 3)), [0.5, 0.5])
    assert mixed.means_.dtype == mixed.covariances_.dtype == mixed.weights_.dtype == np.float64
    # A fitted vocabulary: its training parameters are refused, as after fit or a file load.
    with pytest.raises(ValueError, match="cannot set n_clusters=4"):
        made.set_params(n_clusters=4)


GOOD = dict(means=np.zeros((3, 2)), covariances=np.ones((3, 2)), weights=np.full(3, 1 / 3))


@pytest.mark.parametrize("changes,error,message", [
    (dict(means=np.zeros(3)), ValueError, r"means must be a 2-D array, got shape \(3,\)"),
    (dict(means=np.zeros((0, 2)), covariances=np.ones((0, 2)), weights=np.ones(0)),
     ValueError, r"means must have at least one row and one column"),
    (dict(means=np.array([["a", "b"]] * 3)), TypeError, "means must be an array of real numbers"),
    (dict(covariances=np.ones((3, 3))), ValueError,
     r"covariances has shape \(3, 3\), expected \(3, 2\) \(one row per word of means"),
    (dict(weights=np.full(4, 0.25)), ValueError, r"weights has shape \(4,\), expected \(3,\)"),
    (dict(weights=np.full((3, 1), 1 / 3)), ValueError, "weights must be a 1-D array"),
    (dict(means=np.array([[0, np.nan]] * 3)), ValueError, "means contains NaN or inf"),
    (dict(covariances=np.array([[1, np.inf]] * 3)), ValueError, "covariances contains NaN or inf"),
    (dict(weights=np.array([0.5, np.nan, 0.5])), ValueError, "weights contains NaN or inf"),
    (dict(covariances=np.array([[1.0, 0.0], [1, 1], [1, 1]])), ValueError,
     r"covariances must be positive .* 1 of them are <= 0"),
    (dict(covariances=-np.ones((3, 2))), ValueError, "covariances must be positive"),
    (dict(weights=np.array([1.2, -0.2, 0.0])), ValueError, r"weights must be >= 0, got -0.2 \(component 1\)"),
    (dict(weights=np.array([0.3, 0.3, 0.3])), ValueError, "weights must sum to 1 .* sum of 0.9"),
    (dict(weights=np.ones(3)), ValueError, "weights must sum to 1"),
])
def test_from_parameters_validation(changes, error, message):
    arguments = {**GOOD, **changes}
    with pytest.raises(error, match=message):
        GMMVocabulary.from_parameters(arguments["means"], arguments["covariances"], arguments["weights"])


def test_from_parameters_accepts_round_off_in_the_weights_and_zero_weights():
    weights = np.array([0.5, 0.5 + 5e-5, 0.0])
    made = GMMVocabulary.from_parameters(GOOD["means"], GOOD["covariances"], weights)
    np.testing.assert_array_equal(made.weights_, weights)  # used as given


@pytest.mark.parametrize("pca_mean,pca_components,message", [
    (np.zeros(5), None, "pca_mean and pca_components go together"),
    (None, np.zeros((2, 5)), "pca_mean and pca_components go together"),
    (np.zeros(5), np.zeros((3, 5)), r"pca_components has shape \(3, 5\), expected \(2, D_in\)"),
    (np.zeros(1), np.zeros((2, 1)), r"pca_components has shape \(2, 1\), expected \(2, D_in\) with D_in >= 2"),
    (np.zeros(4), np.zeros((2, 5)), r"pca_mean has shape \(4,\), expected \(5,\)"),
    (np.zeros((5, 1)), np.zeros((2, 5)), "pca_mean must be a 1-D array"),
    (np.zeros(5), np.full((2, 5), np.inf), "pca_components contains NaN or inf"),
    (np.full(5, np.nan), np.zeros((2, 5)), "pca_mean contains NaN or inf"),
])
def test_constructors_validate_the_pca(pca_mean, pca_components, message):
    for make in (lambda **pca: KMeansVocabulary.from_centers(np.zeros((3, 2)), **pca),
                 lambda **pca: GMMVocabulary.from_parameters(GOOD["means"], GOOD["covariances"],
                                                             GOOD["weights"], **pca)):
        with pytest.raises(ValueError, match=message):
            make(pca_mean=pca_mean, pca_components=pca_components)


def test_from_centers_validation():
    with pytest.raises(ValueError, match=r"centers must be a 2-D array, got shape \(\)"):
        KMeansVocabulary.from_centers(3.0)
    with pytest.raises(ValueError, match="centers contains NaN or inf"):
        KMeansVocabulary.from_centers([[0.0, np.inf]])
    with pytest.raises(TypeError, match="centers must be an array of real numbers, got dtype bool"):
        KMeansVocabulary.from_centers(np.ones((2, 2), bool))
    with pytest.raises(ValueError, match=r"centers must have at least one row and one column, got shape \(2, 0\)"):
        KMeansVocabulary.from_centers(np.ones((2, 0)))


def test_functional_api_is_exported():
    assert vladkit.vlad_encode is vlad_encode and vladkit.fisher_encode is fisher_encode
    assert {"vlad_encode", "fisher_encode"} <= set(vladkit.__all__)
