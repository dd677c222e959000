"""The ``vladkit`` command: its parser and the dispatch to :mod:`vladkit.app.commands`.

Only the standard library (and :mod:`vladkit._util.defaults`, :mod:`vladkit.app.errors`)
is imported until the arguments are parsed, so ``vladkit --help`` and usage errors answer
at once; the command's module, and with it numpy, scikit-learn, numba and faiss, loads
after.

Exit codes: 0 success, 1 the job failed, 2 bad usage (argparse's convention).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading

from .._version import __version__
from .._util.defaults import (AUTO_PCA, DEFAULT_MAX_MEMORY, DEFAULT_MAX_PIXELS, DENSE_MAX_SIDE, DENSE_SIZES,
    DENSE_STEP, FAISS_MAX_ITER, FAISS_THRESHOLD, MINIBATCH_THRESHOLD, SIFT_MAX_SIDE, SKLEARN_MAX_ITER, parse_memory)
from .errors import EXIT_FAILED, EXIT_USAGE, UsageError


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_feature_options(parser, from_vocabulary=False):
    """Local-feature options; with ``from_vocabulary`` the defaults are the vocabulary's."""
    group = parser.add_argument_group(
        "local features" + (" (default: those the vocabulary was built on)" if from_vocabulary else ""))
    default = (lambda value: None) if from_vocabulary else (lambda value: value)
    group.add_argument("--features", choices=("dense", "sift"), default=default("dense"),
                       help="dense multi-scale SIFT on a grid (PHOW) or sparse SIFT keypoints"
                            + ("" if from_vocabulary else " (default: dense)"))
    group.add_argument("--root", action="store_true", default=default(False), help="RootSIFT descriptors")
    group.add_argument("--spatial", action="store_true", default=default(False),
                       help="spatially augmented descriptors (Sanchez et al. 2012): append each one's "
                            "position in the image, (x/w - 0.5, y/h - 0.5), as 2 more dimensions, which "
                            "the vocabulary's PCA leaves as they are: a Fisher vector then also records "
                            "where each kind of patch lies (4 more values per Gaussian)")
    group.add_argument("--spatial-scale", type=_positive_float, default=None, metavar="S",
                       help="multiply the appended positions by S (implies --spatial; default 1)")
    # Left None when not given (defaults applied later), so that giving them with sparse
    # keypoints, which have no grid, is an error rather than silently ignored.
    group.add_argument("--step", type=_positive_int, default=None, metavar="PX",
                       help="dense grid step in pixels" + ("" if from_vocabulary else f" (default {DENSE_STEP})"))
    group.add_argument("--sizes", type=_positive_int, nargs="+", default=None, metavar="PX",
                       help="dense bin sizes in pixels"
                            + ("" if from_vocabulary else f" (default {' '.join(map(str, DENSE_SIZES))})"))
    group.add_argument("--max-side", type=_max_side, default=None, metavar="PX",
                       help="downscale images whose long side is larger than this; 0 keeps full "
                            f"resolution (default: {DENSE_MAX_SIDE} for dense features, "
                            f"{SIFT_MAX_SIDE} for sparse"
                            + (", or as the vocabulary was built)" if from_vocabulary else ")"))
    _add_input_options(group)


def _add_input_options(group):
    group.add_argument("--on-error", choices=("skip", "raise"), default="skip",
                       help="unreadable image: report it on stderr and go on (skip, default), or "
                            "stop with exit status 1 naming it (raise; encode keeps the shards "
                            "finished before it, for a rerun to resume from, and writes no output)")
    group.add_argument("--error-log", default=None, metavar="FILE",
                       help="also write the skipped images as JSON lines {path, reason}")
    group.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                       help=f"refuse images with more pixels than this, read from the header "
                            f"(default {DEFAULT_MAX_PIXELS:,}; 0 lifts the limit)")
    group.add_argument("--no-recursive", action="store_true", help="do not descend into sub-folders")
    group.add_argument("-j", "--jobs", type=int, default=-1, metavar="N",
                       help="threads for extraction (default -1: every core)")
    group.add_argument("--batch-size", type=_positive_int, default=64, metavar="N",
                       help="at most this many images per batch (default 64)")
    group.add_argument("--max-memory", type=_memory, default=DEFAULT_MAX_MEMORY, metavar="SIZE",
                       help="working-memory budget, e.g. 512MB or 4GB (default 1GB): batches are "
                            "sized by the descriptors their images give, and an image too large "
                            "for it is processed in pieces")


def _add_dask_options(parser, verb, shared):
    dask = parser.add_argument_group("Dask (optional extra: pip install 'vladkit[dask]')")
    dask.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                      help=f"{verb} on a local Dask cluster of N worker processes (one thread each)")
    dask.add_argument("--scheduler", default=None, metavar="ADDRESS",
                      help=f"{verb} on an existing Dask cluster, e.g. tcp://10.0.0.1:8786; {shared} must "
                           "be at the same paths on every worker (shared storage); --jobs sets threads "
                           "per task (default 1)")


def _add_retrieval_options(parser):
    parser.add_argument("--rerank", type=_non_negative_int, default=0, metavar="R",
                        help="re-rank the top R results by spatial verification of local feature "
                             "matches (needs an index built with --rerank-features; e.g. 100)")
    parser.add_argument("--qe", type=_non_negative_int, default=0, metavar="M",
                        help="query expansion: search again with the query plus its M nearest "
                             "results (average QE, Chum et al. 2007; default 0: none)")
    parser.add_argument("--qe-alpha", type=_non_negative_float, default=None, metavar="A",
                        help="alpha-QE, with --qe: weight each of the M results by max(score, 0)^A "
                             "(default 0: average QE; 3 in Radenovic et al. 2018)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar (--rerank shows one)")


def _add_verify_option(parser, what):
    parser.add_argument("--no-verify", action="store_true",
                        help=f"read the shards of {what} without checking them against the SHA-256 "
                             "their job recorded (by default each is checked as it is first read, and "
                             "a damaged one stops the command, named)")


def _non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value


def _non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _max_side(text):
    try:
        return _non_negative_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a number of pixels (0: full resolution), got {text!r}") from None


def _memory(text):
    try:
        return parse_memory(text, "the budget")
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _pq_code(text):
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(part.isdigit() for part in parts) or int(parts[0]) < 1 or not 1 <= int(parts[1]) <= 16:
        raise argparse.ArgumentTypeError(f"expected MxB (M sub-quantizers of B bits, e.g. 16x8), got {text!r}")
    return text.lower()


def _whiten(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 0.5:
        raise argparse.ArgumentTypeError(f"expected an exponent between 0 and 0.5, got {text!r}")
    return value


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
                       help="k-means for BoF/VLAD/LLC/SV, gmm for Fisher vectors (default kmeans)")
    build.add_argument("--pca", type=_non_negative_int, default=None, metavar="N",
                       help=f"reduce descriptors to N principal components first; 0: no PCA "
                            f"(default: {AUTO_PCA} for --kind gmm, as FisherEncoder: a diagonal GMM fits "
                            "decorrelated descriptors better; none for kmeans)")
    build.add_argument("--whiten", action="store_true", help="whiten the PCA components (needs PCA)")
    build.add_argument("--algorithm", choices=("auto", "sklearn", "faiss"), default="auto",
                       help=f"how k-means words are trained: scikit-learn's KMeans (k-means++, up to "
                            f"{SKLEARN_MAX_ITER} Lloyd iterations; MiniBatchKMeans above {MINIBATCH_THRESHOLD:,} "
                            f"descriptors) or faiss's (random initialisation, {FAISS_MAX_ITER} Lloyd "
                            f"iterations: several times faster for large K). auto: faiss from -k {FAISS_THRESHOLD} on, scikit-learn below "
                            "(default auto)")
    build.add_argument("--max-descriptors", type=_positive_int, default=200_000, metavar="N",
                       help="training sample size, spread over the images (default 200,000)")
    build.add_argument("--max-per-image", type=_positive_int, default=None, metavar="N",
                       help="at most this many descriptors from one image")
    build.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0): same seed, same file")
    build.add_argument("-o", "--output", required=True, metavar="FILE", help="vocabulary file to write (.npz)")
    build.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _add_feature_options(build)
    _add_dask_options(build, "extract the sample", "the images")
    build.set_defaults(run=("vocab", "cmd_vocab_build"))

    info = vocab_commands.add_parser("info", help="describe a vocabulary file",
                                     description="Print what a vocabulary file holds.")
    info.add_argument("vocabulary", help="a .npz file written by 'vladkit vocab build'")
    info.set_defaults(run=("vocab", "cmd_vocab_info"))
    vocab.set_defaults(run=lambda args: (vocab.print_help(), EXIT_USAGE)[1])

    encode = commands.add_parser(
        "encode", help="encode the images of a folder (BoF, VLAD, Fisher, NetVLAD, LLC, SV; ASMK word sets)",
        description="Extract local features from the images of FOLDER (recursively) and encode "
                    "each image into one vector with the vocabulary (or NetVLAD parameters), batch "
                    "by batch, in resumable shards (rerun the same command after a crash or a "
                    "kill). The output (vectors, image paths, and the recipe: features, encoder, "
                    "vocabulary) is one .npz, or for any other name a folder of shards that no "
                    "command loads whole. Unreadable images are reported and skipped. --workers "
                    "or --scheduler run the shards on Dask, with the same output bytes.",
        epilog="example: vladkit encode photos/ --vocab words.npz -o photos.npz (one file); "
               "-o photos.enc (a folder of shards); add --workers 8 to run on a local Dask cluster",
    )
    encode.add_argument("folder", help="folder of images")
    encode.add_argument("--vocab", required=True, metavar="FILE",
                        help="vocabulary from 'vladkit vocab build', or NetVLAD parameters from "
                             "'vladkit netvlad train' (told apart by their format)")
    encode.add_argument("--encoder", choices=("bof", "vlad", "fisher", "netvlad", "llc", "sv", "asmk"),
                        default=None,
                        help="llc: locality-constrained linear coding, sv: super-vector coding, asmk: "
                             "(word, signature) sets for the selective match kernels, a folder of shards "
                             "(all with k-means words); default: fisher for a GMM, vlad for k-means words, "
                             "netvlad for a NetVLAD file (which only netvlad can use)")
    asmk = encode.add_argument_group("ASMK (--encoder asmk)")
    asmk.add_argument("--signatures", choices=("bits", "float"), default=None,
                      help="bits: the signs of a word's summed residuals (ASMK*, 16 bytes for SIFT; default); "
                           "float: the unit residual (ASMK, 512 bytes)")
    asmk.add_argument("--assignment", type=_positive_int, default=None, metavar="M",
                      help="words per descriptor of indexed images (default 1)")
    asmk.add_argument("--query-assignment", type=_positive_int, default=None, metavar="M",
                      help="words per descriptor of queries (default 5)")
    asmk.add_argument("--queries", action="store_true", help="encode as queries, for 'vladkit evaluate'")
    encode.add_argument("--pyramid", action="store_true",
                        help="spatial pyramid: encode 1x1 + 2x2 + 1x3 cells and concatenate (8x longer)")
    encode.add_argument("-o", "--output", required=True, metavar="OUTPUT",
                        help="OUTPUT.npz: one file (vectors in memory while it is written: for up to "
                             "~100k images); any other name: a folder of shards (out of core: .npy "
                             "vectors + JSON reports + manifest), which every command reads")
    encode.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    encode.add_argument("--shard-size", type=_positive_int, default=256, metavar="N",
                        help="images per shard of the resumable job (default 256): finished shards "
                             "stay (in OUTPUT.npz.parts/ for a .npz) and a rerun of the same command "
                             "after a crash or a kill resumes from them; on Dask a shard is a task")
    _add_dask_options(encode, "encode", "the images and OUTPUT")
    _add_feature_options(encode, from_vocabulary=True)
    encode.set_defaults(run=("encode", "cmd_encode"))

    index = commands.add_parser("index", help="build a search index from encodings",
                                description="Build a search index from encodings.")
    index_commands = index.add_subparsers(dest="index_command", metavar="SUBCOMMAND")
    build_index = index_commands.add_parser(
        "build", help="index the vectors of an encodings file",
        description="Index the vectors of ENCODINGS (from 'vladkit encode') for inner-product search "
                    "(ASMK word sets: an inverted file): exact (default), or with a product quantizer (--pq), "
                    "optionally with an inverted file (--nlist). --pca first reduces the vectors "
                    "with PCA-whitening (Jegou & Chum 2012), learnt on the vectors themselves or "
                    "on --train. The folder also keeps the recipe and the vocabulary, so that "
                    "'vladkit search' encodes queries the same way. Written atomically.",
        epilog="example: vladkit index build photos.npz --pca 256 --pq 64x8 -o photos.index",
    )
    build_index.add_argument("encodings", help="encodings from 'vladkit encode' (.npz file or shards folder)")
    build_index.add_argument("--pca", type=_positive_int, default=None, metavar="D",
                             help="PCA-whiten to D dimensions before indexing")
    build_index.add_argument("--whiten", type=_whiten, default=None, metavar="A",
                             help="whitening exponent: variances^-A (0.5 full whitening, default; 0.25 "
                                  "partial, better with few training vectors; 0 plain PCA)")
    build_index.add_argument("--power", type=float, default=None, metavar="P",
                             help="signed power normalization after whitening (e.g. 0.5)")
    build_index.add_argument("--pq", type=_pq_code, default=None, metavar="MxB",
                             help="product quantization, M sub-quantizers of B bits: M*B/8 bytes per image")
    build_index.add_argument("--nlist", type=_positive_int, default=None, metavar="N",
                             help="inverted file with N lists on top of --pq (IVF-PQ) for large collections")
    build_index.add_argument("--nprobe", type=_positive_int, default=None, metavar="N",
                             help="lists visited per query with --nlist (default 8)")
    build_index.add_argument("--train", default=None, metavar="FILE",
                             help="encodings to learn the PCA and quantizer on (default: the indexed ones)")
    build_index.add_argument("--train-size", type=_positive_int, default=100_000, metavar="N",
                             help="learn them on at most N vectors, a reproducible sample (default "
                                  "100,000; memory: N x dimension x 4 bytes)")
    build_index.add_argument("--vocab", default=None, metavar="FILE",
                             help="the vocabulary that encoded ENCODINGS, if it is no longer at the path "
                                  "they record nor beside them (a moved folder); checked by its SHA-256")
    build_index.add_argument("--rerank-features", action="store_true",
                             help="also store sparse RootSIFT features of the indexed images (read again "
                                  "from their paths, at most 1,000 per image, ~140 KB each) so that "
                                  "search and evaluate can --rerank")
    build_index.add_argument("-j", "--jobs", type=int, default=-1, metavar="N",
                             help="threads for --rerank-features' extraction (default -1: every core)")
    build_index.add_argument("--max-memory", type=_memory, default=DEFAULT_MAX_MEMORY, metavar="SIZE",
                             help="working-memory budget of that extraction, and of an ASMK build (default 1GB)")
    asmk = build_index.add_argument_group("ASMK (ENCODINGS from 'vladkit encode --encoder asmk')")
    asmk.add_argument("--alpha", type=float, default=None, metavar="A", help="a word pair of similarity u "
                      "counts u^A (default 3), if u is at least --threshold T, in [-1, 1] (default 0)")
    asmk.add_argument("--threshold", type=float, default=None, metavar="T", help="(see --alpha)")
    asmk.add_argument("--idf", action="store_true", help="weigh word c by log(N / n_c)^2 (N images, n_c with c)")
    _add_verify_option(build_index, "ENCODINGS (and --train)")
    build_index.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    build_index.add_argument("-o", "--output", required=True, metavar="FOLDER", help="index folder to write")
    build_index.set_defaults(run=("index", "cmd_index_build"))
    index.set_defaults(run=lambda args: (index.print_help(), EXIT_USAGE)[1])

    search = commands.add_parser(
        "search", help="find the indexed images most similar to query images",
        description="Encode each IMAGE as the indexed images were, and print its nearest indexed "
                    "images (rank, inner-product score, path).",
        epilog="example: vladkit search photos.index query.jpg --top 5",
    )
    search.add_argument("index", help="index folder from 'vladkit index build'")
    search.add_argument("images", nargs="+", metavar="IMAGE", help="query image files")
    search.add_argument("--top", type=_positive_int, default=10, metavar="K", help="results per query (default 10)")
    search.add_argument("--json", action="store_true", help="print JSON instead of a listing")
    _add_retrieval_options(search)
    search.add_argument("-j", "--jobs", type=int, default=-1, metavar="N",
                        help="threads, over the query images and within each (default -1: every core)")
    search.add_argument("--max-memory", type=_memory, default=DEFAULT_MAX_MEMORY, metavar="SIZE",
                        help="working-memory budget for the queries' features, e.g. 512MB (default 1GB)")
    search.set_defaults(run=("search", "cmd_search"))

    serve = commands.add_parser(
        "serve", help="a search service over an index, with a web page (needs the serve extra)",
        description="Serve INDEX over HTTP until Ctrl-C: a web page at / to upload or drop a photo "
                    "and look at its nearest indexed images, and a JSON API (POST /api/search with "
                    "an image, GET /api/search?id=ID, /api/thumbnail?id=ID, /api/info, "
                    "/api/health). The index, its recipe and vocabulary are loaded once; queries "
                    "run on worker threads within a time limit; uploads are bounded in bytes and "
                    "in pixels (read from the header before decoding); idle and slow connections are "
                    "closed, and capped per client. Listens on this machine only, and answers "
                    "requests addressed to its own names only (localhost, 127.0.0.1, [::1]: a "
                    "guard against DNS rebinding), unless --host and --allowed-host say otherwise. "
                    "Needs the serve extra: python -m pip install 'vladkit[serve]'.",
        epilog="example: vladkit serve photos.index, then open http://127.0.0.1:8000/",
    )
    serve.add_argument("index", help="index folder from 'vladkit index build' (--rerank-features for re-ranking)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every "
                            "interface, with --allowed-host)")
    serve.add_argument("--port", type=_positive_int, default=8000, metavar="N", help="port (default 8000)")
    serve.add_argument("--max-upload-mb", type=_positive_float, default=20.0, metavar="MB",
                       help="largest upload in megabytes (10^6 bytes; default 20): 413 beyond")
    serve.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS, metavar="N",
                       help=f"largest image in pixels, read from its header before decoding (default "
                            f"{DEFAULT_MAX_PIXELS:,}): 413 beyond")
    serve.add_argument("--timeout", type=_positive_float, default=30.0, metavar="S",
                       help="seconds a request may take, its upload and waiting included (default 30): 503 "
                            "beyond (408 if the upload was still arriving, and the connection is closed)")
    serve.add_argument("--max-concurrency", type=_positive_int, default=None, metavar="N",
                       help="queries computed at once (default: one per core)")
    serve.add_argument("-j", "--jobs", type=int, default=1, metavar="N",
                       help="threads within one query (default 1: the parallelism is across queries)")
    serve.add_argument("--image-root", default=None, metavar="FOLDER",
                       help="the folder the index's relative image paths are relative to: the one 'vladkit "
                            "encode' ran in (default: the current folder)")
    serve.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                       help="also answer requests addressed to NAME (repeatable; '*.example.org' for its "
                            "subdomains, '*' for any: no DNS-rebinding protection). Default: only localhost, "
                            "127.0.0.1, [::1] and the --host address; needed with --host 0.0.0.0 or ::; "
                            "other Host headers get 400")
    serve.add_argument("--max-connections-per-client", type=_non_negative_int, default=16, metavar="N",
                       help="connections one client address (IPv6: its /64) may hold open at once; one more "
                            "gets 503 (default 16; 0: no cap, e.g. behind a reverse proxy that caps them)")
    serve.add_argument("--header-timeout", type=_positive_float, default=10.0, metavar="S",
                       help="seconds a connection has to send a request's headers (default 10); a body must "
                            "arrive within --timeout; past either the connection is closed")
    serve.add_argument("-q", "--quiet", action="store_true", help="no access log, only warnings and errors")
    serve.set_defaults(run=("serve", "cmd_serve"))

    evaluate = commands.add_parser(
        "evaluate", help="mean average precision and recall@k of an index",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Search INDEX with every image of QUERIES and score the rankings: mean average
precision (mAP, the Holidays/Oxford trapezoidal AP) and recall@k (the fraction
of queries with a positive among their first k results).

QUERIES is an encodings file from 'vladkit encode', made with the index's
vocabulary and options. It is either the file the index was built from (every
indexed image is a query, as in INRIA Holidays) or images kept out of the index
(held-out queries: 15-Scene's test/ searched in an index of train/). Either way
the positives of a query are the INDEX images of its group; a query that is
itself indexed is left out of its own ranking.

--ground-truth folders: an image's group is its folder relative to the root of
  its collection: test/coast/1.jpg (a query) and train/coast/7.jpg (indexed)
  are both in group 'coast'. By default each root is the deepest folder above
  all the image folders of its collection (test/ and train/ here); queries that
  are all indexed images share the index's root. --query-root and
  --database-root set the roots.
--ground-truth holidays: INRIA Holidays names (NNNNNN.jpg): the queries are
  the images NNNN00.jpg, their positives the other index images NNNNxx.jpg.""",
        epilog="""\
examples:
  vladkit evaluate holidays.index holidays.npz --ground-truth holidays
  vladkit evaluate train.index test.npz --ground-truth folders   # held-out queries
  vladkit evaluate train.index test.npz --ground-truth folders --top 100 --k 1 10 100""",
    )
    evaluate.add_argument("index", help="index folder from 'vladkit index build'")
    evaluate.add_argument("queries", help="encodings file of the query images (the indexed ones or others)")
    _add_verify_option(evaluate, "QUERIES")
    evaluate.add_argument("--ground-truth", choices=("holidays", "folders"), required=True,
                          help="how groups are read from the image paths (see above)")
    evaluate.add_argument("--query-root", default=None, metavar="DIR",
                          help="folders: the folder that holds the query group folders (default: inferred)")
    evaluate.add_argument("--database-root", default=None, metavar="DIR",
                          help="folders: the folder that holds the indexed group folders (default: inferred)")
    evaluate.add_argument("--k", type=_positive_int, nargs="+", default=None, metavar="K",
                          help="recall@k for these k (default 1 5 10, or those up to --top); at most --top")
    evaluate.add_argument("--top", type=_positive_int, default=None, metavar="N",
                          help="score only the first N results of each query, not counting the query "
                               "itself when it is indexed: reported as mAP@N, positives ranked lower "
                               "count as not found (default: rank the whole index, exact mAP)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    _add_retrieval_options(evaluate)
    evaluate.set_defaults(run=("evaluate", "cmd_evaluate"))

    demo = commands.add_parser(
        "demo", help="the whole product on a built-in near-duplicate benchmark (about 2 minutes)",
        description="Build an INRIA Copydays-style near-duplicate benchmark from the sample photos "
                    "that ship with scikit-learn, scikit-image and matplotlib (nothing is "
                    "downloaded): originals and distractors as the database, seven attacks of each "
                    "original (crop, JPEG, rotation, scaling, blur, contrast, strong) as queries. "
                    "Train vocabularies on separate images, encode with BoF, VLAD and Fisher "
                    "vectors, index them exactly and compressed (PCA + product quantization), and "
                    "print mAP and recall@1 against bytes per image. Writes an HTML report with a "
                    "plot and the top results of some queries. Seeded (--seed): the same "
                    "vladkit and library versions on the same machine with the same number of "
                    "threads print the same table on every run. On another machine expect "
                    "differences of a few mAP points, most in the compressed (PCA, PQ) rows: "
                    "OpenCV's SIFT, the BLAS kernels and the thread split all follow the CPU and "
                    "its core count, and the iterative training of the vocabularies and "
                    "quantizers (k-means, GMM) turns their last-bit differences into slightly "
                    "different vocabularies, which move a few of the 161 queries' rankings.",
    )
    demo.add_argument("-o", "--output", default="vladkit-demo", metavar="FOLDER",
                      help="folder for report.html (default: ./vladkit-demo)")
    demo.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    demo.set_defaults(run=("demo", "cmd_demo"))

    netvlad = commands.add_parser("netvlad", help="train NetVLAD pooling on local features (needs torch)",
                                  description="Train NetVLAD pooling (Arandjelovic et al., CVPR 2016) "
                                              "on local features. Needs PyTorch.")
    netvlad_commands = netvlad.add_subparsers(dest="netvlad_command", metavar="SUBCOMMAND")
    netvlad_train = netvlad_commands.add_parser(
        "train", help="train NetVLAD on the images of a folder, from weak supervision",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Extract local features from the images of FOLDER (recursively; a bounded random
subset of each image's descriptors is kept), initialise NetVLAD from k-means
and train it with PyTorch (seeded, deterministic on the CPU), then write its
parameters (.npz, atomically) for 'vladkit encode --vocab FILE' (encoder
netvlad) and NetVLADEncoder, which run without torch.

Weak supervision says which images show the same thing:
--labels folders: images in the same folder are positives of each other (a
  place, an object, a class); negatives come from the other folders.
--labels none: no labels: each image and --copies attacked copies of it
  (crop, JPEG, rotation, scaling, blur, contrast: the demo's attacks) form a
  group, for near-duplicate search.

--loss triplet is the paper's ranking loss: the closest positive must be
nearer than the hard negatives (mined every epoch) by a margin;
classification trains a linear head on the folders (discarded afterwards).
A share of the images (--validation) is held out and the epoch with the best
validation mAP is kept.""",
        epilog="examples:\n"
               "  vladkit netvlad train places/ -k 64 --root -o netvlad.npz\n"
               "  vladkit netvlad train photos/ -k 64 --root --labels none -o netvlad.npz\n"
               "  vladkit encode photos/ --vocab netvlad.npz -o photos.npz",
    )
    netvlad_train.add_argument("folder", help="folder of images (one sub-folder per group with --labels folders)")
    netvlad_train.add_argument("-k", type=_positive_int, default=64, metavar="K",
                               help="number of clusters (default 64)")
    netvlad_train.add_argument("--labels", choices=("folders", "none"), default="folders",
                               help="positives: same folder (default), or none: attacked copies of each image")
    netvlad_train.add_argument("--copies", type=_positive_int, default=None, metavar="N",
                               help="attacked copies per image with --labels none (default 4)")
    netvlad_train.add_argument("--init", choices=("v1", "v2"), default="v2",
                               help="initialisation from k-means: v1 (no bias, MATLAB's default) or v2 "
                                    "(with bias: exactly soft-assignment VLAD; default)")
    netvlad_train.add_argument("--loss", choices=("triplet", "classification", "triplet+classification"),
                               default="triplet", help="training loss (default triplet)")
    netvlad_train.add_argument("--epochs", type=_non_negative_int, default=10, metavar="N",
                               help="passes over the images (default 10; 0 writes the initialisation)")
    netvlad_train.add_argument("--lr", type=_positive_float, default=1e-3, metavar="LR",
                               help="Adam learning rate (default 0.001)")
    netvlad_train.add_argument("--minibatch", type=_positive_int, default=8, metavar="N",
                               help="queries (triplet) or images (classification) per step (default 8)")
    netvlad_train.add_argument("--descriptors-per-image", type=_positive_int, default=1000, metavar="N",
                               help="descriptors kept per image, drawn at random (default 1000)")
    netvlad_train.add_argument("--descriptors-per-step", type=_positive_int, default=500, metavar="N",
                               help="descriptors of an image drawn each time it is used in training (default 500)")
    netvlad_train.add_argument("--negatives", type=_positive_int, default=10, metavar="N",
                               help="hard negatives per query (default 10)")
    netvlad_train.add_argument("--margin", type=_positive_float, default=0.1, metavar="M",
                               help="triplet margin on squared distances (default 0.1)")
    netvlad_train.add_argument("--validation", type=_fraction, default=0.1, metavar="F",
                               help="share of the images held out to choose the epoch (default 0.1; 0: none, "
                                    "the last epoch is kept): some of every folder, or whole folders (at least "
                                    "2) when they are small and 4 or more, as the groups of copies of --labels "
                                    "none")
    netvlad_train.add_argument("--seed", type=int, default=0, metavar="S",
                               help="random seed (default 0): same seed and threads (-j), same file")
    netvlad_train.add_argument("-o", "--output", required=True, metavar="FILE", help="NetVLAD file to write (.npz)")
    netvlad_train.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _add_feature_options(netvlad_train)
    importlib.import_module("vladkit.app.commands.netvlad_images").add_image_options(netvlad_train)
    netvlad_train.set_defaults(run=("netvlad", "cmd_netvlad_train"))
    netvlad.set_defaults(run=lambda args: (netvlad.print_help(), EXIT_USAGE)[1])
    return parser


def main(argv=None) -> int:
    # A job started in the background by a non-interactive shell (CI scripts, `cmd &`)
    # inherits SIGINT ignored, and Python then never raises KeyboardInterrupt: an explicit
    # `kill -INT` would be silently ignored. Interrupting must always stop cleanly.
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # File names whose bytes are not UTF-8 are printed as those bytes, as ls does, not
    # as an encoding error after the job.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    # The command's own module only (vladkit.app.commands.<module>), and the failures
    # reported in one line, which name the library's errors.
    failures = importlib.import_module("vladkit.app.commands.common").FAILURES
    run = args.run
    if isinstance(run, tuple):
        module, function = run
        run = getattr(importlib.import_module(f"vladkit.app.commands.{module}"), function)
    try:
        return run(args)
    except KeyboardInterrupt:
        # (encode keeps its finished shards for a rerun; they are not an output yet)
        resume = " (rerun the same command to resume from the finished shards)" if args.command == "encode" else ""
        print(f"vladkit: interrupted; no output file was written{resume}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our output went away (`vladkit vocab info F | head -1`): stop
        # quietly, as Unix tools do, with the status of a SIGPIPE death; stdout now goes
        # nowhere so that the interpreter's final flush does not fail again.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except UsageError as exc:
        print(f"vladkit: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except failures as exc:
        print(f"vladkit: error: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
