"""Encoding jobs: a list of images to a sharded encodings folder, on this machine or a
Dask cluster, resumable, with the same bytes either way.

:func:`encode_images` cuts the images into shards of ``shard_size`` consecutive images
(whole batches) and encodes each shard into ``shard-NNNNNN.npy`` + ``.json``
(:mod:`vladkit.pipeline.sharded`). A shard's vectors depend only on its images and the recipe (the
encoders sum in float64 in a fixed order, see ARCHITECTURE.md), so where and how often a
shard is computed does not change a byte:

* one job per folder: the job holds the folder's lock (:mod:`vladkit.pipeline.locking`) from
  start to end; a second job on the same folder fails at once, naming the holder, and
  changes nothing. Every shard report carries the job's digest (recipe, settings, input
  order), so no job ever adopts a shard another wrote;
* resumable: a rerun of the same job keeps the shards it already wrote (checked against
  their SHA-256 and its digest) and computes the others; a different job in a vladkit
  folder starts over; a folder that is not vladkit's (no vladkit manifest) is refused and
  never cleared;
* on Dask (``client=``), each shard is a task with a stable key (the job's digest and the
  output folder); the vocabulary is scattered to every worker once. A worker that dies takes its task with it and the
  scheduler runs it elsewhere: the shard is then written twice, atomically, with the same
  bytes. Unreadable images are reported by the client from the shard reports, so each is
  reported once however often its task ran.

Workers: every task limits BLAS, OpenMP *and* numba threads to ``n_jobs`` (the Dask nanny
sets only the first two); the first task of a process compiles vladkit's numba kernels
under a machine-wide file lock, so that worker processes do not write the same on-disk
cache at once; the kernels release the GIL (numba ``nogil``, BLAS, OpenCV), so a long task
does not starve the worker's heartbeat.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.base import clone

from .locking import LOCK_FILE, folder_lock, machine_lock
from .._util.threads import limit_threads
from .budget import DEFAULT_MAX_MEMORY, iter_batches
from .recipe import Recipe, load_vocabulary_file
from ..features.extractors import ImageSkippedWarning
from .image_encoder import encode_batches, encode_rows, sample_features
from ..features.images import DEFAULT_MAX_PIXELS
from ..vocabulary.sampling import DescriptorSampler
from .word_sets import WORD_SET_ENCODERS, QueryEncoding, ShardedWordSets, is_word_set_encoder, pack_entries
from .sharded import (MANIFEST, SHARDED_FORMAT, SHARDED_FORMAT_VERSION, ShardedEncodings, images_digest, is_job_file,
    job_digest, read_manifest, read_shard, shard_stem, write_images, write_manifest, write_shard)

__all__ = ["EncodeResult", "encode_images", "job_folder", "sample_descriptors"]


@dataclass
class EncodeResult:
    """What :func:`encode_images` did."""

    encodings: ShardedEncodings   # the output folder, opened
    n_images: int                 # images given
    skipped: list                 # [(path, reason)] of the unreadable ones, in input order
    resumed: int                  # images found already encoded by an earlier run


@dataclass(frozen=True)
class _Settings:
    """What every shard task needs besides its images and the vocabulary (small: pickled
    into each task)."""

    folder: str
    recipe: dict
    batch_size: int
    max_memory: int
    max_pixels: int | None
    on_error: str
    n_jobs: int | None
    job_sha256: str = ""
    queries: bool = False   # word sets (ASMK) encoded as queries (query_assignment words a descriptor)


@dataclass(frozen=True)
class _Shard:
    number: int
    first: int
    end: int
    images: tuple


def encode_images(images, recipe, output, *, vocabulary=None, shard_size=256, batch_size=64,
                  max_memory=DEFAULT_MAX_MEMORY, max_pixels=DEFAULT_MAX_PIXELS, on_error="skip",
                  n_jobs=None, client=None, progress=None, on_skipped=None, log=None, queries=False):
    """Encode ``images`` with ``recipe`` into the sharded folder ``output``.

    With the "asmk" encoder the folder holds word-signature sets
    (:class:`vladkit.pipeline.word_sets.ShardedWordSets`), not vectors.

    Parameters
    ----------
    images : list of paths
        In the order of the output rows; their string forms are the ids.
    recipe : vladkit.pipeline.recipe.Recipe
        Extractor, encoder (+ pyramid) and vocabulary file.
    output : path
        A new or empty folder, or one an earlier run of this job left (it resumes). A
        vladkit folder of another job is started over; a folder that is not vladkit's (no
        vladkit manifest) or that holds other files too is refused, never cleared. The job
        holds the folder's lock throughout: another job on it raises
        :class:`vladkit.FolderLockedError` at once and changes nothing.
    vocabulary : loaded vocabulary or NetVLADParams, optional
        Default: loaded from ``recipe.vocabulary_path``.
    shard_size : int, default=256
        Images per shard, rounded up to a multiple of ``batch_size``: the unit of work
        that a rerun resumes from and of a Dask task (small enough to balance a few
        workers on thousands of images; 8 MB per shard for VLAD K=64).
    batch_size, max_memory
        Images per batch and the memory budget of one task (:mod:`vladkit.pipeline.budget`).
    max_pixels : int or None
        The extractor's pixel limit (None: none).
    on_error : {"skip", "raise"}
        "skip": an unreadable image is reported (``on_skipped``) and left out; "raise":
        :class:`vladkit.ImageReadError` naming it stops the job (finished shards are kept).
    n_jobs : int or None
        Threads per task (BLAS, OpenMP, numba, extraction). Default: all cores locally,
        1 per task on Dask (run one task per worker thread).
    client : distributed.Client, optional
        Run the shards as tasks on this Dask cluster. The output folder must be on storage
        every worker sees, at the same path.
    progress : callable(n), optional
        Called with the number of images finished (per batch locally, per shard on Dask).
    on_skipped : callable(path, reason), optional
        Told of each unreadable image once, when it is found (resumed shards' are not
        told again). Default: an :class:`vladkit.ImageSkippedWarning`.
    log : callable(message), optional
        Told when the folder held another job, which is started over. Default: a warning.
    queries : bool, default=False
        Word sets only: encode the images as queries (the encoder's ``query_assignment``
        words per descriptor, :meth:`vladkit.ASMKEncoder.transform_queries`), not as images
        to index.

    Returns
    -------
    EncodeResult
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size} and {batch_size}")
    images = [os.fspath(image) for image in images]
    if not images:
        raise ValueError("no images to encode")
    if vocabulary is None:
        vocabulary = load_vocabulary_file(recipe.vocabulary_path)
    shard_size = -(-shard_size // batch_size) * batch_size
    folder = Path(output)
    word_sets = recipe.encoder in WORD_SET_ENCODERS
    if queries and not word_sets:
        raise ValueError(f"queries=True is for word-set encoders ({sorted(WORD_SET_ENCODERS)}): a "
                         f"{recipe.encoder} vector is the same for a query")
    job = {"recipe": recipe.to_json(), "n_images": len(images), "images_sha256": images_digest(images),
           "batch_size": batch_size, "shard_size": shard_size, "max_pixels": max_pixels,
           "max_memory": max_memory}
    if word_sets:
        job["word_sets"] = "queries" if queries else "database"
    digest = job_digest(job)
    with job_folder(folder):
        _prepare_folder(folder, job, images, log)
        settings = _Settings(os.fspath(folder.resolve()), recipe.to_json(), batch_size, max_memory, max_pixels,
                             on_error, n_jobs if n_jobs is not None else (1 if client is not None else -1), digest,
                             bool(queries))
        shards = [_Shard(number, first, min(first + shard_size, len(images)),
                         tuple(images[first:first + shard_size]))
                  for number, first in enumerate(range(0, len(images), shard_size))]
        reports = {}
        for shard in shards:
            report = _finished(settings, shard)
            if report is not None:
                reports[shard.number] = report
        resumed = sum(reports[n]["end"] - reports[n]["first"] for n in reports)
        if progress is not None and resumed:
            progress(resumed)
        if on_skipped is None:
            def on_skipped(path, reason):
                warnings.warn(f"skipped {path}: {reason}", ImageSkippedWarning, stacklevel=3)
        todo = [shard for shard in shards if shard.number not in reports]
        if client is None:
            for shard in todo:
                reports[shard.number] = _encode_shard(settings, shard, vocabulary, progress, on_skipped)
        else:
            reports.update(_encode_on_dask(client, settings, todo, vocabulary, progress, on_skipped))
        ordered = [reports[shard.number] for shard in shards]
        # The reports on disk must still be this job's: a Dask worker of an earlier, killed
        # client can finish its task late. Cheap (the reports, not the vectors).
        for shard in shards:
            if read_shard(folder, shard.number, verify=False, job_sha256=digest) is None:
                raise RuntimeError(f"{os.fspath(folder)!r}: {shard_stem(shard.number)} was replaced by another "
                                   "job while this one ran: run this job again")
        if word_sets:
            _, encoder = recipe.build(vocabulary, n_jobs=1)
            layout = {"n_words": int(encoder.n_words_), "signature_dtype": "uint8" if encoder.binary else "float32",
                      "signature_shape": list(encoder.signature_shape_), "role": job["word_sets"]}
            write_manifest(folder, job, ordered, word_sets=layout)
            encodings = ShardedWordSets(folder)
        else:
            write_manifest(folder, job, ordered, dim=ordered[0]["dim"])
            encodings = ShardedEncodings(folder)
    skipped = [tuple(item) for report in ordered for item in report["skipped"]]
    return EncodeResult(encodings, len(images), skipped, resumed)


@contextlib.contextmanager
def job_folder(folder):
    """Hold the job lock of the output ``folder`` (created if missing) for the block.

    A folder that is not vladkit's is refused first, before anything is made in it
    (:class:`FileExistsError` listing what it holds); a folder another process holds
    raises :class:`vladkit.FolderLockedError` naming it. Re-entrant: a command that
    wraps :func:`encode_images` (to assemble its output, or to clean up after a failure)
    holds it across both.
    """
    folder = Path(folder)
    _refuse_foreign_folder(folder)  # before the lock file is made in it
    with folder_lock(folder):
        yield folder


def _finished(settings, shard):
    """The shard's report if this job already wrote it, intact; else None."""
    report = read_shard(settings.folder, shard.number, job_sha256=settings.job_sha256)
    if report is not None and (report["first"], report["end"]) == (shard.first, shard.end):
        return report
    return None


def _refuse_foreign_folder(folder):
    """Refuse ``folder`` unless it is missing, empty, or a vladkit encodings folder (its
    manifest names the format and a version this vladkit writes) holding only a job's
    files. What is refused is listed, and nothing in it is touched."""
    if not os.path.lexists(folder):
        return
    if not folder.is_dir():
        raise FileExistsError(f"{os.fspath(folder)!r} exists and is not a folder: choose a new or empty folder")
    entries = sorted(os.listdir(folder))
    if all(name == LOCK_FILE or (name.startswith(".") and name.endswith(".tmp") and is_job_file(name))
           for name in entries):
        return  # empty, or a job killed before it wrote its manifest
    manifest = read_manifest(folder)
    shown = ", ".join(repr(name) for name in entries[:10]) + (f" and {len(entries) - 10} more"
                                                                if len(entries) > 10 else "")
    if manifest is None or manifest.get("format_version") != SHARDED_FORMAT_VERSION:
        raise FileExistsError(f"{os.fspath(folder)!r} is not a vladkit encodings folder (no manifest.json of "
                              f"format {SHARDED_FORMAT!r}, version {SHARDED_FORMAT_VERSION}) and is not empty: "
                              f"it holds {shown}. Nothing was changed: choose a new or empty folder")
    others = [name for name in entries if not is_job_file(name)]
    if others:
        raise FileExistsError(f"{os.fspath(folder)!r} holds other files than a vladkit encoding job's: "
                              f"{', '.join(repr(name) for name in others[:10])}"
                              f"{f' and {len(others) - 10} more' if len(others) > 10 else ''}. Nothing was "
                              "changed: choose a new or empty folder")


def _prepare_folder(folder, job, images, log):
    """Under the folder's lock: keep an earlier run's files of the same job (resume), or
    clear the files of another job (start over), and record the job."""
    _refuse_foreign_folder(folder)  # again: another job may have changed it before we locked it
    for name in os.listdir(folder):  # half-written files of a killed run
        if name.startswith(".") and name.endswith(".tmp") and is_job_file(name):
            (folder / name).unlink(missing_ok=True)
    manifest = read_manifest(folder)
    if manifest is not None and manifest.get("job") == job:
        return
    if manifest is not None:
        message = f"{os.fspath(folder)} holds a job for other images or settings: starting over"
        if log is None:
            warnings.warn(message, RuntimeWarning, stacklevel=4)
        else:
            log(message)
    # The new job's manifest first, in one atomic step: from then on the folder is this
    # job's (unfinished), whatever happens next, and no reader sees the other job's
    # "complete" manifest over files that are going away.
    write_manifest(folder, job)
    for name in os.listdir(folder):
        if name not in (LOCK_FILE, MANIFEST) and is_job_file(name):
            (folder / name).unlink()
    write_images(folder, images)


def _encode_shard(settings, shard, vocabulary, progress=None, on_skipped=None):
    """Encode one shard and write it (the task). A shard already written, by an earlier
    run of the task, is returned as it is."""
    report = _finished(settings, shard)
    if report is not None:
        return report
    extractor, encoder = Recipe.from_json(settings.recipe).build(vocabulary, n_jobs=settings.n_jobs)
    extractor.set_params(max_pixels=settings.max_pixels)
    _compile_once(extractor, encoder)
    skipped = []
    unreadable = _unreadable(settings, shard.images, skipped, on_skipped)

    word_sets = is_word_set_encoder(encoder)
    if word_sets and settings.queries:
        encoder = QueryEncoding(encoder)
    with limit_threads(settings.n_jobs):
        batches = iter_batches(extractor, list(shard.images), max_memory=settings.max_memory,
                               max_images=settings.batch_size, encoder=encoder, on_unreadable=unreadable,
                               streamed=True)
        vectors, encoded = encode_rows(encoder, batches, len(shard.images), progress)
    ids = [image for image, ok in zip(shard.images, encoded) if ok]
    if word_sets:
        payload = pack_entries([item for item, ok in zip(vectors, encoded) if ok],
                               np.uint8 if encoder.binary else np.float32, encoder.signature_shape_)
    else:
        payload = vectors[encoded]
    return write_shard(settings.folder, shard.number, shard.first, shard.end, payload, ids, skipped,
                       settings.job_sha256)


def _unreadable(settings, images, skipped, on_skipped):
    """The ``on_unreadable`` of a task: with on_error "raise" the error stops it; else the
    image is listed in ``skipped`` (the task's report) and told to ``on_skipped``."""
    def unreadable(index, error):
        if settings.on_error == "raise":
            raise error
        skipped.append((images[index], error.reason))
        if on_skipped is not None:
            on_skipped(images[index], error.reason)
    return unreadable


def _encode_on_dask(client, settings, shards, vocabulary, progress, on_skipped):
    """Run the shards as tasks on ``client``'s cluster; their reports, by shard number."""
    from distributed import as_completed

    if not shards:
        return {}
    # Stable keys: a client that reconnects (or resubmits) gets the same tasks, not copies.
    # They name the destination too: the same job into two folders is two sets of tasks.
    folder_key = hashlib.sha256(os.fsencode(settings.folder)).hexdigest()[:12]
    job_key = settings.job_sha256[:16] + "-" + folder_key
    vocabulary_future = client.scatter(vocabulary, broadcast=True, hash=False)
    futures = {client.submit(_encode_shard, settings, shard, vocabulary_future,
                             key=f"vladkit-encode-{job_key}-{shard_stem(shard.number)}"): shard
               for shard in shards}
    reports = {}
    try:
        for future in as_completed(futures):
            report = future.result()  # re-raises a task's error (an unreadable image with "raise")
            for path, reason in report["skipped"]:
                on_skipped(path, reason)
            if progress is not None:
                progress(report["end"] - report["first"])
            reports[report["number"]] = report
    finally:
        client.cancel([future for future in futures if not future.done()])
    return reports


def sample_descriptors(images, extractor, *, max_descriptors=200_000, max_per_image=None, seed=0,
                       chunk_size=256, batch_size=64, max_memory=DEFAULT_MAX_MEMORY, on_error="skip",
                       n_jobs=None, client=None, progress=None, on_skipped=None):
    """A vocabulary's training sample: :class:`vladkit.DescriptorSampler`'s rows of every
    image, extracted here or on a Dask cluster (chunks of ``chunk_size`` images per task).

    The sample is the same wherever it is drawn (each image's rows are drawn from
    ``(seed, image index)``), and only it travels back to the caller: memory is bounded
    by ``max_descriptors``, not by the number of images.

    Parameters
    ----------
    images : list of paths
    extractor : SIFT or DenseSIFT
    max_descriptors, max_per_image, seed
        As for :class:`vladkit.DescriptorSampler`.
    chunk_size, batch_size, max_memory, on_error, n_jobs, client, progress, on_skipped
        As for :func:`encode_images` (``chunk_size`` images per task).

    Returns
    -------
    sample : (n, D) array or None
        At most ``max_descriptors`` rows, in image order; None if no image gave any.
    skipped : list of (path, reason)
    """
    images = [os.fspath(image) for image in images]
    sampler = DescriptorSampler(len(images), max_descriptors, max_per_image, seed)
    chunks = [_Shard(number, first, min(first + chunk_size, len(images)), tuple(images[first:first + chunk_size]))
              for number, first in enumerate(range(0, len(images), chunk_size))]
    settings = _Settings("", {}, batch_size, max_memory, None, on_error,
                         n_jobs if n_jobs is not None else (1 if client is not None else -1))
    if on_skipped is None:
        def on_skipped(path, reason):
            warnings.warn(f"skipped {path}: {reason}", ImageSkippedWarning, stacklevel=3)
    skipped = {}  # by chunk: reported as they come, listed in input order

    def gather(chunk, result):
        for index, descriptors in result["rows"].items():
            sampler.keep(index, descriptors)
        skipped[chunk.number] = result["skipped"]

    if client is None:
        for chunk in chunks:
            gather(chunk, _sample_chunk(settings, chunk, extractor, (len(images), max_descriptors, max_per_image,
                                                                     seed), progress, on_skipped))
    else:
        from distributed import as_completed

        futures = {client.submit(_sample_chunk, settings, chunk, extractor,
                                 (len(images), max_descriptors, max_per_image, seed), pure=False): chunk
                   for chunk in chunks}
        try:
            for future in as_completed(futures):
                result = future.result()
                for path, reason in result["skipped"]:
                    on_skipped(path, reason)
                gather(futures[future], result)
                if progress is not None:
                    progress(len(futures[future].images))
        finally:
            client.cancel([future for future in futures if not future.done()])
    skipped = [item for number in sorted(skipped) for item in skipped[number]]
    try:
        return sampler.sample(), skipped
    except ValueError:  # no descriptors at all
        return None, skipped


def _sample_chunk(settings, chunk, extractor, sampler_args, progress=None, on_skipped=None):
    """One chunk of :func:`sample_descriptors` (the task): {image index: sampled rows}."""
    sampler = DescriptorSampler(*sampler_args)
    extractor = clone(extractor).set_params(n_jobs=settings.n_jobs)
    skipped, rows, done = [], {}, 0
    unreadable = _unreadable(settings, chunk.images, skipped, on_skipped)

    with limit_threads(settings.n_jobs):
        for batch in iter_batches(extractor, list(chunk.images), max_memory=settings.max_memory,
                                  max_images=settings.batch_size, on_unreadable=unreadable):
            for index, pieces in batch:
                rows[chunk.first + index] = sample_features(sampler, chunk.first + index, pieces,
                                                            extractor).descriptors
            end = batch[-1][0] + 1
            del batch, pieces
            if progress is not None:
                progress(end - done)
            done = end
    if progress is not None and done < len(chunk.images):
        progress(len(chunk.images) - done)
    return {"rows": rows, "skipped": skipped}


_compiled = set()
_compiled_lock = threading.Lock()


def _compile_once(extractor, encoder):
    """Encode a small synthetic image once per process and kind of recipe, under a
    machine-wide file lock: numba compiles (or loads from its on-disk cache) every kernel
    the recipe uses, one process at a time. Several processes compiling the same
    ``cache=True`` function at once can corrupt its cache files."""
    key = (type(extractor), type(encoder), type(getattr(encoder, "encoder", None)))
    with _compiled_lock:
        if key in _compiled:
            return
        with machine_lock("vladkit-numba-compile"):
            image = np.random.default_rng(0).integers(0, 256, size=(48, 48), dtype=np.uint8)
            with limit_threads(1):
                list(encode_batches(encoder, [[(0, extractor.transform([image]))]]))
        _compiled.add(key)
