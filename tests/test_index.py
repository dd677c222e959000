import json
import os

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from threadpoolctl import threadpool_limits

import vladkit.retrieval.index as index_module
from vladkit.retrieval.index_files import IndexFileError
from vladkit.retrieval.whitening import PCAWhitening
from vladkit.retrieval.index import VectorIndex

faiss = index_module.faiss


@pytest.fixture(scope="module", autouse=True)
def one_openmp_thread():
    # faiss shares scikit-learn's libgomp, which conftest loads before vladkit can set
    # OMP_WAIT_POLICY=PASSIVE: on a busy machine, spinning OpenMP threads make k-means
    # training 6x slower (measured 6.4 s vs 0.9 s). One thread has nothing to spin for.
    with threadpool_limits(limits=1, user_api="openmp"):
        yield


def unit(X):
    X = np.asarray(X, dtype=np.float64)
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)


def clustered(n, dim=64, n_centers=40, seed=0):
    """Unit vectors around 40 fixed centres: structure a product quantizer can learn."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).standard_normal((n_centers, dim))
    labels = rng.integers(0, n_centers, n)
    return unit(centers[labels] + 0.6 * rng.standard_normal((n, dim)))


def names(n, prefix="img"):
    return [f"{prefix}{i}.jpg" for i in range(n)]


def reference_search(X, Q, k):
    """Brute force in float64: scores descending, exact ties by insertion order."""
    S = np.asarray(Q, np.float64) @ np.asarray(X, np.float64).T
    order = np.lexsort((np.broadcast_to(np.arange(S.shape[1]), S.shape), -S), axis=-1)[:, :k]
    return np.take_along_axis(S, order, axis=1), order


def as_positions(ids):
    return np.array([[int(i[3:-4]) for i in row] for row in ids])


@pytest.fixture(scope="module")
def data():
    return clustered(2000), clustered(200, seed=1)


@pytest.fixture(scope="module")
def pq_index(data):
    X, _ = data
    return VectorIndex("pq", pq="16x8").train(X).add(X, names(len(X)))


@pytest.fixture(scope="module")
def ivfpq_index(data):
    X, _ = data
    return VectorIndex("ivfpq", pq="16x8", nlist=32, nprobe=4).train(X).add(X, names(len(X)))


def check_valid_top_k(scores, ids, exact_scores, k):
    """Returned items are a top k of ``exact_scores`` (up to float32 rounding)."""
    positions = as_positions(ids)
    assert scores.shape == positions.shape == (len(exact_scores), k)
    got = np.take_along_axis(exact_scores, positions, axis=1)
    np.testing.assert_allclose(scores, got, atol=2e-5)
    best = -np.sort(-exact_scores, axis=1)[:, :k]
    np.testing.assert_allclose(scores, best, atol=2e-5)
    assert all(len(set(row)) == k for row in ids)


# ------------------------------------------------------------------ flat, exact search


def test_flat_equals_brute_force():
    rng = np.random.default_rng(0)
    X, Q = unit(rng.standard_normal((500, 32))), unit(rng.standard_normal((30, 32)))
    index = VectorIndex().add(X, names(500))
    scores, ids = index.search(Q, k=7)
    ref_scores, ref_order = reference_search(X, Q, 7)
    assert scores.dtype == np.float32 and scores.shape == (30, 7)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    np.testing.assert_array_equal(as_positions(ids), ref_order)
    assert index.bytes_per_vector == 4 * 32 and index.dim == 32 and len(index) == 500


@pytest.mark.parametrize("n_queries", [3, 40])  # faiss switches to BLAS from 20 queries
def test_flat_ties_are_broken_by_insertion_order(n_queries):
    # Small integer vectors: every product is exact in float32 and ties abound (also
    # exact duplicates); faiss returns tied vectors in no defined order.
    rng = np.random.default_rng(1)
    X = rng.integers(-1, 2, (60, 6)).astype(np.float32)
    X[30:40] = X[0]
    Q = rng.integers(-1, 2, (n_queries, 6)).astype(np.float32)
    index = VectorIndex().add(X, names(60))
    for k in (1, 3, 5, 17, 59, 60, 100):
        scores, ids = index.search(Q, k)
        ref_scores, ref_order = reference_search(X, Q, min(k, 60))
        np.testing.assert_array_equal(scores, ref_scores)
        np.testing.assert_array_equal(as_positions(ids), ref_order)
    # A query's result does not depend on the rest of the batch.
    single = index.search(Q[1:2], 5)
    assert single[1][0] == index.search(Q, 5)[1][1]


def test_ties_cut_at_the_kth_place_are_completed(monkeypatch):
    # faiss may return any of the vectors tied at the k-th place; simulate the worst case
    # (ties returned latest-inserted first) and check the earliest-inserted are kept.
    index = VectorIndex().add(np.ones((6, 4)), names(6))
    calls = []

    def reversed_ties(Q, kk, nprobe):
        calls.append(kk)
        return np.ones((len(Q), kk), np.float32), np.tile(np.arange(5, 5 - kk, -1), (len(Q), 1))

    monkeypatch.setattr(index, "_faiss_search", reversed_ties)
    scores, ids = index.search(np.ones((2, 4)), k=2)
    assert ids == [names(2), names(2)] and np.all(scores == 1)
    assert calls == [3, 6]  # k + 1, then twice that (capped at 6) since the tie went on


def test_k_larger_than_index_and_empty_results():
    X = unit(np.random.default_rng(2).standard_normal((4, 8)))
    index = VectorIndex().add(X, names(4))
    scores, ids = index.search(X, k=10)
    assert scores.shape == (4, 4) and all(len(row) == 4 for row in ids)
    assert [row[0] for row in ids] == names(4)
    assert index.search(X[:0], k=3)[0].shape == (0, 3)
    empty = VectorIndex().train(X)
    scores, ids = empty.search(X, k=3)
    assert scores.shape == (4, 0) and ids == [[], [], [], []]


# ---------------------------------------------------------------- product quantization


def test_bytes_per_vector():
    assert VectorIndex("pq", pq="16x8").bytes_per_vector == 16
    assert VectorIndex("ivfpq", pq="8x8").bytes_per_vector == 8
    assert VectorIndex("pq", pq="16x4").bytes_per_vector == 8
    assert VectorIndex("pq", pq="3x4").bytes_per_vector == 2


def test_pq_recall_and_adc_scores(data, pq_index):
    X, Q = data
    assert pq_index.bytes_per_vector == 16 and pq_index.faiss_index.code_size == 16
    exact = Q.astype(np.float64) @ X.T.astype(np.float64)
    true_nn = exact.argmax(axis=1)
    scores, ids = pq_index.search(Q, k=10)
    positions = as_positions(ids)
    recall = np.mean([true_nn[i] in positions[i] for i in range(len(Q))])
    assert recall >= 0.75  # measured 0.875; a random ranking gives 0.005
    error = np.abs(scores - np.take_along_axis(exact, positions, axis=1))
    assert error.mean() < 0.03 and error.max() < 0.2  # measured 0.020 / 0.097 (scores ~0.8)
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_pq_search_is_exact_search_over_the_decoded_vectors(data, pq_index):
    # Asymmetric distance computation: the query is not quantized, so the score is the
    # exact inner product of the query with the vector's reconstruction.
    X, Q = data
    decoded = pq_index.faiss_index.reconstruct_n(0, len(X))
    scores, ids = pq_index.search(Q, k=10)
    check_valid_top_k(scores, ids, Q.astype(np.float64) @ decoded.T.astype(np.float64), 10)


def test_ivfpq_recall_and_adc_scores(data, ivfpq_index):
    X, Q = data
    assert ivfpq_index.nlist_ == 32 and ivfpq_index.bytes_per_vector == 16
    exact = Q.astype(np.float64) @ X.T.astype(np.float64)
    true_nn = exact.argmax(axis=1)
    scores, ids = ivfpq_index.search(Q, k=10)
    positions = as_positions(ids)
    assert np.mean([true_nn[i] in positions[i] for i in range(len(Q))]) >= 0.8  # measured 0.93
    error = np.abs(scores - np.take_along_axis(exact, positions, axis=1))
    assert error.mean() < 0.03 and error.max() < 0.2


def test_ivfpq_with_all_lists_equals_exhaustive_adc(data, ivfpq_index):
    X, Q = data
    faiss_index = faiss.clone_index(ivfpq_index.faiss_index)
    faiss_index.make_direct_map()
    decoded = faiss_index.reconstruct_n(0, len(X))  # centroid + decoded residual
    exact_adc = Q.astype(np.float64) @ decoded.T.astype(np.float64)
    ivfpq_index.nprobe = 32
    try:
        scores, ids = ivfpq_index.search(Q, k=10)
    finally:
        ivfpq_index.nprobe = 4
    check_valid_top_k(scores, ids, exact_adc, 10)
    # Fewer lists: a subset is scanned, so the best score can only be lower or equal.
    few = ivfpq_index.search(Q, k=10)[0]
    assert np.all(few[:, 0] <= scores[:, 0] + 1e-6)


def test_default_nlist_and_full_rows_when_probed_lists_are_short(data):
    X, Q = data
    index = VectorIndex("ivfpq", pq="8x4", nprobe=1).train(X[:1600])
    assert index.nlist_ == round(4 * np.sqrt(1600)) == 160
    index.add(X[:300], names(300))  # about 2 vectors per list: nprobe=1 finds too few
    probes, real_search = [], index._faiss_search
    index._faiss_search = lambda Q, kk, nprobe: probes.append(nprobe) or real_search(Q, kk, nprobe)
    scores, ids = index.search(Q, k=25)
    assert probes[0] == 1 and set(probes) <= {1, 2, 4, 8, 16, 32, 64, 128, 160} and len(set(probes)) > 2
    assert scores.shape == (len(Q), 25) and all(len(row) == len(set(row)) == 25 for row in ids)
    assert np.all(np.isfinite(scores)) and np.all(np.diff(scores, axis=1) <= 0)


def test_pq_ties_between_identical_codes_follow_insertion_order():
    X = clustered(300, dim=16, seed=3)
    index = VectorIndex("pq", pq="4x4").train(X)
    index.add(np.repeat(X[:5], 4, axis=0), [f"v{i}-copy{c}" for i in range(5) for c in range(4)])
    for k in (1, 2, 3, 6):
        _, ids = index.search(X[:5], k)
        for i, row in enumerate(ids):
            assert row[: min(k, 4)] == [f"v{i}-copy{c}" for c in range(min(k, 4))]


# ---------------------------------------------------------------------- PCA whitening


def reference_whitening(X_train, X, n_components, whiten=True, eps=1e-9, power=None):
    X_train = X_train.astype(np.float64)
    mean = X_train.mean(axis=0)
    covariance = np.cov(X_train - mean, rowvar=False)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1][:n_components]
    components, variances = eigenvectors[:, order].T, eigenvalues[order]
    y = (X.astype(np.float64) - mean) @ components.T
    if whiten:
        y /= (variances + eps) ** (0.5 if whiten is True else whiten)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    if power is not None:
        y = np.sign(y) * np.abs(y) ** power
        y /= np.linalg.norm(y, axis=1, keepdims=True)
    return y, components, variances


@pytest.fixture(scope="module")
def anisotropic():
    rng = np.random.default_rng(4)
    scales = np.geomspace(5.0, 0.05, 24)
    mixing = np.linalg.qr(rng.standard_normal((24, 24)))[0]
    X = (rng.standard_normal((400, 24)) * scales) @ mixing + 3.0
    return X, (rng.standard_normal((50, 24)) * scales) @ mixing + 3.0


@pytest.mark.parametrize("whiten", [True, False, 0.25])
@pytest.mark.parametrize("power", [None, 0.5])
def test_whitening_equals_numpy_reference(anisotropic, whiten, power):
    X, X_new = anisotropic
    model = PCAWhitening(10, whiten=whiten, power=power).fit(X)
    for data in (X, X_new):
        ref, components, variances = reference_whitening(X, data, 10, whiten=whiten, power=power)
        signs = np.sign(np.sum(model.components_ * components, axis=1))
        np.testing.assert_allclose(np.abs(np.sum(model.components_ * components, axis=1)), 1, atol=1e-5)
        np.testing.assert_allclose(model.explained_variance_, variances, rtol=1e-8)
        out = model.transform(data)
        assert out.dtype == np.float32 and out.shape == (len(data), 10)
        np.testing.assert_allclose(out, ref * signs, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-6)


def test_whitening_makes_the_training_set_isotropic(anisotropic):
    X, _ = anisotropic
    # Before the L2 step, whitened training vectors have identity covariance.
    model = PCAWhitening(10).fit(X)
    raw = (X - model.mean_) @ model.projection_.T.astype(np.float64)
    np.testing.assert_allclose(np.cov(raw, rowvar=False), np.eye(10), atol=1e-4)
    assert not np.allclose(model.transform(X), PCAWhitening(10, whiten=False).fit(X).transform(X), atol=1e-3)


def test_whitening_zero_rows_float64_and_power(anisotropic):
    X, _ = anisotropic
    model = PCAWhitening(6, power=0.5).fit(X.astype(np.float32))
    batch = np.vstack([np.zeros(24), X[:3]])
    out = model.transform(batch)
    assert np.all(out[0] == 0) and np.all(np.isfinite(out))
    np.testing.assert_allclose(out[1:], model.transform(X[:3].astype(np.float32)), atol=1e-6)
    assert model.fit_transform(X).dtype == np.float32


def test_whitening_parameters_and_sklearn_conventions(anisotropic):
    X, _ = anisotropic
    with pytest.raises(ValueError, match=r"n_components=30.*min\(400, 24\) = 24"):
        PCAWhitening(30).fit(X)
    with pytest.raises(ValueError, match="n_components"):
        PCAWhitening(0).fit(X)
    with pytest.raises(ValueError, match="power"):
        PCAWhitening(4, power=-1).fit(X)
    with pytest.raises(ValueError, match="NaN"):
        PCAWhitening(4).fit(np.where(np.eye(400, 24, dtype=bool), np.nan, X))
    with pytest.raises(ValueError, match="identical"):
        PCAWhitening(2).fit(np.ones((10, 5)))
    with pytest.warns(UserWarning, match="no variance"):
        PCAWhitening(5).fit(X[:5])  # centred 5 x 24 data has rank 4
    model = PCAWhitening(8, power=0.5, eps=1e-6, random_state=0)
    with pytest.raises(NotFittedError):
        model.transform(X)
    copy = clone(model)
    assert copy.get_params() == model.get_params() and not hasattr(copy, "projection_")
    model.fit(X)
    assert list(model.get_feature_names_out()) == [f"pcawhitening{i}" for i in range(8)]
    with pytest.raises(ValueError, match="X has 23 features, but PCAWhitening is expecting 24"):
        model.transform(X[:, :23])
    assert model.transform(X[:0]).shape == (0, 8)
    with pytest.raises(ValueError, match="infinity"):  # float64 beyond float32's range
        model.transform(np.full((1, 24), 1e300))


# --------------------------------------------------------------------------- files


def assert_same_search(a, b, Q, k=10):
    scores_a, ids_a = a.search(Q, k)
    scores_b, ids_b = b.search(Q, k)
    np.testing.assert_array_equal(scores_a, scores_b)
    assert ids_a == ids_b


@pytest.mark.parametrize("kind", ["flat", "pq", "ivfpq"])
def test_save_load_search_identical(tmp_path, data, pq_index, ivfpq_index, kind):
    X, Q = data
    index = {"flat": VectorIndex().add(X, names(len(X))), "pq": pq_index, "ivfpq": ivfpq_index}[kind]
    index.save(tmp_path / "index")
    assert sorted(os.listdir(tmp_path)) == ["index"]
    assert sorted(os.listdir(tmp_path / "index")) == ["ids.json", "index.faiss", "metadata.json"]
    metadata = json.loads((tmp_path / "index" / "metadata.json").read_text("utf-8"))
    assert metadata["kind"] == kind and metadata["dim"] == 64 and metadata["format_version"] == 1
    assert isinstance(faiss.read_index(str(tmp_path / "index" / "index.faiss")), faiss.Index)
    loaded = VectorIndex.load(tmp_path / "index")
    assert (loaded.kind, len(loaded), loaded.dim, loaded.ids) == (kind, len(index), 64, index.ids)
    assert (loaded.nlist_, loaded.nprobe, loaded.bytes_per_vector) == (
        index.nlist_, index.nprobe, index.bytes_per_vector)
    assert_same_search(index, loaded, Q)


@pytest.mark.parametrize("kind", ["flat", "pq"])
def test_save_load_with_whitening(tmp_path, data, kind):
    X, Q = data
    whitening = PCAWhitening(32, power=0.5).fit(X[:1000])
    index = VectorIndex(kind, pq="8x4", whitening=whitening).train(X).add(X[:500], names(500))
    assert index.dim == 64 and index.index_dim == 32
    assert index.bytes_per_vector == (128 if kind == "flat" else 4)
    if kind == "flat":  # the index holds whitened vectors
        np.testing.assert_allclose(index.search(Q[:5], 3)[0],
                                   reference_search(whitening.transform(X[:500]), whitening.transform(Q[:5]), 3)[0],
                                   atol=1e-5)
    index.save(tmp_path / "w")
    assert "whitening.npz" in os.listdir(tmp_path / "w")
    loaded = VectorIndex.load(tmp_path / "w")
    np.testing.assert_array_equal(loaded.whitening.transform(Q), whitening.transform(Q))
    assert loaded.whitening.get_params() == whitening.get_params()
    assert_same_search(index, loaded, Q)


def test_ids_with_any_characters_survive(tmp_path):
    ids = ["a\nb.jpg", "日本/写真 1.jpg", '"quoted"\t\\', "", "\udcff-not-utf8.jpg", "é" * 300]
    X = unit(np.random.default_rng(5).standard_normal((len(ids), 8)))
    index = VectorIndex().add(X, ids)
    index.save(tmp_path / "ids")
    loaded = VectorIndex.load(tmp_path / "ids")
    assert loaded.ids == ids
    assert [row[0] for row in loaded.search(X, 1)[1]] == ids


def test_save_replaces_an_index_atomically(tmp_path, monkeypatch):
    rng = np.random.default_rng(6)
    X = unit(rng.standard_normal((20, 8)))
    target = tmp_path / "index"
    VectorIndex().add(X[:10], names(10, "old")).save(target)
    VectorIndex().add(X, names(20, "new")).save(target)
    assert VectorIndex.load(target).ids == names(20, "new")
    assert sorted(os.listdir(tmp_path)) == ["index"]  # no temporary or backup left

    # A save that fails half-way leaves the previous index as it was, and no debris.
    def failing_write(path, data):
        if path.endswith("ids.json"):
            raise OSError("disk full")
        return real_write(path, data)

    real_write = index_module._write_file
    monkeypatch.setattr(index_module, "_write_file", failing_write)
    with pytest.raises(OSError, match="disk full"):
        VectorIndex().add(X[:3], names(3, "other")).save(target)
    monkeypatch.undo()
    assert VectorIndex.load(target).ids == names(20, "new")
    assert sorted(os.listdir(tmp_path)) == ["index"]


def test_save_refuses_to_replace_something_else(tmp_path):
    index = VectorIndex().add(np.eye(3, 4), ["a", "b", "c"])
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"not really")
    with pytest.raises(FileExistsError, match="photos.*not a vladkit index"):
        index.save(photos)
    assert os.listdir(photos) == ["cat.jpg"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        index.save(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    index.save(tmp_path / "empty")  # an empty folder may be used
    assert VectorIndex.load(tmp_path / "empty").ids == ["a", "b", "c"]
    with pytest.raises(ValueError, match="not trained"):
        VectorIndex("pq").save(tmp_path / "untrained")


@pytest.fixture
def saved(tmp_path):
    rng = np.random.default_rng(7)
    whitening = PCAWhitening(4).fit(rng.standard_normal((50, 8)))
    folder = tmp_path / "saved"
    VectorIndex(whitening=whitening).add(rng.standard_normal((5, 8)), list("abcde")).save(folder)
    return folder


def edit_json(path, change):
    value = json.loads(path.read_text("utf-8"))
    path.write_text(json.dumps(change(value)), "utf-8")


def test_load_refuses_bad_folders(saved, tmp_path):
    assert len(VectorIndex.load(saved)) == 5
    with pytest.raises(FileNotFoundError, match="nowhere"):
        VectorIndex.load(tmp_path / "nowhere")
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(IndexFileError, match="other.*metadata.json is missing"):
        VectorIndex.load(other)
    (other / "metadata.json").write_text('{"format": "something-else"}')
    with pytest.raises(IndexFileError, match="other.*not a vladkit index"):
        VectorIndex.load(other)
    (other / "metadata.json").write_text("{not json")
    with pytest.raises(IndexFileError, match="other.*JSON"):
        VectorIndex.load(other)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: edit_json(f / "metadata.json", lambda m: {**m, "format_version": 99}), "version 99"),
        (lambda f: edit_json(f / "ids.json", lambda ids: ids[:-1]), "4 ids but index.faiss holds 5"),
        (lambda f: edit_json(f / "ids.json", lambda ids: ["a"] * 5), "duplicate"),
        (lambda f: edit_json(f / "ids.json", lambda ids: [1, 2, 3, 4, 5]), "list of strings"),
        (lambda f: edit_json(f / "metadata.json", lambda m: {**m, "kind": "pq"}), "IndexPQ"),
        (lambda f: edit_json(f / "metadata.json", lambda m: {**m, "index_dim": 5}), "shape"),
        (lambda f: os.remove(f / "index.faiss"), "index.faiss is missing"),
        (lambda f: (f / "index.faiss").write_bytes(b"garbage"), "not a readable faiss index"),
        (lambda f: os.remove(f / "whitening.npz"), "whitening.npz is missing"),
        (lambda f: np.savez(f / "whitening.npz", mean_=np.array([object()] * 8)), "pickle"),
    ],
)
def test_load_refuses_damaged_index(saved, damage, message):
    damage(saved)
    with pytest.raises(IndexFileError, match=message) as caught:
        VectorIndex.load(saved)
    assert str(saved) in str(caught.value)


# ----------------------------------------------------------------------- validation


def test_input_validation():
    rng = np.random.default_rng(8)
    X = rng.standard_normal((300, 16))
    index = VectorIndex().add(X[:10], names(10))  # float64 accepted
    assert index.faiss_index.ntotal == 10
    with pytest.raises(ValueError, match="dimension 15.*dimension 16"):
        index.search(X[:2, :15])
    with pytest.raises(ValueError, match="dimension 17.*dimension 16"):
        index.add(np.ones((1, 17)), ["x"])
    bad = X[:3].copy()
    bad[1, 4] = np.nan
    with pytest.raises(ValueError, match="NaN or inf.*row 1"):
        index.search(bad)
    with pytest.raises(ValueError, match="NaN or inf"):
        index.add(np.full((1, 16), np.inf), ["inf"])
    with pytest.raises(ValueError, match="NaN or inf"):
        index.add(np.full((1, 16), 1e300), ["overflows float32"])
    with pytest.raises(ValueError, match="2-D.*reshape"):
        index.search(X[0])
    with pytest.raises(TypeError, match="numbers"):
        index.search(np.array([["a"] * 16]))
    with pytest.raises(ValueError, match="k must be"):
        index.search(X[:1], k=0)

    with pytest.raises(ValueError, match="duplicate ids.*'img3.jpg'"):
        index.add(X[10:12], ["new.jpg", "img3.jpg"])
    with pytest.raises(ValueError, match="duplicate ids.*'twice'"):
        index.add(X[10:12], ["twice", "twice"])
    with pytest.raises(ValueError, match="2 vectors but 1 ids"):
        index.add(X[10:12], ["one"])
    with pytest.raises(TypeError, match="strings"):
        index.add(X[10:11], [7])
    assert len(index) == 10 and len(index.ids) == 10  # refused adds changed nothing

    untrained = VectorIndex("ivfpq", pq="4x4")
    with pytest.raises(ValueError, match="not trained.*train"):
        untrained.add(X[:5], names(5))
    with pytest.raises(ValueError, match="not trained"):
        untrained.search(X[:5])
    with pytest.raises(ValueError, match=r"pq='4x8'.*2\*\*8 = 256.*got 100"):
        VectorIndex("pq", pq="4x8").train(X[:100])
    with pytest.raises(ValueError, match="pq='5x4'.*dimension 16.*M=5"):
        VectorIndex("pq", pq="5x4").train(X)
    with pytest.raises(ValueError, match="nlist=301.*got 300"):
        VectorIndex("ivfpq", pq="4x4", nlist=301).train(X)
    trained = VectorIndex("pq", pq="4x4").train(X).add(X[:3], names(3))
    with pytest.raises(ValueError, match="already holds 3"):
        trained.train(X)


def test_parameter_validation():
    with pytest.raises(ValueError, match="kind"):
        VectorIndex("hnsw")
    with pytest.raises(ValueError, match="MxB"):
        VectorIndex("pq", pq="16")
    with pytest.raises(ValueError, match="B <= 16"):
        VectorIndex("pq", pq="16x32")
    with pytest.raises(ValueError, match="nprobe"):
        VectorIndex("ivfpq", nprobe=0)
    with pytest.raises(ValueError, match="nlist"):
        VectorIndex("ivfpq", nlist=-3)
    with pytest.raises(NotFittedError):
        VectorIndex(whitening=PCAWhitening(4))
    with pytest.raises(TypeError, match="PCAWhitening"):
        VectorIndex(whitening=object())


@pytest.mark.parametrize("whiten", [0.75, -0.1, "yes"])
def test_whitening_exponent_out_of_range_is_refused(anisotropic, whiten):
    with pytest.raises(ValueError, match="whiten"):
        PCAWhitening(4, whiten=whiten).fit(anisotropic[0])


@pytest.mark.parametrize("kind", ["flat", "pq", "ivfpq"])
@pytest.mark.parametrize("alpha", [0.0, 3.0])
def test_query_expansion_matches_its_formula(kind, alpha):
    """q' = normalise(q + sum_i max(s_i, 0)^alpha x_i) over the first search's top m (x_i as
    stored: decoded for PQ), then an ordinary search with q'."""
    rng = np.random.default_rng(4)
    X = rng.standard_normal((600, 32)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    Q = X[:5] + 0.3 * rng.standard_normal((5, 32)).astype(np.float32)
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    index = VectorIndex(kind, pq="8x4", nlist=8 if kind == "ivfpq" else None, nprobe=8)
    index.train(X).add(X, [f"v{i}" for i in range(len(X))])
    m = 4
    scores, ids = index.search(Q, k=m)
    stored = index.faiss_index.reconstruct_n(0, len(X)) if kind != "ivfpq" else None
    if stored is None:
        index.faiss_index.make_direct_map()
        stored = np.stack([index.faiss_index.reconstruct(i) for i in range(len(X))])
    rows = [[int(i[1:]) for i in row] for row in ids]
    weights = np.ones_like(scores) if alpha == 0 else np.maximum(scores, 0) ** alpha
    expanded = Q + np.einsum("qm,qmd->qd", weights, stored[np.array(rows)])
    expanded /= np.linalg.norm(expanded, axis=1, keepdims=True)
    want_scores, want_ids = index.search(expanded, k=10)
    got_scores, got_ids = index.search(Q, k=10, expand=m, alpha=alpha)
    assert got_ids == want_ids
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
    with pytest.raises(ValueError, match="expand"):
        index.search(Q, expand=-1)
    with pytest.raises(ValueError, match="alpha"):
        index.search(Q, expand=2, alpha=-1)
