"""Memory budgets: dense SIFT in bands, images in pieces, batches sized by bytes.

The equalities are checked against the unbounded computation (an image extracted and
encoded whole); the memory bounds are measured as resident memory in a fresh process,
since OpenCV's and numba's buffers are invisible to tracemalloc.
"""

import json
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest

from conftest import textured_image
from vladkit import (
    SIFT,
    BoFEncoder,
    DenseSIFT,
    FisherEncoder,
    ImageEncoder,
    LocalFeatures,
    SpatialPyramid,
    VLADEncoder,
)
from vladkit.pipeline.budget import encoder_memory, iter_batches, parse_memory, plan_batches
from vladkit.features.dsift import dense_sift, dense_sift_pieces
from vladkit.features.images import read_image, read_size


def photo(seed, height, width):
    """A large grey 'photo': textured blobs upscaled, plus fine noise (detail at every scale)."""
    rng = np.random.default_rng(seed)
    coarse = textured_image(seed, (max(8, height // 8), max(8, width // 8)))
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    image += rng.integers(-12, 13, (height, width), dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def big():
    return photo(0, 600, 800)


@pytest.fixture
def low_floor(monkeypatch):
    """Budgets below the 256 MB floor, so that pieces are tested on small images (fast)."""
    monkeypatch.setattr("vladkit._util.defaults.MIN_MAX_MEMORY", 1)


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text,expected", [
    ("1GB", 10**9), ("1g", 10**9), ("512MB", 512 * 10**6), ("1.5GB", 1.5e9), ("2GiB", 2 * 2**30),
    ("300 mib", 300 * 2**20), (10**9, 10**9), ("1e9", 10**9),
])
def test_parse_memory(text, expected):
    assert parse_memory(text) == int(expected)


@pytest.mark.parametrize("text", ["", "lots", "1XB", "-1GB", "10MB", 1000, "nan"])
def test_parse_memory_refuses(text):
    with pytest.raises(ValueError, match="max_memory"):
        parse_memory(text)


def test_parse_memory_refuses_types():
    with pytest.raises(TypeError, match="max_memory"):
        parse_memory(True)
    with pytest.raises(TypeError, match="max_memory"):
        parse_memory([1])


# ------------------------------------------------------------------ dense SIFT in bands


@pytest.mark.parametrize("max_bytes", [1 << 20, 3 << 20, 64 << 20])
@pytest.mark.parametrize("smooth", [True, False])
def test_dense_sift_in_bands_equals_whole_image(big, max_bytes, smooth):
    whole = dense_sift(big, step=5, sizes=(4, 6, 10), smooth=smooth, max_bytes=None)
    banded = dense_sift(big, step=5, sizes=(4, 6, 10), smooth=smooth, max_bytes=max_bytes, n_threads=2)
    pieces = list(dense_sift_pieces(big, step=5, sizes=(4, 6, 10), smooth=smooth, max_bytes=max_bytes,
                                    n_threads=2))
    if max_bytes < (8 << 20):
        assert len(pieces) > 3 * 3  # several bands per size
    else:
        assert len(pieces) == 3  # one band per size
    for index, expected in enumerate(whole):
        np.testing.assert_array_equal(banded[index], expected)
        np.testing.assert_array_equal(np.concatenate([piece[index] for piece in pieces]), expected)


def test_dense_sift_pieces_fit_their_bound(big):
    max_bytes = 2 << 20
    for descriptors, positions, *_ in dense_sift_pieces(big, max_bytes=max_bytes):
        assert descriptors.nbytes <= max_bytes


@pytest.mark.parametrize("extractor", [
    DenseSIFT(root=True, max_side=None),
    DenseSIFT(step=3, sizes=(4, 8), low_contrast="drop", max_side=None),
    DenseSIFT(root=True, max_side=700, n_jobs=2),
    SIFT(root=True, max_side=None),
], ids=["dense-root", "dense-drop", "dense-max-side", "sift"])
def test_extract_pieces_concatenate_to_transform(big, extractor):
    whole = extractor.transform([big])[0]
    pieces = list(extractor.extract_pieces(big, max_bytes=2 << 20))
    if isinstance(extractor, DenseSIFT):
        assert len(pieces) > 4
    else:
        assert len(pieces) == 1  # OpenCV's detector needs the whole image
    for name in ("descriptors", "positions", "scales"):
        np.testing.assert_array_equal(np.concatenate([getattr(p, name) for p in pieces]), getattr(whole, name))
    assert all(p.image_shape == whole.image_shape for p in pieces)


def test_extract_pieces_reads_at_once(tmp_path):
    from vladkit import ImageReadError

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match="bad.jpg"):
        DenseSIFT().extract_pieces(str(bad))  # raised by the call, not by the first piece
    with pytest.warns(UserWarning, match="bad.jpg"):
        assert list(DenseSIFT(on_error="skip").extract_pieces(str(bad))) == []


def test_memory_estimate_covers_the_output(big):
    for extractor in (DenseSIFT(max_side=None), DenseSIFT(max_side=None, low_contrast="drop")):
        features = extractor.transform([big])[0]
        output, scratch = extractor.memory_estimate(*big.shape)
        held = features.descriptors.nbytes + features.positions.nbytes + features.scales.nbytes
        assert held <= output  # exact grid count (an upper bound when low-contrast ones are dropped)
        if extractor.low_contrast == "zero":
            assert output <= 1.2 * held
        assert scratch > 0
    features = SIFT(max_side=None).transform([big])[0]
    output, scratch = SIFT(max_side=None).memory_estimate(*big.shape)
    assert features.descriptors.nbytes <= output


# ------------------------------------------------------------- encoders, piece by piece


_SAMPLE = dict(max_descriptors=5_000, random_state=0)  # vocabularies fitted quickly
ENCODERS = {
    "bof": BoFEncoder(20, **_SAMPLE),
    "bof-soft": BoFEncoder(20, assignment="soft", **_SAMPLE),
    "vlad": VLADEncoder(8, **_SAMPLE),
    "vlad-knn": VLADEncoder(8, assignment="knn", **_SAMPLE),
    "vlad-soft-mass": VLADEncoder(8, assignment="soft", normalize_mass=True, **_SAMPLE),
    "fisher": FisherEncoder(6, **_SAMPLE),
    "fisher-weights": FisherEncoder(6, include_weights=True, improved=False, power=None, **_SAMPLE),
    "pyramid": SpatialPyramid(FisherEncoder(6, **_SAMPLE)),
}


@pytest.fixture(scope="module")
def features():
    extractor = DenseSIFT(step=6, root=True, max_side=None)
    return extractor.transform([photo(seed, 300 + 40 * seed, 420) for seed in range(4)])


@pytest.mark.parametrize("name", list(ENCODERS))
def test_pieces_of_an_image_accumulate_to_the_whole(features, name):
    encoder = ENCODERS[name].fit(features)
    whole = encoder.transform(features)
    rng = np.random.default_rng(1)
    accumulation = encoder._accumulate(len(features))
    for image in rng.permutation(len(features)):  # images interleaved, cut anywhere
        item = features[image]
        cuts = np.sort(rng.integers(0, len(item), 5))
        for start, end in zip(np.r_[0, cuts], np.r_[cuts, len(item)]):
            piece = LocalFeatures(item.descriptors[start:end], item.positions[start:end],
                                  item.scales[start:end], item.image_shape)
            accumulation.add(int(image), piece if name == "pyramid" else piece.descriptors)
    # Compared before the signed square root of the improved Fisher vector: the pieces'
    # float32 products are blocked differently than the whole's, and sqrt's infinite slope
    # at 0 turns a 1e-12 difference into 1e-6 (measured: 3e-5 at a component of 4e-7).
    # v |v| undoes it up to the L2 norm, which both share; vectors without it just square.
    def before_power(vectors):
        return vectors * np.abs(vectors)

    np.testing.assert_allclose(before_power(accumulation.finish()), before_power(whole), rtol=0, atol=1e-8)


# ---------------------------------------------------------------- batches by the budget


def test_batches_follow_the_budget(tmp_path):
    small = [textured_image(i, (200, 200)) for i in range(100)]
    extractor = DenseSIFT(max_side=None)
    sizes = [len(b.indices) for b in plan_batches(small, extractor, 10**9, 64)]
    assert sizes == [64, 36]  # thumbnails: the count limit
    large = [photo(i, 1200, 1600) for i in range(2)] * 6
    batches = list(plan_batches(large, extractor, 10**9, 64))
    per_image = sum(extractor.memory_estimate(1200, 1600))
    assert all(len(b.indices) * per_image > 0.5e9 for b in batches[:-1])  # full, not single
    assert all(b.piece_bytes is None for b in batches)
    assert sum(len(b.indices) for b in batches) == 12
    huge = list(plan_batches(large[:2], DenseSIFT(max_side=None), 300 * 10**6, 64))
    assert [b.indices for b in huge] == [[0], [1]] and all(b.piece_bytes for b in huge)
    # Sizes come from the header: a 12-megapixel JPEG with the default max_side is planned
    # at 640 x 480, as read_image will give it.
    path = tmp_path / "photo.jpg"
    cv2.imwrite(str(path), photo(3, 3024, 4032))
    assert read_size(path, max_side=640)[:2] == read_image(path, max_side=640).shape == (480, 640)
    assert read_size(path)[:2] == (3024, 4032)


def test_batches_count_the_scratch_of_every_thread():
    """One image gets every thread, and dense SIFT then computes n_jobs bands at once:
    an image that fits the budget with one thread's scratch but not with eight goes to
    pieces with eight threads."""
    image = photo(5, 1200, 1600)
    output, scratch = DenseSIFT(max_side=None).memory_estimate(1200, 1600)
    budget = output + 2 * scratch
    alone = list(plan_batches([image], DenseSIFT(max_side=None, n_jobs=1), budget, 64))
    threaded = list(plan_batches([image], DenseSIFT(max_side=None, n_jobs=8), budget, 64))
    assert [b.piece_bytes for b in alone] == [None]
    assert [b.indices for b in threaded] == [[0]] and threaded[0].piece_bytes
    # (the 8 bands ahead, the one being encoded and the one waiting fit the budget)
    assert 10 * threaded[0].piece_bytes <= budget


def test_sparse_sift_over_the_budget_is_a_warning():
    # OpenCV's detector needs the whole image: it is extracted whole, with a warning.
    image = photo(7, 2400, 3200)
    with pytest.warns(ResourceWarning, match="cannot be split: set max_side"):
        batches = list(plan_batches([image], SIFT(max_side=None), 300 * 10**6, 64))
    assert [b.indices for b in batches] == [[0]]
    assert list(plan_batches([image], SIFT(), 300 * 10**6, 64))[0].piece_bytes is None  # max_side=1024


def test_unreadable_images_are_reported_and_left_out(tmp_path):
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        cv2.imwrite(str(paths[-1]), textured_image(i))
    paths[2].write_bytes(b"broken")
    seen = []
    batches = list(iter_batches(DenseSIFT(), paths, max_memory=10**9,
                                on_unreadable=lambda index, error: seen.append((index, error.reason))))
    assert [index for batch in batches for index, _ in batch] == [0, 1, 3]
    assert [index for index, _ in seen] == [2]


def _vocabulary_words(model):
    vocabulary = getattr(model.encoder_, "encoder_", model.encoder_).vocabulary_
    return getattr(vocabulary, "means_", getattr(vocabulary, "centers_", None))


@pytest.mark.parametrize("encoder", [FisherEncoder(8, random_state=0),
                                     SpatialPyramid(VLADEncoder(16, random_state=0))],
                         ids=["fisher", "pyramid-vlad"])
def test_image_encoder_under_a_small_budget_equals_unbounded(encoder, low_floor):
    # Two images of a million pixels: ~150,000 dense descriptors (85 MB) each, so under
    # 150 MB (the encoder takes 60-100 MB of it) they are extracted and encoded in pieces;
    # the two thumbnails between them are batched together.
    images = [photo(1, 900, 1200), textured_image(2, (120, 160)), textured_image(3, (150, 100)),
              photo(4, 1200, 900)]
    extractor = DenseSIFT(step=4, sizes=(4, 8), root=True, max_side=None, n_jobs=2)
    bounded = ImageEncoder(extractor, encoder, max_memory="150MB", max_descriptors=5_000, random_state=0)
    unbounded = ImageEncoder(extractor, encoder, max_memory="20GB", max_descriptors=5_000, random_state=0)
    bounded.fit(images)
    unbounded.fit(images)
    plan = [(b.indices, b.piece_bytes is not None)
            for b in plan_batches(images, extractor, 150 * 10**6, 64, bounded.encoder_)]
    assert plan == [([0], True), ([1, 2], False), ([3], True)]
    # The same training sample, drawn from pieces as from whole images, so the same words:
    np.testing.assert_array_equal(_vocabulary_words(bounded), _vocabulary_words(unbounded))
    # Compared before the signed square root (v |v|), as the pieces above: the Fisher
    # vector's soft posteriors come from float32 products that BLAS blocks differently for
    # a piece than for a whole image, and sqrt's slope at 0 turned their 1e-12 differences
    # into 2e-5 at components near 0 here. Hard assignment needs no such allowance:
    # nearest_words gives every descriptor the float64 nearest word however the rows are
    # blocked (before it did not, and a whole VLAD block moved by 2e-4).
    def before_power(vectors):
        return vectors * np.abs(vectors)

    vectors = before_power(bounded.transform(images))
    np.testing.assert_allclose(vectors, before_power(unbounded.transform(images)), rtol=0, atol=1e-8)
    np.testing.assert_allclose(vectors, before_power(unbounded.encoder_.transform(extractor.transform(images))),
                               rtol=0, atol=1e-8)


def test_encoder_memory_counts_pyramid_cells(features):
    plain = VLADEncoder(8, **_SAMPLE).fit(features)
    pyramid = SpatialPyramid(VLADEncoder(8, **_SAMPLE)).fit(features)
    fixed, per_image = encoder_memory(plain)
    assert per_image >= 8 * plain.n_features_out_  # the float64 sums at least
    assert encoder_memory(pyramid) == (fixed, 8 * per_image)  # 8 cells, one chunk
    assert encoder_memory(None) == (0, 0)


# ------------------------------------------------------ resident memory, fresh process

_MEASURE = textwrap.dedent("""
    import json, sys
    import numpy as np
    import vladkit
    from vladkit import DenseSIFT, FisherEncoder, ImageEncoder
    sys.path.insert(0, {tests!r})
    from test_budget import photo

    def status(field):
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(field))

    height, width, budget = {height}, {width}, {budget!r}
    train = [photo(9, 400, 500)]
    model = ImageEncoder(DenseSIFT(root=True, max_side=None, n_jobs=2), FisherEncoder(16, random_state=0),
                         max_memory=budget, random_state=0).fit(train)
    model.transform(train)  # compiled, warm
    image = photo(5, height, width)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # the peak (VmHWM) starts again from the current resident size
    before = status("VmRSS:")
    vector = model.transform([image])[0]
    peak = status("VmHWM:")
    print(json.dumps({{"working": peak - before, "before": before, "vector": vector.tolist()}}))
""")


def _resident(height, width, budget):
    import os

    code = _MEASURE.format(tests=os.path.dirname(__file__), height=height, width=width, budget=budget)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")
def test_resident_memory_follows_the_budget_not_the_image():
    """Dense SIFT at full resolution: a 12-megapixel image is ~3 million descriptors (1.6 GB
    with positions). Under a 300 MB budget the growth of the peak resident memory stays
    within the budget for 3 and 12 megapixels alike, while the 3-megapixel image encoded
    whole (8 GB budget) needs more than the 300 MB; the vectors are the same (to 1e-6)."""
    small_image = _resident(1500, 2000, "300MB")
    small_whole = _resident(1500, 2000, "8GB")
    large_image = _resident(3024, 4032, "300MB")
    mb = {name: round(r["working"] / 1e6) for name, r in
          [("3MP@300MB", small_image), ("3MP@8GB (whole)", small_whole), ("12MP@300MB", large_image)]}
    print("growth of the peak resident memory (MB):", mb)
    assert small_image["working"] <= 300e6
    assert large_image["working"] <= 300e6
    assert small_whole["working"] > 300e6  # what the budget saves: the whole image's descriptors
    np.testing.assert_allclose(small_image["vector"], small_whole["vector"], rtol=0, atol=1e-6)
