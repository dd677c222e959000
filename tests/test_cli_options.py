"""The command line as users meet it at the edges: options that would do nothing, a
project folder moved elsewhere, file names that are not UTF-8, a closed output pipe,
recipes that record what was really used, and queries searched in batches."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import cv2
import pytest

from conftest import cli
from vladkit import load_vocabulary
from vladkit.app.cli import main
from vladkit.pipeline.encodings import load_encodings
from vladkit.features.extractors import DenseSIFT

CLI = [sys.executable, "-m", "vladkit"]
ROOT = Path(__file__).resolve().parent.parent




def _write_images(folder, n, first_seed=0):
    from conftest import textured_image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        assert cv2.imwrite(str(folder / f"img{i}.png"), textured_image(first_seed + i, (96, 120)))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder: images, a 8-word vocabulary and the encodings, side by side."""
    root = tmp_path_factory.mktemp("project") / "proj"
    _write_images(root / "images", 6)
    for args in (("vocab", "build", root / "images", "-k", 8, "-o", root / "words.npz", "-q"),
                 ("encode", root / "images", "--vocab", root / "words.npz", "-o", root / "enc.npz", "-q")):
        code, _, err = cli(*args)
        assert code == 0, err
    return root


# ------------------------------------------------------------- options that do nothing


@pytest.mark.parametrize("options, named", [
    (("--power", "0.5", "--whiten", "0.25"), ("--whiten", "--power", "--pca")),
    (("--power", "0.5"), ("--power", "--pca")),
    (("--nprobe", "99", "--pq", "4x4"), ("--nprobe", "--nlist")),
    (("--nlist", "2"), ("--nlist", "--pq")),
    (("--train", "{enc}"), ("--train", "--pca")),
])
def test_index_build_refuses_options_that_would_do_nothing(project, tmp_path, options, named):
    options = [option.format(enc=project / "enc.npz") for option in options]
    code, _, err = cli("index", "build", project / "enc.npz", *options, "-o", tmp_path / "idx")
    assert code == 2, err
    assert all(name in err for name in named), err
    assert not (tmp_path / "idx").exists()


@pytest.mark.parametrize("command, options, named", [
    ("vocab", ("--features", "sift", "--step", "8", "--sizes", "3"), ("--step", "--sizes", "--features sift")),
    ("vocab", ("--whiten",), ("--whiten", "--pca")),
    ("vocab", ("--kind", "gmm", "--pca", "0", "--whiten"), ("--whiten", "--pca")),
    ("encode", ("--features", "sift", "--step", "3"), ("--step", "--features sift")),
])
def test_feature_options_that_would_do_nothing(project, tmp_path, command, options, named):
    if command == "vocab":
        args = ("vocab", "build", project / "images", "-o", tmp_path / "out.npz", "-q", *options)
    else:
        args = ("encode", project / "images", "--vocab", project / "words.npz", "-o", tmp_path / "out.npz",
                "-q", *options)
    code, _, err = cli(*args)
    assert code == 2, err
    assert all(name in err for name in named), err
    assert not (tmp_path / "out.npz").exists()


def test_search_extracts_the_queries_in_batches(project, tmp_path, monkeypatch):
    """-j works across query images: they are extracted together, not one call each."""
    code, _, err = cli("index", "build", project / "enc.npz", "-o", tmp_path / "idx")
    assert code == 0, err
    calls = []
    transform = DenseSIFT.transform

    def counting(self, X, *args, **kwargs):
        calls.append(len(X))
        return transform(self, X, *args, **kwargs)

    monkeypatch.setattr(DenseSIFT, "transform", counting)
    queries = sorted((project / "images").glob("*.png"))
    code, out, err = cli("search", tmp_path / "idx", *queries, "--top", 1, "--json", "-j", 2)
    assert code == 0, err
    assert calls == [len(queries)]
    answers = json.loads(out)
    assert [a["query"] for a in answers] == [str(q) for q in queries]
    assert all(a["results"][0]["id"] == a["query"] for a in answers)  # each finds itself


# ----------------------------------------------------------- the recipe, honest defaults


def test_gmm_vocabulary_has_fishers_default_pca_and_recipes_record_what_was_used(project, tmp_path):
    code, _, err = cli("vocab", "build", project / "images", "-k", 4, "--kind", "gmm", "-o", tmp_path / "g.npz",
                       "-q", "--max-descriptors", 3000)
    assert code == 0, err
    assert load_vocabulary(tmp_path / "g.npz").pca_components_.shape == (64, 128)  # FisherEncoder's "auto"

    code, _, err = cli("vocab", "build", project / "images", "-k", 4, "--kind", "gmm", "--pca", 0,
                       "-o", tmp_path / "g0.npz", "-q", "--max-descriptors", 3000)
    assert code == 0, err
    assert load_vocabulary(tmp_path / "g0.npz").dim_ == 128
    for vocabulary, encoder in (("g0.npz", "fisher"), (project / "words.npz", "vlad")):
        code, _, err = cli("encode", project / "images", "--vocab", tmp_path / vocabulary, "-o", tmp_path / "e.npz",
                           "-q", "--encoder", encoder)
        assert code == 0, err
        params = load_encodings(tmp_path / "e.npz").recipe.encoder_params
        # The vocabulary was given: what would have trained one was not used.
        assert not {"n_components", "n_clusters", "pca", "max_descriptors", "random_state"} & set(params), params
        assert params, "the parameters that shape the vectors are recorded"


# ------------------------------------------------------------------- moved project folder


def test_index_build_finds_a_moved_vocabulary_by_content(project, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(project, moved)  # (the original stays for the other tests)
    recorded = load_encodings(moved / "enc.npz").recipe.vocabulary_path
    assert Path(recorded) == project / "words.npz"
    os.rename(project / "words.npz", project / "words.away")  # as if the folder had moved
    try:
        # Beside the encodings, under any name: found by its SHA-256.
        os.rename(moved / "words.npz", moved / "renamed.npz")
        code, _, err = cli("index", "build", moved / "enc.npz", "-o", tmp_path / "idx")
        assert code == 0, err

        # Elsewhere: the error says how to give it, and --vocab does.
        elsewhere = tmp_path / "elsewhere.npz"
        os.rename(moved / "renamed.npz", elsewhere)
        code, _, err = cli("index", "build", moved / "enc.npz", "-o", tmp_path / "idx2")
        assert code == 1 and "--vocab" in err and str(recorded) in err, err
        code, _, err = cli("index", "build", moved / "enc.npz", "--vocab", elsewhere, "-o", tmp_path / "idx2")
        assert code == 0, err

        # Another file is refused: queries would be encoded differently.
        code, _, err = cli("index", "build", moved / "enc.npz", "--vocab", moved / "enc.npz", "-o", tmp_path / "idx3")
        assert code == 1 and "is not the vocabulary" in err, err
        assert not (tmp_path / "idx3").exists()
    finally:
        os.rename(project / "words.away", project / "words.npz")

    code, out, err = cli("search", tmp_path / "idx2", moved / "images" / "img0.png", "--top", 1)
    assert code == 0, err
    assert str(project / "images" / "img0.png") in out  # the ids are the paths encoded


# ------------------------------------------------------------ file names that are not UTF-8


@pytest.mark.skipif(sys.platform != "linux", reason="byte file names are a POSIX matter")
def test_file_names_that_are_not_utf8_round_trip(project, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    ok, buffer = cv2.imencode(".png", cv2.imread(str(project / "images" / "img0.png")))
    good, bad = os.fsencode(folder) + b"/ok_\xfe.png", os.fsencode(folder) + b"/bad_\xff.jpg"
    with open(good, "wb") as handle:
        handle.write(buffer.tobytes())
    with open(bad, "wb") as handle:
        handle.write(b"not an image")
    shutil.copy(project / "images" / "img1.png", folder / "plain.png")
    log, enc, idx = tmp_path / "log.jsonl", tmp_path / "enc.npz", tmp_path / "idx"
    env = dict(os.environ, LC_ALL="C.UTF-8", PYTHONIOENCODING="")

    def run(*args):
        return subprocess.run([*CLI, *map(str, args)], capture_output=True, env=env, timeout=300)

    result = run("encode", folder, "--vocab", project / "words.npz", "-o", enc, "-q", "--error-log", log)
    assert result.returncode == 0, result.stderr
    assert b"bad_\xff.jpg" in result.stderr  # the name as its bytes, like ls
    [line] = log.read_text(encoding="utf-8").splitlines()  # valid UTF-8
    assert os.fsencode(json.loads(line)["path"]) == bad
    ids = load_encodings(enc).ids
    assert good in [os.fsencode(i) for i in ids]

    assert run("index", "build", enc, "-o", idx).returncode == 0
    result = run("search", idx, os.fsdecode(good), "--top", 1, "--json")
    assert result.returncode == 0, result.stderr
    [answer] = json.loads(result.stdout.decode("utf-8"))
    assert os.fsencode(answer["query"]) == good and os.fsencode(answer["results"][0]["id"]) == good
    result = run("search", idx, os.fsdecode(good), "--top", 1)
    assert result.returncode == 0 and good in result.stdout, result.stderr


# ---------------------------------------------------------------------- closed pipe, docs


def test_a_closed_output_pipe_ends_quietly(project):
    """`vladkit vocab info F | head -1`: no error message, the status of SIGPIPE."""
    process = subprocess.Popen([*CLI, "vocab", "info", project / "words.npz"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()  # before the command writes anything (it takes a second to start)
    _, err = process.communicate(timeout=300)
    assert err == b"", err
    assert process.returncode == 128 + signal.SIGPIPE

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    err = io.StringIO()
    with redirect_stdout(ClosedPipe()), redirect_stderr(err):
        code = main(["vocab", "info", str(project / "words.npz")])
    assert code == 128 + signal.SIGPIPE and err.getvalue() == ""


def test_documents_cited_are_in_the_repository():
    """Code, tests and docs cite only documents a user of the repository can open."""
    import re

    cited = set()
    for path in [*ROOT.glob("*.md"), *ROOT.glob("vladkit/**/*.py"), *ROOT.glob("tests/*.py"),
                 *ROOT.glob("benchmarks/*.py")]:
        if path.name != Path(__file__).name:
            cited |= set(re.findall(r"\b([A-Z][A-Z_]+\.md)\b", path.read_text(encoding="utf-8")))
    assert "ARCHITECTURE.md" in cited
    assert all((ROOT / name).is_file() for name in cited), sorted(cited)


def test_encoder_and_vocabulary_kinds_must_match(project, tmp_path):
    code, _, err = cli("encode", project / "images", "--vocab", project / "words.npz", "--encoder", "fisher",
                       "-o", tmp_path / "e.npz", "-q")
    assert code == 2 and "GMMVocabulary" in err and "--kind gmm" in err, err
    assert not (tmp_path / "e.npz").exists()


def test_qe_alpha_without_qe_is_refused(project, tmp_path):
    """--qe-alpha weights query expansion's results: alone it used to be silently ignored
    (exit 0); it is now refused as other options that would do nothing (exit 2)."""
    code, _, err = cli("index", "build", project / "enc.npz", "-o", tmp_path / "idx", "-q")
    assert code == 0, err
    query = str(project / "images" / "img0.png")
    for args in (["search", str(tmp_path / "idx"), query],
                 ["evaluate", str(tmp_path / "idx"), str(project / "enc.npz"), "--ground-truth", "folders"]):
        alone = subprocess.run(CLI + args + ["--qe-alpha", "3"], capture_output=True, text=True)
        assert alone.returncode == 2, alone.stderr
        assert "--qe-alpha" in alone.stderr and "--qe M" in alone.stderr
        with_qe = subprocess.run(CLI + args + ["--qe", "2", "--qe-alpha", "3"], capture_output=True, text=True)
        assert with_qe.returncode in (0, 1) and "--qe-alpha" not in with_qe.stderr, with_qe.stderr
