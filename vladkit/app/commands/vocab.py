"""``vladkit vocab build`` and ``vladkit vocab info``: train a vocabulary on a folder, describe one."""

from __future__ import annotations

from ...pipeline.recipe import describe_extractor
from ...encoders.fisher import AUTO_PCA
from ...features.spatial_augmentation import N_POSITION_DIMS
from ...features.images import ImageReadError, list_images
from ...pipeline.jobs import sample_descriptors
from ...vocabulary.gmm import GMMVocabulary
from ...vocabulary.kmeans import MINIBATCH_THRESHOLD, KMeansVocabulary
from ...vocabulary.loading import load_vocabulary
from ..errors import EXIT_OK, CommandError, UsageError
from .common import (_cannot_read, _dask_client, _elapsed, _extractor_from_args, _progress, _report_skipped,
    _skip_reporter, _spatial_scale)


def _vocabulary_pca(args, dim):
    """--pca as given (0: none); by default Fisher's rule (:class:`FisherEncoder`'s
    pca="auto": PCA-64 for descriptors of more dimensions, the positions of --spatial not
    counted) for a GMM, none for k-means."""
    if _spatial_scale(args) is not None:
        dim -= N_POSITION_DIMS  # kept out of the PCA (passthrough_dims)
    if args.pca is not None:
        return args.pca or None
    return AUTO_PCA if args.kind == "gmm" and dim > AUTO_PCA else None


def _sklearn_algorithm(n_samples):
    return "minibatch" if n_samples > MINIBATCH_THRESHOLD else "lloyd"


def cmd_vocab_build(args):
    if args.algorithm != "auto" and args.kind != "kmeans":
        raise UsageError("--algorithm chooses how k-means words are trained: it needs --kind kmeans")
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
    if args.kind == "kmeans" and args.algorithm != "auto":
        # "sklearn": KMeansVocabulary's own choice among scikit-learn's (Lloyd, or mini-batch
        # for large samples), which is also what "auto" gives below FAISS_THRESHOLD.
        size["algorithm"] = "faiss" if args.algorithm == "faiss" else _sklearn_algorithm(len(sample))
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
    if meta["kind"] == "kmeans":
        print(f"k-means:          {_algorithm_name(meta.get('algorithm'))}")
    if meta["kind"] == "gmm":
        weights = vocab.weights_
        print(f"priors:           min {weights.min():.4g}, max {weights.max():.4g}")
        print(f"variances:        min {vocab.covariances_.min():.4g}, max {vocab.covariances_.max():.4g}")
    print(f"format:           {meta['format']} v{meta['format_version']}, written by vladkit {meta['vladkit_version']}")
    return EXIT_OK


def _algorithm_name(algorithm):
    return {"lloyd": "scikit-learn KMeans (Lloyd)", "elkan": "scikit-learn KMeans (Elkan)",
            "minibatch": "scikit-learn MiniBatchKMeans", "faiss": "faiss Clustering (Lloyd)",
            None: "not recorded"}.get(algorithm, str(algorithm))
