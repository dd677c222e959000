"""What the ``vladkit`` commands share: the local-feature options turned into an extractor,
progress bars, reading images batch by batch and reporting the skipped ones, the Dask
client of ``--workers``/``--scheduler``, and :data:`FAILURES`, the errors reported in one
line (exit status 1).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading

from ..._util.io import atomic_output, json_dumps
from ...pipeline.recipe import EncodingsFileError
from ...pipeline.budget import iter_batches
from ...features.extractors import SIFT, DenseSIFT
from ...features.images import ImageReadError
from ...retrieval.index_files import IndexFileError
from ...vocabulary.fileformat import VocabularyFileError
from ..errors import CommandError, UsageError


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
    ``first``; see :func:`vladkit.pipeline.budget.iter_batches`), batches sized by ``--max-memory``
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


#: What a command's failure can raise that is reported in one line (exit status 1).
FAILURES = (CommandError, ImageReadError, VocabularyFileError, EncodingsFileError, IndexFileError,
            ValueError, OSError, RuntimeError)
