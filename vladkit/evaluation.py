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

Two protocols are supported. In the same-collection one (INRIA Holidays), the queries are
database images: :func:`holidays_ground_truth` and :func:`folder_ground_truth` take one
list of ids. In the held-out one (15-Scene: index ``train/``, query with ``test/``), the
queries are other images: :func:`retrieval_ground_truth` takes the query ids and the
database ids, and the positives are always database ids.
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
    "folder_roots",
    "holidays_ground_truth",
    "mean_average_precision",
    "recall_at_k",
    "retrieval_ground_truth",
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


def _holidays_numbers(ids, paths, strict=True):
    """image number -> id, in the order of ``ids``; a number given twice is a
    ``ValueError``, and so is a name that is not a number, unless not ``strict`` (then
    the image is left out)."""
    numbers = {}
    for image_id, path in zip(ids, paths):
        if not _IMAGE_NUMBER.fullmatch(path.stem):
            if not strict:
                continue
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
    return numbers


def holidays_ground_truth(ids):
    """The INRIA Holidays ground truth (Jegou et al. 2008) of a list of its images.

    The image number is the file name's stem as an integer ("/data/holidays/100301.jpg"
    -> 100301). Images are grouped by ``number // 100``; the image whose
    ``number % 100 == 0`` is its group's query, and its positives are the other images
    of the group: the rule of ``holidays_map.py``. The images of a group without such
    an image are only distractors.

    A query whose group holds no other image among ``ids`` is skipped: it has no
    positives, so its AP would be undefined. The queries and positives both come from
    ``ids`` (the queries are database images); for queries stored apart from the
    database, use :func:`retrieval_ground_truth`.

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
    numbers = _holidays_numbers(*_check_ids(ids))
    groups = {}
    for number in numbers:
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
    file names all share the folder ".". This is the same-collection protocol: for
    queries that are not database images (a held-out test set in folders named like the
    database's), use :func:`retrieval_ground_truth`.

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


# ---------------------------------------------------------- queries apart from the database


def _folder_root(paths, what):
    """The deepest folder above every image folder of ``paths``."""
    if not paths:
        return PurePath()
    if len({path.is_absolute() for path in paths}) > 1:
        raise ValueError(f"the {what} ids mix absolute and relative paths: give the {what} root")
    # Above the image folders, not at their common folder: a collection whose images are
    # all in one folder ("test/coast/...", a one-class query set) must still be grouped
    # by that folder's name, as the same folder of a larger collection would be.
    common = paths[0].parent.parent.parts
    for path in paths[1:]:
        parts = path.parent.parent.parts
        n = 0
        while n < min(len(common), len(parts)) and common[n] == parts[n]:
            n += 1
        common = common[:n]
    return PurePath(*common)


def _root(root):
    try:
        return PurePath(os.fspath(root))
    except TypeError:
        raise TypeError(f"a root must be a path, got {root!r}") from None


def _folder_roots(query_paths, database_paths, query_root, database_root):
    database_root = _folder_root(database_paths, "database") if database_root is None else _root(database_root)
    if query_root is not None:
        query_root = _root(query_root)
    elif query_paths and set(query_paths) <= set(database_paths):
        # The queries are (part of) the indexed collection: one collection, one root. Their
        # own root could differ (a subset in fewer folders) and split groups that are one.
        query_root = database_root
    else:
        query_root = _folder_root(query_paths, "query")
    return query_root, database_root


def folder_roots(query_ids, database_ids, query_root=None, database_root=None):
    """The folders that the "folders" rule of :func:`retrieval_ground_truth` groups the
    query images and the database images relative to.

    A root given is used as is. A root left out (None) is inferred from the ids, as
    written (``PurePath``: nothing is resolved on disk):

    - the database root is the deepest folder above all the database images' folders,
      e.g. ``/data/scene15/train`` for ``/data/scene15/train/<class>/*.jpg``; it is above
      their folder even when they all lie in one: ``a/b/*.jpg`` has the root ``a`` and
      the group ``b``.
    - the query root is the database root when every query image is also a database
      image (the same collection, or part of it); otherwise it is inferred from the query
      images in the same way, e.g. ``/data/scene15/test``.

    Parameters
    ----------
    query_ids, database_ids : sequence of str or path-like
        The query images and the database images.
    query_root, database_root : str or path-like, optional
        Roots to use instead of the inferred ones.

    Returns
    -------
    (query_root, database_root) : tuple of PurePath

    Raises
    ------
    ValueError
        If an image is listed twice in one collection, or the ids of a collection whose
        root is inferred mix absolute and relative paths.
    """
    _, query_paths = _check_ids(query_ids)
    _, database_paths = _check_ids(database_ids)
    return _folder_roots(query_paths, database_paths, query_root, database_root)


def _groups(paths, ids, root, what):
    groups = []
    for image_id, path in zip(ids, paths):
        try:
            groups.append(path.parent.relative_to(root))
        except ValueError:
            raise ValueError(f"{what} image {image_id!r} is not under the {what} root "
                             f"{str(root)!r}") from None
    return groups


def retrieval_ground_truth(query_ids, database_ids, rule="folders", query_root=None,
                           database_root=None):
    """The ground truth of queries searched in a database, the queries being database
    images or not.

    The positives of a query are the database images of its group, other than the query
    itself. The query is "itself" in the database only when it is also a database image:
    then it is neither a positive nor a negative (it is in the returned ``ignore``).
    Images of the query's group that are not among ``query_ids`` are positives all the
    same: the positives come from ``database_ids`` only.

    - ``"folders"``: an image's group is its folder relative to its collection's root
      (see :func:`folder_roots`): with the roots ``test`` and ``train``, the query
      ``test/coast/1.jpg`` has the positives ``train/coast/*``. The query itself is the
      database id equal to it as a ``PurePath``.
    - ``"holidays"``: INRIA Holidays (Jegou et al. 2008). The image number is the file
      name's stem; the queries are the images whose ``number % 100 == 0``, and the group
      is ``number // 100``; folders play no part. The query itself is the database image
      of the same number, wherever it is stored. Images whose name is not a number are
      in no group: distractors in the database (Flickr images added to Holidays), not
      queries.

    Queries without any positive in the database are left out (their AP would be
    undefined). With ``query_ids == database_ids``, the positives are those of
    :func:`folder_ground_truth` and :func:`holidays_ground_truth`.

    Parameters
    ----------
    query_ids : sequence of str or path-like
        The query images, as they key the rankings.
    database_ids : sequence of str or path-like
        The database images, as they appear in the rankings (the ids of the index).
    rule : {"folders", "holidays"}, default="folders"
        How groups are read from the ids.
    query_root, database_root : str or path-like, optional
        ``"folders"`` only: the roots the groups are relative to; inferred when None, as
        :func:`folder_roots` describes.

    Returns
    -------
    GroundTruth
        ``positives``: query id -> list of database ids, the queries in the order of
        ``query_ids`` and their positives in the order of ``database_ids``, ids exactly as
        given. ``ignore``: query id -> [its own database id], for the queries that are
        database images. Pass it to :func:`mean_average_precision` and
        :func:`recall_at_k` as is.

    Raises
    ------
    ValueError
        For an unknown rule, roots given with ``"holidays"``, an image listed twice in one
        collection (or, Holidays, two images of one number), an image not under the root
        given for its collection, and the errors of :func:`folder_roots`.

    Examples
    --------
    >>> truth = retrieval_ground_truth(
    ...     ["test/a/1.jpg", "test/b/2.jpg"],
    ...     ["train/a/3.jpg", "train/b/4.jpg", "train/a/5.jpg"])
    >>> truth.positives
    {'test/a/1.jpg': ['train/a/3.jpg', 'train/a/5.jpg'], 'test/b/2.jpg': ['train/b/4.jpg']}
    """
    if rule not in ("folders", "holidays"):
        raise ValueError(f"rule must be 'folders' or 'holidays', got {rule!r}")
    query_ids, query_paths = _check_ids(query_ids)
    database_ids, database_paths = _check_ids(database_ids)
    positives, ignore = {}, {}
    if rule == "holidays":
        if query_root is not None or database_root is not None:
            raise ValueError("query_root and database_root are for the 'folders' rule: the "
                             "Holidays rule reads groups from image numbers")
        database = _holidays_numbers(database_ids, database_paths, strict=False)
        groups = {}
        for number in database:
            groups.setdefault(number // 100, []).append(number)
        for number, query in _holidays_numbers(query_ids, query_paths, strict=False).items():
            if number % 100:
                continue
            found = [database[other] for other in groups.get(number // 100, ()) if other != number]
            if found:
                positives[query] = found
                if number in database:
                    ignore[query] = [database[number]]
        return GroundTruth(positives, ignore)

    query_root, database_root = _folder_roots(query_paths, database_paths, query_root, database_root)
    members = {}
    for image_id, path, group in zip(database_ids, database_paths,
                                     _groups(database_paths, database_ids, database_root, "database")):
        members.setdefault(group, []).append((path, image_id))
    for query, path, group in zip(query_ids, query_paths,
                                  _groups(query_paths, query_ids, query_root, "query")):
        found = [image_id for other, image_id in members.get(group, ()) if other != path]
        if found:
            positives[query] = found
            itself = [image_id for other, image_id in members[group] if other == path]
            if itself:
                ignore[query] = itself
    return GroundTruth(positives, ignore)
