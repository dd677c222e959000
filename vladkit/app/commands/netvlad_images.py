"""``vladkit netvlad train FOLDER --backbone NAME``: a CNN and NetVLAD trained end to end on
the images of a folder (:func:`vladkit.netvlad.train_on_images`), written as a torch file.

:func:`add_image_options` adds the options to the ``netvlad train`` parser; it imports
nothing but argparse, so ``vladkit --help`` stays torch-free (cli.py imports this module
while building the parser). :func:`cmd_netvlad_train_images` runs the command; torch is
imported there.
"""

from __future__ import annotations

import argparse

#: The backbones of vladkit.netvlad.build_backbone (kept here, not imported: no torch).
BACKBONE_NAMES = ("vgg16", "resnet18", "resnet34", "resnet50", "resnet101")
IMAGE_LOSSES = ("contrastive", "multi-similarity")


def _image_size(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 8:
        raise argparse.ArgumentTypeError(f"expected a size in pixels of 8 or more, got {text!r}")
    return value


def add_image_options(parser):
    """The ``--backbone`` mode's options, on the ``netvlad train`` parser."""
    parser.description += """

With --backbone, the images themselves are trained on, end to end: a
torchvision CNN cut at --layer (random weights, or --weights, which
torchvision downloads), NetVLAD initialised from k-means on its feature
maps, both trained with hard negatives mined from a cache of every image's
vector; random crops, flips and brightness/contrast jitter. Writes a torch
file (.pt: the state_dict, the backbone, K and the image size). --loss may
then also be contrastive or multi-similarity."""
    parser.epilog += "\n  vladkit netvlad train photos/ --backbone resnet18 --labels none --image-size 160 -o model.pt"
    for action in parser._actions:
        if action.dest == "loss":  # the losses of the image mode join --loss's choices
            action.choices = tuple(action.choices) + IMAGE_LOSSES
        elif action.dest == "lr":  # a whole CNN from scratch wants a smaller step (set in _check)
            action.default = None
            action.help = "Adam learning rate (default 0.001; with --backbone 0.0001)"
    group = parser.add_argument_group("training on images (--backbone)")
    group.add_argument("--backbone", choices=BACKBONE_NAMES, default=None,
                       help="train this CNN and NetVLAD on the images (default: NetVLAD alone, on local features)")
    group.add_argument("--layer", default=None, metavar="NAME",
                       help="where to cut the backbone (resnets: layer3 (default) or layer4; vgg16: conv5_3 "
                            "(default) or conv4_3)")
    group.add_argument("--weights", default=None, metavar="NAME",
                       help="torchvision weights to start from (e.g. DEFAULT, IMAGENET1K_V1; downloaded by "
                            "torchvision); default: random weights")
    group.add_argument("--image-size", type=_image_size, default=None, metavar="PX",
                       help="images are resized to cover PX x PX and cropped to it (default 160)")
    group.add_argument("--checkpoint", default=None, metavar="FILE",
                       help="training state written after every epoch (model, optimiser, miner, generators)")
    group.add_argument("--resume", action="store_true",
                       help="continue from --checkpoint (same options: same final weights as one run)")
    return parser


def _check(args):
    """Refuse options of the other mode; set the mode's default learning rate."""
    from ..errors import UsageError

    if args.lr is None:
        # Measured on 15-Scene attacked copies (resnet18 from random weights): 0.001
        # lowered the validation mAP where 0.0001 did not.
        args.lr = 1e-3 if args.backbone is None else 1e-4

    if args.backbone is None:
        given = [name for name, value in (("--layer", args.layer), ("--weights", args.weights),
                                          ("--image-size", args.image_size), ("--checkpoint", args.checkpoint))
                 if value is not None] + (["--resume"] if args.resume else [])
        if given:
            raise UsageError(f"{', '.join(given)}: options of training on images, which need --backbone")
        if args.loss in IMAGE_LOSSES:
            raise UsageError(f"--loss {args.loss} trains on images: give --backbone (NetVLAD alone trains with "
                             "triplet, classification or triplet+classification)")
        return
    if "classification" in args.loss:
        raise UsageError(f"--loss {args.loss}: with --backbone, the losses are triplet, contrastive and "
                         "multi-similarity")
    if args.resume and args.checkpoint is None:
        raise UsageError("--resume continues from --checkpoint FILE: give it")
    if args.copies is not None and args.labels != "none":
        raise UsageError("--copies sets the attacked copies made without labels: give it with --labels none")


def _split(paths, groups, fraction, seed):
    """(train indices, validation indices): with labels, a share of every folder
    (training's _split_validation); without, whole images (with their copies)."""
    import numpy as np

    from ...netvlad.training import _split_validation
    from ..errors import CommandError

    rng = np.random.default_rng([seed, 21])
    if groups is None:
        n_val = max(2, round(fraction * len(paths)))
        if len(paths) - n_val < 2:
            raise CommandError(f"--validation {fraction}: {len(paths)} images cannot spare {n_val} for "
                               "validation and keep 2 to train on (--validation 0: none)")
        held = np.zeros(len(paths), bool)
        held[rng.choice(len(paths), n_val, replace=False)] = True
        return np.flatnonzero(~held), np.flatnonzero(held)
    _, ids = np.unique(np.asarray(groups), return_inverse=True)
    try:
        return _split_validation(ids, fraction, rng, keep=2)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def cmd_netvlad_train_images(args):
    import sys
    import time
    from pathlib import Path

    from ..errors import CommandError

    try:
        import torch
        from ...netvlad import BACKBONES, build_backbone
        from ...netvlad.image_training import init_netvlad_from_images, save_image_model, train_on_images
        from ...netvlad.images import ImageGroupsDataset
    except ImportError as exc:
        raise CommandError(f"'vladkit netvlad train --backbone' needs PyTorch and torchvision ({exc}): pip "
                           "install torch==2.14.1 torchvision==0.29.1, then pip install 'vladkit[torch]'") from None
    from ..._util.threads import effective_n_jobs
    from ...features.images import list_images
    from .common import _report_skipped

    _check(args)
    paths = list_images(args.folder, recursive=not args.no_recursive)
    if not paths:
        raise CommandError(f"no images found in {args.folder!r}")
    # Each image's folder relative to FOLDER: its group (as netvlad.py's local-feature mode).
    labels = ([str(Path(path).parent.relative_to(args.folder)) for path in paths]
              if args.labels == "folders" else None)
    copies = (4 if args.copies is None else args.copies) if labels is None else 0
    size = args.image_size or 160
    show = not args.quiet
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if show else (lambda line: None)
    skipped = []

    def on_skipped(path, reason):
        skipped.append((path, reason))
        print(f"vladkit: skipped {path}: {reason}", file=sys.stderr)

    train, held = (list(range(len(paths))), []) if not args.validation else _split(paths, labels, args.validation,
                                                                                    args.seed)

    def dataset(indices, augment, seed):
        chosen = [paths[i] for i in indices]
        return ImageGroupsDataset(chosen, None if labels is None else [labels[i] for i in indices],
                                  image_size=size, copies=copies, augment=augment, seed=seed,
                                  on_skipped=on_skipped)

    start = time.perf_counter()
    try:
        training = dataset(train, True, args.seed)
        validation = dataset(held, False, args.seed + 1) if len(held) else None
    except ValueError as exc:
        raise CommandError(f"cannot train on {args.folder!r}: {exc}") from None
    if skipped and args.on_error == "raise":
        raise CommandError(f"cannot read {skipped[0][0]}: {skipped[0][1]} (--on-error skip reports unreadable "
                           "images and goes on)")
    _report_skipped(skipped, len(paths), args.error_log)
    reading = time.perf_counter() - start
    n_threads = effective_n_jobs(args.jobs)
    seed = args.seed
    try:
        torch.manual_seed(seed)  # the backbone's random weights, reproducibly
        backbone = build_backbone(args.backbone, layer=args.layer, weights=args.weights)
        model = init_netvlad_from_images(backbone, training, args.k, n_images=min(500, len(training)),
                                         version=args.init, random_state=seed, n_threads=n_threads)
        start = time.perf_counter()
        model, history = train_on_images(
            model, training, loss=args.loss, epochs=args.epochs, lr=args.lr, batch_size=args.minibatch,
            n_negatives=args.negatives, margin=args.margin if args.loss == "triplet" else None,
            validation=validation, keep_best=validation is not None, checkpoint=args.checkpoint,
            resume=args.resume, random_state=seed, n_threads=n_threads, log=say)
    except ValueError as exc:
        raise CommandError(f"cannot train on {args.folder!r}: {exc}") from None
    seconds = time.perf_counter() - start
    layer = args.layer or BACKBONES[args.backbone][1]
    summary = {"labels": args.labels, "copies_per_image": copies or None, "loss": args.loss,
               "epochs": args.epochs, "lr": args.lr, "batch_size": args.minibatch, "n_negatives": args.negatives,
               "random_state": seed, "n_threads": n_threads, "n_items": len(training),
               "n_validation_items": 0 if validation is None else len(validation), "history": history,
               "weights": args.weights, "init": args.init}
    save_image_model(model, args.output, backbone=args.backbone, layer=layer, image_size=size,
                     metadata={"training": summary})
    final = history[-1]
    result = f"loss {final['loss']:.4f}" if final["loss"] is not None else "untrained"
    if final["validation_map"] is not None:  # the best epoch is kept (ties: the later)
        kept = max(history, key=lambda h: (h["validation_map"], h["epoch"]))
        result += (f", epoch {kept['epoch']} kept: validation mAP {kept['validation_map']:.3f}, initialisation "
                   f"{history[0]['validation_map']:.3f}")
    print(f"wrote {Path(args.output)}: {args.backbone}/{layer} + NetVLAD K={args.k} "
          f"({model.pooling.n_features_out:,} dimensions), {size} px, {args.loss} loss, {args.epochs} epoch{'' if args.epochs == 1 else 's'} "
          f"({result}) from {len(paths) - len(skipped)} images"
          + (f" ({len(skipped)} skipped)" if skipped else "")
          + (f" and {copies} attacked copies each" if copies else f" in {len(set(labels))} folders")
          + f"; reading {reading:.0f} s, training {seconds:.0f} s")
    return 0
