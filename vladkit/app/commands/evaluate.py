"""``vladkit evaluate``: mean average precision and recall@k of an index for a set of queries."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ...pipeline.recipe import Recipe
from ...pipeline.encodings import load_encodings
from ...retrieval.ground_truth import folder_roots, retrieval_ground_truth
from ...retrieval.metrics import mean_average_precision, recall_at_k
from ...pipeline.word_sets import ShardedWordSets
from ...retrieval.asmk_index import ASMKIndex
from ...retrieval.search_folder import RECIPE_FILE, load_index
from ..errors import EXIT_OK, CommandError, UsageError
from .search import _check_retrieval_options, _rerank_lists

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


def _check_query_kind(args, index, queries):
    """Word sets for an ASMK index, vectors for a vector index; word sets encoded as
    database images (one word a descriptor) are searched, with a note that queries are
    encoded with --queries."""
    asmk, word_sets = isinstance(index, ASMKIndex), isinstance(queries, ShardedWordSets)
    if asmk != word_sets:
        raise CommandError(f"{args.queries!r} holds {'word sets' if word_sets else 'vectors'}, the index "
                           f"{args.index!r} is {'an ASMK inverted file' if asmk else 'a vector index'}: encode "
                           "the queries with the index's encoder")
    if asmk and args.qe:
        raise UsageError("--qe (query expansion) averages the vectors of the top results: an ASMK index holds "
                         "word sets, not vectors (use --rerank)")
    if word_sets and queries.role != "queries":
        assignment = queries.recipe.encoder_params.get("query_assignment")
        print(f"vladkit: note: {args.queries} was encoded as images to index; encoded as queries "
              f"('vladkit encode --encoder asmk --queries': {assignment} words per descriptor) they find more",
              file=sys.stderr)


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
    index = load_index(args.index)
    queries = load_encodings(args.queries, verify=not args.no_verify)
    _check_query_recipe(args.index, queries, args.queries)
    _check_query_kind(args, index, queries)
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
    chosen = [rows[q] for q in names]
    if isinstance(index, ASMKIndex):
        _, ranked = index.search(queries.word_sets(chosen), k=depth)
    else:
        _, ranked = index.search(queries.take(chosen), k=depth, expand=args.qe, alpha=args.qe_alpha)
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
