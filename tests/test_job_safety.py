"""Encoding jobs under concurrency and damage, through the real command line: one job per
output folder, folders that are not vladkit's never cleared, shards of another job never
adopted, Dask tasks per destination, checksums checked by readers, permissions from the
umask, and what a failed ``-o X.npz`` run leaves behind.

Each test reproduces a defect found on an earlier version (issue 29) and fails there."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import cli, textured_image
from vladkit import FolderLockedError, Recipe, ShardedEncodings, encode_images, load_encodings
from vladkit.pipeline.recipe import EncodingsFileError

CLI = [sys.executable, "-m", "vladkit"]


def _images(folder, n, size=(96, 128), first_seed=500):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        assert cv2.imwrite(str(folder / f"img_{i:04d}.png"), textured_image(first_seed + i, size))
    return sorted(folder.glob("*.png"))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """40 images and two vocabularies of the same size (two jobs that differ only by
    their vocabulary), from `vladkit vocab build`."""
    root = tmp_path_factory.mktemp("safety")
    _images(root / "photos", 40)
    for name, seed in (("words_a.npz", 0), ("words_b.npz", 1)):
        code, _, err = cli("vocab", "build", root / "photos", "-k", 8, "--step", 8, "--sizes", 4, 8,
                           "--max-descriptors", 5000, "--seed", seed, "-o", root / name, "-q")
        assert code == 0, err
    return root


def _encode(project, output, vocabulary="words_a.npz", *options):
    return CLI + ["encode", str(project / "photos"), "--vocab", str(project / vocabulary), "-o", str(output),
                  "-q", "--shard-size", "2", "--batch-size", "2", "-j", "1", *options]


def _folder_bytes(folder):
    """Every file of a finished folder but its (empty) lock file, by name."""
    return {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir()) if path.name != ".vladkit.lock"}


@pytest.fixture(scope="module")
def clean_runs(project, tmp_path_factory):
    """The folder a clean, single run of each job writes."""
    root = tmp_path_factory.mktemp("clean")
    runs = {}
    for vocabulary in ("words_a.npz", "words_b.npz"):
        done = subprocess.run(_encode(project, root / f"{vocabulary}.enc", vocabulary), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        runs[vocabulary] = _folder_bytes(root / f"{vocabulary}.enc")
    assert runs["words_a.npz"]["shard-000000.npy"] != runs["words_b.npz"]["shard-000000.npy"]
    return runs


# ------------------------------------------------------------------ one job per folder


def test_a_second_job_on_a_busy_folder_fails_naming_the_holder_and_changes_nothing(project, clean_runs,
                                                                                     tmp_path):
    """The issue's reproduction: a job with another vocabulary started on a folder while
    the first writes it. It used to start over, exit 0 and leave a mix of both jobs' rows.
    The first job is paused (SIGSTOP) while the second runs, so the overlap is certain."""
    output = tmp_path / "shared.enc"
    first = subprocess.Popen(_encode(project, output), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (output / "shard-000001.json").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)
        assert first.poll() is None, "the first job finished before the second could start"
        before = _folder_bytes(output)
        second = subprocess.run(_encode(project, output, "words_b.npz"), capture_output=True, text=True)
        # The same from the library: the error names the holder.
        recipe = Recipe.from_json(json.loads((output / "manifest.json").read_text())["job"]["recipe"])
        with pytest.raises(FolderLockedError) as error:
            encode_images(sorted((project / "photos").glob("*.png")), recipe, output, shard_size=2,
                          batch_size=2, n_jobs=1)
        assert _folder_bytes(output) == before  # nothing touched
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 1, second.stderr
    assert "in use by another vladkit job" in second.stderr and f"process {first.pid}" in second.stderr
    assert "words_a.npz" in second.stderr  # the holder's command
    assert error.value.holder["pid"] == first.pid
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert _folder_bytes(output) == clean_runs["words_a.npz"]


@pytest.mark.parametrize("existing", [
    {"manifest.json": '{"name": "my dataset"}', "images.jsonl": '"a.jpg"\n', "shard-notes.json": "{}"},
    {"manifest.json": json.dumps({"format": "vladkit-encodings-sharded", "format_version": 99, "job": {}}),
     "shard-000000.json": "{}"},
    {"notes.txt": "precious"},
])
def test_a_folder_that_is_not_vladkits_is_refused_and_never_cleared(project, tmp_path, existing):
    """A folder holding files named like a job's, under a manifest that is not vladkit's
    (or of a version it does not write), used to be cleared silently, exit 0."""
    folder = tmp_path / "mydata"
    folder.mkdir()
    for name, text in existing.items():
        (folder / name).write_text(text)
    done = subprocess.run(_encode(project, folder), capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    assert "not a vladkit encodings folder" in done.stderr and "Nothing was changed" in done.stderr
    assert all(repr(name) in done.stderr for name in existing)  # what is there, listed
    assert {path.name: path.read_text() for path in folder.iterdir()} == existing


def test_another_jobs_shards_are_never_adopted(project, clean_runs, tmp_path):
    """Shards of job A (same input range, intact) in the unfinished folder of job B: B's
    rerun computes them again. They used to be adopted on their range alone."""
    folder = tmp_path / "b.enc"
    folder.mkdir()
    for name, data in clean_runs["words_b.npz"].items():
        (folder / name).write_bytes(data)
    for name in ("shard-000003.npy", "shard-000003.json"):
        (folder / name).write_bytes(clean_runs["words_a.npz"][name])
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["complete"] = False  # B was killed before its end
    (folder / "manifest.json").write_text(json.dumps(manifest))
    rerun = subprocess.run(_encode(project, folder, "words_b.npz"), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed: 38 of 40" in rerun.stderr  # all but shard 3
    assert _folder_bytes(folder) == clean_runs["words_b.npz"]


# --------------------------------------------------------------------- damaged shards


def test_readers_check_each_shard_against_its_checksum(project, clean_runs, tmp_path):
    """A row zeroed in a shard: `index build` used to index it, exit 0. Now it stops,
    naming the shard; --no-verify reads it anyway."""
    folder = tmp_path / "corrupt.enc"
    folder.mkdir()
    for name, data in clean_runs["words_a.npz"].items():
        (folder / name).write_bytes(data)
    vectors = np.load(folder / "shard-000003.npy")
    vectors[1] = 0
    np.save(folder / "shard-000003.npy", vectors)  # same size, same header: only the data differs
    assert len((folder / "shard-000003.npy").read_bytes()) == len(clean_runs["words_a.npz"]["shard-000003.npy"])
    checked = subprocess.run(CLI + ["index", "build", str(folder), "-o", str(tmp_path / "idx"), "-q"],
                             capture_output=True, text=True)
    assert checked.returncode == 1, checked.stderr
    assert "shard-000003.npy" in checked.stderr and "SHA-256" in checked.stderr
    assert not (tmp_path / "idx").exists()
    unchecked = subprocess.run(CLI + ["index", "build", str(folder), "-o", str(tmp_path / "idx"), "-q",
                                      "--no-verify"], capture_output=True, text=True)
    assert unchecked.returncode == 0, unchecked.stderr


def test_a_shard_is_hashed_in_the_pass_that_reads_it(clean_runs, tmp_path, monkeypatch):
    """No second read of the data: each shard file is opened once, by the read that
    hashes it, and never hashed separately."""
    import vladkit.pipeline.sharded as sharded

    folder = tmp_path / "enc"
    folder.mkdir()
    for name, data in clean_runs["words_a.npz"].items():
        (folder / name).write_bytes(data)
    opened = []
    real_open = open

    def counting_open(path, *args, **kwargs):
        opened.append(os.path.basename(os.fspath(path)))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(sharded, "open", counting_open, raising=False)
    monkeypatch.setattr(sharded, "file_sha256", lambda path: pytest.fail(f"{path} hashed in a pass of its own"))
    encodings = ShardedEncodings(folder)
    expected = np.concatenate([np.load(folder / f"shard-{n:06d}.npy") for n in range(20)])
    np.testing.assert_array_equal(encodings.vectors, expected)
    assert sorted(opened) == [f"shard-{n:06d}.npy" for n in range(20)]
    np.testing.assert_array_equal(encodings.take([5, 39]), expected[[5, 39]])  # checked once: memory-mapped now
    assert len(opened) == 20
    damaged = bytearray((folder / "shard-000007.npy").read_bytes())
    damaged[-3] ^= 0x01
    (folder / "shard-000007.npy").write_bytes(bytes(damaged))
    with pytest.raises(EncodingsFileError, match="shard-000007.npy"):
        ShardedEncodings(folder).take([15])
    np.testing.assert_array_equal(ShardedEncodings(folder, verify=False).take([0]), expected[[0]])


# ---------------------------------------------------------------------- permissions


@pytest.mark.parametrize("umask", [0o077, 0o022])
def test_outputs_get_the_permissions_of_the_users_umask(project, tmp_path, umask):
    """Encodings and indexes list the user's photo paths: under umask 077 they used to be
    made world-readable (files 0o644, index folder 0o755)."""
    def run(*args):
        done = subprocess.run(CLI + [str(arg) for arg in args], capture_output=True, text=True,
                              preexec_fn=lambda: os.umask(umask))
        assert done.returncode == 0, done.stderr

    run(*_encode(project, tmp_path / "enc")[3:])
    run(*_encode(project, tmp_path / "enc.npz")[3:])
    run("index", "build", tmp_path / "enc", "-o", tmp_path / "idx", "-q")
    modes = {path: stat.S_IMODE(path.stat().st_mode) for path in tmp_path.rglob("*")}
    assert len(modes) > 20
    for path, mode in modes.items():
        assert mode == (0o777 if path.is_dir() else 0o666) & ~umask, (path, oct(mode))


# ---------------------------------------------------------- what a failed run leaves


@pytest.mark.parametrize("options, status", [
    (("--max-pixels", "-1"), 2),
    (("--error-log", "{tmp}/missing/log.jsonl"), 2),
    (("--jobs", "0"), 2),
])
def test_bad_arguments_fail_before_any_folder_is_made(project, tmp_path, options, status):
    """Such runs used to fail only once the job had started, leaving X.npz.parts/ behind."""
    options = [option.format(tmp=tmp_path) for option in options]
    done = subprocess.run(_encode(project, tmp_path / "X.npz", "words_a.npz", *options), capture_output=True,
                          text=True)
    assert done.returncode == status, done.stderr
    assert options[0] in done.stderr
    assert os.listdir(tmp_path) == []


def test_a_failed_run_removes_what_it_made_and_keeps_what_a_rerun_needs(project, tmp_path):
    """None readable: nothing is left. Stopped by --on-error raise after some shards: the
    finished shards stay in OUTPUT.npz.parts/ (as its help says) and a rerun resumes."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(3):
        (broken / f"bad{i}.jpg").write_bytes(b"not a jpeg")
    for output in ("X.npz", "X.enc"):
        done = subprocess.run(CLI + ["encode", str(broken), "--vocab", str(project / "words_a.npz"), "-o",
                                     str(tmp_path / output), "-q"], capture_output=True, text=True)
        assert done.returncode == 1 and "none of the 3 images" in done.stderr, done.stderr
    assert sorted(os.listdir(tmp_path)) == ["broken"]

    photos = tmp_path / "photos"
    shutil.copytree(project / "photos", photos)
    (photos / "img_0013.png").write_bytes(b"truncated")
    command = CLI + ["encode", str(photos), "--vocab", str(project / "words_a.npz"), "-o", str(tmp_path / "Y.npz"),
                     "-q", "--shard-size", "2", "--batch-size", "2", "-j", "1"]
    stopped = subprocess.run(command + ["--on-error", "raise"], capture_output=True, text=True)
    assert stopped.returncode == 1 and "img_0013.png" in stopped.stderr, stopped.stderr
    assert "6 finished shard(s) kept" in stopped.stderr
    assert not (tmp_path / "Y.npz").exists()
    assert len(list((tmp_path / "Y.npz.parts").glob("shard-*.json"))) == 6
    help_text = subprocess.run(CLI + ["encode", "--help"], capture_output=True, text=True).stdout
    assert "write nothing" not in help_text and "keeps the shards" in " ".join(help_text.split())
    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0 and "resumed: 12 of 40" in resumed.stderr, resumed.stderr
    assert not (tmp_path / "Y.npz.parts").exists() and len(load_encodings(tmp_path / "Y.npz").ids) == 39


# ------------------------------------------------------------------------------ stress


@pytest.mark.slow
def test_four_jobs_two_vocabularies_random_starts_and_kills(project, clean_runs, tmp_path):
    """4 `vladkit encode` processes on one folder with 2 vocabularies, started at random
    moments, some killed with SIGKILL, in two rounds, then rerun. Whenever the
    folder's manifest says complete (watched every few milliseconds), the folder is the
    clean run of the manifest's own recipe; every run that exits 0 wrote its own recipe;
    every other run was refused by the lock (exit 1) or killed; and a rerun of each job
    gives the clean run's bytes."""
    rng = random.Random(29)
    output = tmp_path / "shared.enc"
    violations, complete_seen = [], set()
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            try:
                manifest = (output / "manifest.json").read_bytes()
                if b'"complete": true' in manifest:
                    files = {name: data for name, data in _folder_bytes(output).items()
                             if not name.endswith(".tmp")}  # being written by a live job
                    if (output / "manifest.json").read_bytes() == manifest == files.get("manifest.json"):
                        vocabulary = Path(json.loads(manifest)["job"]["recipe"]["vocabulary"]["path"]).name
                        complete_seen.add(vocabulary)
                        if files != clean_runs[vocabulary]:
                            violations.append((vocabulary, sorted(files)))
            except (OSError, ValueError):
                pass  # a file replaced or removed while read: the next look sees the rest
            time.sleep(0.003)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    outcomes = []
    try:
        for _ in range(2):
            vocabularies = ["words_a.npz", "words_a.npz", "words_b.npz", "words_b.npz"]
            rng.shuffle(vocabularies)
            starts = sorted(rng.uniform(0, 3) for _ in vocabularies)
            kills = {i: starts[i] + rng.uniform(0.5, 3.5) for i in rng.sample(range(4), 2)}
            running, began = {}, time.monotonic()
            while len(running) < 4 or any(process.poll() is None for process, _ in running.values()):
                now = time.monotonic() - began
                for i, vocabulary in enumerate(vocabularies):
                    if i not in running and now >= starts[i]:
                        running[i] = (subprocess.Popen(_encode(project, output, vocabulary), stdout=subprocess.PIPE,
                                                       stderr=subprocess.PIPE, text=True), vocabulary)
                    if i in running and i in kills and now >= kills[i] and running[i][0].poll() is None:
                        running[i][0].send_signal(signal.SIGKILL)
                        del kills[i]
                time.sleep(0.005)
            for process, vocabulary in running.values():
                out, err = process.communicate()
                outcomes.append((vocabulary, process.returncode, out, err))
    finally:
        time.sleep(0.05)
        stop.set()
        watcher.join()
    for vocabulary, code, out, err in outcomes:
        assert code in (0, 1, -signal.SIGKILL), err
        if code == 1:
            assert "in use by another vladkit job" in err, err
        if code == 0:
            assert out.startswith(f"wrote {output}: 40 images"), out
    codes = [code for _, code, _, _ in outcomes]
    assert codes.count(0) >= 1 and codes.count(-signal.SIGKILL) >= 1, codes
    assert not violations, violations[:3]
    assert complete_seen  # the watcher saw finished folders
    for vocabulary in ("words_a.npz", "words_b.npz", "words_a.npz"):
        rerun = subprocess.run(_encode(project, output, vocabulary), capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stderr
        assert _folder_bytes(output) == clean_runs[vocabulary]
