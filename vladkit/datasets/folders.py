"""Image sets in folders: the images of a "one sub-folder per class" folder, with labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..features.images import list_images

__all__ = ["labelled_images"]


def labelled_images(folder, per_class=None):
    """The images of a "one sub-folder per class" folder, classes in sorted order.

    Returns
    -------
    paths : list of Path
    labels : ndarray of int
    classes : list of str (the sub-folder names; ``labels`` index into it)
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths, labels = [], []
    for label, name in enumerate(classes):
        images = list_images(folder / name)[:per_class]
        paths += images
        labels += [label] * len(images)
    return paths, np.array(labels, dtype=np.intp), classes
