"""The selective match kernels' hot loops: residuals aggregated per (image, word), sign
bits packed, the inverted file sorted by word (a counting sort), and queries scored over
it (Tolias, Avrithis & Jégou, ICCV 2013).

Scoring a query visits, for each of its words c, the inverted list of c: every indexed
image holding c, with its signature. With binary signatures (ASMK*) the similarity of
two B-bit signatures is u = 1 - 2 h / B, h their Hamming distance (a popcount of their
XOR, 64 bits at a time), and sigma_alpha(u) is looked up in a table of its B + 1 values;
with float signatures (ASMK) u = q . v of the unit aggregated residuals. The selectivity sigma_alpha(u) = sign(u) |u|^alpha where u >= tau
(else 0), times the word's weight w_c and the image's normaliser gamma, accumulates into
one dense score per image; the top k come out of the images the query touched only.
"""

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from ._flags import _FAST

#: Set bits of each byte value: the popcount of a byte of XOR.
_POPCOUNT = np.array([bin(value).count("1") for value in range(256)], dtype=np.uint8)


@njit(cache=True, nogil=True)
def aggregate_image(X, assignments, centers, sums, words):
    """The residuals of one image summed per word: the ``m`` words of each row of
    ``assignments`` each receive that row's residual x - c_word (a row listing a word
    twice adds once, as the reference does).

    Sums run in X's dtype, row after row in input order: the arithmetic of the reference
    package (``asmk``), so that signs of near-zero sums come out as its do.

    Parameters
    ----------
    X : (n, D) float32 or float64
    assignments : (n, m) int64, each row's words
    centers : (K, D), X's dtype
    sums : (n * m, D), X's dtype, out: one row per distinct word, in increasing word order
    words : (n * m,) int64, out: the distinct words, increasing

    Returns
    -------
    int: the number of distinct words (the rows of ``sums`` and ``words`` written)
    """
    n, m = assignments.shape
    flat = assignments.ravel().copy()
    flat.sort()
    count = 0
    for j in range(flat.shape[0]):
        if count == 0 or flat[j] != words[count - 1]:
            words[count] = flat[j]
            count += 1
    for t in range(count):
        sums[t, :] = 0
    for i in range(n):
        for a in range(m):
            word = assignments[i, a]
            repeated = False
            for b in range(a):
                if assignments[i, b] == word:
                    repeated = True
            if repeated:
                continue
            t = np.searchsorted(words[:count], word)
            for d in range(X.shape[1]):
                sums[t, d] += X[i, d] - centers[word, d]
    return count


@njit(cache=True, nogil=True)
def pack_signs(V, out):
    """Bit d of row i of ``out`` is [V[i, d] > 0], packed 8 to a byte, most significant
    bit first (numpy's ``packbits`` order); padding bits are 0."""
    n, dim = V.shape
    for i in range(n):
        for byte in range(out.shape[1]):
            value = 0
            for bit in range(8):
                d = byte * 8 + bit
                value <<= 1
                if d < dim and V[i, d] > 0:
                    value |= 1
            out[i, byte] = value


@njit(cache=True, nogil=True)
def normalize_signatures(V, out):
    """out[i] = V[i] / (||V[i]|| + 1e-6), in V's dtype: the reference package's L2
    normalisation of aggregated residuals (a zero sum stays zero)."""
    for i in range(V.shape[0]):
        total = V.dtype.type(0)
        for d in range(V.shape[1]):
            total += V[i, d] * V[i, d]
        scale = np.sqrt(total) + V.dtype.type(1e-6)
        for d in range(V.shape[1]):
            out[i, d] = V[i, d] / scale


@njit(cache=True, nogil=True, parallel=True)
def aggregate_images(X, offsets, assignments, centers, binary, signatures, words, counts):
    """Every image's signatures at once, in parallel over images: image i is rows
    ``offsets[i]:offsets[i + 1]`` of X; its residuals are summed per word
    (:func:`aggregate_image`, in a scratch of its own) and its signatures written from row
    ``offsets[i] * m`` of ``signatures`` and ``words``, their number into ``counts[i]``.

    ``binary``: ``signatures`` is (n * m, ceil(D / 8)) uint8, sign bits packed
    (:func:`pack_signs`); otherwise (n * m, D) float32, unit sums
    (:func:`normalize_signatures`)."""
    m = assignments.shape[1]
    for i in prange(offsets.shape[0] - 1):
        first, end = offsets[i], offsets[i + 1]
        sums = np.empty(((end - first) * m, X.shape[1]), dtype=X.dtype)
        count = aggregate_image(X[first:end], assignments[first:end], centers, sums, words[first * m:end * m])
        counts[i] = count
        if binary:
            pack_signs(sums[:count], signatures[first * m:first * m + count])
        else:
            unit = np.empty((count, X.shape[1]), dtype=X.dtype)
            normalize_signatures(sums[:count], unit)
            for t in range(count):
                for d in range(X.shape[1]):
                    signatures[first * m + t, d] = unit[t, d]


@njit(cache=True, nogil=True)
def count_words(words, n_words, counts):
    """counts[c] += the number of entries of word c (words >= n_words are an error the
    caller has excluded)."""
    for j in range(words.shape[0]):
        counts[words[j]] += 1


@njit(cache=True, nogil=True)
def scatter_entries(words, images, signatures, cursor, entry_images, entry_signatures):
    """Write each entry at its word's next free slot (``cursor[c]``, advanced): the second
    pass of the counting sort that lays the inverted lists out contiguously. Entries of one
    word keep their input order, so images added in increasing order stay sorted."""
    for j in range(words.shape[0]):
        slot = cursor[words[j]]
        cursor[words[j]] = slot + 1
        entry_images[slot] = images[j]
        entry_signatures[slot, :] = signatures[j, :]


@njit(cache=True, nogil=True)
def _selectivity(u, alpha, threshold):
    """sigma_alpha(u) = sign(u) |u|^alpha for u >= threshold, else 0."""
    if u < threshold:
        return 0.0
    if u >= 0:
        return u ** alpha
    return -((-u) ** alpha)


@njit(cache=True, nogil=True)
def _popcount64(value):
    """Set bits of a uint64 (the SWAR count: pairs, nibbles, bytes, then a multiply)."""
    value = value - ((value >> np.uint64(1)) & np.uint64(0x5555555555555555))
    value = (value & np.uint64(0x3333333333333333)) + ((value >> np.uint64(2)) & np.uint64(0x3333333333333333))
    value = (value + (value >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (value * np.uint64(0x0101010101010101)) >> np.uint64(56)


def selectivity_table(n_bits, alpha, threshold):
    """sigma_alpha(1 - 2 h / n_bits) for every Hamming distance h = 0..n_bits: binary
    signatures have only these n_bits + 1 similarities, so a search looks them up."""
    u = 1.0 - 2.0 * np.arange(int(n_bits) + 1) / n_bits
    return np.where(u >= threshold, np.sign(u) * np.abs(u) ** alpha, 0.0)


def _match(query, entries, j, table, alpha, threshold):
    """sigma_alpha(u(query, entries[j])): looked up by Hamming distance for packed bits
    (uint8 or, 8 bytes at a time, uint64), computed from the inner product in float64 for
    float signatures; chosen by dtype when compiled."""
    raise NotImplementedError  # numba's overload below; never called from Python


@overload(_match, jit_options={"cache": True, "nogil": True, "fastmath": _FAST})
def _match_by_dtype(query, entries, j, table, alpha, threshold):
    if query.dtype == types.uint64:
        def words64(query, entries, j, table, alpha, threshold):
            h = 0
            for word in range(query.shape[0]):
                h += _popcount64(query[word] ^ entries[j, word])
            return table[h]
        return words64
    if isinstance(query.dtype, types.Integer):
        def bytes8(query, entries, j, table, alpha, threshold):
            h = 0
            for byte in range(query.shape[0]):
                h += _POPCOUNT[query[byte] ^ entries[j, byte]]
            return table[h]
        return bytes8

    def inner_product(query, entries, j, table, alpha, threshold):
        # In the signatures' dtype, vectorised (fastmath lets the sum be reordered): the
        # reference computes this product in float32 too, by BLAS.
        total = entries.dtype.type(0)
        for d in range(query.shape[0]):
            total += query[d] * entries[j, d]
        return _selectivity(np.float64(total), alpha, threshold)
    return inner_product


@njit(cache=True, nogil=True)
def _score_one(q_words, q_signatures, word_offsets, entry_images, entry_signatures, word_weights, image_scales,
               table, alpha, threshold, scores, touched):
    """Accumulate one query's scores; returns (the number of images touched, the query's
    normaliser sum_c w_c over its words)."""
    n_touched = 0
    query_norm = 0.0
    n_words = word_offsets.shape[0] - 1
    for t in range(q_words.shape[0]):
        word = q_words[t]
        if word < 0 or word >= n_words:
            query_norm += 1.0  # a word no image holds weighs 1, as an empty word does
            continue
        weight = word_weights[word]
        query_norm += weight
        for j in range(word_offsets[word], word_offsets[word + 1]):
            s = _match(q_signatures[t], entry_signatures, j, table, alpha, threshold)
            image = entry_images[j]
            if touched[image] < 0:
                touched[image] = n_touched
                n_touched += 1
            scores[image] += s * weight * image_scales[image]
    return n_touched, query_norm


@njit(cache=True, nogil=True)
def _top_images(i, q_offsets, q_words, q_signatures, word_offsets, entry_images, entry_signatures, word_weights,
                image_scales, table, alpha, threshold, out_scores, out_images):
    """Query i's top ``out_scores.shape[1]`` images into row i of the outputs (see
    :func:`score_queries`)."""
    n_images = image_scales.shape[0]
    scores = np.zeros(n_images)
    touched = np.full(n_images, -1, dtype=np.int64)
    first, end = q_offsets[i], q_offsets[i + 1]
    n_touched, query_norm = _score_one(q_words[first:end], q_signatures[first:end], word_offsets, entry_images,
                                       entry_signatures, word_weights, image_scales, table, alpha, threshold,
                                       scores, touched)
    query_scale = 1.0 / np.sqrt(query_norm) if query_norm > 0 else 0.0
    hits = np.empty(n_touched, dtype=np.int64)
    if n_touched * 8 > n_images:
        for image in range(n_images):
            if touched[image] >= 0:
                hits[touched[image]] = image
    else:
        # Few touched images: find them from the entries again rather than by a pass
        # over every image.
        for t in range(first, end):
            word = q_words[t]
            if word < 0 or word >= word_offsets.shape[0] - 1:
                continue
            for j in range(word_offsets[word], word_offsets[word + 1]):
                image = entry_images[j]
                hits[touched[image]] = image
    hits.sort()
    values = np.empty(n_touched)
    for h in range(n_touched):
        values[h] = -scores[hits[h]] * query_scale
    order = np.argsort(values, kind="mergesort")
    kk = out_scores.shape[1]
    filled = 0
    for h in range(min(kk, n_touched)):
        out_images[i, filled] = hits[order[h]]
        out_scores[i, filled] = -values[order[h]]
        filled += 1
    image = 0
    while filled < kk and image < n_images:
        if touched[image] < 0:
            out_images[i, filled] = image
            out_scores[i, filled] = 0.0
            filled += 1
        image += 1


@njit(cache=True, nogil=True, parallel=True)
def _score_in_parallel(q_offsets, q_words, q_signatures, word_offsets, entry_images, entry_signatures, word_weights,
                       image_scales, table, alpha, threshold, out_scores, out_images):
    for i in prange(q_offsets.shape[0] - 1):
        _top_images(i, q_offsets, q_words, q_signatures, word_offsets, entry_images, entry_signatures, word_weights,
                    image_scales, table, alpha, threshold, out_scores, out_images)


@njit(cache=True, nogil=True)
def _score_in_order(q_offsets, q_words, q_signatures, word_offsets, entry_images, entry_signatures, word_weights,
                    image_scales, table, alpha, threshold, out_scores, out_images):
    for i in range(q_offsets.shape[0] - 1):
        _top_images(i, q_offsets, q_words, q_signatures, word_offsets, entry_images, entry_signatures, word_weights,
                    image_scales, table, alpha, threshold, out_scores, out_images)


def score_queries(q_offsets, q_words, q_signatures, word_offsets, entry_images, entry_signatures, word_weights,
                  image_scales, table, alpha, threshold, out_scores, out_images):
    """The top k indexed images of each query: in parallel over queries, or in this thread
    for one query (waking sleeping worker threads costs more than one query's work).

    Query i's words are ``q_words[q_offsets[i]:q_offsets[i + 1]]`` with their signatures.
    Its score for image x is

        s(q, x) = gamma(q) gamma(x) sum_c w_c sigma_alpha(u(q_c, x_c))

    over the words c both hold; gamma(x) = ``image_scales[x]`` = (sum_{c in x} w_c)^(-1/2)
    and gamma(q) likewise over the query's words (0 for an image or query with none).
    Out: ``out_scores`` (n, k) float64, decreasing, and ``out_images`` (n, k) int64; ties
    in increasing image order; images the query shares no word with follow, score 0.
    """
    kernel = _score_in_order if len(q_offsets) <= 2 else _score_in_parallel
    kernel(q_offsets, q_words, q_signatures, word_offsets, entry_images, entry_signatures, word_weights,
           image_scales, table, alpha, threshold, out_scores, out_images)
