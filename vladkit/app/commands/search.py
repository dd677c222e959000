"""``vladkit search``, and the spatial re-ranking of result lists that ``vladkit evaluate``
shares.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ..._util.io import json_dumps
from ...pipeline.budget import DEFAULT_MAX_MEMORY, iter_batches
from ...features.extractors import LocalFeatures
from ...pipeline.image_encoder import encode_rows
from ...retrieval.rerank import FeatureStore, rerank
from ...pipeline.word_sets import QueryEncoding
from ...retrieval.asmk_index import ASMKIndex
from ...retrieval.search_folder import VOCABULARY_FILE, load_search_index
from ..errors import EXIT_FAILED, EXIT_OK, CommandError, UsageError
from .common import _progress


def _check_retrieval_options(args):
    if args.qe_alpha is not None and not args.qe:
        raise UsageError("--qe-alpha weights the results of query expansion: give --qe M with it")
    args.qe_alpha = args.qe_alpha or 0.0


def cmd_search(args):
    _check_retrieval_options(args)
    index, recipe = load_search_index(args.index)
    extractor, encoder = recipe.build(vocabulary=str(Path(args.index) / VOCABULARY_FILE), n_jobs=args.jobs)
    failed = []

    def unreadable(position, error):
        failed.append(args.images[position])
        print(f"vladkit: cannot read {args.images[position]}: {error.reason}", file=sys.stderr)

    # The queries are extracted in batches (images in parallel with -j) and searched at once.
    encoded, read = _encode_queries(args, index, extractor, encoder, unreadable)
    answers = []
    if read.any():
        depth = max(args.top, args.rerank)
        all_scores, all_ids = _search(index, encoded, read, depth, args)
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


def _encode_queries(args, index, extractor, encoder, unreadable):
    """The queries encoded as the index's images were: a (n, dim) array of vectors, or for
    an ASMK index a list of word sets (encoded as queries: the encoder's
    ``query_assignment`` words per descriptor); and which of them could be read."""
    asmk = isinstance(index, ASMKIndex)
    if asmk and args.qe:
        raise UsageError("--qe (query expansion) averages the vectors of the top results: an ASMK index holds "
                         "word sets, not vectors (use --rerank)")
    encoder = QueryEncoding(encoder) if asmk else encoder
    batches = iter_batches(extractor, args.images, max_memory=args.max_memory, encoder=encoder,
                           on_unreadable=unreadable)
    encoded, read = encode_rows(encoder, batches, len(args.images))
    return encoded, read


def _search(index, encoded, read, depth, args):
    """(scores, ids) of the readable queries' top ``depth`` results."""
    if isinstance(index, ASMKIndex):
        return index.search([item for item, ok in zip(encoded, read) if ok], k=depth)
    return index.search(encoded[read], k=depth, expand=args.qe, alpha=args.qe_alpha)


def _rerank_lists(args, index, query_images, ranked):
    """Each query's ranked ids with its top --rerank re-ranked by spatial verification
    (:func:`vladkit.retrieval.rerank.rerank`), and {id: inliers} per query. Query images that cannot
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
