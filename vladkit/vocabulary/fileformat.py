"""The vocabulary file format: its name and version, the error for a file vladkit cannot
load, and the JSON-safe parameters a file records.

Files are ``.npz`` archives holding plain arrays and one JSON metadata entry, read with
``allow_pickle=False`` (loading a file from a stranger cannot run code), written
atomically (a temporary file renamed into place) and byte-for-byte reproducible.
``_Vocabulary.save`` (:mod:`.base`) writes them, :func:`~.loading.load_vocabulary` reads them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["VocabularyFileError"]

FILE_FORMAT = "vladkit-vocabulary"
FILE_FORMAT_VERSION = 1


class VocabularyFileError(ValueError):
    """A vocabulary file is not one vladkit can load (the message says why)."""


def _jsonable(params):
    out = {}
    for key, value in params.items():
        if isinstance(value, np.generic):
            value = value.item()
        if value is None or isinstance(value, (bool, int, float, str)):
            out[key] = value
        else:  # e.g. a RandomState: not reproducible from the file anyway
            out[key] = None
    return out
