"""The non-aggregated selective match kernels' hot loops (SMK, SMK*; Tolias, Avrithis &
Jégou, ICCV 2013) and Hamming embedding with burstiness (Jégou, Douze & Schmid, ECCV 2008,
CVPR 2009; the weighting of COLMAP's ``retrieval/inverted_file.h``).

An image keeps one entry per descriptor (and assignment), so an inverted list holds an
image as many times as it has descriptors in the word, its entries next to each other
(the lists are sorted by image, non-decreasing). A query descriptor t of word c adds to
image x

    w_c sum_{y in x_c} f(t, y)                                      (plain)
    w_c sum_{y in x_c} f(t, y) / sqrt(#{y in x_c : f(t, y) != 0})   (burstiness)

f(t, y) = sigma_alpha(u(t, y)) (SMK) or exp(-h^2 / sigma^2) where h <= h_t (HE), looked up
in a table by Hamming distance for packed bits. The pair similarity, the top-k heap and
the scratch are the aggregated kernels' (:mod:`vladkit.kernels.asmk`), imported.
"""

import numpy as np
from numba import njit, prange

from .asmk import _fill_untouched, _match, _reset, _select_top

__all__ = ["hamming_table", "self_similarities", "score_smk_queries"]


def hamming_table(n_bits, max_distance, sigma):
    """exp(-h^2 / sigma^2) for h <= ``max_distance``, else 0, for h = 0..n_bits (Hamming
    embedding's weight of a match at distance h, COLMAP's ``HammingDistWeightFunctor``)."""
    h = np.arange(int(n_bits) + 1, dtype=np.float64)
    return np.where(h <= max_distance, np.exp(-h * h / (float(sigma) ** 2)), 0.0)


@njit(cache=True, nogil=True)
def self_similarities(words, images, signatures, weights, table, alpha, threshold, all_pairs, norms):
    """Per image, its similarity with itself, added into ``norms``:

        all_pairs:      sum_c w_c sum_{x in X_c} sum_{x' in X_c} f(x, x')    (SMK's gamma^-2)
        not all_pairs:  sum_c w_c sum_{x in X_c} f(x, x)                     (COLMAP's, HE)

    The entries ``(words, images, signatures)`` come with those of one (word, image)
    next to each other (an inverted file's CSR order, or one image's non-decreasing
    words). A word beyond ``weights`` weighs 1 (a query word no indexed image holds)."""
    n = words.shape[0]
    start = 0
    while start < n:
        end = start + 1
        while end < n and words[end] == words[start] and images[end] == images[start]:
            end += 1
        word = words[start]
        weight = weights[word] if word < weights.shape[0] else 1.0
        total = 0.0
        for a in range(start, end):
            if all_pairs:
                for b in range(start, end):
                    total += _match(signatures[a], signatures, b, table, alpha, threshold)
            else:
                total += _match(signatures[a], signatures, a, table, alpha, threshold)
        norms[images[start]] += weight * total
        start = end


@njit(cache=True, nogil=True)
def _accumulate_smk(q_words, q_signatures, word_offsets, entry_images, entry_signatures, word_weights, table, alpha,
                    threshold, burstiness, pairs, touched, hits):
    """One query's terms into ``pairs[:, 0]`` (each already times the image's gamma,
    ``pairs[:, 1]``); touched images marked and listed in ``hits``. Returns (images
    touched, -1 or a word whose list is damaged: an image out of range or decreasing)."""
    n_words, n_images = word_offsets.shape[0] - 1, pairs.shape[0]
    n_touched = 0
    for t in range(q_words.shape[0]):
        word = q_words[t]
        if word < 0 or word >= n_words:
            continue
        weight = word_weights[word]
        j, end, last = word_offsets[word], word_offsets[word + 1], -1
        while j < end:
            image = entry_images[j]
            # Checked as read (numba checks no bounds), as the aggregated kernel does.
            if image <= last or image >= n_images:
                return n_touched, word
            last = image
            total, votes = 0.0, 0
            while j < end and entry_images[j] == image:  # this image's entries of the word
                s = _match(q_signatures[t], entry_signatures, j, table, alpha, threshold)
                total += s
                votes += s != 0.0
                j += 1
            if burstiness and votes > 1:
                total /= np.sqrt(votes)
            at = np.uint64(image)
            if touched[at] == 0:
                touched[at] = 1
                hits[n_touched] = image
                n_touched += 1
            pairs[at, 0] += total * weight * pairs[at, 1]
    return n_touched, -1


@njit(cache=True, nogil=True)
def _top_smk(first, end, q_words, q_signatures, q_scales, i, word_offsets, entry_images, entry_signatures,
             word_weights, table, alpha, threshold, burstiness, pairs, touched, hits, out_scores, out_images):
    n_touched, damaged = _accumulate_smk(q_words[first:end], q_signatures[first:end], word_offsets, entry_images,
                                         entry_signatures, word_weights, table, alpha, threshold, burstiness,
                                         pairs, touched, hits)
    if damaged < 0:
        filled = _select_top(pairs, hits, n_touched, q_scales[i], out_scores, out_images)
        _fill_untouched(touched, filled, out_scores, out_images)
    _reset(pairs, touched, hits, n_touched)
    return damaged


@njit(cache=True, nogil=True, parallel=True)
def _score_smk_blocks(q_offsets, q_words, q_signatures, q_scales, word_offsets, entry_images, entry_signatures,
                      word_weights, table, alpha, threshold, burstiness, pairs, touched, hits, out_scores,
                      out_images, damaged):
    n, blocks = q_offsets.shape[0] - 1, pairs.shape[0]
    for b in prange(blocks):
        for i in range(b * n // blocks, (b + 1) * n // blocks):
            damaged[i] = _top_smk(q_offsets[i], q_offsets[i + 1], q_words, q_signatures, q_scales, i, word_offsets,
                                  entry_images, entry_signatures, word_weights, table, alpha, threshold, burstiness,
                                  pairs[b], touched[b], hits[b], out_scores[i], out_images[i])


def score_smk_queries(q_offsets, q_words, q_signatures, q_scales, word_offsets, entry_images, entry_signatures,
                      word_weights, table, alpha, threshold, burstiness, scratch, out_scores, out_images):
    """The top k indexed images of each query under SMK / SMK* / HE, in parallel over
    blocks of queries (one per row of ``scratch``, from
    :func:`vladkit.kernels.asmk.score_scratch` of the images' gammas):

        s(q, x) = gamma(q) gamma(x) sum_{t in q} w_{c(t)} [sum_{y in x_c(t)} f(t, y)] / b(t, x)

    b(t, x) = sqrt(votes of t in x) with ``burstiness``, else 1; gamma(q) = ``q_scales``.
    Out: ``out_scores`` (n, k) float64 decreasing, ``out_images`` (n, k) int64, ties by
    increasing image, images sharing no word with the query after them at 0.

    Returns
    -------
    int: -1, or a word whose inverted list is damaged.
    """
    n = len(q_offsets) - 1
    damaged = np.full(n, -1, dtype=np.int64)
    _score_smk_blocks(q_offsets, q_words, q_signatures, q_scales, word_offsets, entry_images, entry_signatures,
                      word_weights, table, float(alpha), float(threshold), bool(burstiness), *scratch, out_scores,
                      out_images, damaged)
    bad = damaged[damaged >= 0]
    return int(bad[0]) if len(bad) else -1
