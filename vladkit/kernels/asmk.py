"""The selective match kernels' hot loops: residuals aggregated per (image, word), sign
bits packed, the inverted file sorted by word (a counting sort), and queries scored over
it (Tolias, Avrithis & Jégou, ICCV 2013).

Scoring a query visits, for each of its words c, the inverted list of c: every indexed
image holding c, with its signature. With binary signatures (ASMK*) the similarity of
two B-bit signatures is u = 1 - 2 h / B, h their Hamming distance (a popcount of their
XOR, 64 bits at a time), and sigma_alpha(u) is looked up in a table of its B + 1 values;
with float signatures (ASMK) u = q . v of the unit aggregated residuals. The selectivity sigma_alpha(u) = sign(u) |u|^alpha where u >= tau
(else 0), times the word's weight w_c and the image's normaliser gamma, accumulates into
one score per image, images a block at a time so that the scores stay in cache (at a
million images they do not fit it), and a large query's image ranges on several threads;
the top k come out of the images the query touched only, by a heap. The scores' scratch
is kept between queries and reset where a query wrote, never zeroed whole.
"""

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic, overload

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
            if not first_of_its_word(assignments, i, a):
                continue
            word = assignments[i, a]
            t = np.searchsorted(words[:count], word)
            for d in range(X.shape[1]):
                sums[t, d] += X[i, d] - centers[word, d]
    return count


@njit(cache=True, nogil=True)
def first_of_its_word(assignments, i, a):
    """Whether assignment ``a`` of row ``i`` is the first of the row to name its word (a
    row listing a word twice counts once for it)."""
    for b in range(a):
        if assignments[i, b] == assignments[i, a]:
            return False
    return True


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
def check_entries(words, images, n_words, n_images):
    """-1, or the position of the first entry of a shard that breaks its rules: words in
    0..n_words-1, images in 0..n_images-1, (word, image) strictly increasing."""
    for j in range(words.shape[0]):
        word, image = words[j], images[j]
        if word < 0 or word >= n_words or image < 0 or image >= n_images:
            return j
        if j > 0 and (word < words[j - 1] or (word == words[j - 1] and image <= images[j - 1])):
            return j
    return -1


@njit(cache=True, nogil=True)
def word_slice(words, word_start, word_end):
    """``(lo, hi)``: the entries of words ``word_start..word_end-1`` in ``words`` (sorted),
    by binary search: on a memory-mapped shard this reads a few pages, where
    ``np.searchsorted`` would first copy the whole strided column."""
    n = words.shape[0]
    return _lower_bound(words, 0, n, word_start), _lower_bound(words, 0, n, word_end)


@njit(cache=True, nogil=True)
def scatter_range(words, images, signatures, first_image, word_start, cursor, out_images, out_signatures):
    """One shard's entries of a range of words into the range's buffer: entry j goes to
    its word's next free slot, ``cursor[words[j] - word_start]`` (advanced), its image
    numbered globally (``first_image + images[j]``). Shards come in image order, so each
    word's images stay increasing."""
    for j in range(words.shape[0]):
        c = words[j] - word_start
        slot = cursor[c]
        cursor[c] = slot + 1
        out_images[slot] = first_image + images[j]
        out_signatures[slot, :] = signatures[j, :]


@njit(cache=True, nogil=True)
def accumulate_norms(entry_images, counts, weights, norms):
    """norms[x] += weights[c] for each entry (of image x) of each word c of a range laid
    out by word (``counts[c]`` entries each), in that order: the additions of
    ``np.bincount(entry_images, weights[entry_words])`` over the whole inverted file, so the
    sums round alike."""
    j = 0
    for c in range(counts.shape[0]):
        weight = weights[c]
        for _ in range(counts[c]):
            norms[entry_images[j]] += weight
            j += 1


@njit(cache=True, nogil=True)
def _selectivity(u, alpha, threshold):
    """sigma_alpha(u) = sign(u) |u|^alpha for u >= threshold, else 0."""
    if u < threshold:
        return 0.0
    if u >= 0:
        return u ** alpha
    return -((-u) ** alpha)


@intrinsic
def _popcount64(typingctx, value):
    """Set bits of a uint64: LLVM's ctpop, one instruction where the CPU has it (numba
    compiles for the host CPU); the SWAR count it replaced cost ~1.5 ns an entry more."""
    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])
    return types.uint64(types.uint64), codegen


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
            if query.shape[0] == 2:  # 128 bits (SIFT's): unrolled, ~2 ns an entry less
                return table[_popcount64(query[0] ^ entries[j, 0]) + _popcount64(query[1] ^ entries[j, 1])]
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
def _lower_bound(entry_images, first, end, image):
    """The first position in ``first..end-1`` whose value is >= ``image`` (``end`` if
    none): a binary search of a sorted run (an inverted list's images, a shard's words)."""
    while first < end:
        middle = (first + end) // 2
        if entry_images[middle] < image:
            first = middle + 1
        else:
            end = middle
    return first


#: Images scored at a time: their (score, gamma) pairs (16 bytes each) and marks stay in
#: a core's L2 cache (512 KiB of 1 MiB here), where a query scattering its terms over a
#: million images (16 MB) waited on memory for most of them: 42 ns an entry, against 9
#: at a hundred thousand images.
BLOCK_IMAGES = 1 << 15


@njit(cache=True, nogil=True)
def _accumulate(q_words, q_signatures, word_offsets, entry_images, entry_signatures, word_weights, table, alpha,
                threshold, pairs, touched, hits, lo, hi, block_images):
    """Accumulate one query's scores over the images ``lo..hi-1`` into ``pairs[:, 0]``
    (``pairs[:, 1]`` holds each image's gamma: one cache line for both), marking each
    image it touches in ``touched`` and listing it, in increasing order, in ``hits``
    (``hi - lo`` slots at least).

    The images are taken ``block_images`` at a time (:data:`BLOCK_IMAGES`), each block over all the query's
    words: every list is sorted by image, so a cursor per word resumes where the last
    block stopped, and an image's terms are still added in the order of the query's words
    (the same sums as one pass word after word).

    Returns (the number of images touched, the query's normaliser sum_c w_c over its
    words, -1 or the first word whose inverted list is damaged: an image number out of
    range or not increasing; numba checks no bounds, so the list is read no further).
    """
    n_q = q_words.shape[0]
    n_words = word_offsets.shape[0] - 1
    n_images = pairs.shape[0]
    cursor = np.zeros(n_q, dtype=np.int64)
    stop = np.zeros(n_q, dtype=np.int64)
    previous = np.full(n_q, lo - 1, dtype=np.int64)
    weights = np.zeros(n_q)
    query_norm = 0.0
    for t in range(n_q):
        word = q_words[t]
        if word < 0 or word >= n_words:
            query_norm += 1.0  # a word no image holds weighs 1, as an empty word does
            continue
        weights[t] = word_weights[word]
        query_norm += weights[t]
        first, end = word_offsets[word], word_offsets[word + 1]
        if lo > 0:
            first = _lower_bound(entry_images, first, end, lo)
        if hi < n_images:
            end = _lower_bound(entry_images, first, end, hi)
        cursor[t], stop[t] = first, end
    n_touched, damaged = 0, -1
    for block in range(lo, hi, block_images):
        block_end = min(hi, block + block_images)
        for t in range(n_q):
            j, last = _accumulate_word(q_signatures[t], weights[t], cursor[t], stop[t], previous[t], block_end,
                                       entry_images, entry_signatures, table, alpha, threshold, pairs, touched)
            cursor[t], previous[t] = j, last
            if last < -1:
                damaged = q_words[t]
                break
        # The block's touched images listed by one pass over its marks (32 KiB, in L1/L2),
        # rather than a test and a store per entry.
        for image in range(block, block_end):
            if touched[image]:
                hits[n_touched] = image
                n_touched += 1
        if damaged >= 0:
            return n_touched, query_norm, damaged
    for t in range(n_q):
        if cursor[t] != stop[t]:  # entries left at or above hi: out of range, or out of order
            return n_touched, query_norm, q_words[t]
    return n_touched, query_norm, -1


@njit(cache=True, nogil=True)
def _accumulate_word(query, weight, j, end, last, block_end, entry_images, entry_signatures, table, alpha,
                     threshold, pairs, touched):
    """One word's entries from ``j`` whose images are below ``block_end``: their terms
    added to the pairs' scores, their images marked. Returns (where it stopped, the last
    image; -2 if an image was not above the one before, the list being damaged)."""
    while j < end:
        image = entry_images[j]
        if image >= block_end:
            break
        # Checked as the list is read, not when the index is loaded: a check at load would
        # read every entry (gigabytes) before the first answer.
        if image <= last:
            return j, -2
        last = image
        at = np.uint64(image)  # >= 0 now: unsigned, numba adds no negative-index wraparound
        s = _match(query, entry_signatures, j, table, alpha, threshold)
        touched[at] = 1
        pairs[at, 0] += s * weight * pairs[at, 1]
        j += 1
    return j, last


@njit(cache=True, nogil=True)
def _better(value_a, image_a, value_b, image_b):
    """Whether (value_a, image_a) ranks before (value_b, image_b): higher score first, ties
    by increasing image."""
    return value_a > value_b or (value_a == value_b and image_a < image_b)


@njit(cache=True, nogil=True)
def _sift_down(values, images, size, position):
    """Restore the heap below ``position``: the root holds the worst-ranked kept image."""
    while True:
        worst = position
        for child in (2 * position + 1, 2 * position + 2):
            if child < size and _better(values[worst], images[worst], values[child], images[child]):
                worst = child
        if worst == position:
            return
        values[position], values[worst] = values[worst], values[position]
        images[position], images[worst] = images[worst], images[position]
        position = worst


@njit(cache=True, nogil=True)
def _select_top(pairs, hits, n_touched, query_scale, out_scores, out_images):
    """The best ``len(out_scores)`` of the images ``hits[:n_touched]``, by score *
    query_scale decreasing and then image increasing, into ``out_scores``/``out_images``;
    returns how many were written (min(k, n_touched)). A heap of k: O(n_touched log k),
    where sorting every touched image (a query touches most of a million-image index)
    took longer than the scoring."""
    size = min(out_scores.shape[0], n_touched)
    values = np.empty(size)
    images = np.empty(size, dtype=np.int64)
    for h in range(size):
        values[h] = pairs[hits[h], 0] * query_scale
        images[h] = hits[h]
    for position in range(size // 2 - 1, -1, -1):
        _sift_down(values, images, size, position)
    for h in range(size, n_touched):
        image = hits[h]
        value = pairs[image, 0] * query_scale
        if _better(value, image, values[0], images[0]):
            values[0], images[0] = value, image
            _sift_down(values, images, size, 0)
    for last in range(size - 1, -1, -1):  # pop the worst into the last free slot
        out_scores[last], out_images[last] = values[0], images[0]
        values[0], images[0] = values[last], images[last]
        _sift_down(values, images, last, 0)
    return size


@njit(cache=True, nogil=True)
def _fill_untouched(touched, filled, out_scores, out_images):
    """After the touched images, those the query shares no word with: score 0, in image
    order."""
    image = 0
    while filled < out_scores.shape[0] and image < touched.shape[0]:
        if touched[image] == 0:
            out_images[filled] = image
            out_scores[filled] = 0.0
            filled += 1
        image += 1


@njit(cache=True, nogil=True)
def _reset(pairs, touched, hits, n_touched):
    """Leave the scratch as found: zero only where this query wrote."""
    for h in range(n_touched):
        pairs[hits[h], 0] = 0.0
        touched[hits[h]] = 0


@njit(cache=True, nogil=True)
def _top_images(first, end, q_words, q_signatures, word_offsets, entry_images, entry_signatures, word_weights,
                table, alpha, threshold, pairs, touched, hits, block_images, out_scores, out_images):
    """One query's top ``len(out_scores)`` images (see :func:`score_queries`) on one
    scratch row, zero on entry and left zero (only the touched images are reset: zeroing
    a million scores per query cost more than a small query's work). Returns -1, or the
    word whose list is damaged."""
    n_touched, query_norm, damaged = _accumulate(q_words[first:end], q_signatures[first:end], word_offsets,
                                                 entry_images, entry_signatures, word_weights, table, alpha,
                                                 threshold, pairs, touched, hits, 0, pairs.shape[0], block_images)
    if damaged < 0:
        query_scale = 1.0 / np.sqrt(query_norm) if query_norm > 0 else 0.0
        filled = _select_top(pairs, hits, n_touched, query_scale, out_scores, out_images)
        _fill_untouched(touched, filled, out_scores, out_images)
    _reset(pairs, touched, hits, n_touched)
    return damaged


@njit(cache=True, nogil=True, parallel=True)
def _score_blocks(q_offsets, q_words, q_signatures, word_offsets, entry_images, entry_signatures, word_weights,
                  table, alpha, threshold, pairs, touched, hits, block_images, out_scores, out_images, damaged):
    """Queries in ``len(pairs)`` contiguous blocks in parallel, block b on scratch row b."""
    n, blocks = q_offsets.shape[0] - 1, pairs.shape[0]
    for b in prange(blocks):
        for i in range(b * n // blocks, (b + 1) * n // blocks):
            damaged[i] = _top_images(q_offsets[i], q_offsets[i + 1], q_words, q_signatures, word_offsets,
                                     entry_images, entry_signatures, word_weights, table, alpha, threshold,
                                     pairs[b], touched[b], hits[b], block_images, out_scores[i], out_images[i])


@njit(cache=True, nogil=True)
def _score_in_order(q_offsets, q_words, q_signatures, word_offsets, entry_images, entry_signatures, word_weights,
                    table, alpha, threshold, pairs, touched, hits, block_images, out_scores, out_images, damaged):
    for i in range(q_offsets.shape[0] - 1):
        damaged[i] = _top_images(q_offsets[i], q_offsets[i + 1], q_words, q_signatures, word_offsets,
                                 entry_images, entry_signatures, word_weights, table, alpha, threshold,
                                 pairs[0], touched[0], hits[0], block_images, out_scores[i], out_images[i])


@njit(cache=True, nogil=True, parallel=True)
def _score_split(q_words, q_signatures, word_offsets, entry_images, entry_signatures, word_weights, table, alpha,
                 threshold, pairs, touched, hits, parts, block_images, out_scores, out_images):
    """One query over ``parts`` ranges of images in parallel, on one scratch row (its hit
    list of ``n_images + parts`` slots: part p's from ``lo + p``, one spare each): each
    part reads its slice of every list (found by binary search: the lists are sorted by
    image), so an image's sum is added in the same order as in one thread, and keeps its
    own top k; the parts' tops are then merged. Returns -1 or a damaged word."""
    n_images, k = pairs.shape[0], out_scores.shape[0]
    counts = np.zeros(parts, dtype=np.int64)
    norms = np.zeros(parts)
    damaged = np.full(parts, -1, dtype=np.int64)
    top_scores = np.empty((parts, k))
    top_images = np.empty((parts, k), dtype=np.int64)
    filled = np.zeros(parts, dtype=np.int64)
    for p in prange(parts):
        lo, hi = p * n_images // parts, (p + 1) * n_images // parts
        counts[p], norms[p], damaged[p] = _accumulate(q_words, q_signatures, word_offsets, entry_images,
                                                      entry_signatures, word_weights, table, alpha, threshold,
                                                      pairs, touched, hits[lo + p:hi + p + 1], lo, hi,
                                                      block_images)
    query_scale = 1.0 / np.sqrt(norms[0]) if norms[0] > 0 else 0.0
    for p in prange(parts):
        lo = p * n_images // parts + p
        if damaged.max() < 0:
            filled[p] = _select_top(pairs, hits[lo:], counts[p], query_scale, top_scores[p], top_images[p])
    if damaged.max() < 0:
        _merge_tops(top_scores, top_images, filled, out_scores, out_images)
        _fill_untouched(touched, min(k, filled.sum()), out_scores, out_images)
    for p in prange(parts):
        lo = p * n_images // parts + p
        _reset(pairs, touched, hits[lo:], counts[p])
    return damaged.max()


@njit(cache=True, nogil=True)
def _merge_tops(top_scores, top_images, filled, out_scores, out_images):
    """The best ``len(out_scores)`` of the parts' tops (each best first)."""
    heads = np.zeros(top_scores.shape[0], dtype=np.int64)
    for slot in range(min(out_scores.shape[0], filled.sum())):
        best = -1
        for p in range(top_scores.shape[0]):
            if heads[p] < filled[p] and (best < 0 or _better(top_scores[p, heads[p]], top_images[p, heads[p]],
                                                            top_scores[best, heads[best]],
                                                            top_images[best, heads[best]])):
                best = p
        out_scores[slot], out_images[slot] = top_scores[best, heads[best]], top_images[best, heads[best]]
        heads[best] += 1


def score_scratch(blocks, image_scales):
    """A scratch for :func:`score_queries`, per block of queries run at once: per image its
    (score, gamma) pair (float64, scores zero, gammas ``image_scales``), a mark (uint8) and
    a hit list entry (int32; :data:`MAX_PARTS` more for the spare slots of a split
    query). Reused across calls (it is left as found), so a query pays for the images it
    touches, not for all of them."""
    pairs = np.zeros((blocks, len(image_scales), 2))
    pairs[:, :, 1] = image_scales
    return (pairs, np.zeros((blocks, len(image_scales)), dtype=np.uint8),
            np.zeros((blocks, len(image_scales) + MAX_PARTS), dtype=np.int32))


#: A single query is split over threads by image range above this many entries to read
#: (below, waking the worker threads costs more than they save).
SPLIT_ENTRIES = 1 << 20
#: At most this many parts of a split query.
MAX_PARTS = 64


def score_queries(q_offsets, q_words, q_signatures, word_offsets, entry_images, entry_signatures, word_weights,
                  image_scales, table, alpha, threshold, out_scores, out_images, scratch=None, threads=1,
                  block_images=None):
    """The top k indexed images of each query: in parallel over blocks of queries (one per
    row of ``scratch``); or one query in this thread, or split over ``threads`` threads by
    image range when it reads more than :data:`SPLIT_ENTRIES` entries.

    Query i's words are ``q_words[q_offsets[i]:q_offsets[i + 1]]`` with their signatures.
    Its score for image x is

        s(q, x) = gamma(q) gamma(x) sum_c w_c sigma_alpha(u(q_c, x_c))

    over the words c both hold; gamma(x) = ``image_scales[x]`` = (sum_{c in x} w_c)^(-1/2)
    and gamma(q) likewise over the query's words (0 for an image or query with none).
    Out: ``out_scores`` (n, k) float64, decreasing, and ``out_images`` (n, k) int64; ties
    in increasing image order; images the query shares no word with follow, score 0. The
    same numbers however the work is split: each image's terms are added in query order.

    ``scratch``: from :func:`score_scratch` of ``image_scales`` (made here if None).
    ``block_images``: images scored at a time (:data:`BLOCK_IMAGES` if None; see
    :func:`_accumulate`; any value gives the same numbers).
    Inverted lists must hold increasing image numbers below ``len(image_scales)``.

    Returns
    -------
    int: -1, or a word whose inverted list breaks that rule (the caller reports the
    damaged file).
    """
    n = len(q_offsets) - 1
    block_images = BLOCK_IMAGES if block_images is None else int(block_images)
    if scratch is None:
        scratch = score_scratch(1 if n <= 1 else 2, image_scales)
    if n == 1 and threads > 1 and len(image_scales) >= threads:
        q_words = q_words[q_offsets[0]:q_offsets[1]]
        held = q_words[(q_words >= 0) & (q_words < len(word_offsets) - 1)]
        if int(np.sum(word_offsets[held + 1] - word_offsets[held])) > SPLIT_ENTRIES:
            return int(_score_split(q_words, q_signatures[q_offsets[0]:q_offsets[1]], word_offsets, entry_images,
                                    entry_signatures, word_weights, table, alpha, threshold, scratch[0][0],
                                    scratch[1][0], scratch[2][0], min(threads, MAX_PARTS), block_images,
                                    out_scores[0], out_images[0]))
    damaged = np.full(max(n, 0), -1, dtype=np.int64)
    kernel = _score_in_order if len(scratch[0]) == 1 or n <= 1 else _score_blocks
    kernel(q_offsets, q_words, q_signatures, word_offsets, entry_images, entry_signatures, word_weights,
           table, alpha, threshold, *scratch, block_images, out_scores, out_images, damaged)
    bad = damaged[damaged >= 0]
    return int(bad[0]) if len(bad) else -1
