"""Defaults and size parsing that the command line needs before anything heavy is loaded.

``vladkit --help`` and usage errors must answer at once, so the parser imports only this
module (the standard library): numpy, scikit-learn, numba and faiss load with the command
that uses them. The modules these values belong to re-export them.
"""

from __future__ import annotations

import math
import re

#: Default working-memory budget of the streaming paths: with the libraries, a job stays
#: under ~1.6 GB resident whatever the image sizes (measured in benchmarks/bench_photos.py).
DEFAULT_MAX_MEMORY = 1_000_000_000

#: The smallest budget accepted: the encoder's scratch (~100 MB for K = 256) and a few
#: bands of a large photo.
MIN_MAX_MEMORY = 256 * 10**6

#: Largest image read, in pixels (the decompression-bomb guard of ``read_image``).
DEFAULT_MAX_PIXELS = 100_000_000

#: Default ``max_side`` of :class:`DenseSIFT`: photos are described at 640 x 480 (VLFeat's
#: PHOW applications cap images at 480 rows), which keeps a 12-megapixel photo to ~70k
#: descriptors instead of 3 million; see README, "Photos", for the measurements.
DENSE_MAX_SIDE = 640
#: Default ``max_side`` of :class:`SIFT`: 1024 x 768, the resolution of the INRIA Holidays
#: retrieval experiments (Jegou et al. 2008); OpenCV's scale space of a full 12-megapixel
#: photo takes ~3 GB.
SIFT_MAX_SIDE = 1024
#: :class:`DenseSIFT`'s grid step and bin sizes, in pixels (VLFeat's PHOW defaults).
DENSE_STEP = 4
DENSE_SIZES = (4, 6, 8, 10)

#: ``FisherEncoder(pca="auto")``: descriptors of more dimensions are reduced to this many.
AUTO_PCA = 64

#: ``KMeansVocabulary(algorithm="auto")``: faiss from this many words on (below:
#: scikit-learn, mini-batch above MINIBATCH_THRESHOLD samples); measured in
#: README, "Vocabularies".
FAISS_THRESHOLD = 1024
MINIBATCH_THRESHOLD = 500_000
#: ``KMeansVocabulary(max_iter="auto")``: Lloyd iterations with scikit-learn (at most;
#: VLFeat's default) and with faiss (exactly).
SKLEARN_MAX_ITER = 100
FAISS_MAX_ITER = 20

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(value, name="max_memory"):
    """Bytes from an int or a string such as ``"512MB"``, ``"1.5GB"``, ``"2GiB"``.

    Units as Dask's: kB, MB, GB, TB are powers of 1000 (``"1G"`` = ``"1GB"``), KiB, MiB,
    GiB, TiB powers of 1024; case does not matter; a bare number is bytes. Budgets below
    256 MB are refused (the encoder's own scratch is up to ~100 MB).
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number of bytes or a string like '1GB', got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", value.lower())
        if not match or match.group(2) not in _UNITS:
            raise ValueError(f"{name} must be a size such as '512MB', '1.5GB' or '2GiB', got {value!r}")
        number = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise TypeError(f"{name} must be a number of bytes or a string like '1GB', got {type(value).__name__}")
    if not math.isfinite(number) or number < MIN_MAX_MEMORY:
        raise ValueError(f"{name} must be at least 256MB, got {value!r}")
    return int(number)
