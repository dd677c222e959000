"""``vladkit netvlad train``: the local features of a folder (and attacked copies of its
images) into :func:`vladkit.netvlad.training.train_netvlad`, its parameters written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...pipeline.recipe import describe_extractor
from ...pipeline.budget import iter_batches
from ...features.images import list_images
from ...pipeline.image_encoder import sample_features
from ...vocabulary.sampling import DescriptorSampler
from ..errors import EXIT_OK, CommandError, UsageError
from .common import _extractor_from_args, _progress, _read_batches, _report_skipped


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

    from .netvlad_images import _check, cmd_netvlad_train_images

    _check(args)  # the options of training on images (--backbone) against the mode chosen
    if args.backbone is not None:
        return cmd_netvlad_train_images(args)

    try:  # torch is imported here only: `vladkit --help` and the other commands stay torch-free
        from ...netvlad.training import attacked_copies, train_netvlad
    except ImportError:
        raise CommandError("'vladkit netvlad train' needs PyTorch: pip install torch==2.14.1 "
                           "torchvision==0.29.1 (a matching pair), then pip install 'vladkit[torch]'") from None
    from ..._util.threads import effective_n_jobs
    from ...encoders.netvlad_params import save_netvlad
    from ...features.images import read_image

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
    training_start = time.perf_counter()
    try:
        params = train_netvlad(
            [sets.pop(key) for key in keys], [groups[key] for key in keys], n_clusters=args.k,
            init=args.init, loss=args.loss, epochs=args.epochs, lr=args.lr, batch_size=args.minibatch,
            descriptors_per_step=args.descriptors_per_step, margin=args.margin, n_negatives=args.negatives,
            validation=args.validation or None, random_state=args.seed,
            n_threads=effective_n_jobs(args.jobs), progress=show, metadata=metadata)
    except ValueError as exc:
        raise CommandError(f"cannot train on {args.folder!r}: {exc}") from None
    training = time.perf_counter() - training_start
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
          + f"; extraction {extraction:.0f} s, training {training:.0f} s")
    return EXIT_OK
