"""Retrieval metrics: average precision, mAP and recall@k of ranked result lists.

A ranking is the sequence of database ids (strings, ints, paths: anything hashable) a
search returned for one query, best first; it may be truncated (a top-N list), and
positives it does not contain count as never found. Ids are compared as given: a ranking
of ``Path`` objects does not match a ground truth of strings.

Average precision follows the Holidays / Oxford evaluation code, so figures compare with
published ones: the ignored items (the query itself, Oxford's "junk") are removed from
the ranking first, then the precision-recall curve is integrated with the trapezoid rule
starting from (recall 0, precision 1). Nothing here ever returns NaN: a query without
positives, or a ground truth without queries, is a ``ValueError``. The ground truths
themselves are in :mod:`vladkit.retrieval.ground_truth`.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping

import numpy as np

from .ground_truth import _ground_truth, _id_collection

__all__ = [
    "average_precision",
    "mean_average_precision",
    "recall_at_k",
]


def _check_top(top):
    """``top`` as an int >= 1, or None."""
    if top is None:
        return None
    try:
        if isinstance(top, bool):
            raise TypeError
        top = operator.index(top)
    except TypeError:
        raise ValueError(f"top must be an integer >= 1 or None, got {top!r}") from None
    if top < 1:
        raise ValueError(f"top must be an integer >= 1 or None, got {top!r}")
    return top


def _positive_ranks(ranked, positives, ignore, where="", top=None):
    """0-based ranks (float64, increasing) of the positives in ``ranked`` once the ignored
    items are removed, and the number of positives ``npos`` (ignored ones not counted).
    With ``top``, only the first ``top`` items left after that removal are looked at."""
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
        if top is not None and rank >= top:
            break
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


def average_precision(ranked, positives, ignore=(), top=None):
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
    top : int, optional
        Score only the first ``top`` items of the ranking once ``ignore`` is removed: AP@top,
        which counts the positives ranked lower as never found (so AP@top <= AP). Default:
        the whole ranking as given.

    Returns
    -------
    float in [0, 1]

    Raises
    ------
    ValueError
        If no positive remains once ``ignore`` is removed (AP is undefined, and NaN is
        never returned), or an id appears twice in ``ranked``.
    """
    ranks, npos = _positive_ranks(ranked, positives, ignore, top=_check_top(top))
    return _trapezoid_ap(ranks, npos)


def _query_ranks(rankings, ground_truth, exclude_query, top=None):
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
        ranks, npos = _positive_ranks(rankings[query], positives, ignore, f"query {query!r}: ", top)
        yield query, ranks, npos


def mean_average_precision(rankings, ground_truth, exclude_query=True, top=None):
    """Mean over the ground truth's queries of their :func:`average_precision`.

        ``mAP = (1 / |Q|) sum_{q in Q} AP(ranking_q, positives_q, ignore_q [+ q])``

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
    top : int, optional
        Score only the first ``top`` results of each ranking, counted once the query and
        its ignored ids are removed: the mAP@top of a top-N search, where the positives
        ranked lower count as never found (so mAP@top <= mAP; report it as such). Rankings
        cut at N by a search give the same figure as passing ``top=N``, provided the
        search returned N results besides the query itself. Default: the rankings as given.

    Returns
    -------
    float in [0, 1]

    Raises
    ------
    ValueError
        If a query of the ground truth has no ranking or no positives (the message names
        it), or the ground truth has no queries.
    """
    queries = _query_ranks(rankings, ground_truth, exclude_query, _check_top(top))
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


def recall_at_k(rankings, ground_truth, k=(1, 5, 10), exclude_query=True, top=None):
    """Fraction of queries with at least one positive in their top k, for each k.

        ``recall@k = (1 / |Q|) sum_{q in Q} [ min_j r_{q,j} < k ]``

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
    top : int, optional
        The rankings are (to be) cut at ``top`` results, counted as for
        :func:`mean_average_precision`. A ``k`` above it is refused: recall@k of rankings
        cut at N is recall@N for every k >= N, not the recall@k of the full ranking. Pass
        it whenever the rankings come from a top-N search. Default: the rankings are taken
        as complete, and a k longer than a ranking sees all of it.

    Returns
    -------
    dict
        k -> recall in [0, 1], in the order of ``k``.

    Raises
    ------
    ValueError
        As :func:`mean_average_precision`, for a ``k`` that is not an integer >= 1, and for
        a ``k`` above ``top``.
    """
    ks = _check_ks(k)
    top = _check_top(top)
    above = [value for value in ks if top is not None and value > top]
    if above:
        raise ValueError(f"k={above[0]} is above top={top}: rankings cut at {top} results cannot "
                         f"tell recall@{above[0]}, which would read as recall@{top}")
    # A query whose positives were never retrieved is never recognised, whatever k.
    queries = _query_ranks(rankings, ground_truth, exclude_query, top)
    first = np.array([ranks[0] if len(ranks) else np.inf for _, ranks, _ in queries])
    return {value: float(np.mean(first < value)) for value in ks}
