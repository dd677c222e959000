"""Training NetVLAD (vladkit.netvlad.training) and ``vladkit netvlad train``: learning
helps on synthetic groups, determinism, attacked copies, the CLI end to end, bad input."""

import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

# vladkit before torch (its thread-wait settings must reach the OpenMP runtime torch loads).
from vladkit.encoders.netvlad import NetVLADEncoder
from vladkit.encoders.netvlad_params import DEFAULT_INIT, NetVLADParams, init_netvlad, load_netvlad

torch = pytest.importorskip(
    "torch", reason="torch is not installed (optional: pip install torch==2.14.1 torchvision==0.29.1, then "
                    "pip install '.[torch]')")

from vladkit.app.cli import main  # noqa: E402
from vladkit.netvlad.training import (  # noqa: E402
    _split_validation,
    attacked_copies,
    copy_groups,
    train_netvlad,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "scene15"


def synthetic_groups(n_groups=8, per_group=4, n=120, seed=0):
    """Sets of 6-D descriptors whose group shows only through the right assignment.

    Dimensions 0-1: four well separated blobs, picked at random whatever the group (the
    largest variance: k-means with K=4 clusters these). 2-3: a type, two values, equally
    frequent. 4-5: +mu_g for type 0 and -mu_g for type 1, mu_g a unit vector per group.
    Assigned by blob, every cluster holds both types and its residual sum cancels mu_g;
    assigned by type, each cluster's residual is +-mu_g. The k-means initialisation sees
    the blobs, training has to learn the types."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(n_groups, 2))
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    blobs = np.array([[3, 3], [3, -3], [-3, 3], [-3, -3]], float)
    sets, groups = [], []
    for g in range(n_groups):
        for _ in range(per_group):
            kind = rng.integers(0, 2, n)[:, None]
            x = np.empty((n, 6))
            x[:, :2] = blobs[rng.integers(0, 4, n)] + 0.3 * rng.normal(size=(n, 2))
            x[:, 2:4] = np.where(kind == 0, [1.5, 0], [-1.5, 0]) + 0.2 * rng.normal(size=(n, 2))
            x[:, 4:] = np.where(kind == 0, 1, -1) * 0.8 * mu[g] + 0.2 * rng.normal(size=(n, 2))
            sets.append(x.astype(np.float32))
            groups.append(g)
    return sets, np.array(groups)


def retrieval_map(params, sets, groups):
    """mAP of each set searching the others (positives: its group), torch-free encoder."""
    from vladkit.retrieval.metrics import mean_average_precision

    vectors = NetVLADEncoder(params).fit(sets).transform(sets)
    scores = vectors @ vectors.T
    rankings = {q: list(np.argsort(-scores[q], kind="stable")) for q in range(len(sets))}
    truth = {q: [p for p in np.flatnonzero(groups == groups[q]) if p != q] for q in range(len(sets))}
    return mean_average_precision(rankings, truth)


TRAIN = dict(n_clusters=4, epochs=8, lr=1e-2, batch_size=8, descriptors_per_step=100, progress=False,
             n_threads=1, random_state=0)


@pytest.fixture(scope="module")
def trained():
    sets, groups = synthetic_groups()
    held_out = synthetic_groups(seed=1)  # other groups altogether
    params = train_netvlad(sets, groups, validation=held_out, keep_best=False, **TRAIN)
    initial = train_netvlad(sets, groups, **{**TRAIN, "epochs": 0})
    return sets, groups, held_out, params, initial


@pytest.mark.parametrize("init", ["v1", "v2"])
def test_training_reduces_the_loss_and_improves_held_out_map(init):
    sets, groups = synthetic_groups()
    held_out = synthetic_groups(seed=1)
    params = train_netvlad(sets, groups, init=init, validation=held_out, keep_best=False, **TRAIN)
    history = params.metadata["training"]["history"]
    assert [entry["epoch"] for entry in history] == list(range(9))
    assert history[-1]["loss"] < 0.5 * history[1]["loss"]  # the triplet loss of the mined tuples
    assert history[-1]["validation_map"] > history[0]["validation_map"] + 0.05
    initial = train_netvlad(sets, groups, init=init, **{**TRAIN, "epochs": 0})
    assert initial.bias is None if init == "v1" else initial.bias is not None
    # The same gain through the torch-free encoder, every descriptor of new groups' sets.
    assert retrieval_map(params, *held_out) > retrieval_map(initial, *held_out) + 0.05


def test_result_is_a_netvlad_file_with_its_training_summary(trained, tmp_path):
    from vladkit.encoders.netvlad_params import save_netvlad

    sets, _, _, params, initial = trained
    assert isinstance(params, NetVLADParams) and params.n_clusters == 4 and params.dim == 6
    assert params.layout == "KxD" and params.normalize_input and params.intra_norm and params.l2
    summary = params.metadata["training"]
    assert summary["loss"] == "triplet" and summary["epochs"] == 8 and summary["returned_epoch"] == 8
    assert summary["n_sets"] == 32 and summary["n_groups"] == 8 and summary["n_threads"] == 1
    assert params.metadata["init"] == "v2" == DEFAULT_INIT and params.metadata["alpha"] > 0
    save_netvlad(params, tmp_path / "p.npz")
    loaded = load_netvlad(tmp_path / "p.npz")
    assert np.array_equal(loaded.weight, params.weight) and loaded.metadata == params.metadata
    # epochs=0 is the initialisation itself: k-means on the MATLAB-style sample, then v2 (the default).
    assert not np.array_equal(initial.weight, params.weight)


def test_same_seed_same_parameters_other_seed_others():
    sets, groups = synthetic_groups(n_groups=4, per_group=3, n=60)
    options = {**TRAIN, "epochs": 2, "validation": 0.5}
    first = train_netvlad(sets, groups, **options)
    again = train_netvlad(sets, groups, **options)
    other = train_netvlad(sets, groups, **{**options, "random_state": 1})
    for name in ("weight", "bias", "centers"):
        assert np.array_equal(getattr(first, name), getattr(again, name)), name
    assert not np.array_equal(first.weight, other.weight)
    # Same inputs, seed and threads: equal parameters, metadata included (no timings in it).
    assert first == again and first.metadata == again.metadata
    # The caller's torch settings are left as they were.
    assert not torch.are_deterministic_algorithms_enabled()


def test_keep_best_returns_the_best_validation_epoch():
    sets, groups = synthetic_groups(n_groups=6, per_group=3, n=60)
    params = train_netvlad(sets, groups, **{**TRAIN, "epochs": 3, "lr": 0.5, "validation": 0.34})
    summary = params.metadata["training"]
    scores = [e["validation_map"] for e in summary["history"]]
    best = max(range(len(scores)), key=lambda epoch: (scores[epoch], epoch))
    assert summary["returned_epoch"] == best
    assert summary["n_validation_sets"] == 6  # whole groups held out: 2 of 6 groups of 3


def test_classification_loss_and_float16_sets():
    sets, groups = synthetic_groups(n_groups=4, per_group=4, n=60)
    params = train_netvlad([s.astype(np.float16) for s in sets], groups,
                           **{**TRAIN, "epochs": 2, "loss": "classification", "batch_size": 4})
    assert params.metadata["training"]["loss"] == "classification"
    assert np.isfinite(params.weight).all()
    both = train_netvlad(sets, groups, **{**TRAIN, "epochs": 1, "loss": "triplet+classification"})
    assert both.metadata["training"]["classification_weight"] == 1.0


def test_initial_parameters_can_be_given():
    sets, groups = synthetic_groups(n_groups=4, per_group=3, n=60)
    start = init_netvlad(np.random.default_rng(0).normal(size=(3, 6)), np.concatenate(sets), "v2")
    params = train_netvlad(sets, groups, **{**TRAIN, "init": start, "epochs": 1})
    assert params.n_clusters == 3 and params.bias is not None


def test_attacked_copies_are_reproducible_and_grouped():
    image = cv2.cvtColor(np.random.default_rng(0).integers(0, 255, (80, 90), dtype=np.uint8), cv2.COLOR_GRAY2RGB)
    copies = attacked_copies(image, 4, seed=3, index=7)
    again = attacked_copies(image, 4, seed=3, index=7)
    assert len(copies) == 4 and len({name for name, _ in copies}) == 4
    assert all(a[0] == b[0] and np.array_equal(a[1], b[1]) for a, b in zip(copies, again))
    assert [name for name, _ in attacked_copies(image, 4, seed=3, index=8)] != [name for name, _ in copies] or \
        not all(np.array_equal(a[1], b[1]) for a, b in zip(copies, attacked_copies(image, 4, seed=3, index=8)))
    assert len(attacked_copies(image[..., 0], 9)) == 9  # grey input; a second round of attacks
    assert list(copy_groups(2, 3)) == [0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize("kwargs, message", [
    (dict(groups=[0, 1]), "one group per descriptor set"),
    (dict(groups=[0] * 12), "at least two groups"),
    (dict(groups=list(range(12))), "attacked copies"),
    (dict(loss="hinge"), "loss must be one of"),
    (dict(init="v3"), "init must be"),
    (dict(epochs=-1), "epochs"),
    (dict(lr=0), "lr must be a positive number"),
    (dict(validation=1.5), "validation"),
    (dict(n_clusters=500), "to initialise 500 clusters"),
])
def test_bad_arguments(kwargs, message):
    sets, groups = synthetic_groups(n_groups=4, per_group=3, n=30)
    kwargs = {**TRAIN, "epochs": 1, "groups": groups, **kwargs}
    with pytest.raises(ValueError, match=message):
        train_netvlad(sets, **kwargs)


def test_bad_descriptors():
    sets, groups = synthetic_groups(n_groups=3, per_group=2, n=30)
    bad = list(sets)
    bad[4] = bad[4].copy()
    bad[4][3, 2] = np.nan
    with pytest.raises(ValueError, match=r"descriptor_sets\[4\]: descriptors contain NaN"):
        train_netvlad(bad, groups, **TRAIN)
    bad[4] = np.ones((5, 7), np.float32)
    with pytest.raises(ValueError, match=r"descriptor_sets\[4\]: descriptors of dimension 7, earlier sets 6"):
        train_netvlad(bad, groups, **TRAIN)
    with pytest.raises(TypeError, match="list of"):
        train_netvlad(np.zeros((6, 5, 6)), groups, **TRAIN)
    with pytest.raises(ValueError, match="validation descriptors have dimension 5"):
        train_netvlad(sets, groups, **{**TRAIN, "validation": ([np.ones((3, 5))] * 2, [0, 0])})


# ------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two folders of three textured 72 x 80 JPEGs each."""
    from conftest import textured_image

    root = tmp_path_factory.mktemp("netvlad-images")
    for i in range(6):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(exist_ok=True)
        cv2.imwrite(str(folder / f"img{i}.jpg"), textured_image(100 + i, (72, 80)))
    return root


FAST = ["-k", "4", "--epochs", "1", "--descriptors-per-image", "200", "--descriptors-per-step", "100",
        "--negatives", "2", "-q", "-j", "1"]


def test_cli_train_writes_a_loadable_file_and_encode_uses_it(folders, tmp_path, capsys):
    out = tmp_path / "netvlad.npz"
    assert main(["netvlad", "train", str(folders), *FAST, "--root", "--validation", "0", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "from 6 images in 2 folders" in printed
    params = load_netvlad(out)
    assert params.n_clusters == 4 and params.dim == 128
    assert params.metadata["descriptor_type"].startswith("DenseSIFT(") and "root=True" in params.metadata["descriptor_type"]
    assert params.metadata["labels"] == "folders" and params.metadata["training"]["n_groups"] == 2
    again = tmp_path / "again.npz"
    assert main(["netvlad", "train", str(folders), *FAST, "--root", "--validation", "0", "-o", str(again)]) == 0
    # Same inputs, seed and threads: the same bytes (the timings go to the output, not the file).
    assert again.read_bytes() == out.read_bytes()
    from vladkit.app.cli import build_parser

    encode_choices = next(a for a in build_parser()._subparsers._group_actions[0].choices["encode"]._actions
                          if a.dest == "encoder").choices
    if "netvlad" not in encode_choices:
        pytest.skip("vladkit encode has no netvlad encoder yet")
    encodings = tmp_path / "enc.npz"
    assert main(["encode", str(folders), "--vocab", str(out), "-q", "-o", str(encodings)]) == 0
    from vladkit.pipeline.encodings import load_encodings

    encoded = load_encodings(encodings)
    assert encoded.vectors.shape == (6, 4 * 128) and encoded.recipe.encoder == "netvlad"


def test_cli_train_without_labels(folders, tmp_path, capsys):
    out = tmp_path / "copies.npz"
    assert main(["netvlad", "train", str(folders), *FAST, "--labels", "none", "--copies", "2",
                 "--validation", "0.34", "-o", str(out)]) == 0
    assert "from 6 images and 12 attacked copies" in capsys.readouterr().out
    params = load_netvlad(out)
    assert params.metadata["labels"] == "none" and params.metadata["copies_per_image"] == 2
    assert params.metadata["training"]["n_validation_sets"] == 6  # 2 of 6 groups of 3, held out whole


def test_cli_usage_errors(folders, tmp_path, capsys):
    out = str(tmp_path / "x.npz")
    assert main(["netvlad", "train", str(folders), "--copies", "2", "-o", out]) == 2
    assert "--copies" in capsys.readouterr().err
    assert main(["netvlad", "train", str(folders), "--labels", "none", "--loss", "classification", "-o", out]) == 2
    assert "needs --labels folders" in capsys.readouterr().err
    assert main(["netvlad", "train", str(folders / "a"), "-o", out]) == 2
    assert "one folder" in capsys.readouterr().err
    assert main(["netvlad", "train", str(tmp_path / "empty"), "-o", out]) == 1
    assert main(["netvlad"]) == 2
    with pytest.raises(SystemExit) as exit_:
        main(["netvlad", "train", str(folders), "--validation", "1", "-o", out])
    assert exit_.value.code == 2
    assert not Path(out).exists()


# ------------------------------------------------------- validation on few groups


@pytest.mark.parametrize("sizes, keep, expected", [
    ([4, 4, 4], 2, [2, 2, 2]),        # few groups: 2 of each, 2 kept for the triplet loss
    ([3, 3, 3], 1, [2, 2, 2]),        # the classification loss keeps 1 per group
    ([4, 4], 2, [2, 2]),
    ([20, 20, 20], 2, [2, 2, 2]),     # labelled folders: 0.1 of each
    ([5] * 10, 2, [5, 5] + [0] * 8),  # an image and its copies: 2 whole groups (was 1)
    ([3] * 6, 2, [3, 3] + [0] * 4),
])
def test_validation_holds_out_two_groups_or_more(sizes, keep, expected):
    """The held-out sets (validation=0.1) span two groups or more, one with two sets or
    more: queries with a positive and negatives. (Holding out one whole group, as before
    on few or small groups, made every ranking perfect: validation mAP 1.000 always.)"""
    groups = np.repeat(np.arange(len(sizes)), sizes)
    train, held = _split_validation(groups, 0.1, np.random.default_rng(0), keep)
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(len(groups)))
    per_group = np.bincount(groups[held], minlength=len(sizes))
    assert sorted(per_group.tolist(), reverse=True) == expected
    kept = np.bincount(groups[train], minlength=len(sizes))
    assert np.all((kept >= keep) | (per_group == sizes))  # split groups keep enough to train


@pytest.mark.parametrize("sizes, keep, minimum", [
    ([3, 3, 3], 2, "one group of at least 4 sets and another of at least 3"),
    ([2, 2, 2], 1, "one group of at least 3 sets and another of at least 2"),
    ([1] * 6, 1, "4 groups or more"),  # whole groups of one set: no positives
])
def test_validation_that_cannot_be_held_out_is_refused(sizes, keep, minimum):
    groups = np.repeat(np.arange(len(sizes)), sizes)
    with pytest.raises(ValueError, match=minimum):
        _split_validation(groups, 0.1, np.random.default_rng(0), keep)


def test_a_given_validation_of_one_group_is_refused():
    sets, groups = synthetic_groups(n_groups=4, per_group=3, n=30)
    with pytest.raises(ValueError, match="all of one group: no negatives"):
        train_netvlad(sets, groups, **{**TRAIN, "epochs": 0, "validation": (sets[:3], [7, 7, 7])})


def _scene_tree(root, per_class, classes=("bedroom", "coast", "forest")):
    """Folders of real 200 x 200 15-Scene photos, one per class (skips without them)."""
    if not (DATA / "train").is_dir():
        pytest.skip(f"15-Scene not found at {DATA}")
    for name in classes:
        (root / name).mkdir(parents=True)
        for path in sorted((DATA / "train" / name).glob("*.jpg"))[:per_class]:
            shutil.copyfile(path, root / name / path.name)
    return root


#: Small enough for a few seconds of training (the rest is importing torch).
TINY = ["-k", "4", "--epochs", "2", "--descriptors-per-image", "150", "--descriptors-per-step", "100",
        "--negatives", "2", "--minibatch", "4", "-q", "-j", "1"]


def _vladkit(*args):
    return subprocess.run([sys.executable, "-m", "vladkit", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_cli_validation_on_three_folders_holds_out_from_each(tmp_path):
    """`vladkit netvlad train` on 3 folders of 4 photos, the default --validation 0.1: 2
    photos of every folder held out (not one whole folder, whose photos only had one
    another to find: validation mAP 1.000 at every epoch), and the summary counts 3
    folders (it counted the 2 trained on)."""
    tree = _scene_tree(tmp_path / "photos", 4)
    out = tmp_path / "netvlad.npz"
    done = _vladkit("netvlad", "train", tree, *TINY, "-o", out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "from 12 images in 3 folders, 6 of them held out for validation" in done.stdout
    summary = load_netvlad(out).metadata["training"]
    assert summary["n_validation_sets"] == 6 and summary["n_validation_groups"] == 3
    assert summary["n_sets"] == 6 and summary["n_groups"] == 3
    # With negatives to rank, a validation mAP below 1 (measured 0.875 at every epoch):
    # the reported number measures something.
    assert min(entry["validation_map"] for entry in summary["history"]) < 1


def test_cli_refuses_a_validation_it_cannot_hold_out(tmp_path):
    """3 folders of 3 photos: no split leaves a validation with a query, its positive and
    negatives while every folder keeps 2 photos for the triplet loss; the error says what
    would, and nothing is written."""
    tree = _scene_tree(tmp_path / "photos", 3)
    out = tmp_path / "netvlad.npz"
    done = _vladkit("netvlad", "train", tree, *TINY, "-o", out)
    assert done.returncode == 1, done.stdout
    assert "one group of at least 4 sets and another of at least 3" in done.stderr
    assert "or train without validation" in done.stderr and not out.exists()


def test_help_does_not_import_torch():
    code = ("import sys, contextlib, io; from vladkit.app.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: main(['netvlad', 'train', '--help'])\n"
            "    except SystemExit: pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "train").is_dir(), reason=f"15-Scene not found at {DATA}")
def test_quick_benchmark_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_netvlad.py"), "--quick", "--per-class", "2",
         "--data", str(DATA), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "netvlad-quick.md").read_text()
    assert "balanced accuracy" in table and "trained on labels + SPM" in table
    assert "trained on attacked copies" in table and "+ PQ 64x" in table
