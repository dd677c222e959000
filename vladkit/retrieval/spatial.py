r"""Geometric verification of local-feature matches, to re-rank retrieval results.

Philbin et al. (CVPR 2007) re-rank the top of a bag-of-words ranking by how many of the
query's features match a candidate's features *consistently with one transformation*:
a photo of the same object or scene has many such matches, an unrelated photo only the
few that chance gives. This module does the three steps:

1. :func:`match_descriptors`: tentative matches, nearest neighbours in descriptor space
   that pass Lowe's ratio test (and are mutual nearest neighbours);
2. :func:`verify`: a robust fit (OpenCV's RANSAC / USAC) of a similarity or affine
   transformation from query to candidate positions, reported as a
   :class:`Verification` (inlier count, inliers, transformation);
3. :func:`spatial_score`: both at once for two :class:`~vladkit.LocalFeatures`.

A verification that cannot be credible (too few matches or inliers, degenerate or
collinear points, an implausible transformation, OpenCV finding nothing) is a *zero
result*: ``n_inliers == 0``, no inliers, ``transform is None``; never an exception or a
NaN, so a re-ranking loop needs no special case.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ..features.extractors import LocalFeatures

__all__ = ["Verification", "default_threshold", "match_descriptors", "spatial_score", "verify"]

#: Bound on the elements of one query-by-candidate distance block in
#: :func:`match_descriptors` (2**22 float32 = 16 MB), whatever the number of features.
MATCH_BLOCK_ELEMENTS = 1 << 22

#: Points that determine each model: a similarity is fixed by 2 matches, an affine
#: transformation by 3, so that many matches always fit exactly and prove nothing.
_SAMPLE_SIZE = {"similarity": 2, "affine": 3}
#: Default ``min_inliers``: three matches beyond the minimal sample must agree. Chance
#: alone gave up to 4 (similarity) and 5 (affine) between unrelated photos (see
#: :func:`verify`, Notes).
_MIN_INLIERS = {"similarity": 5, "affine": 6}
#: The robust estimator of each model (see :func:`verify`, Notes, for the measurements).
#: ``estimateAffinePartial2D`` accepts only RANSAC and LMedS (LMedS needs > 50 % inliers,
#: which tentative matches between retrieval candidates rarely have).
_METHOD = {"similarity": cv2.RANSAC, "affine": cv2.RANSAC}
#: Default inlier threshold: this fraction of the longer side of the candidate image.
THRESHOLD_FRACTION = 0.01
#: Smallest default threshold in pixels (SIFT keypoint positions are sub-pixel, but
#: JPEG and resampling move them by about a pixel).
_MIN_THRESHOLD = 2.0


@dataclass(frozen=True, eq=False)
class Verification:
    """The result of a geometric verification.

    Attributes
    ----------
    n_inliers : int
        Matches consistent with ``transform`` (0 for a zero result). The re-ranking score.
    inliers : ndarray (n_inliers,), int64
        Rows of ``matches`` that are inliers, ascending.
    transform : ndarray (2, 3), float64, or None
        Affine matrix ``T`` mapping query to candidate positions:
        ``candidate_xy ~ T[:, :2] @ query_xy + T[:, 2]``. None for a zero result.
    matches : ndarray (m, 2), int64
        The (query row, candidate row) pairs that were verified, so that
        ``matches[inliers]`` are the inlier pairs (:func:`spatial_score` computes them).
    """

    n_inliers: int
    inliers: np.ndarray
    transform: np.ndarray | None
    matches: np.ndarray

    def __repr__(self):
        return f"Verification(n_inliers={self.n_inliers}, n_matches={len(self.matches)})"


def _zero(matches):
    return Verification(0, np.zeros(0, np.int64), None, matches)


def _descriptor_array(x, name):
    x = np.asarray(x)
    if x.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be an array of real numbers, got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, D) array, got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or inf (or values beyond float32)")
    return x


def match_descriptors(query, candidate, ratio=0.8, *, mutual=True,
                      block_elements=MATCH_BLOCK_ELEMENTS):
    r"""Tentative matches between two descriptor sets: ratio test and mutual nearest neighbours.

    With squared Euclidean distances

    .. math::

        d(i, j) = \|q_i\|^2 - 2\, q_i \cdot c_j + \|c_j\|^2

    (one BLAS product per block of query rows, in float32, clamped at 0 against rounding),
    query row :math:`i` is matched to its nearest candidate row
    :math:`j = \arg\min_j d(i, j)` (the lowest row on ties) when

    - Lowe's ratio test passes: :math:`d_1 < \mathrm{ratio}^2\, d_2`, where :math:`d_1`,
      :math:`d_2` are the smallest and second smallest :math:`d(i, \cdot)`, i.e. the
      distance ratio is below ``ratio``;
    - and, if ``mutual``, :math:`i` is also the nearest query row of :math:`j`.

    Parameters
    ----------
    query : array-like (n_q, D)
        Query descriptors, one per row (e.g. RootSIFT; unit norm is not assumed).
    candidate : array-like (n_c, D)
        Candidate descriptors.
    ratio : float in (0, 1], default=0.8
        Lowe's distance ratio threshold (0.8 in Lowe 2004).
    mutual : bool, default=True
        Also require mutual nearest neighbours. Keeps each candidate feature in at most
        one match, so repeated texture cannot pile many query features onto one
        candidate feature and inflate the inlier count (see :func:`verify`, Notes).
    block_elements : int, default=2**22
        Bound on the elements of one distance block (query rows x ``n_c``); at least one
        query row is processed at a time.

    Returns
    -------
    ndarray (m, 2), int64
        ``(query row, candidate row)`` pairs, by ascending query row. Empty ``(0, 2)``
        when either set is empty or the candidate has fewer than 2 rows (no second
        neighbour, so no ratio test).

    Raises
    ------
    ValueError
        Arrays not 2-D, with different numbers of columns or non-finite values; ``ratio``
        outside (0, 1]; ``block_elements`` < 1.
    """
    q = _descriptor_array(query, "query")
    c = _descriptor_array(candidate, "candidate")
    if q.shape[1] != c.shape[1]:
        raise ValueError(f"query has {q.shape[1]} columns but candidate has {c.shape[1]}")
    ratio = float(ratio)
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    if int(block_elements) < 1:
        raise ValueError(f"block_elements must be >= 1, got {block_elements!r}")
    n_q, n_c = len(q), len(c)
    if n_q == 0 or n_c < 2:
        return np.zeros((0, 2), np.int64)

    ratio2 = np.float32(ratio * ratio)
    q_sq = np.einsum("ij,ij->i", q, q)
    c_sq = np.einsum("ij,ij->i", c, c)
    rows = max(1, int(block_elements) // n_c)
    nearest = np.empty(n_q, np.int64)
    passed = np.empty(n_q, bool)
    if mutual:
        # Running column minima over the blocks: each candidate's nearest query row.
        best_d = np.full(n_c, np.inf, np.float32)
        best_q = np.zeros(n_c, np.int64)
        columns = np.arange(n_c)
    for start in range(0, n_q, rows):
        stop = min(start + rows, n_q)
        d = q[start:stop] @ c.T
        d *= -2
        d += c_sq
        d += q_sq[start:stop, None]
        np.maximum(d, 0, out=d)
        if mutual:
            arg = d.argmin(axis=0)
            col_min = d[arg, columns]
            # Strictly smaller: on ties the earlier block (lower query row) keeps it,
            # as a global argmin would.
            better = col_min < best_d
            best_d[better] = col_min[better]
            best_q[better] = arg[better] + start
        r = np.arange(stop - start)
        j = d.argmin(axis=1)
        d1 = d[r, j].copy()
        d[r, j] = np.inf  # the block is ours: mask the nearest to find the second
        d2 = d.min(axis=1)
        nearest[start:stop] = j
        passed[start:stop] = d1 < ratio2 * d2
    if mutual:
        passed &= best_q[nearest] == np.arange(n_q)
    rows_kept = np.flatnonzero(passed)
    return np.stack([rows_kept, nearest[rows_kept]], axis=1).astype(np.int64, copy=False)


def _positions(xy, name):
    xy = np.asarray(xy)
    if xy.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be an array of real numbers, got dtype {xy.dtype}")
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"{name} must have shape (n, 2) (x, y), got {xy.shape}")
    xy = xy.astype(np.float64, copy=False)
    if not np.all(np.isfinite(xy)):
        raise ValueError(f"{name} contains NaN or inf")
    return xy


def _thickness(points):
    """RMS distance of the points to their best-fitting line (0 when collinear)."""
    centred = points - points.mean(axis=0)
    cov = centred.T @ centred / len(points)
    # Smallest eigenvalue of the symmetric 2 x 2 covariance, closed form.
    half_trace = 0.5 * (cov[0, 0] + cov[1, 1])
    gap = np.hypot(0.5 * (cov[0, 0] - cov[1, 1]), cov[0, 1])
    return float(np.sqrt(max(half_trace - gap, 0.0)))


def _plausible(transform, max_scale):
    """Whether the linear part keeps orientation and scales every direction by a factor
    within [1/max_scale, max_scale], with at most ``max_scale`` between directions."""
    linear = transform[:, :2]
    if np.linalg.det(linear) <= 0:
        return False
    s_max, s_min = np.linalg.svd(linear, compute_uv=False)
    return 1 / max_scale <= s_min and s_max <= max_scale and s_max <= max_scale * s_min


def default_threshold(image_shape):
    """The default inlier threshold in pixels of an image of shape ``(height, width)``:
    ``max(2, 0.01 * max(height, width))`` (see :func:`verify`)."""
    return max(_MIN_THRESHOLD, THRESHOLD_FRACTION * float(max(image_shape[:2])))


def verify(query_xy, candidate_xy, matches, model="similarity", *, threshold=None,
           candidate_shape=None, max_iters=2000, confidence=0.999, min_inliers=None,
           min_matches=None, max_scale=10.0, refine_iters=10, seed=0):
    r"""Fit a transformation to the matches robustly and count the matches that agree.

    The model maps query positions :math:`p_i` to candidate positions :math:`p'_j`,
    :math:`p' \approx A p + t` with ``transform = [A | t]``:

    - ``"similarity"``: :math:`A = s R(\theta)` (rotation, uniform scale, translation;
      4 degrees of freedom), OpenCV's ``estimateAffinePartial2D``;
    - ``"affine"``: any :math:`A` (6 degrees of freedom), ``estimateAffine2D``.

    Both run RANSAC (``cv2.RANSAC``), then refine the best hypothesis on its inliers by
    Levenberg-Marquardt. A match is an inlier when its reprojection error
    :math:`\|A p_i + t - p'_j\|` is at most ``threshold`` (recomputed here with the
    refined transformation, so ``n_inliers`` always means exactly that).

    The result is a zero result (``n_inliers=0``, ``transform=None``) when

    - there are fewer than ``min_matches`` matches, or fewer than ``min_inliers`` inliers;
    - the matched query or candidate points are all identical or collinear, or the
      inliers' candidate points lie within ``threshold`` of one line (a line does not
      fix a 2-D transformation, and matches along one edge or text line are weak
      evidence);
    - OpenCV finds no transformation;
    - the transformation is implausible (:math:`\det A \le 0`, or a singular value of
      :math:`A` outside ``[1/max_scale, max_scale]``, or their ratio above
      ``max_scale``): a mirror image does not match SIFT descriptors, SIFT does not
      match across more than a ~10x change of scale, and a near-singular :math:`A`
      squeezes the query's points onto a line or a dot, where many fall within the
      threshold by chance.

    Parameters
    ----------
    query_xy : array-like (n_q, 2)
        Query keypoint positions ``(x, y)`` in pixels (``LocalFeatures.positions``).
    candidate_xy : array-like (n_c, 2)
        Candidate keypoint positions.
    matches : array-like (m, 2) of int
        ``(query row, candidate row)`` pairs (:func:`match_descriptors`).
    model : {"similarity", "affine"}, default="similarity"
    threshold : float or None
        Inlier threshold in candidate pixels. None: :func:`default_threshold` of
        ``candidate_shape`` = ``max(2, 0.01 * longer side)``, or of the extent of
        ``candidate_xy`` (bottom-right keypoint) when ``candidate_shape`` is None.
    candidate_shape : tuple (height, width) or None
        Size of the candidate image, for the default threshold.
    max_iters : int, default=2000
        RANSAC iterations at most (fewer when ``confidence`` is reached).
    confidence : float in (0, 1), default=0.999
        RANSAC stops when it has this probability of having drawn an all-inlier sample.
    min_inliers : int or None
        Fewest inliers of a credible verification, at least the minimal sample + 1
        (similarity 2, affine 3). None: 5 for a similarity, 6 for an affine (the minimal
        sample + 3, one more than chance gave unrelated photos: see Notes).
    min_matches : int or None
        Fewest matches to attempt a verification. None: ``min_inliers``.
    max_scale : float > 1, default=10
        Bound on the scale change (see above).
    refine_iters : int, default=10
        Levenberg-Marquardt iterations on the inliers (0: none).
    seed : int, default=0
        Seed of OpenCV's random generator (``cv2.setRNGSeed``) before estimation, so
        results are reproducible whatever OpenCV drew before.

    Returns
    -------
    Verification

    Raises
    ------
    ValueError
        Malformed input: positions not ``(n, 2)`` or not finite, match rows out of
        range, a bad parameter. Degenerate but well-formed input gives a zero result.

    Notes
    -----
    OpenCV's random generator is per thread: seeding it here resets the calling thread's
    ``cv2.theRNG()`` state (its other draws in that thread restart from ``seed``), and
    concurrent calls from several threads do not disturb one another. OpenCV 5's
    RANSAC and USAC draw from their own fixed-seed generators (measured: results do not
    change with the global seed); the seeding keeps other versions reproducible too.

    Measured choices (README, "Geometric verification"; 10 15-Scene photos against
    copies cropped to 60 %, rotated by 20 deg and saved at JPEG quality 15, and 110
    unrelated pairs):

    - RANSAC for both models. ``estimateAffinePartial2D`` offers only RANSAC and LMedS
      (which needs > 50 % inliers). For the affine model, USAC_DEFAULT, USAC_MAGSAC and
      USAC_ACCURATE found the same inliers as RANSAC (within 1 per pair) but were slower:
      with many outliers (no ratio test) the median unrelated pair took 7.6-10.9 ms
      against RANSAC's 1.3-1.8 ms.
    - The threshold scales with the image, because the error of a similarity or affine
      model of a real viewpoint change grows with the image: under a perspective tilt a
      fixed 2 px kept 42 %, 25 % and 14 % of the correct matches of 200, 400 and 800
      pixel images, 1 % of the side kept 42 % at every size. On the attacked copies
      (an exact similarity) 1 % and 4x larger thresholds found the same inliers (within
      2 %), and larger thresholds let more chance inliers in.
    - ``min_inliers``: with the default threshold, chance gave at most 4 (similarity)
      and 5 (affine) inliers in 330 unrelated pairs (photos at 200, 400 and 800 px);
      the attacked copies gave 17 to 90 at 200 px and 43 to 729 at 400 px (but 0 for a
      nearly featureless photo with 1 to 5 tentative matches).
    """
    if model not in _SAMPLE_SIZE:
        raise ValueError(f"model must be 'similarity' or 'affine', got {model!r}")
    query_xy = _positions(query_xy, "query_xy")
    candidate_xy = _positions(candidate_xy, "candidate_xy")
    matches = np.asarray(matches)
    if matches.size == 0:
        matches = np.zeros((0, 2), np.int64)
    if matches.dtype.kind not in "iu" or matches.ndim != 2 or matches.shape[1] != 2:
        raise ValueError(f"matches must be an (m, 2) integer array, got {matches.dtype} {matches.shape}")
    matches = matches.astype(np.int64, copy=False)
    if len(matches) and (
        matches.min(axis=0).min() < 0
        or matches[:, 0].max() >= len(query_xy)
        or matches[:, 1].max() >= len(candidate_xy)
    ):
        raise ValueError("matches refer to rows outside query_xy or candidate_xy")

    sample = _SAMPLE_SIZE[model]
    min_inliers = _MIN_INLIERS[model] if min_inliers is None else int(min_inliers)
    if min_inliers < sample + 1:
        raise ValueError(f"min_inliers must be >= {sample + 1} for a {model} "
                         f"({sample} matches always fit one exactly), got {min_inliers}")
    min_matches = min_inliers if min_matches is None else int(min_matches)
    if threshold is None:
        if candidate_shape is None:
            extent = candidate_xy.max(axis=0) if len(candidate_xy) else np.zeros(2)
            candidate_shape = (extent[1] + 1, extent[0] + 1)
        threshold = default_threshold(candidate_shape)
    threshold = float(threshold)
    if not (np.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be a positive number, got {threshold!r}")
    if int(max_iters) < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters!r}")
    if not 0 < float(confidence) < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if not float(max_scale) > 1:
        raise ValueError(f"max_scale must be > 1, got {max_scale!r}")

    if len(matches) < max(min_matches, min_inliers):
        return _zero(matches)
    src = query_xy[matches[:, 0]]
    dst = candidate_xy[matches[:, 1]]
    # All identical or exactly collinear points (up to rounding): OpenCV would return
    # None or an arbitrary transformation; the relative tolerance scales with the points.
    for points in (src, dst):
        if _thickness(points) <= 1e-9 * (1.0 + np.abs(points).max()):
            return _zero(matches)

    estimate = cv2.estimateAffinePartial2D if model == "similarity" else cv2.estimateAffine2D
    cv2.setRNGSeed(int(seed))
    try:
        transform, _ = estimate(
            src.astype(np.float32), dst.astype(np.float32), method=_METHOD[model],
            ransacReprojThreshold=threshold, maxIters=int(max_iters),
            confidence=float(confidence), refineIters=int(refine_iters),
        )
    except cv2.error:
        # OpenCV asserts on some degenerate samples (USAC: fewer points than a sample);
        # "cannot be estimated" is a zero result, as when it returns None.
        return _zero(matches)
    if transform is None or transform.shape != (2, 3) or not np.all(np.isfinite(transform)):
        return _zero(matches)
    transform = transform.astype(np.float64)
    if not _plausible(transform, float(max_scale)):
        return _zero(matches)
    residuals = np.linalg.norm(src @ transform[:, :2].T + transform[:, 2] - dst, axis=1)
    inliers = np.flatnonzero(residuals <= threshold)
    if len(inliers) < min_inliers or _thickness(dst[inliers]) < threshold:
        return _zero(matches)
    return Verification(int(len(inliers)), inliers.astype(np.int64), transform, matches)


def spatial_score(query_features, candidate_features, model="similarity", ratio=0.8, *,
                  mutual=True, threshold=None, max_iters=2000, confidence=0.999,
                  min_inliers=None, min_matches=None, max_scale=10.0, seed=0):
    """Match two images' local features and verify the matches geometrically.

    :func:`match_descriptors` on the descriptors, then :func:`verify` on the positions
    (the default threshold from ``candidate_features.image_shape``). ``n_inliers`` of
    the result is the score to re-rank retrieval candidates by (Philbin et al. 2007).

    Parameters
    ----------
    query_features, candidate_features : LocalFeatures
        Descriptors and positions of the two images (e.g. from
        ``vladkit.SIFT(root=True)``), with descriptors of the same dimension.
    model, threshold, max_iters, confidence, min_inliers, min_matches, max_scale, seed
        As in :func:`verify`.
    ratio, mutual
        As in :func:`match_descriptors`.

    Returns
    -------
    Verification
        ``matches`` holds the tentative matches, ``matches[inliers]`` the verified ones.
    """
    for name, features in (("query_features", query_features),
                           ("candidate_features", candidate_features)):
        if not isinstance(features, LocalFeatures):
            raise TypeError(f"{name} must be LocalFeatures, got {type(features).__name__}")
    matches = match_descriptors(query_features.descriptors, candidate_features.descriptors,
                                ratio, mutual=mutual)
    return verify(query_features.positions, candidate_features.positions, matches, model,
                  threshold=threshold, candidate_shape=candidate_features.image_shape,
                  max_iters=max_iters, confidence=confidence, min_inliers=min_inliers,
                  min_matches=min_matches, max_scale=max_scale, seed=seed)
