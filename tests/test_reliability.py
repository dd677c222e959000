"""Bad input and interrupted jobs through the command line: nothing lost, nothing half-written."""

import json
import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import textured_image
from test_images import _png_claiming_size
from vladkit.app.cli import main


def _good_images(folder, n, size=(96, 128)):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(folder / f"good_{i:03d}.png")
        cv2.imwrite(str(paths[-1]), textured_image(100 + i, size))
    return paths


def _bad_file_corpus(folder):
    """Files a real folder holds: {name: expected} with True = readable (must be encoded)
    and False = unreadable (must be reported once, with a reason)."""
    folder.mkdir(parents=True, exist_ok=True)
    image = textured_image(7, (80, 100))
    ok, jpeg = cv2.imencode(".jpg", image)
    (folder / "truncated.jpg").write_bytes(jpeg.tobytes()[: len(jpeg) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not an image")
    (folder / "bomb.png").write_bytes(_png_claiming_size(50_000, 50_000))
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")  # a symlink to itself
    expected = {"truncated.jpg": False, "empty.jpg": False, "notes.jpg": False, "bomb.png": False,
                "loop.jpg": False}
    # Readable, if unusual: each must be encoded (1x1 and flat images give zero vectors).
    ok, png = cv2.imencode(".png", image)
    (folder / "png_named.jpg").write_bytes(png.tobytes())
    cv2.imwrite(str(folder / "one_pixel.png"), np.full((1, 1), 128, np.uint8))
    cv2.imwrite(str(folder / "sixteen_bit.png"), (image.astype(np.uint16) * 257))
    Image.fromarray(np.stack([image] * 3, axis=2)).convert("CMYK").save(folder / "cmyk.jpg")
    frames = [Image.fromarray(np.roll(image, 7 * k, axis=1)) for k in range(3)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    expected.update({"png_named.jpg": True, "one_pixel.png": True, "sixteen_bit.png": True,
                     "cmyk.jpg": True,
                     # OpenCV reads GIF (first frame) from 4.11; an older build reports it
                     "animated.gif": cv2.haveImageReader(str(folder / "animated.gif"))})
    if os.geteuid() != 0:  # root reads any file: the case cannot be made as root
        locked = folder / "locked.png"
        cv2.imwrite(str(locked), image)
        locked.chmod(0)
        expected["locked.png"] = False
    return expected


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vocab_images")
    _good_images(folder, 6)
    path = folder / "words.npz"
    assert main(["vocab", "build", str(folder), "-k", "8", "--step", "8", "--sizes", "4", "8",
                 "-o", str(path), "-q"]) == 0
    return path


def test_bad_file_corpus_is_reported_and_skipped(tmp_path, vocabulary, capsys):
    folder = tmp_path / "photos"
    good = _good_images(folder, 4)
    expected = _bad_file_corpus(folder / "mixed")
    capsys.readouterr()
    output, log = tmp_path / "enc.npz", tmp_path / "errors.jsonl"
    assert main(["encode", str(folder), "--vocab", str(vocabulary), "-o", str(output), "-q",
                 "--error-log", str(log)]) == 0
    stderr = capsys.readouterr().err
    with np.load(output) as stored:
        ids = [os.path.basename(i) for i in stored["ids"]]
        vectors = stored["vectors"]
    readable = [name for name, ok in expected.items() if ok] + [p.name for p in good]
    assert sorted(ids) == sorted(readable)
    assert np.all(np.isfinite(vectors))
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    unreadable = sorted(name for name, ok in expected.items() if not ok)
    assert sorted(os.path.basename(entry["path"]) for entry in logged) == unreadable
    for entry in logged:
        assert entry["reason"]  # a reason in words
        # each bad file is named exactly once on stderr, with its reason
        assert stderr.count(f"skipped {entry['path']}:") == 1, entry
        assert entry["reason"] in stderr
    assert f"skipped {len(unreadable)}" in stderr  # the summary


def test_on_error_raise_fails_and_writes_nothing(tmp_path, vocabulary, capsys):
    folder = tmp_path / "photos"
    _good_images(folder, 3)
    (folder / "broken.jpg").write_text("not an image")
    output = tmp_path / "enc.npz"
    assert main(["encode", str(folder), "--vocab", str(vocabulary), "-o", str(output), "-q",
                 "--on-error", "raise"]) == 1
    assert "broken.jpg" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["photos"]  # no output, no temporary, no work folder
    assert main(["vocab", "build", str(folder), "-k", "2", "-o", str(tmp_path / "w.npz"), "-q",
                 "--on-error", "raise"]) == 1
    assert sorted(os.listdir(tmp_path)) == ["photos"]


def _encode_command(folder, vocabulary, output):
    return [sys.executable, "-m", "vladkit", "encode", str(folder), "--vocab", str(vocabulary),
            "-o", str(output), "-q", "--shard-size", "4", "--batch-size", "2", "--jobs", "1"]


def test_killed_encode_resumes_to_the_same_output(tmp_path, vocabulary):
    folder = tmp_path / "photos"
    _good_images(folder, 120, size=(160, 200))
    (folder / "broken.jpg").write_text("not an image")
    reference = tmp_path / "reference.npz"
    subprocess.run(_encode_command(folder, vocabulary, reference), check=True, capture_output=True)

    output = tmp_path / "resumed.npz"
    parts = tmp_path / "resumed.npz.parts"
    job = subprocess.Popen(_encode_command(folder, vocabulary, output),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(parts.glob("shard-*.json"))) < 3 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert job.returncode == -signal.SIGKILL, "the job finished before it could be killed"
    done = len(list(parts.glob("shard-*.json")))
    assert 3 <= done < 31 and not output.exists()

    rerun = subprocess.run(_encode_command(folder, vocabulary, output), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed" in rerun.stderr
    assert not parts.exists()  # the work folder is removed once the output is written
    assert output.read_bytes() == reference.read_bytes()  # no duplicates, no gaps, same bytes
