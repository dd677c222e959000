"""
VLAD, Fisher vectors and BoF: retrieval accuracy against bytes per image
========================================================================

How good is a global image vector at finding near-duplicates, and how much of that survives
compression? This example builds a small INRIA Copydays-style benchmark from the sample
photos that ship with scikit-learn, scikit-image and matplotlib (nothing is downloaded;
:func:`vladkit.datasets.near_duplicate_set`, the benchmark of ``vladkit demo``), encodes it
with Bag-of-Features, VLAD and Fisher vectors on sparse RootSIFT, and indexes the vectors

* exactly (:class:`vladkit.VectorIndex` ``"flat"``: 4 bytes per dimension),
* after PCA-whitening (:class:`vladkit.PCAWhitening`, 128 dimensions: 512 bytes),
* and product-quantized after the PCA (``VectorIndex("pq", pq="MxB")``: M bytes).

It is a reduced version of ``vladkit demo`` (photos at 320 pixels, smaller vocabularies),
so that it runs in under a minute on 2 cores; the demo's full table is in the user guide (Install and first steps).
"""

# %%
# The benchmark
# -------------
# Each photo is an original in the database, with three mirrored crops of it as
# distractors; the queries are seven attacks of each original (crop, JPEG, rotation,
# downscale, blur, contrast, and all of them at once). Vocabularies, PCA and quantizers are
# learnt on a separate set of grey crops of the photos turned upside down.

import time

import matplotlib.pyplot as plt
import numpy as np

from vladkit import (SIFT, BoFEncoder, FisherEncoder, GMMVocabulary, KMeansVocabulary, PCAWhitening,
                     VectorIndex, VLADEncoder, mean_average_precision, recall_at_k)
from vladkit.datasets.near_duplicates import demo_photos, near_duplicate_set

start_all = time.perf_counter()
photos = demo_photos(max_side=320)
data = near_duplicate_set(photos, learning_per_photo=12, seed=0)
database_ids = [name for name, _ in data.database]
query_ids = [name for name, _, _ in data.queries]
print(f"{len(photos)} photos: {len(data.database)} database images, {len(data.queries)} queries, "
      f"{len(data.learning)} learning images")

extractor = SIFT(root=True, n_jobs=-1)
learning = extractor.transform(data.learning)
database = extractor.transform([image for _, image in data.database])
queries = extractor.transform([image for _, image, _ in data.queries])
sample = np.concatenate([f.descriptors for f in learning])
sample = sample[np.random.default_rng(0).permutation(len(sample))[:25_000]]
print(f"RootSIFT: {sum(len(f.descriptors) for f in learning + database + queries):,} descriptors, "
      f"vocabularies learnt on {len(sample):,}")

# %%
# Encode, index, search
# ---------------------
# Every query ranks the whole database; mAP follows the INRIA Holidays convention and
# recall@1 is the share of queries whose original comes first.

PCA_DIM = 128
PQ_CODES = ("32x8", "8x8")
encodings = [
    ("BoF K=512", BoFEncoder(vocabulary=KMeansVocabulary(512, algorithm="minibatch", random_state=0)
                             .fit_sample(sample), power=0.5)),
    ("VLAD K=32", VLADEncoder(vocabulary=KMeansVocabulary(32, max_iter=30, random_state=0).fit_sample(sample))),
    ("FV K=32", FisherEncoder(vocabulary=GMMVocabulary(32, pca=64, max_iter=30, random_state=0)
                              .fit_sample(sample))),
]


def evaluate(name, index, X_queries):
    _, ranked = index.search(X_queries, k=len(index))
    rankings = dict(zip(query_ids, ranked))
    row = (name, index.bytes_per_vector, mean_average_precision(rankings, data.ground_truth),
           recall_at_k(rankings, data.ground_truth, k=1)[1])
    print(f"{row[0]:<32} {row[1]:>7,} bytes  mAP {row[2]:.3f}  recall@1 {row[3]:.3f}")
    return row


results = {}
for name, encoder in encodings:
    encoder.fit(learning[:1])
    X_learning, X_database, X_queries = (encoder.transform(f) for f in (learning, database, queries))
    index = VectorIndex("flat")
    index.add(X_database, database_ids)
    rows = [evaluate(name, index, X_queries)]
    whitening = PCAWhitening(PCA_DIM, whiten=0.25, random_state=0).fit(X_learning)
    index = VectorIndex("flat", whitening=whitening)
    index.add(X_database, database_ids)
    rows.append(evaluate(f"{name} + PCA-{PCA_DIM}", index, X_queries))
    for code in PQ_CODES:
        index = VectorIndex("pq", pq=code, whitening=whitening)
        index.train(X_learning)
        index.add(X_database, database_ids)
        rows.append(evaluate(f"{name} + PCA-{PCA_DIM} + PQ {code}", index, X_queries))
    results[name] = rows
print(f"total {time.perf_counter() - start_all:.1f} s")

# %%
# mAP against bytes per image
# ---------------------------
# Uncompressed, Fisher vectors and VLAD lead BoF. PCA-whitening to 128 dimensions and a
# product quantizer shrink them 512-fold (16 KB to 32 bytes) at the cost of a good part of
# their mAP; at 8 bytes the three are close. On 161 queries, differences of a few points
# are noise, and the learning set here is small (a few hundred images): the user guide's
# ``vladkit demo`` table, with larger vocabularies and learning set, is the reference.

fig, axis = plt.subplots(figsize=(7, 4.2))
for name, rows in results.items():
    rows = sorted(rows, key=lambda row: row[1])
    axis.plot([row[1] for row in rows], [row[2] for row in rows], marker="o", label=name)
    for label, size, value, _ in rows if name.startswith("VLAD") else []:  # one family's labels
        axis.annotate(label[len(name):].replace(" + ", " ").strip() or "exact", (size, value),
                      textcoords="offset points", xytext=(4, 4), fontsize=7)
axis.set_xscale("log")
axis.set_xlabel("bytes per image")
axis.set_ylabel("mAP")
axis.set_title(f"near-duplicate retrieval: {len(data.queries)} queries, {len(data.database)} images")
axis.grid(True, alpha=0.3)
axis.legend()
fig.tight_layout()
plt.show()
