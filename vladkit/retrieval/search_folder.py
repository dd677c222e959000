"""The index folder as the search commands read it: the recipe and the vocabulary that
``vladkit index build`` writes beside the index, and :func:`load_search_index`.

The files are read by ``vladkit search``, ``vladkit evaluate`` and ``vladkit serve``; the
messages of :class:`IndexFileError` are the command line's ("vladkit: error: ...").
"""

from __future__ import annotations

import json
from pathlib import Path

from ..pipeline.recipe import Recipe
from .index_files import IndexFileError
from .index import VectorIndex

RECIPE_FILE, VOCABULARY_FILE = "recipe.json", "vocabulary.npz"


def load_search_index(folder):
    """The index of ``folder`` and its recipe (:class:`vladkit.pipeline.recipe.Recipe`), for
    encoding queries as the indexed images were; :class:`IndexFileError` if the recipe is
    missing or unreadable."""
    index = VectorIndex.load(folder)
    recipe_path = Path(folder) / RECIPE_FILE
    if not recipe_path.is_file():
        raise IndexFileError(f"{folder!r} has no {RECIPE_FILE}: build it with 'vladkit index build'")
    try:
        recipe = Recipe.from_json(json.loads(recipe_path.read_text(encoding="utf-8")))
    except ValueError as exc:
        raise IndexFileError(f"{recipe_path}: {exc}") from None
    return index, recipe
