"""Training on images end to end (vladkit.netvlad.images, .mining, .image_training) and
``vladkit netvlad train --backbone``: the miner and the losses against slow numpy
references, the dataset's groups and determinism, training, checkpoints, the CLI, the
benchmark's smoke run."""

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import vladkit  # noqa: F401  (before torch: its thread-wait settings)

torch = pytest.importorskip(
    "torch", reason="torch is not installed (optional: pip install torch==2.14.1 torchvision==0.29.1, then "
                    "pip install '.[torch]')")
pytest.importorskip("torchvision", reason="torchvision is not installed (the torch extra; build_backbone needs it)")

from torch import nn  # noqa: E402

from vladkit.app.cli import main  # noqa: E402
from vladkit.netvlad import (  # noqa: E402
    HardNegativeMiner,
    ImageGroupsDataset,
    ImageRetrievalModel,
    NetVLAD,
    init_netvlad_from_images,
    train_on_images,
)
from vladkit.netvlad.image_training import embed_dataset, load_image_model  # noqa: E402
from vladkit.netvlad.images import pair_groups  # noqa: E402
from vladkit.netvlad.mining import contrastive_loss, multi_similarity_loss, triplet_loss  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "scene15"


def photo(seed, size=48):
    """A small textured RGB image: a few random rectangles and a gradient (distinct per seed)."""
    rng = np.random.default_rng(seed)
    image = np.tile(np.linspace(0, 120, size, dtype=np.float32)[None, :, None], (size, 1, 3))
    for _ in range(6):
        y, x = rng.integers(0, size - 8, 2)
        h, w = rng.integers(4, 20, 2)
        image[y:y + h, x:x + w] = rng.integers(0, 256, 3)
    return np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)


def tiny_backbone():
    """Two convolutions (16 channels, stride 4): a backbone that trains in a blink."""
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 16, 3, stride=2, padding=1))
    return backbone


def tiny_model(dataset, seed=0, k=4):
    torch.manual_seed(seed)
    return init_netvlad_from_images(tiny_backbone(), dataset, k, n_images=20, per_image=20, random_state=seed,
                                    n_threads=1)


@pytest.fixture(scope="module")
def photos():
    return [photo(i) for i in range(8)]


@pytest.fixture(scope="module")
def copies_dataset(photos):
    return ImageGroupsDataset(photos, image_size=32, copies=2, augment=True, seed=0)


# ------------------------------------------------------------------------ the miner


def reference_mine(vectors, groups, q, k):
    """p* and the k hardest negatives of query q over all items, by brute force."""
    d2 = ((vectors - vectors[q]) ** 2).sum(1)
    positives = [i for i in range(len(vectors)) if groups[i] == groups[q] and i != q]
    negatives = [i for i in range(len(vectors)) if groups[i] != groups[q]]
    best = min(positives, key=lambda i: d2[i])
    return best, sorted(negatives, key=lambda i: d2[i])[:k]


def test_miner_matches_brute_force():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(30, 5)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    groups = np.repeat(np.arange(10), 3)
    miner = HardNegativeMiner(n_negatives=4, negative_pool=1000).refresh(vectors, groups)
    tuples = miner.mine(np.arange(30))
    assert tuples.shape == (30, 6)
    for row in tuples:
        positive, negatives = reference_mine(vectors, groups, row[0], 4)
        assert row[1] == positive
        assert list(row[2:]) == negatives
    # A small pool: the negatives are the k nearest among the pool plus last time's, so
    # they are never farther than last time's.
    small = HardNegativeMiner(n_negatives=2, negative_pool=3, random_state=1).refresh(vectors, groups)
    first = small.mine(np.array([0]))[0]
    again = small.mine(np.array([0]))[0]
    d2 = ((vectors - vectors[0]) ** 2).sum(1)
    assert d2[again[2:]].max() <= d2[first[2:]].max() + 1e-6
    assert all(groups[n] != groups[0] for n in again[2:])
    # Refresh timing.
    assert not miner.due(0) and HardNegativeMiner(refresh_every=5).refresh(vectors, groups, step=3).due(8)
    assert not HardNegativeMiner(refresh_every=5).refresh(vectors, groups, step=3).due(7)


def test_miner_state_round_trip():
    rng = np.random.default_rng(1)
    vectors, groups = rng.normal(size=(12, 3)).astype(np.float32), np.repeat(np.arange(4), 3)
    miner = HardNegativeMiner(n_negatives=2, negative_pool=4).refresh(vectors, groups)
    miner.mine(np.arange(6))
    copy = HardNegativeMiner(n_negatives=2, negative_pool=4).load_state_dict(miner.state_dict())
    assert np.array_equal(miner.mine(np.arange(12)), copy.mine(np.arange(12)))


# ------------------------------------------------------------------------ the losses


def unit(*rows):
    x = np.array(rows, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_losses_against_hand_computed_values():
    # One tuple in 2-D: q = (1, 0), p at 60°, negatives at 90° and 30°.
    angles = np.radians([0, 60, 90, 30])
    tuple_ = np.stack([np.cos(angles), np.sin(angles)], 1)
    v = torch.tensor(tuple_[None], dtype=torch.float64)
    d2 = 2 - 2 * np.cos(angles[1:])           # squared distances to p, n1, n2: 1, 2, 2 - sqrt 3
    expected = max(0, d2[0] + 0.1 - d2[1]) + max(0, d2[0] + 0.1 - d2[2])  # 0 + (1.1 - 0.268)
    assert float(triplet_loss(v, 0.1)) == pytest.approx(expected)
    assert float(triplet_loss(v, 0.1)) == pytest.approx(1.1 - (2 - np.sqrt(3)))
    d = np.sqrt(d2)
    expected = 0.5 * d2[0] + 0.5 * sum(max(0, 0.7 - x) ** 2 for x in d[1:])
    assert float(contrastive_loss(v, 0.7)) == pytest.approx(expected)
    # Multi-similarity: S_p = 0.5, S_n = 0, 0.866; negatives kept if S + 0.1 > 0.5 (only
    # the second); the positive kept since 0.5 - 0.1 < 0.866.
    s_p, s_n = 0.5, np.array([0.0, np.cos(np.radians(30))])
    kept = s_n[s_n + 0.1 > s_p]
    expected = (np.log1p(np.exp(-2 * (s_p - 0.5))) / 2
                + np.log1p(np.exp(50 * (kept - 0.5)).sum()) / 50)
    assert float(multi_similarity_loss(v)) == pytest.approx(expected)


def test_losses_against_loops_on_random_tuples():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 6, 8))
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    v = torch.tensor(x)
    triplet = contrastive = ms = 0.0
    for t in x:
        q, p, negatives = t[0], t[1], t[2:]
        dp = ((q - p) ** 2).sum()
        triplet += sum(max(0, dp + 0.1 - ((q - n) ** 2).sum()) for n in negatives)
        contrastive += 0.5 * dp + 0.5 * sum(max(0, 0.7 - np.sqrt(((q - n) ** 2).sum())) ** 2 for n in negatives)
        sp, sn = q @ p, negatives @ q
        pos = np.exp(-2 * (sp - 0.5)) if sp - 0.1 < sn.max() else 0.0
        neg = sum(np.exp(50 * (s - 0.5)) for s in sn if s + 0.1 > sp)
        ms += np.log1p(pos) / 2 + np.log1p(neg) / 50
    assert float(triplet_loss(v)) == pytest.approx(triplet / 5)
    assert float(contrastive_loss(v)) == pytest.approx(contrastive / 5)
    assert float(multi_similarity_loss(v)) == pytest.approx(ms / 5)
    v.requires_grad_(True)
    for loss in (triplet_loss, contrastive_loss, multi_similarity_loss):
        v.grad = None
        loss(v).backward()
        assert torch.isfinite(v.grad).all()


# ------------------------------------------------------------------------ the dataset


def test_dataset_groups_items_and_determinism(photos, copies_dataset, tmp_path):
    data = copies_dataset
    data.set_epoch(0)  # (training, in other tests, moves the shared dataset's epoch on)
    assert len(data) == 8 * 3 and data.n_groups == 8
    assert list(data.groups[:6]) == [0, 0, 0, 1, 1, 1] and list(data.sources[:6]) == [0, 0, 0, 1, 1, 1]
    image, group, index = data[4]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and (group, index) == (1, 4)
    # Same (seed, epoch, index): the same tensor; another epoch: another augmentation.
    again = ImageGroupsDataset(photos, image_size=32, copies=2, augment=True, seed=0)
    assert torch.equal(again[4][0], image)
    data.set_epoch(1)
    assert not torch.equal(data[4][0], image)
    data.set_epoch(0)
    # Without augmentation: the normalised centre crop of the stored image.
    plain = data.tensor(0, augment=False)
    stored = data.image(0, augment=False)
    assert np.array_equal(stored, cv2.resize(photos[0], (32, 32), interpolation=cv2.INTER_AREA))
    assert stored.shape == (32, 32, 3) and plain.shape == (3, 32, 32)
    assert np.allclose(plain.numpy().transpose(1, 2, 0),
                       (stored.astype(np.float32) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225], atol=1e-5)
    # Folders and pairs.
    for g in ("a", "b"):
        (tmp_path / g).mkdir()
    for i in range(4):
        cv2.imwrite(str(tmp_path / "ab"[i % 2] / f"{i}.png"), photos[i])
    folders = ImageGroupsDataset.from_folder(tmp_path, image_size=(24, 40))
    assert folders[0][0].shape == (3, 24, 40) and sorted(np.bincount(folders.groups)) == [2, 2]
    assert list(pair_groups(5, [(0, 3), (3, 4)])) == [0, 1, 2, 0, 0]
    paired = ImageGroupsDataset(photos[:5], pairs=[(0, 3), (3, 4)], image_size=16)
    assert list(paired.groups) == [0, 1, 2, 0, 0]


def test_corrupt_image_is_reported_and_skipped(photos, tmp_path, capsys):
    good = tmp_path / "good.png"
    cv2.imwrite(str(good), photos[0])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    data = ImageGroupsDataset([good, bad, good], image_size=16, copies=1)
    assert len(data) == 4 and [p for p, _ in data.skipped] == [str(bad)]
    assert list(data.sources) == [0, 0, 2, 2]
    assert f"skipped {bad}" in capsys.readouterr().err
    with pytest.raises(ValueError, match="none of the 1 images"):
        ImageGroupsDataset([bad], image_size=16, on_skipped=lambda path, reason: None)


# ------------------------------------------------------------------------ training


def test_init_is_the_papers(copies_dataset):
    model = tiny_model(copies_dataset)
    assert isinstance(model, ImageRetrievalModel) and isinstance(model.pooling, NetVLAD)
    assert model.pooling.n_clusters == 4 and model.pooling.dim == 16
    # v2: w = 2 alpha c, b = -alpha ||c||^2.
    w, b, c = (t.detach() for t in (model.pooling.weight, model.pooling.bias, model.pooling.centers))
    alpha = float(w[0, 0] / (2 * c[0, 0]))
    assert torch.allclose(w, 2 * alpha * c, rtol=1e-4) and torch.allclose(b, -alpha * (c * c).sum(1), rtol=1e-4)
    # Random weights: the BatchNorm statistics are estimated on the images on request.
    assert torch.equal(model.backbone[1].running_var, torch.ones(8))
    torch.manual_seed(0)
    calibrated = init_netvlad_from_images(tiny_backbone(), copies_dataset, 4, n_images=20, per_image=20,
                                          n_threads=1, batchnorm_statistics="auto")
    assert not torch.equal(calibrated.backbone[1].running_var, torch.ones(8))
    vectors = embed_dataset(model, copies_dataset)
    assert vectors.shape == (24, 64) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def assert_same_weights(a, b):
    a, b = a.state_dict(), b.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], torch.Tensor):
            assert torch.equal(a[name], b[name]), name
        else:  # NetVLAD's metadata (extra state)
            assert a[name] == b[name], name


def run_training(dataset, epochs, **options):
    model = tiny_model(dataset)
    options = dict(epochs=epochs, lr=3e-3, batch_size=4, n_negatives=3, negative_pool=20, n_threads=1,
                   random_state=0, **options)
    return train_on_images(model, dataset, **options)


def test_training_reduces_the_loss_and_is_deterministic(copies_dataset):
    model, history = run_training(copies_dataset, 4)
    losses = [h["loss"] for h in history[1:]]
    assert history[0]["loss"] is None and len(losses) == 4
    assert losses[-1] < losses[0]
    again, _ = run_training(copies_dataset, 4)
    assert_same_weights(model, again)


def test_resume_gives_the_same_weights(copies_dataset, photos, tmp_path):
    validation = ImageGroupsDataset(photos[:4], image_size=32, copies=1, seed=5)
    options = dict(refresh_every=3, loss="multi-similarity", validation=validation, keep_best=True)
    whole, history = run_training(copies_dataset, 2, **options)
    assert all(0 <= h["validation_map"] <= 1 for h in history)
    checkpoint = tmp_path / "state.pt"
    run_training(copies_dataset, 1, checkpoint=checkpoint, **options)
    resumed, resumed_history = run_training(copies_dataset, 2, checkpoint=checkpoint, resume=True, **options)
    assert resumed_history == history
    assert_same_weights(whole, resumed)
    with pytest.raises(ValueError, match="other options"):
        run_training(copies_dataset, 2, checkpoint=checkpoint, resume=True, refresh_every=4)


# ------------------------------------------------------------------------ the command line


def test_cli_backbone_writes_a_model_that_reloads(photos, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        cv2.imwrite(str(folder / f"{i}.png"), photos[i][..., ::-1])
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "model.pt"
    code = main(["netvlad", "train", str(folder), "--backbone", "resnet18", "--image-size", "32", "-k", "4",
                 "--labels", "none", "--copies", "1", "--epochs", "1", "--minibatch", "2", "--negatives", "2",
                 "--validation", "0", "-j", "1", "-q", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "skipped" in captured.err and "broken.jpg" in captured.err
    assert "resnet18/layer3 + NetVLAD K=4" in captured.out
    model, info = load_image_model(out)
    assert (info["backbone"], info["layer"], info["n_clusters"], info["dim"], info["image_size"]) == \
        ("resnet18", "layer3", 4, 256, 32)
    data = ImageGroupsDataset(photos[:2], image_size=info["image_size"])
    vectors = embed_dataset(model, data)
    assert vectors.shape == (2, 1024) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    # Image options without --backbone, and the image losses, are refused in the other mode.
    assert main(["netvlad", "train", str(folder), "--image-size", "32", "-o", str(tmp_path / "x.npz")]) == 2
    assert main(["netvlad", "train", str(folder), "--loss", "contrastive", "-o", str(tmp_path / "x.npz")]) == 2
    assert "need --backbone" in capsys.readouterr().err


@pytest.mark.skipif(not (DATA / "train").is_dir(), reason="15-Scene is not in ../shared/data/scene15")
def test_benchmark_quick_runs(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_netvlad_images.py"), "--quick",
                             "--data", str(DATA), "--out", str(tmp_path), "--threads", "1"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT / "benchmarks")
    assert result.returncode == 0, result.stderr[-2000:]
    table = (tmp_path / "netvlad_images-quick.md").read_text()
    assert "initialisation" in table and "trained on attacked copies" in table and "RootSIFT VLAD" in table
