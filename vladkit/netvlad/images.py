r"""Images as weakly supervised groups, for training a whole network (backbone + NetVLAD).

:class:`ImageGroupsDataset` holds every training image in memory as uint8 at a small
working resolution and gives ``(image tensor, group id, index)`` items. The groups say
which images show the same thing, nothing more (the weak supervision of Arandjelović et
al.): the folders' labels, an unlabelled photo with its attacked copies (Copydays-style
crops, JPEG, rotation, scaling, blur, contrast: :func:`vladkit.datasets.near_duplicates.attacked_copies`),
or the connected components of a list of positive pairs.

References
----------
Arandjelović, Gronát, Torii, Pajdla & Sivic, "NetVLAD: CNN architecture for weakly
supervised place recognition", CVPR 2016.
Radenović, Tolias & Chum, "Fine-tuning CNN image retrieval with no human annotation",
TPAMI 2018 (training from groups of matching images; random resized crops, flips).
"""

from __future__ import annotations

import numbers
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from ..datasets.near_duplicates import attacked_copies
from ..features.images import ImageReadError, list_images, read_image

__all__ = ["ImageGroupsDataset", "IMAGENET_MEAN", "IMAGENET_STD", "pair_groups"]

#: torchvision's ImageNet statistics (RGB, images in [0, 1]): what its weights expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pair_groups(n_images, pairs):
    """Groups from positive pairs: the connected components of the graph whose edges are
    ``pairs`` (i, j) over ``n_images`` nodes (so i~j and j~k put i, j, k in one group).

    Returns
    -------
    ndarray (n_images,) of int: group ids 0..G-1, numbered by their smallest member.
    """
    parent = np.arange(int(n_images))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving
            i = parent[i]
        return i

    for i, j in pairs:
        if not (0 <= i < n_images and 0 <= j < n_images):
            raise ValueError(f"pair ({i}, {j}) refers to an image outside 0..{n_images - 1}")
        a, b = root(int(i)), root(int(j))
        if a != b:
            parent[max(a, b)] = min(a, b)
    roots = np.array([root(i) for i in range(int(n_images))], dtype=np.intp)
    _, ids = np.unique(roots, return_inverse=True)
    return ids.astype(np.intp)


def _size(image_size):
    if isinstance(image_size, numbers.Integral) and not isinstance(image_size, bool) and image_size >= 8:
        return int(image_size), int(image_size)
    if (isinstance(image_size, (tuple, list)) and len(image_size) == 2
            and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 8 for v in image_size)):
        return int(image_size[0]), int(image_size[1])
    raise ValueError(f"image_size must be an int >= 8 or (height, width), got {image_size!r}")


def _cover(image, height, width):
    """Resize (aspect ratio kept) so that the image covers (height, width): its shorter
    side relative to the target meets it exactly. Area interpolation when shrinking (no
    aliasing), linear when enlarging."""
    h, w = image.shape[:2]
    scale = max(height / h, width / w)
    size = (max(width, round(w * scale)), max(height, round(h * scale)))
    if size == (w, h):
        return np.ascontiguousarray(image)
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


class ImageGroupsDataset(torch.utils.data.Dataset):
    r"""Images in groups of matching ones, as normalised tensors of a fixed size.

    Item ``i`` is ``(image, group, i)``: ``image`` a (3, H, W) float32 tensor,
    :math:`(x / 255 - \mu) / \sigma` per channel with torchvision's ImageNet mean and
    standard deviation (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`), ``group`` an int
    (images of one group are positives of each other). All items have the same size, so
    batches stack.

    Images are read once (unreadable ones are reported and skipped, see ``on_skipped``) and
    kept in memory as uint8 RGB, resized to *cover* the working size (aspect ratio kept):
    about 3 H W bytes per item. Attacked copies are made once, when the dataset is built,
    reproducibly from ``(seed, index)`` (:func:`vladkit.datasets.near_duplicates.attacked_copies`), and
    cached the same way.

    Without augmentation an item is the centre (H, W) window. With ``augment=True``
    (training) an item is a random resized crop (area a fraction ``crop_scale`` of the
    stored image, aspect ratio in ``crop_ratio``, resized to (H, W)), mirrored with
    probability 1/2, then :math:`x \leftarrow c (x - \bar x) + \bar x + 255 b` with
    contrast c and brightness b uniform in ``1 ± jitter`` and ``± jitter``. The random
    draws come from ``numpy.random.default_rng([seed, 5, epoch, index])``: the same item
    of the same epoch is the same tensor whatever the order, the worker or a resumed run
    (:meth:`set_epoch` sets the epoch).

    Build one from a folder with :meth:`from_folder`, or give images and groups:

    Parameters
    ----------
    images : list of paths or (h, w[, 3]) uint8 arrays
    groups : sequence of hashables, one per image, or None
        None: every image its own group (give ``copies`` or ``pairs``).
    image_size : int or (int, int), default=160
        The working size: an int s gives s x s items (from an image scaled so that its
        shorter side is s), a pair (H, W) items of that size.
    copies : int, default=0
        Attacked copies made of every image, each put in its image's group.
    pairs : list of (i, j) or None
        Positive pairs of image indices; groups are their connected components
        (:func:`pair_groups`), given instead of ``groups``.
    augment : bool, default=False
    crop_scale : (float, float), default=(0.5, 1.0)
    crop_ratio : (float, float), default=(3/4, 4/3)
    flip : bool, default=True
    jitter : float, default=0.2
    seed : int, default=0
        Of the copies and of the augmentations.
    max_side : int or None
        Images are read with this longer side at most (default: 4 x the working size,
        ample for the attacks and the crops, and bounded decoding memory).
    on_skipped : callable(path, reason) or None
        Called for each unreadable image (default: a line "vladkit: skipped PATH: reason"
        on stderr, as the command line reports them). They are listed in ``skipped``.

    Attributes
    ----------
    groups : ndarray (n_items,) of int
        Group ids 0..G-1.
    sources : ndarray (n_items,) of int
        The position in ``images`` each item comes from (copies share their original's).
    paths : list
        Each item's original path (or "<array i>"); copies are "PATH [attack]".
    skipped : list of (path, reason)
    """

    def __init__(self, images, groups=None, *, image_size=160, copies=0, pairs=None, augment=False,
                 crop_scale=(0.5, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=True, jitter=0.2, seed=0,
                 max_side=None, on_skipped=None):
        self.size = _size(image_size)
        if isinstance(copies, bool) or not isinstance(copies, numbers.Integral) or copies < 0:
            raise ValueError(f"copies must be a non-negative int, got {copies!r}")
        if groups is not None and pairs is not None:
            raise ValueError("give groups or pairs, not both")
        if groups is not None and len(groups) != len(images):
            raise ValueError(f"groups has {len(groups)} entries for {len(images)} images")
        lo, hi = crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {crop_scale!r}")
        if not 0 < crop_ratio[0] <= crop_ratio[1]:
            raise ValueError(f"crop_ratio must be (low, high) with 0 < low <= high, got {crop_ratio!r}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must lie in [0, 1), got {jitter!r}")
        self.augment, self.flip, self.jitter = bool(augment), bool(flip), float(jitter)
        self.crop_scale, self.crop_ratio = (float(lo), float(hi)), tuple(map(float, crop_ratio))
        self.seed, self.copies, self.epoch = int(seed), int(copies), 0
        self.skipped = []
        report = on_skipped if on_skipped is not None else _report
        max_side = 4 * max(self.size) if max_side is None else max_side
        height, width = self.size
        stored, sources, paths = [], [], []
        for i, source in enumerate(images):
            name = f"<array {i}>" if isinstance(source, np.ndarray) else str(source)
            try:
                image = read_image(source, mode="rgb", max_side=max_side)
            except ImageReadError as error:
                self.skipped.append((name, error.reason))
                report(name, error.reason)
                continue
            stored.append(_cover(image, height, width))
            sources.append(i)
            paths.append(name)
            if self.copies:
                # Copies from the read image (not the working-size one): the attacks crop
                # and rescale, which should not compound with our own downscaling.
                for attack, made in attacked_copies(image, self.copies, seed=self.seed, index=i):
                    stored.append(_cover(made, height, width))
                    sources.append(i)
                    paths.append(f"{name} [{attack}]")
        if not stored:
            raise ValueError(f"none of the {len(images)} images could be read")
        self._images, self.paths = stored, paths
        self.sources = np.asarray(sources, dtype=np.intp)
        if pairs is not None:
            labels = pair_groups(len(images), pairs)[self.sources].tolist()
        elif groups is not None:
            labels = [groups[i] for i in self.sources]
        else:
            labels = self.sources.tolist()
        # Group ids 0..G-1 in order of first appearance (labels may be any hashables).
        numbers_of = {}
        self.groups = np.asarray([numbers_of.setdefault(label, len(numbers_of)) for label in labels],
                                 dtype=np.intp)
        self._mean = np.asarray(IMAGENET_MEAN, np.float32) * 255
        self._std = np.asarray(IMAGENET_STD, np.float32) * 255

    @classmethod
    def from_folder(cls, folder, *, labels="folders", copies=None, recursive=True, **options):
        """The images of a folder: ``labels="folders"`` groups them by sub-folder (a
        place, object or class each); ``labels="none"`` makes each image and its
        ``copies`` (default 4) attacked copies a group. Other options as the class's."""
        if labels not in ("folders", "none"):
            raise ValueError(f"labels must be 'folders' or 'none', got {labels!r}")
        root = Path(folder)
        paths = list_images(root, recursive=recursive)
        if not paths:
            raise ValueError(f"no images found in {str(folder)!r}")
        if labels == "folders":
            if copies:
                raise ValueError("copies are the groups of unlabelled images: give them with labels='none'")
            groups = [str(Path(path).parent.relative_to(root)) for path in paths]
            return cls(paths, groups, **options)
        return cls(paths, None, copies=4 if copies is None else copies, **options)

    def __len__(self):
        return len(self._images)

    @property
    def n_groups(self):
        return int(self.groups.max()) + 1

    def set_epoch(self, epoch):
        """The epoch the augmentations are drawn for (see the class docstring)."""
        self.epoch = int(epoch)

    def image(self, index, augment=None):
        """Item ``index`` as (H, W, 3) uint8 (augmented if ``augment``, default the
        dataset's setting), before normalisation."""
        stored = self._images[index]
        height, width = self.size
        if not (self.augment if augment is None else augment):
            h, w = stored.shape[:2]
            y, x = (h - height) // 2, (w - width) // 2
            return stored[y:y + height, x:x + width]
        rng = np.random.default_rng([self.seed, 5, self.epoch, int(index)])
        h, w = stored.shape[:2]
        # A random resized crop (as torchvision's RandomResizedCrop: area fraction and
        # log-uniform aspect ratio, clipped to the image rather than retried).
        area = h * w * rng.uniform(*self.crop_scale)
        ratio = np.exp(rng.uniform(*np.log(self.crop_ratio))) * (width / height)
        cw = int(min(w, max(8, round(np.sqrt(area * ratio)))))
        ch = int(min(h, max(8, round(np.sqrt(area / ratio)))))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = stored[y:y + ch, x:x + cw]
        shrink = ch > height or cw > width
        out = cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        if self.flip and rng.random() < 0.5:
            out = out[:, ::-1]
        if self.jitter:
            contrast = rng.uniform(1 - self.jitter, 1 + self.jitter)
            brightness = rng.uniform(-self.jitter, self.jitter) * 255
            values = out.astype(np.float32)
            values = contrast * (values - values.mean()) + values.mean() + brightness
            out = np.clip(values + 0.5, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(out)

    def tensor(self, index, augment=None):
        """Item ``index``'s (3, H, W) float32 tensor, normalised."""
        values = (self.image(index, augment).astype(np.float32) - self._mean) / self._std
        return torch.from_numpy(np.ascontiguousarray(values.transpose(2, 0, 1)))

    def batch(self, indices, augment=None):
        """The (B, 3, H, W) tensor of items ``indices``."""
        return torch.stack([self.tensor(int(i), augment) for i in indices])

    def __getitem__(self, index):
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index %= len(self)
        return self.tensor(index), int(self.groups[index]), index

    def __repr__(self):
        return (f"ImageGroupsDataset({len(self)} items in {self.n_groups} groups, size {self.size}, "
                f"copies={self.copies}, augment={self.augment}, skipped {len(self.skipped)})")


def _report(path, reason):
    print(f"vladkit: skipped {path}: {reason}", file=sys.stderr)
