"""The out-of-core ASMK builder (vladkit.retrieval.asmk_build) against the in-memory
ASMKIndex, byte for byte; its recovery from a killed build; the checks of a loaded folder;
ids stored as bytes."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from vladkit.encoders.asmk import WordSignatures
from vladkit.retrieval import asmk_build
from vladkit.pipeline.word_sets import pack_entries
from vladkit.retrieval.asmk_build import ShardSource, build_asmk_index
from vladkit.retrieval.asmk_index import ASMKIndex, StoredIds, lock_folder
from vladkit.retrieval.index_files import IndexFileError

N_WORDS = 97


def _sets(n_images, binary=True, seed=0, common_word=False):
    """Random word sets: some images without words; with ``common_word``, word 5 in all
    the others (a list longer than a small buffer)."""
    rng = np.random.default_rng(seed)
    sets = []
    for image in range(n_images):
        n = 0 if image % 17 == 3 else int(rng.integers(1, 25))
        words = np.sort(rng.choice(N_WORDS - 7, size=n, replace=False)).astype(np.int64)  # the last words unused
        if common_word and n:
            words = np.union1d(words, [5])
        if binary:
            signatures = rng.integers(0, 256, size=(len(words), 16), dtype=np.uint8)
        else:
            signatures = rng.normal(size=(len(words), 8)).astype(np.float32)
            signatures /= np.linalg.norm(signatures, axis=1, keepdims=True)
        sets.append(WordSignatures(words, signatures))
    return sets


def _source(sets, ids, tmp_path=None, seed=1):
    """Shards of 1-40 images; with ``tmp_path``, every other shard an .npy file."""
    rng = np.random.default_rng(seed)
    shards, first = [], 0
    signature = sets[0].signatures
    while first < len(sets):
        size = int(rng.integers(1, 40))
        entries = pack_entries(sets[first:first + size], signature.dtype, signature.shape[1:])
        if tmp_path is not None and len(shards) % 2:
            path = tmp_path / f"shard{len(shards)}.npy"
            np.save(path, entries)
            entries = path
        shards.append((first, entries))
        first += size
    return ShardSource(shards, ids, N_WORDS, signature.dtype, signature.shape[1:])


def _files(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("idf", [False, True])
def test_builder_writes_the_in_memory_index_byte_for_byte(tmp_path, binary, idf):
    sets = _sets(300, binary=binary)
    ids = [f"image/{i:04d}.jpg" for i in range(len(sets))]
    ASMKIndex(idf=idf, alpha=2.5).add(sets, ids).save(tmp_path / "memory", extra_files={"recipe.json": b"{}"})
    stats = build_asmk_index(_source(sets, ids, tmp_path), tmp_path / "built", idf=idf, alpha=2.5,
                             extra_files={"recipe.json": b"{}"})
    assert stats["passes"] == 1
    assert _files(tmp_path / "built") == _files(tmp_path / "memory")
    memory, built = ASMKIndex.load(tmp_path / "memory"), ASMKIndex.load(tmp_path / "built")
    queries = sets[:6]
    for a, b in zip(memory.search(queries, k=20), built.search(queries, k=20)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_small_budget_takes_many_passes_and_the_same_bytes(tmp_path):
    sets = _sets(250, seed=3, common_word=True)
    ids = [str(i) for i in range(len(sets))]
    ASMKIndex(idf=True).add(sets, ids).save(tmp_path / "memory")
    # A budget of ~60 entries beyond the per-image and per-word arrays (the process's own
    # memory before the build is not counted).
    source = _source(sets, ids)
    largest = max(entries.nbytes for _, entries in source.shards())
    budget = asmk_build._SLACK + 8 * len(sets) + 32 * N_WORDS + largest + 60 * 20
    seen = []
    stats = build_asmk_index(source, tmp_path / "built", idf=True, max_memory=budget,
                             progress=lambda *args: seen.append(args))
    assert stats["buffer_bytes"] == 60 * 20 and stats["passes"] > 20  # word 5 alone: in pieces
    assert ("write", stats["passes"], stats["passes"]) in seen
    assert _files(tmp_path / "built") == _files(tmp_path / "memory")
    with pytest.raises(MemoryError, match="max_memory"):
        build_asmk_index(source, tmp_path / "none", max_memory=budget - 60 * 20)


def test_images_without_words_only_and_bad_sources(tmp_path):
    sets = [WordSignatures(np.zeros(0, np.int64), np.zeros((0, 16), np.uint8)) for _ in range(3)]
    ASMKIndex().add(sets, ["a", "b", "c"]).save(tmp_path / "memory")
    build_asmk_index(ShardSource([], ["a", "b", "c"], N_WORDS), tmp_path / "built")
    assert _files(tmp_path / "built") == _files(tmp_path / "memory")
    sets = _sets(20)
    with pytest.raises(ValueError, match="duplicate ids"):
        build_asmk_index(_source(sets, ["x"] * 20), tmp_path / "dup")
    unsorted = pack_entries(sets, np.uint8, (16,))[::-1]
    with pytest.raises(ValueError, match="out of .word, image. order"):
        build_asmk_index(ShardSource([(0, unsorted)], [str(i) for i in range(20)], N_WORDS), tmp_path / "bad")
    with pytest.raises(ValueError, match="out of range"):
        build_asmk_index(ShardSource([(0, pack_entries(sets, np.uint8, (16,)))], [str(i) for i in range(20)], 50),
                         tmp_path / "bad")
    assert not os.path.exists(tmp_path / "dup") and not os.path.exists(tmp_path / "bad")
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


KILLED_BUILD = """
import sys, time
import numpy as np
from vladkit.retrieval import asmk_build
from vladkit.retrieval.asmk_build import ShardSource, build_asmk_index

# (a budget of 8,000 entries beside the arrays: 10 passes of 2 s)

class Slow(ShardSource):
    def shards(self):
        for shard in super().shards():
            time.sleep(0.05)
            yield shard

n = 4000
rng = np.random.default_rng(0)
shards = []
for first in range(0, n, 100):
    entries = np.zeros(100 * 20, dtype=[("word", "<i4"), ("image", "<i4"), ("signature", "u1", (16,))])
    entries["word"] = np.repeat(np.arange(20), 100)
    entries["image"] = np.tile(np.arange(100), 20)
    entries["signature"] = rng.integers(0, 256, size=(len(entries), 16))
    shards.append((first, entries))
budget = asmk_build._SLACK + 8 * n + 32 * 20 + shards[0][1].nbytes + 8000 * 20
build_asmk_index(Slow(shards, [str(i) for i in range(n)], 20), sys.argv[1], max_memory=budget)
"""


def test_a_killed_build_leaves_nothing_loadable_and_a_rerun_cleans_up(tmp_path):
    target = tmp_path / "index"
    process = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(target)])
    try:
        deadline = time.monotonic() + 120
        temporary = None
        while time.monotonic() < deadline and process.poll() is None:
            found = [p for p in tmp_path.iterdir() if p.name.startswith(".index.") and p.name.endswith(".tmp")]
            if found and (found[0] / "entry_images.npy").exists():
                temporary = found[0]
                break
            time.sleep(0.02)
        assert temporary is not None, "the build never started writing entries"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    assert temporary.is_dir() and not target.exists()
    with pytest.raises(IndexFileError, match="metadata.json is missing"):
        ASMKIndex.load(temporary)
    # A live writer's temporary folder (its lock held) is left alone; the dead one is not.
    live = tmp_path / ".index.abcd1234.tmp"
    live.mkdir()
    fd = lock_folder(str(live))
    try:
        sets = _sets(30)
        build_asmk_index(_source(sets, [str(i) for i in range(30)]), target)
    finally:
        os.close(fd)
    assert not temporary.exists() and live.is_dir()
    assert len(ASMKIndex.load(target)) == 30


@pytest.fixture
def saved(tmp_path):
    sets = _sets(60)
    ids = [f"im{i}" for i in range(60)]
    build_asmk_index(_source(sets, ids), tmp_path / "index")
    return tmp_path / "index", sets


def _rewrite(path, change):
    array = np.load(path)
    change(array)
    np.save(path, array)


@pytest.mark.parametrize("name", ["entry_signatures.npy", "entry_images.npy", "ids.npy", "id_offsets.npy",
                                  "word_offsets.npy", "image_scales.npy"])
def test_truncated_files_are_refused_by_name(saved, name):
    folder, _ = saved
    path = folder / name
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(IndexFileError, match=name):
        ASMKIndex.load(folder)


def test_altered_offsets_and_images_are_refused_by_name(saved):
    folder, sets = saved
    _rewrite(folder / "id_offsets.npy", lambda a: a.__setitem__(5, a[7]))
    with pytest.raises(IndexFileError, match="id_offsets.npy"):
        ASMKIndex.load(folder)
    _rewrite(folder / "id_offsets.npy", lambda a: a.__setitem__(5, a[4]))
    ASMKIndex.load(folder)  # an empty id is still offsets in order
    _rewrite(folder / "word_offsets.npy", lambda a: a.__setitem__(3, a[-1] + 1))
    with pytest.raises(IndexFileError, match="word_offsets.npy"):
        ASMKIndex.load(folder)
    _rewrite(folder / "word_offsets.npy", lambda a: a.__setitem__(3, (a[2] + a[4]) // 2))
    _rewrite(folder / "entry_images.npy", lambda a: a.__setitem__(slice(None), a[::-1]))
    index = ASMKIndex.load(folder)  # the entries are checked as a search reads them
    with pytest.raises(IndexFileError, match="entry_images.npy"):
        index.search(sets[:3], k=5)
    _rewrite(folder / "image_scales.npy", lambda a: a.__setitem__(0, np.nan))
    with pytest.raises(IndexFileError, match="image_scales.npy"):
        ASMKIndex.load(folder)


IDS = ["plain.jpg", "café/naïve.png", "写真/猫.jpg", "emoji 📷.heic", "bad_\udcff.jpg", "lone \ud800", "", "x" * 300]


def test_ids_round_trip_as_bytes(tmp_path):
    sets = _sets(len(IDS))
    index = ASMKIndex().add(sets, IDS)
    index.save(tmp_path / "memory")
    build_asmk_index(_source(sets, IDS), tmp_path / "built")
    assert _files(tmp_path / "built") == _files(tmp_path / "memory")
    loaded = ASMKIndex.load(tmp_path / "built")
    assert isinstance(loaded.ids, StoredIds) and list(loaded.ids) == IDS
    assert loaded.ids[-1] == IDS[-1] and loaded.ids[1:3] == IDS[1:3] and len(loaded.ids) == len(IDS)
    assert loaded.search(sets[2:3], k=1)[1] == [[IDS[2]]]
    assert loaded.ids._set is None  # not built by loading or searching
    with pytest.raises(ValueError, match="duplicate ids"):
        loaded.add(sets[:1], [IDS[3]])
    loaded.add(sets[:1], ["new"])
    assert list(loaded.ids) == IDS + ["new"]
    loaded.save(tmp_path / "again")
    assert list(ASMKIndex.load(tmp_path / "again").ids) == IDS + ["new"]


def test_loading_imports_neither_faiss_nor_scikit_learn(saved):
    folder, _ = saved
    code = ("import sys; from vladkit.retrieval.asmk_index import ASMKIndex; "
            f"index = ASMKIndex.load({str(folder)!r}); assert len(index) == 60; "
            "print(sorted({'faiss', 'sklearn'} & set(sys.modules)))")  # scipy: numba's
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


@pytest.mark.parametrize("block", [7, 64])
def test_a_query_in_image_blocks_and_split_over_threads_answers_as_one_pass(saved, monkeypatch, block):
    from vladkit.kernels import asmk as kernels
    folder, sets = saved
    index = ASMKIndex.load(folder)
    queries = sets[:12]
    alone = [index.search([q], k=25) for q in queries]   # one thread, one block each
    monkeypatch.setattr(kernels, "BLOCK_IMAGES", block)  # images a few at a time
    together = index.search(queries, k=25)               # blocks of queries in parallel
    monkeypatch.setattr(kernels, "SPLIT_ENTRIES", 0)     # each query over image ranges
    split = [index.search([q], k=25) for q in queries]
    for row, ((a_scores, a_ids), (s_scores, s_ids)) in enumerate(zip(alone, split)):
        np.testing.assert_array_equal(a_scores, s_scores)
        np.testing.assert_array_equal(a_scores[0], together[0][row])
        assert a_ids == s_ids and a_ids[0] == together[1][row]
    _rewrite(folder / "entry_images.npy", lambda a: a.__setitem__(slice(None), a[::-1]))
    with pytest.raises(IndexFileError, match="entry_images.npy"):
        ASMKIndex.load(folder).search(queries[:1], k=5)
