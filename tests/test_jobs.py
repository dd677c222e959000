"""Encoding jobs (vladkit.pipeline.jobs) and the sharded encodings format (vladkit.pipeline.sharded):
resumable, out of core, and the same bytes locally and on a Dask cluster."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import warnings

import cv2
import numpy as np
import pytest

from conftest import textured_image
from vladkit import (DenseSIFT, EncodedImages, ImageEncoder, ImageReadError, KMeansVocabulary, Recipe,
                     ShardedEncodings, encode_images, load_encodings)
from vladkit.pipeline.recipe import EncodingsFileError

EXTRACTOR = DenseSIFT(step=8, sizes=(4, 8), root=True)


def _images(folder, n, size=(96, 128), broken=()):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img_{i:04d}.png"
        if i in broken:
            path.write_text("not an image")
        else:
            cv2.imwrite(str(path), textured_image(300 + i, size))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Images (one unreadable) and a recipe: dense RootSIFT + VLAD on 8 words."""
    root = tmp_path_factory.mktemp("jobs")
    paths = _images(root / "images", 23, broken=(9,))
    sample = np.concatenate([f.descriptors for f in EXTRACTOR.transform([str(p) for p in paths[:4]])])
    vocabulary_path = root / "words.npz"
    KMeansVocabulary(8, random_state=0).fit_sample(sample).save(vocabulary_path)
    return paths, Recipe.make(EXTRACTOR, vocabulary_path, "vlad")


def _run(paths, recipe, folder, **options):
    options.setdefault("shard_size", 4)
    options.setdefault("batch_size", 2)
    options.setdefault("n_jobs", 1)
    skipped = []
    result = encode_images(paths, recipe, folder, on_skipped=lambda path, reason: skipped.append(path), **options)
    return result, skipped


def _folder_bytes(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_job_matches_the_encoder_and_reads_back_block_by_block(setup, tmp_path):
    paths, recipe = setup
    result, skipped = _run(paths, recipe, tmp_path / "out")
    assert skipped == [str(paths[9])] and [s[0] for s in result.skipped] == [str(paths[9])]
    encodings = load_encodings(tmp_path / "out")
    assert isinstance(encodings, ShardedEncodings)
    readable = [str(p) for i, p in enumerate(paths) if i != 9]
    assert encodings.ids == readable and len(encodings) == 22
    # The same vectors as the estimators give, image by image.
    _, encoder = recipe.build(n_jobs=1)
    expected = ImageEncoder(EXTRACTOR, encoder).fit(readable[:1]).transform(readable)
    np.testing.assert_array_equal(encodings.vectors, expected)
    starts = [start for start, _ in encodings.blocks()]
    assert starts == [0, 4, 8, 11, 15, 19]  # one block per shard (shard 2 lost its broken image)
    rows = [21, 0, 5, 5, 12]
    np.testing.assert_array_equal(encodings.take(rows), expected[rows])
    sample, sampled_rows = encodings.sample(7, seed=3)
    np.testing.assert_array_equal(sample, expected[sampled_rows])
    assert len(set(sampled_rows.tolist())) == 7
    # An .npz of the same vectors gives the same sample (index build trains on it).
    same = EncodedImages(expected, readable, recipe)
    np.testing.assert_array_equal(same.sample(7, seed=3)[1], sampled_rows)


def test_rerun_resumes_and_verifies_shards(setup, tmp_path):
    paths, recipe = setup
    reference, _ = _run(paths, recipe, tmp_path / "reference")
    expected = _folder_bytes(tmp_path / "reference")
    folder = tmp_path / "out"
    _run(paths, recipe, folder)
    (folder / "shard-000001.json").unlink()                 # a shard that never finished
    data = bytearray((folder / "shard-000003.npy").read_bytes())
    data[-1] ^= 0xFF                                        # a shard damaged on disk
    (folder / "shard-000003.npy").write_bytes(bytes(data))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["complete"] = False                            # killed before the end
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EncodingsFileError, match="unfinished"):
        load_encodings(folder)
    result, skipped = _run(paths, recipe, folder)
    assert result.resumed == 23 - 8  # shards 1 and 3 (4 images each) computed again
    assert skipped == []              # shard 2's broken image was reported by the first run
    assert [s[0] for s in result.skipped] == [str(paths[9])]  # but is still in the summary
    assert _folder_bytes(folder) == expected


def test_other_job_starts_over_and_other_files_are_refused(setup, tmp_path):
    paths, recipe = setup
    folder = tmp_path / "out"
    _run(paths[:8], recipe, folder)
    messages = []
    _run(paths[:12], recipe, folder, log=messages.append)
    assert "starting over" in messages[0]
    assert len(load_encodings(folder)) == 11 and not (folder / "shard-000003.npy").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="holiday.jpg"):
        _run(paths, recipe, mine)
    assert os.listdir(mine) == ["holiday.jpg"]


def test_raise_stops_at_the_unreadable_image_keeping_finished_shards(setup, tmp_path):
    paths, recipe = setup
    with pytest.raises(ImageReadError) as error:
        _run(paths, recipe, tmp_path / "out", on_error="raise")
    assert error.value.path == str(paths[9])
    assert sorted(p.name for p in (tmp_path / "out").glob("shard-*.json")) == ["shard-000000.json",
                                                                             "shard-000001.json"]


# ---------------------------------------------------------------------------------- Dask

@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed", reason="Dask is an optional extra: pip install 'vladkit[dask]'")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Port 8787 is already in use" and the like
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           dashboard_address=None, silence_logs=50)
    with cluster, distributed.Client(cluster) as dask_client:
        yield dask_client


def test_dask_gives_the_same_bytes_and_reports_once(setup, tmp_path, client):
    paths, recipe = setup
    _run(paths, recipe, tmp_path / "here")
    result, skipped = _run(paths, recipe, tmp_path / "dask", client=client)
    assert _folder_bytes(tmp_path / "dask") == _folder_bytes(tmp_path / "here")
    assert skipped == [str(paths[9])]  # reported once, by the client


def test_dask_runs_one_job_into_two_folders_as_two_jobs(setup, tmp_path, client):
    """The same images and recipe into two folders at once, on one client: the task keys
    name the destination. They used to be the same keys, so Dask ran one set of tasks and
    one folder failed with "shard-000000 is missing"."""
    paths, recipe = setup
    _run(paths, recipe, tmp_path / "here")
    outcome = {}

    def job(name):
        try:
            outcome[name] = _run(paths, recipe, tmp_path / name, client=client)
        except BaseException as exc:  # noqa: BLE001 (reported by the assertion below)
            outcome[name] = exc

    threads = [threading.Thread(target=job, args=(name,)) for name in ("dA.enc", "dB.enc")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not any(isinstance(value, BaseException) for value in outcome.values()), outcome
    assert _folder_bytes(tmp_path / "dA.enc") == _folder_bytes(tmp_path / "here")
    assert _folder_bytes(tmp_path / "dB.enc") == _folder_bytes(tmp_path / "here")


def test_dask_survives_a_killed_worker(tmp_path, setup, client):
    _, recipe = setup
    paths = _images(tmp_path / "many", 48, size=(240, 320), broken=(17,))
    _run(paths, recipe, tmp_path / "here", shard_size=2)
    folder = tmp_path / "dask"
    outcome = {}

    def job():
        try:
            outcome["result"] = _run(paths, recipe, folder, shard_size=2, client=client)
        except BaseException as exc:  # noqa: BLE001 (reported by the assertion below)
            outcome["error"] = exc

    thread = threading.Thread(target=job)
    thread.start()
    deadline = time.monotonic() + 60
    while not list(folder.glob("shard-*.json")) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert thread.is_alive(), "the job ended before a worker could be killed"
    pids = client.run(os.getpid)
    victim = sorted(pids.values())[0]
    os.kill(victim, signal.SIGKILL)
    thread.join(180)
    assert "error" not in outcome, outcome.get("error")
    assert len(list(folder.glob("shard-*.json"))) == 24
    assert victim not in client.run(os.getpid).values()  # it was killed (and replaced)
    assert _folder_bytes(folder) == _folder_bytes(tmp_path / "here")
    assert outcome["result"][1] == [str(paths[17])]  # reported once, although its task may have run twice


def test_cli_workers_same_bytes_and_a_killed_client_resumes(tmp_path):
    pytest.importorskip("distributed", reason="Dask is an optional extra: pip install 'vladkit[dask]'")
    import subprocess
    import sys

    folder = tmp_path / "photos"
    _images(folder, 100, size=(160, 200), broken=(31,))
    vocabulary = tmp_path / "words.npz"
    base = [sys.executable, "-m", "vladkit"]
    subprocess.run(base + ["vocab", "build", str(folder), "-k", "8", "--step", "8", "--sizes", "4", "8",
                           "-o", str(vocabulary), "-q"], check=True, capture_output=True)

    def encode(output, *options):
        return base + ["encode", str(folder), "--vocab", str(vocabulary), "-o", str(output), "-q",
                       "--shard-size", "4", "--batch-size", "2", *options]

    here = subprocess.run(encode(tmp_path / "here", "--jobs", "1"), capture_output=True, text=True)
    assert here.returncode == 0, here.stderr
    assert here.stderr.count("img_0031.png") == 1
    full = subprocess.run(encode(tmp_path / "full", "--workers", "2"), capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    assert full.stderr.count("img_0031.png") == 1  # reported once, by the client
    assert _folder_bytes(tmp_path / "full") == _folder_bytes(tmp_path / "here")
    output = tmp_path / "dask"
    job = subprocess.Popen(encode(output, "--workers", "2"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(output.glob("shard-*.json"))) < 3 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert job.returncode == -signal.SIGKILL, "the job finished before it could be killed"
    assert not (output / "manifest.json").read_text().count('"complete": true')
    rerun = subprocess.run(encode(output, "--workers", "2"), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed" in rerun.stderr
    assert _folder_bytes(output) == _folder_bytes(tmp_path / "here")
