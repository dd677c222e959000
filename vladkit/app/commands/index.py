"""``vladkit index build``: an index folder (the vectors, their recipe and vocabulary) and
its re-ranking features.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from ...pipeline.recipe import locate_vocabulary
from ...pipeline.encodings import load_encodings
from ...retrieval.whitening import PCAWhitening
from ...retrieval.index import VectorIndex
from ...retrieval.rerank import STORE_BIN, STORE_JSON, write_feature_store
from ...pipeline.word_sets import ShardedWordSets
from ...retrieval.asmk_build import build_asmk_index
from ...retrieval.asmk_index import ASMKIndex, lock_folder, remove_stale_temporaries
from ...retrieval.search_folder import RECIPE_FILE, VOCABULARY_FILE
from ..errors import EXIT_OK, CommandError, UsageError
from .common import _progress

#: index build adds vectors this many at a time (bounds the whitened copy).
ADD_ROWS = 65_536


#: index build's options for vectors, and those for word sets (ASMK).
VECTOR_OPTIONS = ("pca", "whiten", "power", "pq", "nlist", "nprobe", "train")
ASMK_OPTIONS = ("alpha", "threshold", "idf")


def _given(args, names):
    return [f"--{name.replace('_', '-')}" for name in names if getattr(args, name) not in (None, False)]


def _check_index_options(args):
    """Options that would do nothing in this combination are errors, not silently ignored."""
    given = _given(args, ASMK_OPTIONS)
    if given:
        raise UsageError(f"{' and '.join(given)} set an ASMK inverted file: ENCODINGS must be word sets "
                         "('vladkit encode --encoder asmk')")
    if args.pca is None:
        given = [option for option, value in (("--whiten", args.whiten), ("--power", args.power))
                 if value is not None]
        if given:
            raise UsageError(f"{' and '.join(given)} act on the PCA-whitening: give --pca D with "
                             + ("them" if len(given) > 1 else "it"))
    if args.nlist is not None and args.pq is None:
        raise UsageError("--nlist makes an inverted file over product-quantized codes: give --pq MxB with it")
    if args.nprobe is not None and args.nlist is None:
        raise UsageError("--nprobe is the number of inverted lists visited per query: it needs --nlist")
    if args.train is not None and args.pca is None and args.pq is None:
        raise UsageError("--train gives the vectors to learn the PCA and the quantizer on: an exact index "
                         "without --pca learns nothing")


def cmd_index_build(args):
    encoded = load_encodings(args.encodings, verify=not args.no_verify)
    if isinstance(encoded, ShardedWordSets):
        return _build_asmk_index(args, encoded)
    _check_index_options(args)
    # Found first: a missing vocabulary fails before the (long) training, not after.
    vocabulary = locate_vocabulary(encoded.recipe, args.encodings, given=args.vocab)
    if encoded.recipe.extractor == "DenseSIFT" and encoded.recipe.encoder == "fisher":
        # Measured (benchmarks/bench_retrieval.py): dense SIFT suits classification; for
        # near-duplicates its Fisher vectors fall far behind sparse RootSIFT's.
        print("vladkit: note: Fisher vectors of dense SIFT find near-duplicates poorly: on vladkit's "
              "benchmark 0.45 of the queries' copies came first, 0.80 with sparse RootSIFT "
              "(vocab build --features sift --root); README, \"Finding near-duplicates\"", file=sys.stderr)
    # Out of core: whitening and quantizers learn from a reproducible sample; the vectors
    # are then added shard by shard, so memory is the index plus one block.
    training, _ = (load_encodings(args.train, verify=not args.no_verify) if args.train
                   else encoded).sample(args.train_size, seed=0)
    whitening = None
    if args.pca:
        whitening = PCAWhitening(args.pca, whiten=0.5 if args.whiten is None else args.whiten,
                                 power=args.power, random_state=0).fit(training)
    kind = "ivfpq" if args.nlist else "pq" if args.pq else "flat"
    index = VectorIndex(kind, pq=args.pq or "16x8", nlist=args.nlist, nprobe=args.nprobe or 8,
                        whitening=whitening)
    index.train(training)
    del training
    for start, block in encoded.blocks():
        for first in range(0, len(block), ADD_ROWS):
            rows = slice(first, min(first + ADD_ROWS, len(block)))
            index.add(np.array(block[rows]), encoded.ids[start + rows.start:start + rows.stop])
    # The recipe and the vocabulary travel with the index (same atomic write), so that
    # `vladkit search` can encode query images exactly as the indexed ones.
    recipe = json.dumps(encoded.recipe.to_json(), indent=1, sort_keys=True).encode()
    extra = {RECIPE_FILE: recipe, VOCABULARY_FILE: Path(vocabulary).read_bytes()}
    with _scratch_folder(args.output) as scratch:
        if args.rerank_features:
            extra.update(_feature_store(args, encoded.ids, scratch))
        index.save(args.output, extra_files=extra)
    size = index.bytes_per_vector
    print(f"wrote {args.output}: {len(index)} images, {kind} index of dimension {index.index_dim}, "
          f"{size:,} bytes per image")
    return EXIT_OK


def _build_asmk_index(args, word_sets):
    """An ASMK inverted file from word sets, out of core (within --max-memory), with the
    recipe and the vocabulary beside it as for a vector index."""
    given = _given(args, VECTOR_OPTIONS)
    if given:
        raise UsageError(f"{' and '.join(given)} act on vectors: {args.encodings!r} holds ASMK word sets, "
                         "indexed as an inverted file (its options: --alpha, --threshold, --idf)")
    if word_sets.role != "database":
        raise CommandError(f"{args.encodings!r} was encoded as queries (--queries: "
                           f"{word_sets.recipe.encoder_params.get('query_assignment')} words per descriptor): "
                           "index the images encoded without --queries")
    vocabulary = locate_vocabulary(word_sets.recipe, args.encodings, given=args.vocab)
    params = {"alpha": 3.0 if args.alpha is None else args.alpha,
              "threshold": 0.0 if args.threshold is None else args.threshold, "idf": args.idf}
    ASMKIndex(**params)._check_params()  # before the (long) build
    recipe = json.dumps(word_sets.recipe.to_json(), indent=1, sort_keys=True).encode()
    extra = {RECIPE_FILE: recipe, VOCABULARY_FILE: Path(vocabulary).read_bytes()}
    with _scratch_folder(args.output) as scratch:
        if args.rerank_features:
            extra.update(_feature_store(args, word_sets.ids, scratch))
        with _progress(len(word_sets.manifest["shards"]), "counting words", not args.quiet) as bar:
            bar.unit, stages = "shard", ["count"]

            def progress(stage, done, total):
                # Two passes: the shards' words counted, then the inverted file written
                # word range by word range (each range reads its slice of every shard).
                if stage != stages[-1]:
                    stages.append(stage)
                    bar.set_description("inverted file")
                    bar.unit = "word range"
                    bar.reset(total=total)
                bar.update(done - bar.n)

            build_asmk_index(word_sets, args.output, **params, max_memory=args.max_memory, extra_files=extra,
                             progress=progress)
    entries = word_sets.manifest["n_entries"]
    per_image = entries * (4 + word_sets.dtype["signature"].itemsize) / max(len(word_sets), 1)
    kind = "ASMK*" if word_sets.signature_dtype == np.uint8 else "ASMK"
    print(f"wrote {args.output}: {len(word_sets)} images, {kind} inverted file of {entries:,} word signatures "
          f"over {word_sets.n_words:,} words, {per_image:,.0f} bytes per image")
    return EXIT_OK


@contextlib.contextmanager
def _scratch_folder(output):
    """A temporary sibling of the output folder for the re-ranking features, named and
    locked as the index writers' own temporaries: a build killed while it extracts (SIGKILL
    included) leaves a folder that the next build of the same output removes, and a
    build running meanwhile keeps its own."""
    remove_stale_temporaries(output)
    target = Path(output).resolve()
    folder = tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    lock = lock_folder(folder)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if lock is not None:
            os.close(lock)


def _feature_store(args, images, folder):
    """Sparse RootSIFT of the indexed images (their ids are their paths) for re-ranking,
    written into ``folder``: {file name in the index: path}."""
    def unreadable(position, error):
        print(f"vladkit: cannot read {images[position]} for re-ranking: {error.reason} (it keeps its rank)",
              file=sys.stderr)

    from ...retrieval.rerank import default_rerank_extractor

    with _progress(len(images), "re-ranking features", not args.quiet) as bar:
        json_path, bin_path = write_feature_store(images, folder, default_rerank_extractor(n_jobs=args.jobs),
                                                  max_memory=args.max_memory, progress=bar.update,
                                                  on_unreadable=unreadable)
    return {STORE_JSON: json_path, STORE_BIN: bin_path}
