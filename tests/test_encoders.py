import itertools

import joblib
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

import reference as ref
from vladkit import (BoFEncoder, FisherEncoder, GMMVocabulary, KMeansVocabulary, LLCEncoder, SuperVectorEncoder,
                     VLADEncoder)
from vladkit._util import vlfeat as vl
from vladkit import LocalFeatures, SpatialPyramid
from vladkit.encoders.pyramid import cell_masks

needs_vlfeat = pytest.mark.skipif(
    vl.load() is None, reason="VLFeat's libvl is not installed (apt-get install libvlfeat-dev)")

D, K = 16, 8


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 1, (K, D))
    centers[-1] += 50  # a word no descriptor is assigned to
    sets = []
    for n in [40, 0, 1, 300, 7]:
        labels = rng.integers(0, K - 1, n)
        sets.append((centers[labels] + 0.6 * rng.standard_normal((n, D))).astype(np.float32))
    variances = rng.uniform(0.2, 1.0, (K, D))
    weights = rng.dirichlet(np.ones(K))
    weights[2] = 1e-7  # a component VLFeat skips
    weights /= weights.sum()
    return {
        "sets": sets,
        "kmeans": KMeansVocabulary.from_centers(centers.astype(np.float32)),
        "gmm": GMMVocabulary.from_parameters(centers.astype(np.float32), variances.astype(np.float32),
                                             weights.astype(np.float32)),
    }


def _weights(assignment, X, centers, alpha, n_neighbors=3):
    if assignment == "hard":
        return ref.hard_weights(X, centers)
    if assignment == "knn":
        return ref.knn_weights(X, centers, n_neighbors, alpha)
    return ref.soft_weights(X, centers, alpha)


VLAD_OPTIONS = list(itertools.product(["hard", "knn", "soft"], [False, True], [0.5, None], [True, False], [True, False]))


def _vlad_case(data, assignment, mass, power, intra, l2):
    vocab = data["kmeans"]
    encoder = VLADEncoder(vocabulary=vocab, assignment=assignment, n_neighbors=3, alpha=0.7,
                          normalize_mass=mass, power=power, intra_norm=intra, l2=l2)
    out = encoder.fit(data["sets"]).transform(data["sets"])
    assert out.shape == (5, K * D) and out.dtype == np.float32
    centers = vocab.centers_.astype(np.float64)
    weights = [_weights(assignment, X.astype(np.float64), centers, 0.7) for X in data["sets"]]
    return out, weights


@pytest.mark.parametrize("assignment,mass,power,intra,l2", VLAD_OPTIONS)
def test_vlad_matches_numpy_reference(data, assignment, mass, power, intra, l2):
    out, weights = _vlad_case(data, assignment, mass, power, intra, l2)
    centers = data["kmeans"].centers_.astype(np.float64)
    for X, Q, encoded in zip(data["sets"], weights, out):
        expected = ref.vlad(X.astype(np.float64), centers, Q, mass, power, intra, l2)
        _assert_float32_close(encoded, expected, power and not (intra or l2))


@needs_vlfeat
@pytest.mark.parametrize("assignment,mass,power,intra,l2", VLAD_OPTIONS)
def test_vlad_matches_vlfeat(data, assignment, mass, power, intra, l2):
    """vl_vlad_encode given the same assignment weights."""
    out, weights = _vlad_case(data, assignment, mass, power, intra, l2)
    flags = ((vl.VLAD_NORMALIZE_MASS if mass else 0) | (vl.VLAD_SQUARE_ROOT if power else 0)
             | (vl.VLAD_NORMALIZE_COMPONENTS if intra else 0) | (0 if l2 else vl.VLAD_UNNORMALIZED))
    for X, Q, encoded in zip(data["sets"], weights, out):
        if len(X):
            theirs = vl.vlad_encode(X, data["kmeans"].centers_, Q.astype(np.float32), flags)
            _assert_float32_close(encoded, theirs, power and not (intra or l2))


def _assert_float32_close(ours, theirs, square_rooted_only):
    """max |ours - theirs| <= 1e-5 for normalised vectors; for unnormalised ones (entries
    up to ~10, rounded in float32 on both sides) the bound scales with the magnitude, and a
    signed square root left unnormalised is undone first, since sqrt near 0 amplifies
    round-off (|sqrt a - sqrt b| <= sqrt |a - b|)."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    if square_rooted_only:
        ours, theirs = np.sign(ours) * ours**2, np.sign(theirs) * theirs**2
    scale = max(1.0, np.abs(theirs).max())
    assert np.abs(ours - theirs).max() <= 1e-5 * scale


FISHER_OPTIONS = [
    ("plain", dict(improved=False, power=None, l2=False), 0),
    ("normalized", dict(improved=False, power=None, l2=True), vl.FISHER_NORMALIZED),
    ("square-root", dict(improved=False, power=0.5, l2=False), vl.FISHER_SQUARE_ROOT),
    ("improved", dict(improved=True), vl.FISHER_IMPROVED),
    ("fast", dict(improved=False, power=None, l2=False, fast=True), vl.FISHER_FAST),
    ("fast-improved", dict(improved=True, fast=True), vl.FISHER_FAST | vl.FISHER_IMPROVED),
    # improved=True is the signed square root and L2 whatever power and l2 say.
    ("improved-over-power", dict(improved=True, power=0.3, l2=False), vl.FISHER_IMPROVED),
    ("improved-over-none", dict(improved=True, power=None, l2=False), vl.FISHER_IMPROVED),
]


def _fisher_case(data, options):
    vocab = data["gmm"]
    out = FisherEncoder(vocabulary=vocab, **options).fit(data["sets"]).transform(data["sets"])
    assert out.shape == (5, 2 * K * D) and out.dtype == np.float32
    # The skipped component (prior < 1e-6) has zero blocks.
    assert not out[:, 2 * D:3 * D].any() and not out[:, K * D + 2 * D:K * D + 3 * D].any()
    square_rooted_only = (options.get("power") == 0.5 and not options.get("l2", True)
                          and not options.get("improved", True))
    return vocab, out, square_rooted_only


@pytest.mark.parametrize("name,options,flags", FISHER_OPTIONS, ids=[o[0] for o in FISHER_OPTIONS])
def test_fisher_matches_numpy_reference(data, name, options, flags):
    vocab, out, square_rooted_only = _fisher_case(data, options)
    for X, encoded in zip(data["sets"], out):
        expected = ref.fisher(X, vocab.means_, vocab.covariances_, vocab.weights_, **options)
        _assert_float32_close(encoded, expected, square_rooted_only)


@needs_vlfeat
@pytest.mark.parametrize("name,options,flags", FISHER_OPTIONS, ids=[o[0] for o in FISHER_OPTIONS])
def test_fisher_matches_vlfeat(data, name, options, flags):
    vocab, out, square_rooted_only = _fisher_case(data, options)
    for X, encoded in zip(data["sets"], out):
        theirs = vl.fisher_encode(X, vocab.means_, vocab.covariances_, vocab.weights_, flags)
        _assert_float32_close(encoded, theirs, square_rooted_only)


def test_fisher_weight_gradient(data):
    vocab = data["gmm"]
    out = FisherEncoder(vocabulary=vocab, include_weights=True).fit(data["sets"]).transform(data["sets"])
    assert out.shape == (5, 2 * K * D + K)
    for X, encoded in zip(data["sets"], out):
        expected = ref.fisher(X, vocab.means_, vocab.covariances_, vocab.weights_, include_weights=True)
        np.testing.assert_allclose(encoded, expected, atol=1e-5)


@needs_vlfeat
def test_fisher_float64_matches_vlfeat_double(data):
    vocab = data["gmm"]
    gmm64 = GMMVocabulary.from_parameters(*(a.astype(np.float64) for a in (vocab.means_, vocab.covariances_, vocab.weights_)))
    sets = [s.astype(np.float64) for s in data["sets"]]
    ours = FisherEncoder(vocabulary=gmm64, improved=False, power=None, l2=False).fit(sets).transform(sets)
    for X, encoded in zip(sets, ours):
        theirs = vl.fisher_encode(X, gmm64.means_, gmm64.covariances_, gmm64.weights_, 0)
        np.testing.assert_allclose(encoded, theirs.astype(np.float32), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("power", [0.3, 0.75, 2.0])
def test_powers_other_than_the_square_root_match_numpy_reference(data, power):
    """sign(v) |v|^power for a power other than 0.5 (which takes a sqrt shortcut), before
    the normalisations, in each encoder that has the option."""
    sets, centers = data["sets"], data["kmeans"].centers_.astype(np.float64)
    vlad = VLADEncoder(vocabulary=data["kmeans"], power=power).fit(sets).transform(sets)
    unnormalised = VLADEncoder(vocabulary=data["kmeans"], power=power, intra_norm=False,
                               l2=False).fit(sets).transform(sets)
    bof = BoFEncoder(vocabulary=data["kmeans"], power=power).fit(sets).transform(sets)
    gmm = data["gmm"]
    fisher = FisherEncoder(vocabulary=gmm, improved=False, power=power).fit(sets).transform(sets)
    for i, X in enumerate(sets):
        X64 = X.astype(np.float64)
        Q = ref.hard_weights(X64, centers)
        _assert_float32_close(vlad[i], ref.vlad(X64, centers, Q, power=power), False)
        expected = ref.vlad(X64, centers, Q, power=power, intra_norm=False, l2=False)
        np.testing.assert_allclose(unnormalised[i], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bof[i], ref.bof(X64, centers, ref.hard_weights, power=power), rtol=1e-6, atol=1e-7)
        expected = ref.fisher(X, gmm.means_, gmm.covariances_, gmm.weights_, improved=False, power=power)
        _assert_float32_close(fisher[i], expected, False)


@pytest.mark.parametrize("assignment", ["hard", "soft"])
@pytest.mark.parametrize("tf_idf,power,norm", [(False, None, None), (False, None, "l2"), (False, None, "l1"),
                                               (True, 0.5, "l2")])
def test_bof_matches_numpy_reference(data, assignment, tf_idf, power, norm):
    vocab = data["kmeans"]
    encoder = BoFEncoder(vocabulary=vocab, assignment=assignment, n_neighbors=3, sigma=0.9,
                         tf_idf=tf_idf, power=power, norm=norm).fit(data["sets"])
    out = encoder.transform(data["sets"])
    centers = vocab.centers_.astype(np.float64)
    weights = (ref.hard_weights if assignment == "hard"
               else lambda X, c: ref.knn_weights(X, c, 3, 0.5 / 0.9**2))
    idf = None
    if tf_idf:
        df = np.array([[weights(X.astype(np.float64), centers).sum(0)[k] > 0 if len(X) else False
                        for k in range(K)] for X in data["sets"]]).sum(0)
        idf = np.log((1 + 5) / (1 + df)) + 1
        np.testing.assert_allclose(encoder.idf_, idf)
    for X, encoded in zip(data["sets"], out):
        expected = ref.bof(X.astype(np.float64), centers, weights, idf, power, norm)
        if assignment == "hard" and norm is None and not tf_idf:
            np.testing.assert_array_equal(encoded, expected)  # integer counts: exactly
        else:
            np.testing.assert_allclose(encoded, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("assignment", ["hard", "soft"])
def test_bof_idf_from_document_frequencies_of_batches(data, assignment):
    # Document frequencies counted batch by batch (as ImageEncoder streams images) give
    # the idf_ that fit gives on all the images at once.
    make = lambda: BoFEncoder(vocabulary=data["kmeans"], assignment=assignment, sigma=0.9, tf_idf=True)
    sets = data["sets"]
    streamed = make().fit(sets[:1])
    df = np.zeros(K, dtype=np.int64)
    for batch in (sets[:2], sets[2:4], sets[4:]):
        accumulation = streamed._accumulate(len(batch))
        for image, descriptors in enumerate(batch):
            accumulation.add(image, descriptors)
        df += streamed._document_frequency(accumulation)
    streamed._set_idf(df, len(sets))
    np.testing.assert_array_equal(streamed.idf_, make().fit(sets).idf_)
    assert streamed.idf_[-1] == np.log(6) + 1  # the word no descriptor is assigned to
    with pytest.raises(ValueError, match="shape"):
        streamed._set_idf(df[:-1], len(sets))
    with pytest.raises(ValueError, match="n_images"):
        streamed._set_idf(df, 1)


# ------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("encoder", [
    VLADEncoder(assignment="hard"), VLADEncoder(assignment="knn"), VLADEncoder(assignment="soft"),
    BoFEncoder(), BoFEncoder(assignment="soft", tf_idf=True), FisherEncoder(), FisherEncoder(fast=True),
    LLCEncoder(), LLCEncoder(pooling="sum"), SuperVectorEncoder(), SuperVectorEncoder(assignment="soft"),
], ids=["vlad-hard", "vlad-knn", "vlad-soft", "bof", "bof-soft-tfidf", "fisher", "fisher-fast", "llc", "llc-sum",
        "sv", "sv-soft"])
def test_edge_cases_are_finite_and_zero_where_empty(data, encoder):
    vocab = data["gmm"] if isinstance(encoder, FisherEncoder) else data["kmeans"]
    encoder = clone(encoder).set_params(vocabulary=vocab).fit(data["sets"])
    far = data["sets"][3][:5] * 1e4  # far from every word
    one = data["sets"][0][:1]
    empty = np.zeros((0, D), np.float32)
    out = encoder.transform([empty, one, far, empty])
    assert np.all(np.isfinite(out))
    assert not out[0].any() and not out[3].any()
    assert out[1].any() and out[2].any()
    norms = np.linalg.norm(out, axis=1)
    np.testing.assert_allclose(norms[[1, 2]], 1.0, rtol=1e-5)


def test_word_without_members_keeps_a_zero_block(data):
    encoder = VLADEncoder(vocabulary=data["kmeans"], normalize_mass=True).fit(data["sets"])
    out = encoder.transform(data["sets"]).reshape(5, K, D)
    assert not out[:, K - 1].any()  # the far word: VLFeat leaves 0, not -c_k


def test_a_large_image_is_split_across_chunks_identically(data, monkeypatch):
    import vladkit.encoders._base as base

    sets = data["sets"]
    encoders = [VLADEncoder(vocabulary=data["kmeans"]), FisherEncoder(vocabulary=data["gmm"]),
                BoFEncoder(vocabulary=data["kmeans"], assignment="soft", sigma=1.0)]
    whole = [e.fit(sets).transform(sets) for e in encoders]
    monkeypatch.setattr(base, "CHUNK_ROWS", 16)  # every image split over several chunks
    for encoder, expected in zip(encoders, whole):
        np.testing.assert_allclose(encoder.transform(sets), expected, atol=1e-6)


def test_batch_equals_one_by_one(data):
    encoder = FisherEncoder(vocabulary=data["gmm"]).fit(data["sets"])
    batch = encoder.transform(data["sets"])
    for X, row in zip(data["sets"], batch):
        np.testing.assert_array_equal(encoder.transform([X])[0], row)


# ----------------------------------------------------------------- scikit-learn usage


def test_fit_trains_a_vocabulary_and_names_features(data):
    encoder = VLADEncoder(n_clusters=4, random_state=0).fit(data["sets"])
    assert isinstance(encoder.vocabulary_, KMeansVocabulary) and encoder.vocabulary_.n_words_ == 4
    names = encoder.get_feature_names_out()
    assert len(names) == encoder.n_features_out_ == 4 * D and names[D + 2] == "vlad_w1_d2"
    fisher = FisherEncoder(3, pca=6, random_state=0).fit(data["sets"])
    assert isinstance(fisher.vocabulary_, GMMVocabulary) and fisher.vocabulary_.dim_ == 6
    assert fisher.transform(data["sets"]).shape == (5, 2 * 3 * 6)
    assert BoFEncoder(5, random_state=0).fit(data["sets"]).get_feature_names_out()[4] == "bof_w4"


def test_vocabulary_from_file_and_unfitted_template(data, tmp_path):
    trained = KMeansVocabulary(4, random_state=0).fit(data["sets"])
    trained.save(tmp_path / "v.npz")
    from_file = VLADEncoder(vocabulary=tmp_path / "v.npz").fit(data["sets"])
    direct = VLADEncoder(vocabulary=trained).fit(data["sets"])
    np.testing.assert_array_equal(from_file.transform(data["sets"]), direct.transform(data["sets"]))
    assert direct.vocabulary_ is trained
    template = VLADEncoder(vocabulary=KMeansVocabulary(4, random_state=0)).fit(data["sets"])
    np.testing.assert_array_equal(template.vocabulary_.centers_, trained.centers_)
    assert template.vocabulary_ is not template.vocabulary  # the template stays unfitted
    # A fitted vocabulary survives sklearn.clone as an independent copy of the same words.
    cloned = clone(VLADEncoder(vocabulary=trained)).fit(data["sets"][:1])
    assert cloned.vocabulary_ is not trained
    np.testing.assert_array_equal(cloned.vocabulary_.centers_, trained.centers_)


def test_errors(data):
    with pytest.raises(NotFittedError):
        VLADEncoder().transform(data["sets"])
    with pytest.raises(TypeError, match="needs a GMMVocabulary"):
        FisherEncoder(vocabulary=data["kmeans"]).fit(data["sets"])
    with pytest.raises(ValueError, match="assignment"):
        VLADEncoder(assignment="fuzzy").fit(data["sets"])
    encoder = VLADEncoder(vocabulary=data["kmeans"]).fit(data["sets"])
    with pytest.raises(ValueError, match="image 1: descriptors have dimension 3, the vocabulary expects 16"):
        encoder.transform([data["sets"][0], np.zeros((4, 3), np.float32)])
    bad = data["sets"][0].copy()
    bad[2, 2] = np.nan
    with pytest.raises(ValueError, match="image 0: descriptors contain NaN"):
        encoder.transform([bad])
    with pytest.raises(TypeError, match="one descriptor set per image"):
        encoder.transform(data["sets"][0])


def test_joblib_round_trip(data, tmp_path):
    encoder = FisherEncoder(4, random_state=0).fit(data["sets"])
    joblib.dump(encoder, tmp_path / "enc.joblib")
    loaded = joblib.load(tmp_path / "enc.joblib")
    np.testing.assert_array_equal(loaded.transform(data["sets"]), encoder.transform(data["sets"]))


@needs_vlfeat
def test_the_vlfeat_comparison_can_fail(data):
    """The bindings really call VLFeat: a different flag gives a different vector."""
    X = data["sets"][3]
    ours = VLADEncoder(vocabulary=data["kmeans"]).fit(data["sets"]).transform([X])[0]
    Q = ref.hard_weights(X.astype(np.float64), data["kmeans"].centers_.astype(np.float64)).astype(np.float32)
    same = vl.vlad_encode(X, data["kmeans"].centers_, Q, vl.VLAD_SQUARE_ROOT | vl.VLAD_NORMALIZE_COMPONENTS)
    other = vl.vlad_encode(X, data["kmeans"].centers_, Q, vl.VLAD_SQUARE_ROOT)
    assert np.abs(ours - same).max() <= 1e-5
    assert np.abs(ours - other).max() > 1e-3


# ---------------------------------------------------------------- spatial pyramid cells

PYRAMID_LEVELS = ((1, 1), (2, 2), (1, 3))


def _pyramid_cells(points, shape, levels=PYRAMID_LEVELS):
    """(row, column) of each point, per level, read off ``cell_masks``."""
    points = np.asarray(points, dtype=np.float32)
    features = LocalFeatures(np.zeros((len(points), 1), np.float32), points,
                             np.ones(len(points), np.float32), shape)
    masks, cells = cell_masks(features, levels), []
    for nx, ny in levels:
        block, masks = np.array(masks[:nx * ny]), masks[nx * ny:]
        assert (block.sum(axis=0) == 1).all()  # every point in exactly one cell
        cell = block.argmax(axis=0)
        cells.append(np.stack([cell // nx, cell % nx], axis=1))
    return cells


def _pixel_lattice(n):
    """Positions (2k + 1) / 64 - 0.5 across an n-pixel side: exact in float32, mirrored
    exactly by n - 1 - x, and never on a cell boundary of 1, 2 or 3 cells ((x + 0.5) * 3 / n
    is never an integer, the numerator being odd)."""
    return (2 * np.arange(32 * n) + 1) / 64 - 0.5


@pytest.mark.parametrize("shape", [(200, 300), (201, 299), (480, 640), (7, 5), (1, 1)])
def test_pyramid_cells_are_mirror_symmetric(shape):
    """Finding 12: positions are pixel centres, so x and its mirror w - 1 - x must fall in
    mirrored cells; the cells used to be cut as if positions were pixel edges."""
    h, w = shape
    rng = np.random.default_rng(0)
    xs, ys = _pixel_lattice(w), _pixel_lattice(h)
    points = np.concatenate([
        np.stack([xs, rng.choice(ys, len(xs))], axis=1),
        np.stack([rng.choice(xs, len(ys)), ys], axis=1),
        [[-3.0, -1.25], [w + 2.0, h + 0.75], [-0.5, h - 0.5]],  # outside: clipped
    ])
    mirror_x = np.stack([w - 1 - points[:, 0], points[:, 1]], axis=1)
    mirror_y = np.stack([points[:, 0], h - 1 - points[:, 1]], axis=1)
    cells = _pyramid_cells(points, shape)
    for (nx, ny), cell, cell_x, cell_y in zip(PYRAMID_LEVELS, cells, _pyramid_cells(mirror_x, shape),
                                              _pyramid_cells(mirror_y, shape)):
        np.testing.assert_array_equal(cell_x, np.stack([cell[:, 0], nx - 1 - cell[:, 1]], axis=1))
        np.testing.assert_array_equal(cell_y, np.stack([ny - 1 - cell[:, 0], cell[:, 1]], axis=1))


def test_pyramid_cells_by_hand():
    """Cell boundaries at k w / n - 0.5 (pixel edges, pixel centres at integers); h = 200,
    w = 300: columns of 2 split at 149.5, rows of 2 at 99.5, rows of 3 at 66.17 and 132.83."""
    points = [
        (10, 66.4),     # was band 0 of 3, while its mirror 132.6 was band 1
        (10, 132.6),    # its mirror: band 1 too
        (0, 132.9),     # band 2 (was 1)
        (149.6, 99.4),  # right of the middle (was left)
        (149.4, 99.6),  # below the middle (was above)
        (149.5, 99.5),  # on the boundaries: half-open cells, right and below
        (-0.5, -0.5),   # the image's corner
        (299.4, 199.4),
        (-5, 250),      # outside: the nearest cell
    ]
    expected = {  # (row, column) per level (1, 1), (2, 2), (1, 3)
        (2, 2): [(0, 0), (1, 0), (1, 0), (0, 1), (1, 0), (1, 1), (0, 0), (1, 1), (1, 0)],
        (1, 3): [(1, 0), (1, 0), (2, 0), (1, 0), (1, 0), (1, 0), (0, 0), (2, 0), (2, 0)],
    }
    cells = _pyramid_cells(points, (200, 300))
    np.testing.assert_array_equal(cells[0], 0)
    np.testing.assert_array_equal(cells[1], expected[(2, 2)])
    np.testing.assert_array_equal(cells[2], expected[(1, 3)])


def test_pyramid_of_a_mirrored_image_mirrors_its_cells(data):
    """End to end: mirroring the positions left-right permutes the columns' blocks."""
    h, w = 200, 300
    X = data["sets"][3]
    rng = np.random.default_rng(1)
    xy = np.stack([rng.choice(_pixel_lattice(w), len(X)), rng.choice(_pixel_lattice(h), len(X))], axis=1)
    features = LocalFeatures(X, xy.astype(np.float32), np.ones(len(X), np.float32), (h, w))
    mirrored = LocalFeatures(X, np.stack([w - 1 - xy[:, 0], xy[:, 1]], axis=1).astype(np.float32),
                             np.ones(len(X), np.float32), (h, w))
    pyramid = SpatialPyramid(BoFEncoder(vocabulary=data["kmeans"]), levels=PYRAMID_LEVELS).fit([features])
    out, out_mirrored = pyramid.transform([features, mirrored])
    blocks, blocks_mirrored = out.reshape(pyramid.n_cells_, -1), out_mirrored.reshape(pyramid.n_cells_, -1)
    order, first = [], 0
    for nx, ny in PYRAMID_LEVELS:
        order.extend(first + row * nx + (nx - 1 - column) for row in range(ny) for column in range(nx))
        first += nx * ny
    np.testing.assert_array_equal(blocks_mirrored, blocks[order])


# ------------------------------------------------- near ties in the nearest words


def test_knn_weights_rank_near_ties_in_float64():
    """Every word has a twin a float32 ulp away in some coordinates: their distances to a
    descriptor differ by less than float32 resolves in ||c||^2 - 2 x.c, so the float32
    BLAS ranking splits twins at the m-th place wrongly on some rows. knn_weights ranks
    its candidates again in float64: float32 descriptors get the float64 neighbours and
    weights (on real data, 1 descriptor in 10,000 at K=1000 had its 5th and 6th words
    2.9e-9 apart; bench_encoders)."""
    from vladkit.kernels.soft import knn_weights
    from vladkit.kernels.nearest import nearest_k_words

    rng = np.random.default_rng(0)
    words = rng.standard_normal((20, 16)).astype(np.float32)
    away = np.where(rng.random(words.shape) < 0.5, -np.inf, np.inf).astype(np.float32)
    centers = np.concatenate([words, np.nextafter(words, away)])
    X = (words[rng.integers(0, 20, 5000)] + 0.5 * rng.standard_normal((5000, 16))).astype(np.float32)
    X64, centers64 = X.astype(np.float64), centers.astype(np.float64)
    m, alpha = 3, 0.7
    expected = ref.knn_weights(X64, centers64, m, alpha)
    truth = np.argsort(ref.squared_distances(X64, centers64), axis=1, kind="stable")[:, :m]
    # the case is there: float32 ranking alone picks other words on some rows
    plain = nearest_k_words(X, centers, m)
    assert (np.sort(plain, axis=1) != np.sort(truth, axis=1)).any(axis=1).sum() > 10

    for descriptors in (X, X64):
        neighbors, weights = knn_weights(descriptors, centers, m, alpha, exact_centers=centers64)
        np.testing.assert_array_equal(neighbors, truth)
        dense = np.zeros_like(expected)
        np.put_along_axis(dense, neighbors, weights.astype(np.float64), axis=1)
        np.testing.assert_allclose(dense, expected, rtol=1e-6, atol=1e-7)


def test_hard_assignment_gives_exact_ties_to_the_first_word():
    """Descriptors exactly as near to two or more words (integer coordinates: every
    product and distance is exact in float32 too) go to the lowest-numbered one, as
    numpy's argmin in the reference; word 5 repeats word 1, so it never gets a member."""
    from vladkit.kernels.nearest import nearest_words

    centers = np.array([[0, 0, 0, 0], [2, 0, 0, 0], [0, 2, 0, 0], [2, 2, 0, 0], [0, 0, 4, 0], [2, 0, 0, 0]])
    X = np.array([[1, 0, 0, 0],   # words 0, 1, 5 at 1
                  [2, 1, 0, 0],   # words 1, 3, 5 at 1
                  [1, 1, 0, 0],   # words 0, 1, 2, 3, 5 at 2
                  [2, 0, 0, 0],   # words 1 and 5 at 0
                  [1, 2, 0, 0],   # words 2 and 3 at 1
                  [0, 0, 2, 0],   # words 0 and 4 at 4
                  [0, 0, 3, 0]])  # word 4 alone
    truth = ref.hard_weights(X, centers).argmax(axis=1)
    assert truth.tolist() == [0, 1, 0, 1, 2, 0, 4]
    for dtype in (np.float32, np.float64):
        labels, distances = nearest_words(X.astype(dtype), centers.astype(dtype))
        np.testing.assert_array_equal(labels, truth)
        np.testing.assert_array_equal(distances, ref.squared_distances(X, centers).min(axis=1))
    # Through the encoders: the counts and residual sums of the reference's words.
    vocabulary = KMeansVocabulary.from_centers(centers.astype(np.float32))
    X32 = X.astype(np.float32)
    bof = BoFEncoder(vocabulary=vocabulary, norm=None).fit([X32]).transform([X32])[0]
    np.testing.assert_array_equal(bof, ref.bof(X, centers, ref.hard_weights, norm=None))
    vlad = VLADEncoder(vocabulary=vocabulary, power=None, intra_norm=False, l2=False).fit([X32]).transform([X32])[0]
    expected = ref.vlad(X.astype(np.float64), centers.astype(np.float64), ref.hard_weights(X, centers),
                        power=None, intra_norm=False, l2=False)
    np.testing.assert_array_equal(vlad, expected)


# ------------------------------------------------------------ soft assignment's alpha


def _netvlad_alpha(X, centers):
    """-log(0.01) / mean(d_2^2 - d_1^2), distances from explicit differences, in float64."""
    gaps = []
    for start in range(0, len(X), 2000):
        d = np.sort(ref.squared_distances(X[start:start + 2000], centers), axis=1)
        gaps.append(d[:, 1] - d[:, 0])
    return -np.log(0.01) / np.concatenate(gaps).mean()


@pytest.mark.parametrize("assignment", ["soft", "knn"])
def test_vlad_default_alpha_is_netvlads_rule(data, assignment):
    """Issue 12, finding 14: alpha=None is NetVLAD's -log(0.01) / mean(d_2^2 - d_1^2);
    "sigma", the former default 1 / (2 mean d_1^2), stays reachable."""
    X = np.concatenate(data["sets"])  # 348 rows: the whole of X is the sample
    centers = data["kmeans"].centers_
    d = np.sort(ref.squared_distances(X, centers), axis=1)
    expected = {None: -np.log(0.01) / (d[:, 1] - d[:, 0]).mean(), "sigma": 0.5 / d[:, 0].mean()}
    expected["netvlad"] = expected[None]
    assert expected[None] > 2 * expected["sigma"]  # the rules differ enough to tell apart
    for alpha, value in expected.items():
        encoder = VLADEncoder(vocabulary=data["kmeans"], assignment=assignment, alpha=alpha).fit(data["sets"])
        np.testing.assert_allclose(encoder.alpha_, value, rtol=1e-6)
    assert VLADEncoder(vocabulary=data["kmeans"], alpha=2.5, assignment=assignment).fit(data["sets"]).alpha_ == 2.5


@pytest.mark.parametrize("alpha", ["fuzzy", "NetVLAD", 0, -1.0, np.nan, np.inf, True, [1.0]])
def test_vlad_alpha_is_validated(data, alpha):
    with pytest.raises(ValueError, match=r"alpha must be a positive number, one of \('netvlad', 'sigma'\)"):
        VLADEncoder(vocabulary=data["kmeans"], assignment="soft", alpha=alpha).fit(data["sets"])


def test_alpha_sample_is_drawn_set_by_set():
    """A uniform sample of the pooled rows, drawn per set (row ids in column 0), the same
    for the same seed."""
    from vladkit.encoders._base import sample_rows

    sizes = [0, 5, 3000, 12_000, 20_000, 7]
    starts = np.cumsum([0] + sizes)
    sets = [np.column_stack([np.arange(a, b), np.ones((b - a, 3))]).astype(np.float32)
            for a, b in zip(starts[:-1], starts[1:])]
    sample = sample_rows(sets, 1000, seed=3)
    ids = sample[:, 0].astype(np.int64)
    assert sample.shape == (1000, 4) and sample.dtype == np.float32
    assert len(np.unique(ids)) == 1000 and np.all(np.diff(ids) > 0)  # distinct, in set order
    counts = np.histogram(ids, bins=starts)[0]
    expected = 1000 * np.array(sizes) / sum(sizes)
    assert np.all(np.abs(counts - expected) <= 5 * np.sqrt(expected) + 1)
    np.testing.assert_array_equal(sample_rows(sets, 1000, seed=3), sample)
    assert not np.array_equal(sample_rows(sets, 1000, seed=4), sample)
    np.testing.assert_array_equal(sample_rows(sets, 10**6, seed=3)[:, 0], np.arange(sum(sizes)))
    with pytest.raises(ValueError, match="no descriptors"):
        sample_rows([np.zeros((0, 4), np.float32)], 10, seed=0)


def test_vlad_alpha_estimate_does_not_copy_the_descriptors():
    """Issue 12, finding 11: fit with soft assignment used to concatenate every training
    descriptor before sampling (a copy of X); now only a bounded sample is allocated."""
    import tracemalloc

    rng = np.random.default_rng(0)
    sets = [rng.random((20_000, 128), dtype=np.float32) for _ in range(40)]
    total = sum(s.nbytes for s in sets)  # 410 MB
    vocabulary = KMeansVocabulary.from_centers(rng.random((16, 128), dtype=np.float32))
    encoder = VLADEncoder(vocabulary=vocabulary, assignment="soft", random_state=7)
    encoder.fit([sets[0][:100]])  # numba loads (or compiles) its kernels: not the fit's data
    tracemalloc.start()
    try:
        encoder.fit(sets)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # The sample is 20,000 x 128 float32 (10 MB, 2.5% of X), plus float64 blocks of it:
    # ~20 MB in all. The old code's copy of X peaked above X itself.
    assert peak < total / 10, f"peak {peak / 1e6:.0f} MB for {total / 1e6:.0f} MB of descriptors"
    sample = encoder._alpha_sample(sets)
    assert sample.shape == (20_000, 128)
    np.testing.assert_allclose(encoder.alpha_, _netvlad_alpha(sample, vocabulary.centers_), rtol=1e-7)
    # The same sample for the same random_state, another one for another.
    np.testing.assert_array_equal(encoder._alpha_sample(sets), sample)
    assert not np.array_equal(clone(encoder).set_params(random_state=8)._alpha_sample(sets), sample)


def test_bof_sigma_estimate_does_not_copy_the_descriptors():
    """The kernel codebook's sigma is estimated on a sample drawn image by image, as
    VLAD's alpha: never a concatenated copy of every training descriptor."""
    import tracemalloc

    rng = np.random.default_rng(1)
    sets = [rng.random((20_000, 128), dtype=np.float32) for _ in range(20)]
    total = sum(s.nbytes for s in sets)  # 205 MB
    vocabulary = KMeansVocabulary.from_centers(rng.random((16, 128), dtype=np.float32))
    encoder = BoFEncoder(vocabulary=vocabulary, assignment="soft")
    encoder.fit([sets[0][:100]])  # numba's kernels load: not the fit's data
    tracemalloc.start()
    try:
        encoder.fit(sets)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < total / 5, f"peak {peak / 1e6:.0f} MB for {total / 1e6:.0f} MB of descriptors"
    assert 0 < encoder.sigma_ < np.sqrt(128)
