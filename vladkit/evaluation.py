"""Retrieval evaluation: average precision, mAP and recall@k, and the ground truths of the
usual benchmarks.

A ranking is the sequence of database ids (strings, ints, paths: anything hashable) a
search returned for one query, best first; it may be truncated (a top-N list), and
positives it does not contain count as never found. Ids are compared as given: a ranking
of ``Path`` objects does not match a ground truth of strings.

Average precision follows the Holidays / Oxford evaluation code, so figures compare with
published ones: the ignored items (the query itself, Oxford's "junk") are removed from
the ranking first, then the precision-recall curve is integrated with the trapezoid rule
starting from (recall 0, precision 1). Nothing here ever returns NaN: a query without
positives, or a ground truth without queries, is a ``ValueError``.
"""

from __future__ import annotations

import operator
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePath

import numpy as np

__all__ = [
    "GroundTruth",
    "average_precision",
    "folder_ground_truth",
    "holidays_ground_truth",
    "mean_average_precision",
    "recall_at_k",
]

# Holidays image numbers are ASCII digits only; int() alone would also take "+1", " 12",
# "1_000" and non-ASCII digits, none of which is a Holidays file name.
_IMAGE_NUMBER = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class GroundTruth:
    """The relevant and the ignored ids of each query.

    Parameters
    ----------
    positives : mapping
        query id -> collection of positive (relevant) database ids. Its keys are the
        queries that get evaluated.
    ignore : mapping, default={}
        query id -> collection of ids removed from that query's ranking before scoring
        (Oxford / Paris "junk"). Queries without an entry ignore nothing; an entry for a
        query that has no positives entry is a ``ValueError``.

    A plain mapping ``query -> positives`` is accepted wherever a ``GroundTruth`` is, as
    ``GroundTruth(positives=mapping)``.
    """

    positives: Mapping
    ignore: Mapping = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.positives, Mapping):
            raise TypeError(
                "positives must be a mapping query id -> positive ids, "
                f"got {type(self.positives).__name__}"
            )
        if not isinstance(self.ignore, Mapping):
            raise TypeError(
                f"ignore must be a mapping query id -> ignored ids, got {type(self.ignore).__name__}"
            )
        unknown = [query for query in self.ignore if query not in self.positives]
        if unknown:
            # An ignore list for a query that is never evaluated is a mismatch of keys
            # (a different id spelling, a different file), not something to skip silently.
            raise ValueError(
                f"ignore has entries for queries that have no positives entry: {unknown[:5]!r}"
                + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            )


def _ground_truth(ground_truth):
    if isinstance(ground_truth, GroundTruth):
        return ground_truth
    if isinstance(ground_truth, Mapping):
        return GroundTruth(positives=ground_truth)
    raise TypeError(
        "ground_truth must be a GroundTruth or a mapping query id -> positive ids, "
        f"got {type(ground_truth).__name__}"
    )


def _id_collection(ids, name):
    """``ids`` as an iterable of ids; a lone string would silently iterate over characters."""
    if isinstance(ids, (str, bytes, os.PathLike)) or not isinstance(ids, Iterable):
        raise TypeError(f"{name} must be a collection of ids, got {type(ids).__name__}: {ids!r}")
    return ids


def _positive_ranks(ranked, positives, ignore, where=""):
    """0-based ranks (float64, increasing) of the positives in ``ranked`` once the ignored
    items are removed, and the number of positives ``npos`` (ignored ones not counted)."""
    ranked = _id_collection(ranked, f"{where}ranked")
    ignore = set(_id_collection(ignore, f"{where}ignore"))
    # An ignored id is out of the evaluation altogether: counting it as a positive that can
    # never be found (the query listed among its own positives) would cap AP below 1.
    relevant = set(_id_collection(positives, f"{where}positives")) - ignore
    if not relevant:
        raise ValueError(f"{where}no positives (once ignored ids are removed): AP is undefined")
    ranks = []
    seen = set()
    rank = 0
    for item in ranked:
        if item in seen:
            # Counted twice, a positive would push AP above 1; a repeated id is a bug upstream.
            raise ValueError(f"{where}id {item!r} appears more than once in the ranking")
        seen.add(item)
        if item in ignore:
            continue
        if item in relevant:
            ranks.append(rank)
        rank += 1
    return np.asarray(ranks, dtype=np.float64), len(relevant)


def _trapezoid_ap(ranks, npos):
    j = np.arange(len(ranks), dtype=np.float64)
    # Precision just before the j-th positive: j hits in r_j items (1 by convention at r_j = 0).
    before = np.divide(j, ranks, out=np.ones_like(ranks), where=ranks > 0)
    after = (j + 1) / (ranks + 1)
    return float((before + after).sum() / (2 * npos))


def average_precision(ranked, positives, ignore=()):
    """Average precision of one ranked result list, by the Holidays / Oxford trapezoid rule.

    The ids in ``ignore`` (the query itself, Oxford "junk") are removed from the ranking
    and from the positives first. With r_j the 0-based rank, in what remains, of the j-th
    positive retrieved (j = 0, 1, ...) and npos the number of positives,

        AP = sum_j (1 / npos) (p0_j + p1_j) / 2,
        p0_j = j / r_j  (1 if r_j = 0),    p1_j = (j + 1) / (r_j + 1),

    the area under the precision-recall curve through (recall 0, precision 1) and the
    point after every rank, by the trapezoid rule: each positive adds a recall step of
    1 / npos, between the precision just before it (p0) and just after it (p1). Positives
    not retrieved add nothing. This is ``score_ap_from_ranks_1`` of INRIA Holidays'
    ``holidays_map.py`` (Jegou et al. 2008) and ``compute_ap`` of Oxford Buildings'
    ``compute_ap.cpp`` (Philbin et al. 2007), in float64.

    It is below the non-interpolated AP, ``mean_j (j + 1) / (r_j + 1)``, whenever a
    negative comes first: a single positive at rank r > 0 gives 1 / (2 (r + 1)), since
    the precision just before it is 0.

    Parameters
    ----------
    ranked : sequence of ids
        The result list, best first; may be truncated. Each id at most once.
    positives : collection of ids
        The relevant ids.
    ignore : collection of ids, default=()
        Ids removed from the ranking (and from ``positives``) before scoring.

    Returns
    -------
    float in [0, 1]

    Raises
    ------
    ValueError
        If no positive remains once ``ignore`` is removed (AP is undefined, and NaN is
        never returned), or an id appears twice in ``ranked``.
    """
    ranks, npos = _positive_ranks(ranked, positives, ignore)
    return _trapezoid_ap(ranks, npos)


def _query_ranks(rankings, ground_truth, exclude_query):
    """(query, positive ranks, npos) for every query of the ground truth, in its order."""
    if not isinstance(rankings, Mapping):
        raise TypeError(
            f"rankings must be a mapping query id -> ranked ids, got {type(rankings).__name__}"
        )
    ground_truth = _ground_truth(ground_truth)
    if not ground_truth.positives:
        raise ValueError("ground_truth has no queries: the mean over them is undefined")
    missing = [query for query in ground_truth.positives if query not in rankings]
    if missing:
        raise ValueError(
            f"no ranking for query {missing[0]!r}"
            + (f" (and {len(missing) - 1} other queries)" if len(missing) > 1 else "")
        )
    for query, positives in ground_truth.positives.items():
        ignore = ground_truth.ignore.get(query, ())
        ignore = set(_id_collection(ignore, f"query {query!r}: ignore"))
        if exclude_query:
            ignore.add(query)
        ranks, npos = _positive_ranks(rankings[query], positives, ignore, f"query {query!r}: ")
        yield query, ranks, npos


def mean_average_precision(rankings, ground_truth, exclude_query=True):
    """Mean over the ground truth's queries of their :func:`average_precision`.

        mAP = (1 / |Q|) sum_{q in Q} AP(ranking_q, positives_q, ignore_q [+ q])

    Parameters
    ----------
    rankings : mapping
        query id -> ranked database ids, best first (may be truncated). Queries that are
        not in the ground truth are not scored.
    ground_truth : GroundTruth or mapping
        query id -> positive ids (as :func:`holidays_ground_truth` and
        :func:`folder_ground_truth` return), or a :class:`GroundTruth` that also lists
        ignored ids per query. Its queries are the ones scored.
    exclude_query : bool, default=True
        Remove the query's own id from its ranking (and positives) before scoring, as
        ``holidays_map.py`` does: when the queries are database images, a search returns
        the query itself first. For Oxford-style protocols, where the query is a crop
        whose full image counts as a positive, key the queries by a name that is not a
        database id (or pass ``False``).

    Returns
    -------
    float in [0, 1]

    Raises
    ------
    ValueError
        If a query of the ground truth has no ranking or no positives (the message names
        it), or the ground truth has no queries.
    """
    queries = _query_ranks(rankings, ground_truth, exclude_query)
    aps = [_trapezoid_ap(ranks, npos) for _, ranks, npos in queries]
    return float(np.mean(aps))


def _check_ks(k):
    ks = [k] if not isinstance(k, Iterable) else list(k)
    if not ks:
        raise ValueError("k must be an integer >= 1 or a non-empty sequence of them, got []")
    checked = []
    for value in ks:
        try:
            if isinstance(value, bool):
                raise TypeError
            value = operator.index(value)
        except TypeError:
            raise ValueError(f"k must hold integers >= 1, got {value!r}") from None
        if value < 1:
            raise ValueError(f"k must hold integers >= 1, got {value!r}")
        checked.append(value)
    return checked


def recall_at_k(rankings, ground_truth, k=(1, 5, 10), exclude_query=True):
    """Fraction of queries with at least one positive in their top k, for each k.

        recall@k = (1 / |Q|) sum_{q in Q} [ min_j r_{q,j} < k ]

    with r_{q,j} the 0-based ranks of query q's positives once its ignored ids (and, with
    ``exclude_query``, itself) are removed from its ranking. This is the place-recognition
    definition (NetVLAD, Arandjelovic et al. 2016; Torii et al. 2015): a query counts as
    recognised if any of its top k results is relevant; it is not the information-
    retrieval recall@k (the fraction of a query's positives found in its top k).

    Parameters
    ----------
    rankings : mapping
        query id -> ranked database ids, best first (may be truncated).
    ground_truth : GroundTruth or mapping
        As for :func:`mean_average_precision`; its queries are the ones scored.
    k : int or sequence of int, default=(1, 5, 10)
        Cut-offs, each >= 1.
    exclude_query : bool, default=True
        Remove the query's own id from its ranking first.

    Returns
    -------
    dict
        k -> recall in [0, 1], in the order of ``k``.

    Raises
    ------
    ValueError
        As :func:`mean_average_precision`, and for a ``k`` that is not an integer >= 1.
    """
    ks = _check_ks(k)
    # A query whose positives were never retrieved is never recognised, whatever k.
    queries = _query_ranks(rankings, ground_truth, exclude_query)
    first = np.array([ranks[0] if len(ranks) else np.inf for _, ranks, _ in queries])
    return {value: float(np.mean(first < value)) for value in ks}


# ------------------------------------------------------------------- ground truths


def _check_ids(ids):
    ids = list(_id_collection(ids, "ids"))
    paths = {}
    for image_id in ids:
        try:
            path = PurePath(os.fspath(image_id))
        except TypeError:
            raise TypeError(f"ids must be file names or paths, got {image_id!r}") from None
        # PurePath equality: "a/b.jpg" and "a//b.jpg" are one image listed twice.
        if path in paths:
            raise ValueError(f"image {image_id!r} is listed twice (also as {paths[path]!r})")
        paths[path] = image_id
    return ids, list(paths)


def holidays_ground_truth(ids):
    """The INRIA Holidays ground truth (Jegou et al. 2008) of a list of its images.

    The image number is the file name's stem as an integer ("/data/holidays/100301.jpg"
    -> 100301). Images are grouped by ``number // 100``; the image whose
    ``number % 100 == 0`` is its group's query, and its positives are the other images
    of the group: the rule of ``holidays_map.py``. The images of a group without such
    an image are only distractors.

    A query whose group holds no other image among ``ids`` is skipped: it has no
    positives, so its AP would be undefined.

    Parameters
    ----------
    ids : sequence of str or path-like
        The database images, as they will appear in the rankings.

    Returns
    -------
    dict
        query id -> list of positive ids, with the ids exactly as given (same objects),
        queries and positives in the order of ``ids``.

    Raises
    ------
    ValueError
        If a file name's stem is not a number (the message names the file), or two ids
        have the same image number.
    """
    ids, paths = _check_ids(ids)
    numbers = {}
    groups = {}
    for image_id, path in zip(ids, paths):
        if not _IMAGE_NUMBER.fullmatch(path.stem):
            raise ValueError(
                f"{image_id!r} is not a Holidays image: its name should be a number "
                "(e.g. 100301.jpg)"
            )
        number = int(path.stem)
        if number in numbers:
            raise ValueError(
                f"{image_id!r} and {numbers[number]!r} are the same Holidays image number {number}"
            )
        numbers[number] = image_id
        groups.setdefault(number // 100, []).append(number)
    ground_truth = {}
    for number, image_id in numbers.items():
        if number % 100:
            continue
        positives = [numbers[other] for other in groups[number // 100] if other != number]
        if positives:
            ground_truth[image_id] = positives
    return ground_truth


def folder_ground_truth(ids):
    """The ground truth of a "one folder per group" image set.

    Images are grouped by their parent directory, compared as written (``PurePath``:
    nothing is resolved on disk, so list the images the same way, e.g. all relative to
    one root). Every image whose folder holds at least one other image of ``ids`` is a
    query, and its positives are the other images of that folder. Images alone in their
    folder are not queries (no positives) but stay in the database as distractors. Bare
    file names all share the folder ".".

    Parameters
    ----------
    ids : sequence of str or path-like
        The database images, as they will appear in the rankings.

    Returns
    -------
    dict
        query id -> list of positive ids, with the ids exactly as given, in the order of
        ``ids``.

    Raises
    ------
    ValueError
        If an image is listed twice.
    """
    ids, paths = _check_ids(ids)
    folders = {}
    for index, path in enumerate(paths):
        folders.setdefault(path.parent, []).append(index)
    ground_truth = {}
    for index, (image_id, path) in enumerate(zip(ids, paths)):
        members = folders[path.parent]
        if len(members) > 1:
            ground_truth[image_id] = [ids[other] for other in members if other != index]
    return ground_truth
