import json
import zipfile

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.cluster import KMeans
from sklearn.mixture import GaussianMixture

from vladkit import (
    DescriptorSampler,
    GMMVocabulary,
    KMeansVocabulary,
    LocalFeatures,
    VocabularyFileError,
    load_vocabulary,
)


def blobs(n=6000, dim=24, n_centers=20, seed=0, dtype=np.float32):
    """Clustered descriptors with uneven spreads, a stand-in for SIFT's structure."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 4, (n_centers, dim))
    spreads = rng.uniform(0.5, 2.0, (n_centers, dim))
    labels = rng.integers(0, n_centers, n)
    return (centers[labels] + spreads[labels] * rng.standard_normal((n, dim))).astype(dtype)


def per_image(X, n_images=30):
    return np.array_split(X, n_images)


# ---------------------------------------------------------------- agreement with sklearn


def test_kmeans_inertia_within_one_percent_of_sklearn():
    # Same settings on both sides, on data without a few obvious clusters (like SIFT),
    # where k-means' local optima are close; compared with the median of three seeds.
    X = blobs(8000, n_centers=200)
    ours = KMeansVocabulary(16, max_descriptors=len(X), n_init=4, random_state=3).fit(X)
    ours_inertia = -ours.score(X)
    theirs = np.median([KMeans(16, n_init=4, max_iter=100, tol=1e-4, random_state=s).fit(X).inertia_
                        for s in range(3)])
    assert abs(ours_inertia - theirs) / theirs < 0.01
    np.testing.assert_allclose(ours.inertia_, ours_inertia, rtol=1e-5)


def test_gmm_log_likelihood_within_one_percent_of_sklearn():
    X = blobs(8000, n_centers=200)
    ours = GMMVocabulary(8, max_descriptors=len(X), random_state=0).fit(X)
    theirs = GaussianMixture(8, covariance_type="diag", random_state=0).fit(X)
    ours_ll, theirs_ll = ours.score(X), theirs.score(X)
    assert abs(ours_ll - theirs_ll) / abs(theirs_ll) < 0.01
    # Our own likelihood agrees with scikit-learn's formula for our model.
    twin = GaussianMixture(8, covariance_type="diag")
    twin.weights_, twin.means_, twin.covariances_ = ours.weights_, ours.means_, ours.covariances_
    twin.precisions_cholesky_ = 1 / np.sqrt(ours.covariances_.astype(np.float64))
    np.testing.assert_allclose(ours.score_samples(X[:500]), twin.score_samples(X[:500]), rtol=1e-6)


def test_predict_is_brute_force_nearest_center():
    X = blobs(2000)
    vocab = KMeansVocabulary(12, random_state=0).fit(X)
    distances = ((X[:, None, :].astype(np.float64) - vocab.centers_[None]) ** 2).sum(-1)
    assert np.mean(vocab.predict(X) == distances.argmin(1)) > 0.999  # float32 near-ties only
    np.testing.assert_allclose(vocab.transform(X[:100]) ** 2, distances[:100], rtol=1e-3, atol=1e-2)


def test_gmm_posteriors_match_the_formula():
    X = blobs(1500, dim=8)
    vocab = GMMVocabulary(5, random_state=0).fit(X)
    mu, var, pi = (a.astype(np.float64) for a in (vocab.means_, vocab.covariances_, vocab.weights_))
    log_p = (np.log(pi) - 0.5 * np.log(2 * np.pi * var).sum(1)
             - 0.5 * (((X[:, None, :] - mu) ** 2) / var).sum(-1))
    q = np.exp(log_p - log_p.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    np.testing.assert_allclose(vocab.predict_proba(X), q, atol=1e-8)
    assert np.all(vocab.predict(X) == q.argmax(1))


# --------------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("make", [
    lambda: KMeansVocabulary(10, random_state=7, max_descriptors=3000),
    lambda: KMeansVocabulary(10, random_state=7, pca=8, whiten=True, algorithm="minibatch"),
    lambda: GMMVocabulary(6, random_state=7, pca=10, max_per_image=50),
], ids=["kmeans", "kmeans-pca-minibatch", "gmm-pca"])
def test_same_seed_gives_identical_files(tmp_path, make):
    sets = per_image(blobs())
    make().fit(sets).save(tmp_path / "a.npz")
    make().fit(sets).save(tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    other = make().set_params(random_state=8).fit(sets)
    other.save(tmp_path / "c.npz")
    assert (tmp_path / "a.npz").read_bytes() != (tmp_path / "c.npz").read_bytes()


@pytest.mark.parametrize("vocab", [
    KMeansVocabulary(10, random_state=0, pca=12),
    GMMVocabulary(6, random_state=0),
], ids=["kmeans", "gmm"])
def test_save_load_predict_identical(tmp_path, vocab):
    X = blobs()
    vocab.fit(per_image(X))
    vocab.save(tmp_path / "v.npz")
    loaded = load_vocabulary(tmp_path / "v.npz")
    assert type(loaded) is type(vocab)
    assert loaded.get_params() == vocab.get_params()
    np.testing.assert_array_equal(loaded.predict(X), vocab.predict(X))
    np.testing.assert_array_equal(loaded.transform(X[:100]), vocab.transform(X[:100]))
    np.testing.assert_array_equal(loaded.project(X[:10]), vocab.project(X[:10]))
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left over


def test_pca_is_the_principal_subspace():
    X = blobs(4000, dim=16)
    vocab = KMeansVocabulary(4, pca=5, random_state=0).fit(X)
    projected = vocab.project(X).astype(np.float64)
    covariance = np.cov(X.astype(np.float64), rowvar=False)
    top = np.sort(np.linalg.eigvalsh(covariance))[::-1][:5]
    np.testing.assert_allclose(projected.var(axis=0, ddof=1), top, rtol=1e-3)
    whitened = KMeansVocabulary(4, pca=5, whiten=True, random_state=0).fit(X).project(X)
    np.testing.assert_allclose(whitened.var(axis=0, ddof=1), 1.0, rtol=1e-3)


# ---------------------------------------------------------------------------- sampling


def test_sampler_bounds_and_order_independence():
    sets = [np.full((n, 4), i, np.float32) for i, n in enumerate([5, 500, 0, 80, 3000])]
    forward = DescriptorSampler(len(sets), 400, max_per_image=None, seed=1)
    for i, s in enumerate(sets):
        forward.add(i, s)
    backward = DescriptorSampler(len(sets), 400, max_per_image=None, seed=1)
    for i in reversed(range(len(sets))):
        backward.add(i, sets[i])
    a, b = forward.sample(), backward.sample()
    np.testing.assert_array_equal(a, b)
    counts = np.bincount(a[:, 0].astype(int), minlength=5)
    assert list(counts) == [5, 80, 0, 80, 80]  # ceil(400 / 5) per image at most
    capped = DescriptorSampler(len(sets), 400, max_per_image=10, seed=1)
    for i, s in enumerate(sets):
        capped.add(i, s)
    assert list(np.bincount(capped.sample()[:, 0].astype(int), minlength=5)) == [5, 10, 0, 10, 10]


def test_sampler_trims_to_max_descriptors():
    # ceil(100 / 7) = 15 per image, 7 * 15 = 105 > 100: the pooled sample is trimmed.
    sampler = DescriptorSampler(7, 100, seed=0)
    for i in range(7):
        sampler.add(i, np.random.default_rng(i).standard_normal((40, 3)))
    sample = sampler.sample()
    assert sample.shape == (100, 3)
    assert len(np.unique(sample, axis=0)) == 100  # drawn without replacement


def test_fit_accepts_local_features_and_respects_max_descriptors():
    X = blobs(3000, dim=8)
    features = [LocalFeatures(part, np.zeros((len(part), 2), np.float32), np.ones(len(part), np.float32), (10, 10))
                for part in per_image(X, 10)]
    vocab = KMeansVocabulary(5, max_descriptors=1000, random_state=0).fit(features)
    assert vocab.n_training_descriptors_ == 1000
    assert vocab.centers_.shape == (5, 8) and vocab.centers_.dtype == np.float32


def test_float64_is_kept():
    X = blobs(1000, dim=6, dtype=np.float64)
    assert KMeansVocabulary(4, random_state=0).fit(X).centers_.dtype == np.float64
    assert GMMVocabulary(3, random_state=0).fit(X).means_.dtype == np.float64


# --------------------------------------------------------------------------- bad input


def test_fewer_descriptors_than_clusters():
    with pytest.raises(ValueError, match="only 30 descriptors to train n_clusters=64"):
        KMeansVocabulary(64).fit([blobs(10), blobs(20)])
    with pytest.raises(ValueError, match="n_components=64"):
        GMMVocabulary(64).fit(blobs(30))


def test_non_finite_descriptors_name_the_image():
    sets = per_image(blobs(600), 6)
    sets[4] = sets[4].copy()
    sets[4][3, 2] = np.nan
    with pytest.raises(ValueError, match="image 4: descriptors contain NaN or inf"):
        KMeansVocabulary(4).fit(sets)
    sets[4][3, 2] = np.inf
    with pytest.raises(ValueError, match="image 4"):
        GMMVocabulary(4).fit(sets)


def test_identical_descriptors_are_refused_clearly():
    same = np.ones((500, 8), np.float32)
    with pytest.raises(ValueError, match="fewer distinct values than n_clusters=4"):
        KMeansVocabulary(4, random_state=0).fit(same)
    with pytest.raises(ValueError, match="all descriptors are identical"):
        GMMVocabulary(4, random_state=0).fit(same)


def test_gmm_variances_stay_positive_on_degenerate_dimensions():
    X = blobs(2000, dim=6)
    X[:, 2] = 5.0  # a constant dimension
    X[:1000, 4] = 1.0  # half the data on one value
    vocab = GMMVocabulary(6, random_state=0).fit(X)
    assert np.all(np.isfinite(vocab.covariances_)) and np.all(vocab.covariances_ > 0)
    floor = 1e-4 * X.var(axis=0).max()
    assert vocab.covariances_.min() >= floor * 0.999
    assert np.all(np.isfinite(vocab.predict_proba(X))) and np.all(np.isfinite(vocab.score_samples(X)))


def test_dimension_mismatch(tmp_path):
    vocab = KMeansVocabulary(4, random_state=0).fit(blobs(500, dim=8))
    with pytest.raises(ValueError, match="X has 6 features, but KMeansVocabulary is expecting 8 features"):
        vocab.predict(np.zeros((3, 6), np.float32))
    vocab.save(tmp_path / "v.npz")
    with pytest.raises(VocabularyFileError, match="trained on 8-dimensional descriptors.*dimension 128"):
        load_vocabulary(tmp_path / "v.npz", descriptor_dim=128)
    assert load_vocabulary(tmp_path / "v.npz", descriptor_dim=8).descriptor_dim_ == 8


def test_unfitted_vocabulary_says_so():
    from sklearn.exceptions import NotFittedError
    with pytest.raises(NotFittedError):
        KMeansVocabulary(4).predict(np.zeros((2, 3)))
    with pytest.raises(NotFittedError):
        GMMVocabulary(4).save("never.npz")


def test_bad_parameters():
    with pytest.raises(ValueError, match="n_clusters"):
        KMeansVocabulary(0).fit(blobs(100))
    with pytest.raises(ValueError, match="algorithm"):
        KMeansVocabulary(4, algorithm="fast").fit(blobs(100))
    with pytest.raises(ValueError, match="pca=40 exceeds the descriptor dimension 24"):
        KMeansVocabulary(4, pca=40).fit(blobs(100))
    with pytest.raises(ValueError, match="covariance_floor"):
        GMMVocabulary(4, covariance_floor=0).fit(blobs(100))


# -------------------------------------------------------------------------------- files


def _rewrite(src, dst, edit_metadata=None, extra=None):
    with np.load(src, allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files}
    if edit_metadata:
        meta = json.loads(str(arrays["metadata"]))
        edit_metadata(meta)
        arrays["metadata"] = np.array(json.dumps(meta))
    arrays.update(extra or {})
    np.savez(dst, **arrays)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "v.npz"
    KMeansVocabulary(4, random_state=0).fit(blobs(500, dim=8)).save(path)
    return path


def test_file_with_pickled_objects_is_refused(saved, tmp_path):
    bad = tmp_path / "pickled.npz"
    _rewrite(saved, bad, extra={"payload": np.array([{"run": "code"}], dtype=object)})
    with pytest.raises(VocabularyFileError, match="contains pickled Python objects .*'payload'"):
        load_vocabulary(bad)


def test_wrong_format_version_is_refused(saved, tmp_path):
    bad = tmp_path / "future.npz"
    _rewrite(saved, bad, edit_metadata=lambda m: m.update(format_version=99))
    with pytest.raises(VocabularyFileError, match="format version 99; this vladkit .* reads version 1"):
        load_vocabulary(bad)


def test_inconsistent_shapes_are_refused(saved, tmp_path):
    bad = tmp_path / "shapes.npz"
    _rewrite(saved, bad, edit_metadata=lambda m: m.update(dim=16, descriptor_dim=16))
    with pytest.raises(VocabularyFileError, match="centers_ has shape"):
        load_vocabulary(bad)


def test_other_files_are_refused(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("hello")
    with pytest.raises(VocabularyFileError, match="not a vocabulary file"):
        load_vocabulary(text)
    plain = tmp_path / "plain.npz"
    np.savez(plain, centers_=np.zeros((4, 8)))
    with pytest.raises(VocabularyFileError, match="no metadata"):
        load_vocabulary(plain)


def test_file_is_plain_npz(saved):
    with zipfile.ZipFile(saved) as archive:
        assert sorted(archive.namelist()) == ["centers_.npy", "metadata.npy"]
    meta = load_vocabulary(saved).metadata_
    assert meta["kind"] == "kmeans" and meta["n_words"] == 4 and meta["descriptor_dim"] == 8


def test_clone_keeps_parameters():
    vocab = GMMVocabulary(12, pca=64, covariance_floor=1e-3, random_state=5)
    assert clone(vocab).get_params() == vocab.get_params()


# -------------------------------------------- clones and set_params of a fitted vocabulary


@pytest.mark.parametrize("make", [
    lambda: KMeansVocabulary(8, random_state=0, pca=12, descriptor_type="blobs"),
    lambda: GMMVocabulary(4, random_state=0),
], ids=["kmeans-pca", "gmm"])
def test_clone_of_a_fitted_vocabulary_is_an_independent_fitted_copy(make, tmp_path):
    import pickle

    X = blobs(2000)
    vocab = make().fit(per_image(X))
    copy = clone(vocab)
    # Issue 12, finding 7: clone returned the vocabulary itself, so the clone's parameters
    # were the user's.
    assert copy is not vocab and type(copy) is type(vocab)
    assert copy.get_params() == vocab.get_params()
    for name in vocab._word_arrays + ("pca_components_", "pca_mean_"):
        ours, theirs = getattr(copy, name), getattr(vocab, name)
        if theirs is None:
            assert ours is None
        else:
            np.testing.assert_array_equal(ours, theirs)
            assert not np.shares_memory(ours, theirs)
    np.testing.assert_array_equal(copy.predict(X[:300]), vocab.predict(X[:300]))
    # A setting that does not shape the words is allowed on the clone, not seen by the original.
    copy.set_params(descriptor_type="DenseSIFT(root=True)", n_jobs=1)
    assert vocab.descriptor_type == make().descriptor_type and vocab.n_jobs is None
    copy.save(tmp_path / "copy.npz")
    assert load_vocabulary(tmp_path / "copy.npz").descriptor_type == "DenseSIFT(root=True)"
    restored = pickle.loads(pickle.dumps(copy))
    np.testing.assert_array_equal(restored.predict(X[:300]), vocab.predict(X[:300]))
    # An unfitted vocabulary still clones unfitted.
    assert not hasattr(clone(make()), "descriptor_dim_")


def test_set_params_refuses_to_change_the_training_of_a_fitted_vocabulary(tmp_path):
    sets = per_image(blobs(2000))
    vocab = KMeansVocabulary(8, random_state=0).fit(sets)
    centers = vocab.centers_.copy()
    for name, value in [("n_clusters", 32), ("pca", 4), ("random_state", 1), ("max_iter", 5)]:
        with pytest.raises(ValueError, match=rf"cannot set {name}={value!r} on this fitted "
                                             r"KMeansVocabulary.*pass an unfitted KMeansVocabulary"):
            vocab.set_params(**{name: value})
    with pytest.raises(ValueError, match="n_components=16 on this fitted GMMVocabulary"):
        GMMVocabulary(2, random_state=0).fit(sets).set_params(n_components=16)
    # Nothing changed: the words and their description agree, in memory and in the file.
    assert vocab.n_clusters == 8 and vocab.pca is None and vocab.random_state == 0
    np.testing.assert_array_equal(vocab.centers_, centers)
    vocab.save(tmp_path / "v.npz")
    assert load_vocabulary(tmp_path / "v.npz").metadata_["params"]["n_clusters"] == 8
    # The current value, or a setting that does not shape the words, is fine.
    vocab.set_params(n_clusters=np.int64(8), random_state=0, n_jobs=2, descriptor_type="SIFT")
    assert vocab.n_jobs == 2 and vocab.descriptor_type == "SIFT"
    # An unfitted vocabulary takes any parameter.
    assert KMeansVocabulary(8).set_params(n_clusters=32).n_clusters == 32


# ------------------------------------------------------ faiss: large codebooks (issue 32)


@pytest.fixture(scope="module")
def rootsift():
    """Dense RootSIFT (step 8) of 8 15-Scene training images, 4 classes x 2."""
    from conftest import scene15_train_photos
    from vladkit import DenseSIFT

    chosen = scene15_train_photos(4, 2)
    features = DenseSIFT(root=True, step=8, n_jobs=2).transform(chosen)
    return chosen, np.concatenate([f.descriptors for f in features])


def test_faiss_words_are_as_good_as_sklearns(rootsift):
    from threadpoolctl import threadpool_limits

    X = rootsift[1][:10000]
    vocab = KMeansVocabulary(32, algorithm="faiss", max_descriptors=len(X), random_state=0).fit(X)
    assert vocab.algorithm_ == "faiss" and vocab.n_iter_ == 20  # max_iter="auto"
    assert vocab.centers_.shape == (32, 128) and vocab.centers_.dtype == np.float32
    assert len(np.unique(vocab.predict(X))) == 32  # every word used
    np.testing.assert_allclose(vocab.inertia_, -vocab.score(X), rtol=1e-5)
    with threadpool_limits(1):  # scikit-learn's OpenMP threads crawl on a busy machine
        theirs = np.median([KMeans(32, n_init=1, max_iter=100, tol=1e-4, random_state=s).fit(X).inertia_
                            for s in range(3)])
    assert abs(vocab.inertia_ - theirs) / theirs < 0.03  # measured: +0.6 %
    # max_iter and n_init are faiss's iterations and restarts; float64 stays float64.
    longer = KMeansVocabulary(64, algorithm="faiss", max_iter=5, n_init=2, max_descriptors=len(X),
                              random_state=0).fit(X.astype(np.float64))
    assert longer.n_iter_ == 5 and longer.centers_.dtype == np.float64


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_faiss_is_reproducible(rootsift, tmp_path, n_jobs):
    # Same descriptors, seed and threads: the same file. (Another thread count may round
    # faiss's products otherwise and end elsewhere: the docstring says so.)
    X = rootsift[1][:6000]

    def train(seed=7):
        return KMeansVocabulary(32, algorithm="faiss", max_descriptors=len(X), random_state=seed,
                                n_jobs=n_jobs).fit(X)

    train().save(tmp_path / "a.npz")
    train().save(tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    assert not np.array_equal(train(seed=8).centers_, load_vocabulary(tmp_path / "a.npz").centers_)


def test_auto_uses_faiss_from_the_threshold_on(monkeypatch):
    from sklearn.cluster import KMeans as SKLearnKMeans

    from vladkit.vocabulary import kmeans

    X = blobs(3000, n_centers=50)
    monkeypatch.setattr(kmeans, "FAISS_THRESHOLD", 12)
    assert KMeansVocabulary(12, random_state=0).fit(X).algorithm_ == "faiss"
    # Below the threshold nothing changed: scikit-learn's KMeans as before, bit for bit.
    below = KMeansVocabulary(11, max_descriptors=len(X), random_state=0).fit(X)
    assert below.algorithm_ == "lloyd" and below.max_iter == "auto"
    twin = SKLearnKMeans(11, n_init=1, max_iter=100, tol=1e-4, random_state=below._seeds()[1]).fit(X)
    np.testing.assert_array_equal(below.centers_, twin.cluster_centers_.astype(np.float32))


def test_faiss_vocabulary_file_records_its_algorithm(tmp_path, saved):
    X = blobs(3000, n_centers=50)
    vocab = KMeansVocabulary(16, algorithm="faiss", pca=12, random_state=0).fit(per_image(X))
    vocab.save(tmp_path / "f.npz")
    loaded = load_vocabulary(tmp_path / "f.npz")
    assert loaded.algorithm_ == "faiss" and loaded.metadata_["algorithm"] == "faiss"
    assert loaded.get_params() == vocab.get_params()
    np.testing.assert_array_equal(loaded.predict(X), vocab.predict(X))
    assert load_vocabulary(saved).algorithm_ == "lloyd"
    # A file written before the field existed still loads.
    _rewrite(saved, tmp_path / "old.npz", lambda meta: meta.pop("algorithm"))
    assert load_vocabulary(tmp_path / "old.npz").algorithm_ is None
    assert KMeansVocabulary.from_centers(vocab.centers_).algorithm_ is None


def test_faiss_refuses_what_sklearn_refuses():
    with pytest.raises(ValueError, match="fewer distinct values than n_clusters=4"):
        KMeansVocabulary(4, algorithm="faiss", random_state=0).fit(np.ones((500, 8), np.float32))
    with pytest.raises(ValueError, match="'minibatch' or 'faiss', got 'fast'"):
        KMeansVocabulary(4, algorithm="fast").fit(blobs(100))
    with pytest.raises(ValueError, match="max_iter must be a positive integer or 'auto', got 'often'"):
        KMeansVocabulary(4, max_iter="often").fit(blobs(100))


def test_vocab_build_algorithm_option(rootsift, tmp_path):
    import os

    from conftest import cli
    from vladkit._util.defaults import FAISS_THRESHOLD

    folder = tmp_path / "images"
    folder.mkdir()
    for path in rootsift[0][:4]:
        os.symlink(os.path.abspath(path), folder / os.path.basename(path))
    out = tmp_path / "v.npz"
    common = [folder, "--root", "--step", "8", "--max-descriptors", "4000", "-q", "-o", out]
    code, stdout, stderr = cli("vocab", "build", "-k", "16", "--algorithm", "faiss", *common)
    assert code == 0, stderr
    assert load_vocabulary(out).algorithm_ == "faiss"
    code, stdout, _ = cli("vocab", "info", out)
    assert code == 0 and "faiss" in stdout
    code, _, stderr = cli("vocab", "build", "-k", "16", "--algorithm", "sklearn", *common)
    assert code == 0, stderr
    assert load_vocabulary(out).algorithm_ == "lloyd"
    code, _, stderr = cli("vocab", "build", "-k", "4", "--kind", "gmm", "--algorithm", "faiss", *common)
    assert code == 2 and "--kind kmeans" in stderr
    code, stdout, _ = cli("vocab", "build", "--help")
    assert f"auto: faiss from -k {FAISS_THRESHOLD} on" in " ".join(stdout.split())
