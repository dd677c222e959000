"""The ``vladkit`` command. It composes the library and holds no algorithm.

Exit codes: 0 success, 1 the job failed, 2 bad usage (argparse's convention).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading

from . import __version__
from .features import SIFT, DenseSIFT
from .images import DEFAULT_MAX_PIXELS, ImageReadError, list_images
from .vocabulary import (
    DescriptorSampler,
    GMMVocabulary,
    KMeansVocabulary,
    VocabularyFileError,
    load_vocabulary,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CommandError(Exception):
    """A failure to report in one line and exit with status 1."""


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

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        bar.close()


def _extractor_from_args(args):
    common = dict(root=args.root, max_side=args.max_side, n_jobs=args.jobs,
                  max_pixels=None if args.max_pixels == 0 else args.max_pixels)
    if args.features == "sift":
        return SIFT(**common)
    return DenseSIFT(step=args.step, sizes=tuple(args.sizes), **common)


def _describe(extractor):
    params = extractor.get_params()
    shown = {k: v for k, v in params.items() if k not in ("n_jobs", "max_pixels")}
    return f"{type(extractor).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"


def _extract_batches(extractor, paths, batch_size, on_image, progress):
    """Extract batch by batch; unreadable images are reported on stderr and skipped.

    Calls ``on_image(index, features)`` for each readable image; returns the skipped
    (path, reason) pairs.
    """
    skipped = []
    for start in range(0, len(paths), batch_size):
        batch = paths[start:start + batch_size]
        try:
            results = list(enumerate(extractor.transform(batch), start))
        except ImageReadError:
            results = []  # isolate the bad file(s): one image at a time
            for index, path in enumerate(batch, start):
                try:
                    results.append((index, extractor.transform([path])[0]))
                except ImageReadError as exc:
                    skipped.append((str(path), exc.reason))
                    progress.write(f"vladkit: skipped {path}: {exc.reason}", file=sys.stderr)
        for index, features in results:
            on_image(index, features)
        progress.update(len(batch))
    return skipped


# ---------------------------------------------------------------------- vocab build


def cmd_vocab_build(args):
    paths = list_images(args.folder, recursive=not args.no_recursive)
    if not paths:
        raise CommandError(f"no images found in {args.folder!r}")
    extractor = _extractor_from_args(args)
    sampler = DescriptorSampler(len(paths), args.max_descriptors, args.max_per_image, args.seed)
    show = not args.quiet
    with _progress(len(paths), "extracting", show) as bar:
        skipped = _extract_batches(
            extractor, paths, args.batch_size,
            lambda index, features: sampler.add(index, features.descriptors), bar,
        )
    if len(skipped) == len(paths):
        raise CommandError(f"none of the {len(paths)} images could be read")
    sample = sampler.sample()
    cls = KMeansVocabulary if args.kind == "kmeans" else GMMVocabulary
    size = {"n_clusters": args.k} if args.kind == "kmeans" else {"n_components": args.k}
    vocab = cls(**size, max_descriptors=args.max_descriptors, max_per_image=args.max_per_image,
                pca=args.pca, whiten=args.whiten, random_state=args.seed,
                descriptor_type=_describe(extractor))
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
          + (" (whitened)" if pca is not None and meta["params"].get("whiten") else ""))
    print(f"word dim:         {meta['dim']} ({meta['dtype']})")
    print(f"descriptors:      {meta['params'].get('descriptor_type') or 'unknown'}")
    print(f"trained on:       {meta['n_training_descriptors']:,} descriptors, seed {meta['params'].get('random_state')}")
    if meta["kind"] == "gmm":
        weights = vocab.weights_
        print(f"priors:           min {weights.min():.4g}, max {weights.max():.4g}")
        print(f"variances:        min {vocab.covariances_.min():.4g}, max {vocab.covariances_.max():.4g}")
    print(f"format:           {meta['format']} v{meta['format_version']}, written by vladkit {meta['vladkit_version']}")
    return EXIT_OK


# --------------------------------------------------------------------------- parser


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_feature_options(parser):
    group = parser.add_argument_group("local features")
    group.add_argument("--features", choices=("dense", "sift"), default="dense",
                       help="dense multi-scale SIFT on a grid (PHOW) or sparse SIFT keypoints "
                            "(default: dense)")
    group.add_argument("--root", action="store_true", help="RootSIFT descriptors")
    group.add_argument("--step", type=_positive_int, default=4, metavar="PX", help="dense grid step in pixels (default 4)")
    group.add_argument("--sizes", type=_positive_int, nargs="+", default=[4, 6, 8, 10], metavar="PX",
                       help="dense bin sizes in pixels (default 4 6 8 10)")
    group.add_argument("--max-side", type=_positive_int, default=None, metavar="PX",
                       help="downscale images whose long side is larger than this")
    group.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                       help=f"refuse images with more pixels than this, read from the header "
                            f"(default {DEFAULT_MAX_PIXELS:,}; 0 lifts the limit)")
    group.add_argument("--no-recursive", action="store_true", help="do not descend into sub-folders")
    group.add_argument("-j", "--jobs", type=int, default=-1, metavar="N",
                       help="threads for extraction (default -1: every core)")
    group.add_argument("--batch-size", type=_positive_int, default=64, metavar="N", help="images per batch (default 64)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vladkit",
        description="Local-feature encodings for images: SIFT / dense SIFT descriptors "
                    "aggregated into Bag-of-Features, VLAD and Fisher vectors.",
        epilog="Run 'vladkit COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"vladkit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    vocab = commands.add_parser("vocab", help="build or inspect a visual vocabulary",
                                description="Build or inspect a visual vocabulary.")
    vocab_commands = vocab.add_subparsers(dest="vocab_command", metavar="SUBCOMMAND")
    build = vocab_commands.add_parser(
        "build", help="train a vocabulary on the images of a folder",
        description="Extract local features from the images of FOLDER (recursively), keep a "
                    "bounded sample spread over the images, and train k-means words (for BoF "
                    "and VLAD) or a diagonal GMM (for Fisher vectors). Unreadable images are "
                    "reported and skipped. The file is written atomically: an interrupted run "
                    "leaves nothing behind.",
        epilog="example: vladkit vocab build photos/ -k 256 --kind gmm --root --pca 80 -o gmm.npz",
    )
    build.add_argument("folder", help="folder of images")
    build.add_argument("-k", type=_positive_int, default=64, metavar="K", help="number of visual words (default 64)")
    build.add_argument("--kind", choices=("kmeans", "gmm"), default="kmeans",
                       help="k-means for BoF/VLAD, gmm for Fisher vectors (default kmeans)")
    build.add_argument("--pca", type=_positive_int, default=None, metavar="N",
                       help="reduce descriptors to N principal components first (Fisher: 64-80)")
    build.add_argument("--whiten", action="store_true", help="whiten the PCA components")
    build.add_argument("--max-descriptors", type=_positive_int, default=200_000, metavar="N",
                       help="training sample size, spread over the images (default 200,000)")
    build.add_argument("--max-per-image", type=_positive_int, default=None, metavar="N",
                       help="at most this many descriptors from one image")
    build.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0): same seed, same file")
    build.add_argument("-o", "--output", required=True, metavar="FILE", help="vocabulary file to write (.npz)")
    build.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _add_feature_options(build)
    build.set_defaults(run=cmd_vocab_build)

    info = vocab_commands.add_parser("info", help="describe a vocabulary file",
                                     description="Print what a vocabulary file holds.")
    info.add_argument("vocabulary", help="a .npz file written by 'vladkit vocab build'")
    info.set_defaults(run=cmd_vocab_info)
    vocab.set_defaults(run=lambda args: (vocab.print_help(), EXIT_USAGE)[1])
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("vladkit: interrupted; nothing was written", file=sys.stderr)
        return 130
    except (CommandError, ImageReadError, VocabularyFileError, ValueError, OSError) as exc:
        print(f"vladkit: error: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
