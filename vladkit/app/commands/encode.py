"""``vladkit encode``: the recipe from the options and the vocabulary, and the resumable
sharded job that encodes a folder with it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

from ...pipeline.recipe import (EXTRACTORS, Recipe, check_encoder, default_encoder, file_sha256, load_vocabulary_file,
    parse_extractor, recorded_descriptor_type)
from ...pipeline.encodings import EncodedImages
from ...features.spatial_augmentation import N_POSITION_DIMS
from ...features.images import ImageReadError, list_images
from ...pipeline.jobs import encode_images, job_folder
from ..errors import EXIT_OK, CommandError, UsageError
from .common import (_cannot_read, _check_dense_options, _dask_client, _progress, _report_skipped, _skip_reporter,
    _spatial_scale)

PYRAMID = ((1, 1), (2, 2), (1, 3))


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
    recipe = Recipe(kind, params, encoder_kind, _encoder_params(args, encoder_kind),
                    [list(level) for level in PYRAMID] if args.pyramid else None,
                    str(Path(args.vocab).resolve()), file_sha256(args.vocab))
    return recipe.with_encoder_defaults(vocab)


#: --signatures, --assignment, --query-assignment: the ASMK encoder's parameters.
ASMK_OPTIONS = {"signatures": "binary", "assignment": "multiple_assignment", "query_assignment": "query_assignment"}


def _encoder_params(args, encoder_kind):
    """The encoder parameters the options give (ASMK's; the other encoders take theirs
    from the vocabulary)."""
    given = [f"--{name.replace('_', '-')}" for name in (*ASMK_OPTIONS, "queries") if getattr(args, name, None)]
    if encoder_kind != "asmk":
        if given:
            raise UsageError(f"{' and '.join(given)} set the ASMK encoder: give --encoder asmk")
        return {}
    params = {ASMK_OPTIONS[name]: getattr(args, name) for name in ASMK_OPTIONS if getattr(args, name) is not None}
    if "binary" in params:
        params["binary"] = params["binary"] == "bits"
    return params


def _check_encode_options(args, single_file, folder):
    """What would fail only after the job ran fails now, before any folder is made."""
    if single_file and args.encoder == "asmk":
        raise UsageError(f"-o {args.output}: ASMK word sets are written as a folder of shards (their sizes vary "
                         "from image to image): give a name without .npz, e.g. -o photos.asmk")
    if args.pyramid and args.encoder == "asmk":
        raise UsageError("--pyramid concatenates vectors of cells: ASMK gives word sets, not vectors")
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
                        progress=bar.update, on_skipped=_skip_reporter(bar), log=log, queries=args.queries)
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
    shape = (f"{len(encodings)} images, {encodings.manifest['n_entries']:,} word signatures"
             f"{' as queries' if args.queries else ''}" if encodings.dim is None
             else f"{len(encodings)} images x {encodings.dim:,}")
    print(f"wrote {args.output}: {shape} ({recipe.encoder}"
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
