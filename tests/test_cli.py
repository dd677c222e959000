import os
import re
import signal
import subprocess
import sys
import time

import cv2
import pytest

from vladkit import load_vocabulary
from vladkit.app.cli import main

CLI = [sys.executable, "-m", "vladkit"]


def run(*args, **kwargs):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """200 textured JPEGs in two sub-folders, plus one broken file."""
    from conftest import textured_image

    root = tmp_path_factory.mktemp("images")
    for i in range(200):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(exist_ok=True)
        cv2.imwrite(str(folder / f"img{i:03d}.jpg"), textured_image(i, (96, 112)))
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def test_console_script_help():
    script = os.path.join(os.path.dirname(sys.executable), "vladkit")
    result = subprocess.run([script, "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "vocab" in result.stdout


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    with pytest.raises(SystemExit) as info:
        main(["vocab", "build"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["vocab", "build", "x", "-k", "0", "-o", "v.npz"])
    assert info.value.code == 2
    assert "positive integer" in capsys.readouterr().err


def test_vocab_build_and_info(image_folder, tmp_path):
    out = tmp_path / "vocab.npz"
    result = run("vocab", "build", image_folder, "-k", "16", "--root", "--max-descriptors", "20000",
                 "--jobs", "2", "-o", out)
    assert result.returncode == 0, result.stderr
    assert "extracting" in result.stderr and "201/201" in result.stderr  # the progress bar
    assert "training kmeans (K=16)" in result.stderr
    assert "skipped" in result.stderr and "broken.jpg" in result.stderr
    assert "from 20,000 descriptors of 200 images (1 skipped)" in result.stdout
    vocab = load_vocabulary(out)
    assert vocab.centers_.shape == (16, 128)
    assert "DenseSIFT" in vocab.descriptor_type and "root=True" in vocab.descriptor_type

    info = run("vocab", "info", out)
    assert info.returncode == 0
    assert "kmeans" in info.stdout and "words:            16" in info.stdout


def test_vocab_build_gmm_with_pca_is_reproducible(image_folder, tmp_path):
    args = ["vocab", "build", image_folder, "-k", "4", "--kind", "gmm", "--pca", "16",
            "--features", "sift", "--max-descriptors", "3000", "-q", "--seed", "3"]
    assert run(*args, "-o", tmp_path / "a.npz").returncode == 0
    assert run(*args, "-o", tmp_path / "b.npz").returncode == 0
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    vocab = load_vocabulary(tmp_path / "a.npz")
    assert vocab.means_.shape == (4, 16) and vocab.pca_components_.shape == (16, 128)


def test_failures_exit_1(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run("vocab", "build", empty, "-o", tmp_path / "v.npz")
    assert result.returncode == 1 and "no images found" in result.stderr
    result = run("vocab", "info", tmp_path / "missing.npz")
    assert result.returncode == 1 and "missing.npz" in result.stderr
    assert not (tmp_path / "v.npz").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_build_leaves_no_file(tmp_path, sig):
    from conftest import textured_image

    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(120):
        cv2.imwrite(str(folder / f"{i:03d}.png"), textured_image(i, (256, 256)))
    out = tmp_path / "vocab.npz"
    process = subprocess.Popen([*CLI, "vocab", "build", str(folder), "-k", "8", "--jobs", "1",
                                "--batch-size", "4", "-o", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Wait until a few batches are extracted (so the kernels are compiled: a fresh install
    # compiles them in this process, and a signal during compilation is not the case
    # tested here), then interrupt.
    deadline = time.time() + 120
    seen = ""
    while time.time() < deadline and not any(int(n) >= 8 for n in re.findall(r"(\d+)/120", seen)):
        character = process.stderr.read(1)
        if not character:
            break
        seen += character
    assert process.poll() is None, "the job ended before it could be interrupted"
    process.send_signal(sig)
    process.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert process.returncode == 130
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [folder]  # no temporary files either
