"""The index folder as the search commands read it: the recipe and the vocabulary that
``vladkit index build`` writes beside the index, and :func:`load_search_index`.

The files are read by ``vladkit search``, ``vladkit evaluate`` and ``vladkit serve``; the
messages of :class:`IndexFileError` are the command line's ("vladkit: error: ...").
"""

from __future__ import annotations

import json
from pathlib import Path

from ..pipeline.recipe import Recipe
from .asmk_index import ASMK_FORMAT, ASMKIndex
from .index_files import METADATA_FILE, IndexFileError, _read_json
from .index import VectorIndex

RECIPE_FILE, VOCABULARY_FILE = "recipe.json", "vocabulary.npz"


def load_index(folder):
    """The index in ``folder``, of the kind its metadata names: an
    :class:`~vladkit.retrieval.asmk_index.ASMKIndex` (inverted file of word signatures) or a
    :class:`~vladkit.retrieval.index.VectorIndex`."""
    try:
        metadata = _read_json(folder, METADATA_FILE)
    except IndexFileError:
        metadata = None  # VectorIndex.load says what is wrong, in its words
    if isinstance(metadata, dict) and metadata.get("format") == ASMK_FORMAT:
        return ASMKIndex.load(folder)
    return VectorIndex.load(folder)


def load_search_index(folder):
    """The index of ``folder`` (:func:`load_index`) and its recipe
    (:class:`vladkit.pipeline.recipe.Recipe`), for encoding queries as the indexed images
    were; :class:`IndexFileError` if the recipe is missing or unreadable."""
    index = load_index(folder)
    recipe_path = Path(folder) / RECIPE_FILE
    if not recipe_path.is_file():
        raise IndexFileError(f"{folder!r} has no {RECIPE_FILE}: build it with 'vladkit index build'")
    try:
        recipe = Recipe.from_json(json.loads(recipe_path.read_text(encoding="utf-8")))
    except ValueError as exc:
        raise IndexFileError(f"{recipe_path}: {exc}") from None
    return index, recipe
