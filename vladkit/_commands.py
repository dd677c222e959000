"""What each ``vladkit`` command does (the parser and the dispatch are in :mod:`vladkit.cli`,
which imports this module only once the arguments are parsed: ``--help`` and usage errors
never load numpy, scikit-learn, numba or faiss). It composes the library and holds no
algorithm.

Exit codes: 0 success, 1 the job failed, 2 bad usage (argparse's convention).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from ._io import atomic_output, json_dumps
from .encodings import (
    EXTRACTORS,
    EncodedImages,
    EncodingsFileError,
    Recipe,
    check_encoder,
    default_encoder,
    describe_extractor,
    file_sha256,
    load_encodings,
    load_vocabulary_file,
    locate_vocabulary,
    parse_extractor,
    recorded_descriptor_type,
)
from .budget import DEFAULT_MAX_MEMORY, iter_batches
from .evaluation import folder_roots, mean_average_precision, recall_at_k, retrieval_ground_truth
from .encoders.fisher import AUTO_PCA
from .features import SIFT, DenseSIFT, LocalFeatures
from .spatial_augmentation import N_POSITION_DIMS
from .images import ImageReadError, list_images
from .image_encoder import encode_batches, sample_features
from .index import IndexFileError, PCAWhitening, VectorIndex
from .rerank import STORE_BIN, STORE_JSON, FeatureStore, rerank, write_feature_store
from .jobs import encode_images, job_folder, sample_descriptors
from .vocabulary import (
    DescriptorSampler,
    GMMVocabulary,
    KMeansVocabulary,
    VocabularyFileError,
    load_vocabulary,
)

from .cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE  # noqa: E402 (the parser's, defined once)

PYRAMID = ((1, 1), (2, 2), (1, 3))


class CommandError(Exception):
    """A failure to report in one line and exit with status 1."""


class UsageError(Exception):
    """Options that make no sense together: reported in one line, exit status 2."""


# --------------------------------------------------------------------------- helpers


def _progress(total, description, enabled):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="img", disable=not enabled,
                dynamic_ncols=True, file=sys.stderr)


@contextlib.contextmanager
def _elapsed(description, enabled):
    """An elapsed-time bar for a step that cannot report its own progress."""
    from tqdm import tqdm

    bar = tqdm(desc=description, bar_format="{desc}: {elapsed}", disable=not enabled, file=sys.stderr)
    done = threading.Event()

    def tick():
        while not done.wait(0.5):
            bar.refresh()

    # Redrawn twice a second on a terminal; in a log file that would be a line every
    # 0.5 s, so there the bar is written once, when the step ends.
    thread = threading.Thread(target=tick, daemon=True)
    if enabled and sys.stderr.isatty():
        thread.start()
    try:
        yield
    finally:
        done.set()
        if thread.is_alive():
            thread.join()
        bar.close()


def _check_dense_options(args, kind):
    """--step and --sizes shape the dense grid: with sparse keypoints they would do nothing."""
    given = [option for option, value in (("--step", args.step), ("--sizes", args.sizes)) if value is not None]
    if kind in ("sift", "SIFT") and given:
        raise UsageError(f"{' and '.join(given)} {'set' if len(given) > 1 else 'sets'} the dense grid: sparse "
                         "SIFT keypoints (--features sift) have no grid: leave "
                         f"{'them' if len(given) > 1 else 'it'} out or use dense features")


def _spatial_scale(args):
    """The extractors' ``spatial_augmentation`` that --spatial / --spatial-scale S ask for
    (S implies --spatial), or None when neither is given."""
    if args.spatial_scale is not None:
        return args.spatial_scale
    return 1.0 if args.spatial else None


def _extractor_from_args(args):
    _check_dense_options(args, args.features)
    common = dict(root=args.root, spatial_augmentation=_spatial_scale(args), n_jobs=args.jobs,
                  max_pixels=None if args.max_pixels == 0 else args.max_pixels)
    if args.max_side is not None:  # else the extractor's default for photos
        common["max_side"] = args.max_side or None
    if args.features == "sift":
        return SIFT(**common)
    defaults = DenseSIFT()
    return DenseSIFT(step=args.step or defaults.step, sizes=tuple(args.sizes or defaults.sizes), **common)


def _read_batches(extractor, paths, args, progress, skipped, encoder=None, first=0):
    """Yield, batch by batch, the [(index, pieces)] of the readable images (indices from
    ``first``; see :func:`vladkit.budget.iter_batches`), batches sized by ``--max-memory``
    and at most ``--batch-size`` images.

    An unreadable image is reported on stderr, appended to ``skipped`` as (path, reason)
    and left out, or with ``--on-error raise`` stops the job naming it.
    """
    def unreadable(index, error):
        if args.on_error == "raise":
            raise CommandError(f"cannot read {paths[index]}: {error.reason} (--on-error skip "
                               "reports unreadable images and goes on)")
        skipped.append((str(paths[index]), error.reason))
        progress.write(f"vladkit: skipped {paths[index]}: {error.reason}", file=sys.stderr)

    done = 0
    for batch in iter_batches(extractor, paths, max_memory=args.max_memory, max_images=args.batch_size,
                              encoder=encoder, on_unreadable=unreadable):
        end, batch = batch[-1][0] + 1, [(first + index, pieces) for index, pieces in batch]
        yield batch
        del batch  # not alive while the next batch is extracted
        progress.update(end - done)
        done = end
    progress.update(len(paths) - done)


def _skip_reporter(bar):
    """on_skipped for the jobs: one line on stderr per unreadable image, above the bar."""
    def report(path, reason):
        bar.write(f"vladkit: skipped {path}: {reason}", file=sys.stderr)
    return report


def _cannot_read(error):
    return f"cannot read {error.path}: {error.reason} (--on-error skip reports unreadable images and goes on)"


def _report_skipped(skipped, n_images, error_log):
    """The end-of-job summary on stderr (n read, n skipped, why), and the JSON-lines log."""
    if error_log:
        with atomic_output(error_log, "w") as handle:
            for path, reason in skipped:
                handle.write(json_dumps({"path": path, "reason": reason}) + "\n")
    if not skipped:
        return
    reasons = {}
    for _, reason in skipped:
        reasons[reason] = reasons.get(reason, 0) + 1
    why = "; ".join(f"{count} x {reason}" for reason, count in sorted(reasons.items(), key=lambda r: -r[1]))
    print(f"vladkit: read {n_images - len(skipped)} of {n_images} images, skipped {len(skipped)}: {why}"
          + (f" (list in {error_log})" if error_log else ""), file=sys.stderr)


# ---------------------------------------------------------------------- vocab build


def _vocabulary_pca(args, dim):
    """--pca as given (0: none); by default Fisher's rule (:class:`FisherEncoder`'s
    pca="auto": PCA-64 for descriptors of more dimensions, the positions of --spatial not
    counted) for a GMM, none for k-means."""
    if _spatial_scale(args) is not None:
        dim -= N_POSITION_DIMS  # kept out of the PCA (passthrough_dims)
    if args.pca is not None:
        return args.pca or None
    return AUTO_PCA if args.kind == "gmm" and dim > AUTO_PCA else None


def cmd_vocab_build(args):
    no_pca = args.pca == 0 or (args.pca is None and args.kind == "kmeans")
    if args.whiten and no_pca:
        raise UsageError("--whiten whitens the PCA components: give --pca N with it")
    paths = list_images(args.folder, recursive=not args.no_recursive)
    if not paths:
        raise CommandError(f"no images found in {args.folder!r}")
    extractor = _extractor_from_args(args)
    show = not args.quiet
    with _progress(len(paths), "extracting", show) as bar, _dask_client(args) as client:
        try:
            sample, skipped = sample_descriptors(
                paths, extractor, max_descriptors=args.max_descriptors, max_per_image=args.max_per_image,
                seed=args.seed, batch_size=args.batch_size, max_memory=args.max_memory, on_error=args.on_error,
                n_jobs=None if client is not None and args.jobs == -1 else args.jobs, client=client,
                progress=bar.update, on_skipped=_skip_reporter(bar))
        except ImageReadError as error:
            raise CommandError(_cannot_read(error)) from None
    _report_skipped(skipped, len(paths), args.error_log)
    if len(skipped) == len(paths):
        raise CommandError(f"none of the {len(paths)} images could be read")
    if sample is None:
        raise CommandError(f"none of the {len(paths)} images has any descriptor")
    cls = KMeansVocabulary if args.kind == "kmeans" else GMMVocabulary
    size = {"n_clusters": args.k} if args.kind == "kmeans" else {"n_components": args.k}
    vocab = cls(**size, max_descriptors=args.max_descriptors, max_per_image=args.max_per_image,
                pca=_vocabulary_pca(args, sample.shape[1]), whiten=args.whiten, random_state=args.seed,
                passthrough_dims=N_POSITION_DIMS if _spatial_scale(args) is not None else 0,
                descriptor_type=describe_extractor(extractor))
    with _elapsed(f"training {args.kind} (K={args.k}) on {len(sample):,} x {sample.shape[1]} descriptors", show):
        vocab.fit_sample(sample)
    vocab.save(args.output)
    print(f"wrote {args.output}: {args.kind}, {vocab.n_words_} words of dimension {vocab.dim_} "
          f"from {len(sample):,} descriptors of {len(paths) - len(skipped)} images"
          + (f" ({len(skipped)} skipped)" if skipped else ""))
    return EXIT_OK


def cmd_vocab_info(args):
    vocab = load_vocabulary(args.vocabulary)
    meta = vocab.metadata_
    print(f"file:             {args.vocabulary}")
    print(f"kind:             {meta['kind']}")
    print(f"words:            {meta['n_words']}")
    print(f"descriptor dim:   {meta['descriptor_dim']}")
    pca = meta["params"].get("pca")
    print(f"PCA:              {'none' if pca is None else f'{pca} components'}"
          + (" (whitened)" if pca is not None and meta["params"].get("whiten") else "")
          + (f", the last {meta['params']['passthrough_dims']} dimensions kept as they are"
             if pca is not None and meta["params"].get("passthrough_dims") else ""))
    print(f"word dim:         {meta['dim']} ({meta['dtype']})")
    print(f"descriptors:      {meta['params'].get('descriptor_type') or 'unknown'}")
    print(f"trained on:       {meta['n_training_descriptors']:,} descriptors, seed {meta['params'].get('random_state')}")
    if meta["kind"] == "gmm":
        weights = vocab.weights_
        print(f"priors:           min {weights.min():.4g}, max {weights.max():.4g}")
        print(f"variances:        min {vocab.covariances_.min():.4g}, max {vocab.covariances_.max():.4g}")
    print(f"format:           {meta['format']} v{meta['format_version']}, written by vladkit {meta['vladkit_version']}")
    return EXIT_OK


# --------------------------------------------------------------------------- encode


def _check_descriptor_dim(args, dim, vocab):
    """Features of another dimension than the vocabulary's (--spatial adds 2) would fail
    on the first image: refuse them before any work."""
    expected = getattr(vocab, "descriptor_dim_", None) or vocab.dim  # a vocabulary, or NetVLAD parameters
    if dim == expected:
        return
    hint = ""
    if dim == expected + N_POSITION_DIMS:
        hint = ": the vocabulary was built without --spatial, leave it out"
    elif dim + N_POSITION_DIMS == expected:
        hint = ": the vocabulary was built on spatially augmented descriptors, add --spatial"
    raise UsageError(f"the local features give {dim}-dimensional descriptors, the vocabulary {args.vocab!r} "
                     f"takes {expected}-dimensional ones{hint}")


def _recipe_from_args(args, vocab):
    """The extractor the vocabulary was built with (its recorded descriptor type),
    overridden by the feature options given, and the encoder asked for."""
    recorded = parse_extractor(recorded_descriptor_type(vocab))
    given = {name: getattr(args, name) for name in ("root", "step", "sizes", "max_side")
             if getattr(args, name) is not None}
    if given.get("max_side") == 0:
        given["max_side"] = None  # --max-side 0: full resolution
    kind = args.features or (recorded[0] if recorded else None)
    if kind is None:
        raise CommandError(f"the vocabulary {args.vocab!r} does not record which local features it was "
                           "built on: give them (--features, --root, --step, --sizes) as used to build it")
    kind = {"dense": "DenseSIFT", "sift": "SIFT"}.get(kind, kind)
    _check_dense_options(args, kind)
    params = dict(recorded[1]) if recorded and recorded[0] == kind else {}
    valid = EXTRACTORS[kind]().get_params()
    params.update({k: (tuple(v) if k == "sizes" else v) for k, v in given.items() if k in valid})
    scale = _spatial_scale(args)
    if scale is not None:
        params["spatial_augmentation"] = scale
    _check_descriptor_dim(args, EXTRACTORS[kind](**params)._descriptor_dim, vocab)
    encoder_kind = args.encoder or default_encoder(vocab)
    try:
        check_encoder(encoder_kind, vocab)
    except ValueError as exc:
        raise UsageError(f"--encoder {encoder_kind} with --vocab {args.vocab}: {exc}") from None
    recipe = Recipe(kind, params, encoder_kind, {}, [list(level) for level in PYRAMID] if args.pyramid else None,
                    str(Path(args.vocab).resolve()), file_sha256(args.vocab))
    return recipe.with_encoder_defaults(vocab)


@contextlib.contextmanager
def _dask_client(args):
    """A Dask client for --scheduler ADDRESS or a local cluster of --workers N processes
    (one thread each), or None to run here."""
    if not args.workers and not args.scheduler:
        yield None
        return
    if args.workers and args.scheduler:
        raise UsageError("--workers starts a local cluster, --scheduler uses an existing one: give one")
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise CommandError("--workers and --scheduler run on Dask, which is not installed: "
                           "python -m pip install 'vladkit[dask]'") from None
    if args.scheduler:
        with Client(args.scheduler, timeout=30) as client:
            yield client
        return
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.CRITICAL) as cluster, Client(cluster) as client:
        yield client


def _check_encode_options(args, single_file, folder):
    """What would fail only after the job ran fails now, before any folder is made."""
    if args.max_pixels < 0:
        raise UsageError(f"--max-pixels must be >= 0 (0 lifts the limit), got {args.max_pixels}")
    if args.jobs == 0:
        raise UsageError("--jobs must be a number of threads, or negative to count back from every core "
                         "(-1: all); 0 is neither")
    if args.error_log:
        parent = Path(args.error_log).resolve().parent
        if not parent.is_dir():
            raise UsageError(f"--error-log {args.error_log}: the folder {str(parent)!r} does not exist")
        if Path(args.error_log).is_dir():
            raise UsageError(f"--error-log {args.error_log} is a folder: give a file name")
    if single_file and Path(args.output).is_dir():
        raise UsageError(f"-o {args.output} is a folder: name the .npz file to write, or give a folder name "
                         "without .npz for a sharded output")


def cmd_encode(args):
    # OUTPUT.npz: one file, assembled from a sharded job in OUTPUT.npz.parts/ (removed at
    # the end); any other OUTPUT: the sharded folder itself, never loaded whole.
    single_file = str(args.output).endswith(".npz")
    folder = Path(str(args.output) + ".parts") if single_file else Path(args.output)
    _check_encode_options(args, single_file, folder)
    paths = list_images(args.folder, recursive=not args.no_recursive)
    if not paths:
        raise CommandError(f"no images found in {args.folder!r}")
    vocab = load_vocabulary_file(args.vocab)  # a vocabulary or NetVLAD parameters, by format
    recipe = _recipe_from_args(args, vocab)
    on_dask = bool(args.workers or args.scheduler)
    created = not os.path.lexists(folder)
    with contextlib.ExitStack() as held:
        try:
            # The lock first (refusing a folder that is not vladkit's, or that another job
            # holds, before anything is made), then the cluster, whose start takes seconds.
            held.enter_context(job_folder(folder))
        except FileExistsError as error:  # FolderLockedError, an OSError, is reported as it is
            raise CommandError(str(error)) from None
        try:
            with _progress(len(paths), "encoding", not args.quiet) as bar, _dask_client(args) as client:
                def log(message):
                    bar.write(f"vladkit: {message}", file=sys.stderr)

                try:
                    result = encode_images(
                        paths, recipe, folder, vocabulary=vocab, shard_size=args.shard_size,
                        batch_size=args.batch_size, max_memory=args.max_memory,
                        max_pixels=None if args.max_pixels == 0 else args.max_pixels, on_error=args.on_error,
                        n_jobs=None if on_dask and args.jobs == -1 else args.jobs, client=client,
                        progress=bar.update, on_skipped=_skip_reporter(bar), log=log)
                except ImageReadError as error:  # --on-error raise
                    raise CommandError(_cannot_read(error)) from None
            if result.resumed:
                print(f"vladkit: resumed: {result.resumed} of {len(paths)} images were already encoded in "
                      f"{folder}", file=sys.stderr)
            _report_skipped(result.skipped, len(paths), args.error_log)
            encodings = result.encodings
            if not len(encodings):
                if created or single_file:
                    shutil.rmtree(folder)  # nothing to resume: a rerun would skip them all again
                raise CommandError(f"none of the {len(paths)} images could be read")
            if single_file:
                EncodedImages(encodings.vectors, encodings.ids, recipe, result.skipped).save(args.output)
                shutil.rmtree(folder)
        except BaseException:
            _clean_up_failed_encode(folder, created)
            raise
    print(f"wrote {args.output}: {len(encodings)} images x {encodings.dim:,} ({recipe.encoder}"
          f"{' + spatial pyramid' if recipe.pyramid else ''}, {recipe.extractor})"
          + (f" in {len(encodings.manifest['shards'])} shards" if not single_file else "")
          + (f", {len(result.skipped)} skipped" if result.skipped else ""))
    return EXIT_OK


def _clean_up_failed_encode(folder, created):
    """After a failed or interrupted encode: remove the output folder this run made if no
    shard of it finished; else keep the finished shards, for a rerun to resume from."""
    if not folder.is_dir():
        return
    finished = len(list(folder.glob("shard-*.json")))
    if created and not finished:
        shutil.rmtree(folder, ignore_errors=True)
    elif finished:
        print(f"vladkit: {finished} finished shard(s) kept in {folder}: rerun the same command to resume",
              file=sys.stderr)


# ---------------------------------------------------------------------------- index

RECIPE_FILE, VOCABULARY_FILE = "recipe.json", "vocabulary.npz"
#: index build adds vectors this many at a time (bounds the whitened copy).
ADD_ROWS = 65_536


def _check_index_options(args):
    """Options that would do nothing in this combination are errors, not silently ignored."""
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
    _check_index_options(args)
    encoded = load_encodings(args.encodings, verify=not args.no_verify)
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
    with tempfile.TemporaryDirectory(prefix=".vladkit-rerank-", dir=Path(args.output).resolve().parent) as scratch:
        if args.rerank_features:
            extra.update(_feature_store(args, encoded.ids, scratch))
        index.save(args.output, extra_files=extra)
    size = index.bytes_per_vector
    print(f"wrote {args.output}: {len(index)} images, {kind} index of dimension {index.index_dim}, "
          f"{size:,} bytes per image")
    return EXIT_OK


def _feature_store(args, images, folder):
    """Sparse RootSIFT of the indexed images (their ids are their paths) for re-ranking,
    written into ``folder``: {file name in the index: path}."""
    def unreadable(position, error):
        print(f"vladkit: cannot read {images[position]} for re-ranking: {error.reason} (it keeps its rank)",
              file=sys.stderr)

    from .rerank import default_rerank_extractor

    with _progress(len(images), "re-ranking features", not args.quiet) as bar:
        json_path, bin_path = write_feature_store(images, folder, default_rerank_extractor(n_jobs=args.jobs),
                                                  max_memory=args.max_memory, progress=bar.update,
                                                  on_unreadable=unreadable)
    return {STORE_JSON: json_path, STORE_BIN: bin_path}


def _load_search_index(folder):
    index = VectorIndex.load(folder)
    recipe_path = Path(folder) / RECIPE_FILE
    if not recipe_path.is_file():
        raise CommandError(f"{folder!r} has no {RECIPE_FILE}: build it with 'vladkit index build'")
    try:
        recipe = Recipe.from_json(json.loads(recipe_path.read_text(encoding="utf-8")))
    except ValueError as exc:
        raise CommandError(f"{recipe_path}: {exc}") from None
    return index, recipe


def _check_retrieval_options(args):
    if args.qe_alpha is not None and not args.qe:
        raise UsageError("--qe-alpha weights the results of query expansion: give --qe M with it")
    args.qe_alpha = args.qe_alpha or 0.0


def cmd_search(args):
    _check_retrieval_options(args)
    index, recipe = _load_search_index(args.index)
    extractor, encoder = recipe.build(vocabulary=str(Path(args.index) / VOCABULARY_FILE), n_jobs=args.jobs)
    failed = []

    def unreadable(position, error):
        failed.append(args.images[position])
        print(f"vladkit: cannot read {args.images[position]}: {error.reason}", file=sys.stderr)

    # The queries are extracted in batches (images in parallel with -j) and searched at once.
    vectors = np.zeros((len(args.images), encoder.n_features_out_), dtype=np.float32)
    read = np.zeros(len(args.images), dtype=bool)
    batches = iter_batches(extractor, args.images, max_memory=args.max_memory, encoder=encoder,
                           on_unreadable=unreadable)
    for rows, batch_vectors in encode_batches(encoder, batches):
        vectors[rows], read[rows] = batch_vectors, True
    answers = []
    if read.any():
        depth = max(args.top, args.rerank)
        all_scores, all_ids = index.search(vectors[read], k=depth, expand=args.qe, alpha=args.qe_alpha)
        queries = [image for image, ok in zip(args.images, read) if ok]
        all_inliers = [None] * len(queries)
        if args.rerank:
            score_of = [dict(zip(ids, scores)) for ids, scores in zip(all_ids, all_scores)]
            all_ids, all_inliers = _rerank_lists(args, index, queries, all_ids)
            all_scores = [[row[i] for i in ids] for row, ids in zip(score_of, all_ids)]
        answers = []
        for image, ids, scores, inliers in zip(queries, all_ids, all_scores, all_inliers):
            results = [{"id": i, "score": round(float(s), 6)} for i, s in zip(ids[:args.top], scores[:args.top])]
            if inliers is not None:
                for result in results:
                    result["inliers"] = inliers.get(result["id"], 0)
            answers.append({"query": image, "results": results})
    if args.json:
        print(json_dumps(answers, indent=1))
    else:
        for answer in answers:
            print(answer["query"])
            for rank, result in enumerate(answer["results"], 1):
                verified = f"  {result['inliers']:4d} inliers" if "inliers" in result else ""
                print(f"  {rank:3d}  {result['score']:.4f}{verified}  {result['id']}")
    return EXIT_FAILED if failed else EXIT_OK


#: The distributions of the serve extra, by the name they are imported under.
SERVE_MODULES = ("starlette", "uvicorn", "python_multipart", "multipart", "anyio")


def cmd_serve(args):
    # The web stack is an optional extra, imported here only: the other commands never
    # need it, and without it this command says what to install.
    try:
        from .serve import allowed_hosts_for, create_app, run
    except ImportError as exc:
        if (exc.name or "").split(".")[0] not in SERVE_MODULES:
            raise
        print(f"vladkit: error: 'vladkit serve' needs the serve extra ({exc.name} is not installed): "
              "python -m pip install 'vladkit[serve]'", file=sys.stderr)
        return EXIT_USAGE
    if args.port > 65535:
        raise UsageError(f"--port must be at most 65535, got {args.port}")
    try:
        allowed_hosts = allowed_hosts_for(args.host, args.allowed_host)
    except ValueError as error:
        raise UsageError(str(error)) from None
    app = create_app(args.index, max_upload_bytes=max(1, round(args.max_upload_mb * 1e6)),
                     max_pixels=args.max_pixels, timeout=args.timeout, max_concurrency=args.max_concurrency,
                     n_jobs=args.jobs, allowed_hosts=allowed_hosts, image_root=args.image_root)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"vladkit: note: listening on {args.host}: whoever reaches this machine can search the index and "
              "see its images and their paths (the ids); put an authenticating proxy in front to restrict that",
              file=sys.stderr)
    if not args.quiet:
        service = app.state.service
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"vladkit: serving {args.index} ({len(service.ids):,} images"
              f"{', re-ranking available' if service.store is not None else ''}) at http://{host}:{args.port}/ "
              "(Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        run(app, host=args.host, port=args.port, quiet=args.quiet,
            max_connections_per_client=args.max_connections_per_client, header_timeout=args.header_timeout)
    except KeyboardInterrupt:  # uvicorn stops cleanly, then passes Ctrl-C on
        pass
    except SystemExit as exc:  # uvicorn's way of failing to start (its log line says why)
        if exc.code:
            raise CommandError(f"could not serve on {args.host}:{args.port} (the port is taken, or the address "
                               "is not this machine's)") from None
    return EXIT_OK


def _rerank_lists(args, index, query_images, ranked):
    """Each query's ranked ids with its top --rerank re-ranked by spatial verification
    (:func:`vladkit.rerank.rerank`), and {id: inliers} per query. Query images that cannot
    be read keep their global ranking."""
    try:
        store = FeatureStore(args.index)
    except FileNotFoundError as error:
        raise CommandError(str(error)) from None
    extractor = store.extractor.set_params(n_jobs=getattr(args, "jobs", -1))
    rows = {image: row for row, image in enumerate(index.ids)}
    reranked, inliers = [list(ids) for ids in ranked], [{} for _ in ranked]

    def unreadable(position, error):
        print(f"vladkit: cannot read {query_images[position]} to re-rank its results: {error.reason}",
              file=sys.stderr)

    with _progress(len(query_images), "re-ranking", not getattr(args, "quiet", False) and len(query_images) > 1) as bar:
        for batch in iter_batches(extractor, list(query_images),
                                  max_memory=getattr(args, "max_memory", DEFAULT_MAX_MEMORY), on_unreadable=unreadable):
            for position, pieces in batch:
                pieces = list(pieces)  # sparse SIFT: one piece (only dense SIFT splits an image)
                features = pieces[0] if len(pieces) == 1 else LocalFeatures(
                    np.concatenate([p.descriptors for p in pieces]), np.concatenate([p.positions for p in pieces]),
                    np.concatenate([p.scales for p in pieces]), pieces[0].image_shape)
                top = reranked[position][:args.rerank]
                result = rerank(features, [rows[i] for i in top], store, n_jobs=getattr(args, "jobs", -1))
                reranked[position][:len(top)] = [top[j] for j in result.order]
                inliers[position] = {i: int(n) for i, n in zip(top, result.inliers)}
                bar.update(1)
    return reranked, inliers


DEFAULT_RECALL_KS = (1, 5, 10)


def _check_evaluate_options(args):
    if args.top is not None and args.k is not None and max(args.k) > args.top:
        # Rankings cut at N hold no answer beyond N: recall@k for k > N would just repeat
        # recall@N under another name.
        raise UsageError(f"--k {max(args.k)} is above --top {args.top}: rankings cut at {args.top} results "
                         f"cannot give recall@{max(args.k)}; lower --k or raise --top")
    if args.ground_truth == "holidays" and (args.query_root or args.database_root):
        raise UsageError("--query-root and --database-root are for --ground-truth folders: the Holidays "
                         "rule reads groups from image numbers")


def _check_query_recipe(index_folder, queries, queries_file):
    """Queries encoded with another vocabulary or encoder than the index give scores that
    mean nothing, without any error: refuse them. Other local-feature options (e.g.
    --max-side) keep the vectors comparable and are only reported."""
    path = Path(index_folder) / RECIPE_FILE
    if not path.is_file():  # a bare VectorIndex: nothing to compare with
        return
    try:
        indexed = Recipe.from_json(json.loads(path.read_text(encoding="utf-8"))).to_json()
    except ValueError as exc:
        raise CommandError(f"{path}: {exc}") from None
    given = queries.recipe.to_json()
    # The vocabulary by content: the file may have been moved since.
    indexed["vocabulary"], given["vocabulary"] = indexed["vocabulary"]["sha256"], given["vocabulary"]["sha256"]
    differ = [part for part in ("vocabulary", "encoder", "pyramid") if indexed[part] != given[part]]
    if differ:
        raise CommandError(f"{queries_file!r} was not encoded as the index {index_folder!r} was (another "
                           f"{' and '.join(differ)}): encode the queries with the index's vocabulary and options")
    if indexed["extractor"] != given["extractor"]:
        print(f"vladkit: note: the local features of {queries_file} differ from the index's "
              f"({given['extractor']} against {indexed['extractor']})", file=sys.stderr)


def _root_option(root, ids):
    """A relative --query-root/--database-root for ids stored as absolute paths is taken
    from the current folder, as a shell user means it."""
    if root is None or not ids or not Path(ids[0]).is_absolute():
        return root
    return Path(root).absolute()


def _no_query_message(args, queries, index, roots):
    if args.ground_truth == "holidays":
        return (f"the holidays rule finds no query image (NNNN00.jpg) among the {len(queries.ids)} images "
                f"of {args.queries!r} with another image of its group in the index {args.index!r}")
    query_root, database_root = roots
    query_group = Path(queries.ids[0]).parent.relative_to(query_root)
    database_group = Path(index.ids[0]).parent.relative_to(database_root) if len(index) else None
    return (f"no image of {args.queries!r} has an image of its group in the index {args.index!r}: the "
            f"query groups are folders relative to {str(query_root)!r} (e.g. {str(query_group)!r}), the "
            f"index's relative to {str(database_root)!r} (e.g. {str(database_group)!r}); set "
            "--query-root and --database-root to the folders that hold the group folders")


def cmd_evaluate(args):
    _check_evaluate_options(args)
    _check_retrieval_options(args)
    index = VectorIndex.load(args.index)
    queries = load_encodings(args.queries, verify=not args.no_verify)
    _check_query_recipe(args.index, queries, args.queries)
    roots = None
    if args.ground_truth == "folders":
        roots = folder_roots(queries.ids, index.ids, _root_option(args.query_root, queries.ids),
                             _root_option(args.database_root, index.ids))
    # Positives are index ids: queries need not be indexed images (held-out test sets).
    truth = retrieval_ground_truth(queries.ids, index.ids, args.ground_truth,
                                   *(roots if roots else ()))
    if not truth.positives:
        raise CommandError(_no_query_message(args, queries, index, roots))
    names = list(truth.positives)
    if roots and len(names) < len(queries.ids):
        unscored = [image for image in queries.ids if image not in truth.positives]
        print(f"vladkit: note: {len(unscored)} of the {len(queries.ids)} images of {args.queries} have no "
              f"other image of their group in the index (e.g. {unscored[0]}): not scored", file=sys.stderr)
    rows = {image: row for row, image in enumerate(queries.ids)}
    # One result more than --top: a query that is indexed finds itself, and is left out
    # before its top N are scored (its ground truth ignores at most that one id).
    depth = len(index) if args.top is None else min(args.top + 1, len(index))
    _, ranked = index.search(queries.take([rows[q] for q in names]), k=depth, expand=args.qe, alpha=args.qe_alpha)
    if args.rerank:
        # The queries' local features come from their images (the ids are their paths).
        ranked, _ = _rerank_lists(args, index, names, ranked)
    rankings = dict(zip(names, ranked))
    ks = args.k or [k for k in DEFAULT_RECALL_KS if args.top is None or k <= args.top]
    # Cut at N, AP counts the positives ranked lower as not found: a lower bound of the
    # AP, named for what it is.
    label = "mAP" if args.top is None else f"mAP@{args.top}"
    result = {"queries": len(names), label: mean_average_precision(rankings, truth, top=args.top)}
    result.update({f"recall@{k}": v for k, v in recall_at_k(rankings, truth, k=ks, top=args.top).items()})
    if args.json:
        print(json.dumps(result))
        return EXIT_OK
    print(f"{len(names)} queries ({args.ground_truth} ground truth), index {args.index} ({len(index)} images)")
    if roots:
        print(f"  groups: folders relative to {roots[0]} (queries) and {roots[1]} (index)")
    for key, value in result.items():
        if key != "queries":
            print(f"  {key:10s} {value:.4f}")
    if args.top is not None:
        print(f"  {label}: AP over the top {args.top} results of each query (not counting the query "
              "itself); positives ranked lower count as not found")
    return EXIT_OK


# ----------------------------------------------------------------------------- demo


def cmd_demo(args):
    import time

    from .demo import format_table, run_demo

    start = time.perf_counter()
    log = (lambda message: None) if args.quiet else (lambda message: print(f"vladkit demo: {message}", file=sys.stderr))
    results = run_demo(args.output, seed=args.seed, log=log)
    print(format_table(results))
    print()
    print("seconds (encoding, or whitening/quantizer training + indexing): "
          + ", ".join(f"{r.encoding} {r.seconds:.1f}" for r in results))
    print(f"total {time.perf_counter() - start:.0f} s; report: {Path(args.output) / 'report.html'}")
    return EXIT_OK


# -------------------------------------------------------------------- netvlad train


def _netvlad_folder_groups(paths, folder):
    """Each image's folder relative to FOLDER (its group: same folder, same label)."""
    root = Path(folder)
    return [str(Path(path).parent.relative_to(root)) for path in paths]


def _check_netvlad_options(args, paths):
    if args.copies is not None and args.labels != "none":
        raise UsageError("--copies sets the attacked copies made without labels: give it with --labels none")
    if "classification" in args.loss and args.labels == "none":
        raise UsageError(f"--loss {args.loss} learns to tell the folders apart: it needs --labels folders")
    if args.labels == "folders":
        groups = _netvlad_folder_groups(paths, args.folder)
        sizes = {}
        for group in groups:
            sizes[group] = sizes.get(group, 0) + 1
        if len(sizes) < 2:
            raise UsageError(f"--labels folders: all {len(paths)} images are in one folder "
                             f"({next(iter(sizes))!r}), NetVLAD needs at least two (one per "
                             "place, object or class); without labels, use --labels none")
        if "triplet" in args.loss and max(sizes.values()) < 2:
            raise UsageError("--labels folders: every folder holds a single image, so no image has a "
                             "positive; without labels, use --labels none (attacked copies)")


def cmd_netvlad_train(args):
    import time

    try:  # torch is imported here only: `vladkit --help` and the other commands stay torch-free
        from .netvlad.training import attacked_copies, train_netvlad
    except ImportError:
        raise CommandError("'vladkit netvlad train' needs PyTorch: pip install torch==2.13.0 (the CPU "
                           "build), then pip install 'vladkit[torch]'") from None
    from ._threads import effective_n_jobs
    from .encoders.netvlad import save_netvlad
    from .images import read_image

    paths = list_images(args.folder, recursive=not args.no_recursive)
    if not paths:
        raise CommandError(f"no images found in {args.folder!r}")
    _check_netvlad_options(args, paths)
    copies = (4 if args.copies is None else args.copies) if args.labels == "none" else 0
    extractor = _extractor_from_args(args)
    # Each image (and each copy) keeps at most --descriptors-per-image of its descriptors,
    # drawn reproducibly (copy j of image i is set number n + i * copies + j).
    n_sets = len(paths) * (1 + copies)
    sampler = DescriptorSampler(n_sets, n_sets * args.descriptors_per_image, args.descriptors_per_image, args.seed)
    sets, groups = {}, {}
    labels = _netvlad_folder_groups(paths, args.folder) if args.labels == "folders" else None
    show = not args.quiet
    skipped = []
    start = time.perf_counter()
    with _progress(len(paths), "extracting" + (f" (+ {copies} attacked copies each)" if copies else ""),
                   show) as bar:
        for batch in _read_batches(extractor, paths, args, bar, skipped):
            for index, pieces in batch:
                features = sample_features(sampler, index, pieces, extractor)
                sets[index] = features.descriptors.astype(np.float16)
                groups[index] = labels[index] if labels is not None else index
                if not copies:
                    continue
                image = read_image(paths[index], mode="rgb", max_side=extractor.max_side,
                                   max_pixels=None if args.max_pixels == 0 else args.max_pixels)
                made = [copy for _, copy in attacked_copies(image, copies, seed=args.seed, index=index)]
                del image
                for copy_batch in iter_batches(extractor, made, max_memory=args.max_memory,
                                               max_images=args.batch_size):
                    for j, copy_pieces in copy_batch:
                        key = len(paths) + index * copies + j
                        sets[key] = sample_features(sampler, key, copy_pieces, extractor).descriptors.astype(np.float16)
                        groups[key] = index
                    del copy_batch, copy_pieces
            del batch, pieces  # not alive while the next batch is extracted
    _report_skipped(skipped, len(paths), args.error_log)
    if len(skipped) == len(paths):
        raise CommandError(f"none of the {len(paths)} images could be read")
    keys = sorted(sets)
    n_images = len(paths) - len(skipped)
    extraction = time.perf_counter() - start
    metadata = {"descriptor_type": describe_extractor(extractor),
                "labels": args.labels, "n_images": n_images, "copies_per_image": copies or None}
    try:
        params = train_netvlad(
            [sets.pop(key) for key in keys], [groups[key] for key in keys], n_clusters=args.k,
            init=args.init, loss=args.loss, epochs=args.epochs, lr=args.lr, batch_size=args.minibatch,
            descriptors_per_step=args.descriptors_per_step, margin=args.margin, n_negatives=args.negatives,
            validation=args.validation or None, random_state=args.seed,
            n_threads=effective_n_jobs(args.jobs), progress=show, metadata=metadata)
    except ValueError as exc:
        raise CommandError(f"cannot train on {args.folder!r}: {exc}") from None
    save_netvlad(params, args.output)
    summary = params.metadata["training"]
    history = summary["history"]
    kept = summary["returned_epoch"]
    # Every folder read, held out for validation or not (summary["n_groups"] counts those
    # trained on only: without any held out whole).
    n_folders = len({groups[key] for key in keys})
    held_out = summary["n_validation_sets"]
    validation = ""
    if history[0]["validation_map"] is not None:
        validation = (f"; validation mAP {history[kept]['validation_map']:.3f} at epoch {kept} "
                      f"(initialisation {history[0]['validation_map']:.3f})")
    print(f"wrote {args.output}: NetVLAD K={params.n_clusters}, D={params.dim} (init {args.init}, {args.loss} loss, "
          f"{args.epochs} epochs, epoch {kept} kept{validation}) from {n_images} images"
          + (f" ({len(skipped)} skipped)" if skipped else "")
          + (f" and {len(keys) - n_images} attacked copies" if copies else f" in {n_folders} folders")
          + (f", {held_out} of them held out for validation" if held_out else "")
          + f"; extraction {extraction:.0f} s, training {summary['seconds']:.0f} s")
    return EXIT_OK


# --------------------------------------------------------------------------- parser


#: What a command's failure can raise that is reported in one line (exit status 1).
FAILURES = (CommandError, ImageReadError, VocabularyFileError, EncodingsFileError, IndexFileError,
            ValueError, OSError, RuntimeError)
