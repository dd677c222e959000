"""Retrieval ground truths: the relevant (and ignored) database ids of each query.

:class:`GroundTruth` holds, per query, its positive ids and the ids removed from its
ranking before scoring (:mod:`vladkit.retrieval.metrics` scores rankings against it).

Two protocols are supported. In the same-collection one (INRIA Holidays), the queries are
database images: :func:`holidays_ground_truth` and :func:`folder_ground_truth` take one
list of ids. In the held-out one (15-Scene: index ``train/``, query with ``test/``), the
queries are other images: :func:`retrieval_ground_truth` takes the query ids and the
database ids, and the positives are always database ids.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePath

__all__ = [
    "GroundTruth",
    "folder_ground_truth",
    "folder_roots",
    "holidays_ground_truth",
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
