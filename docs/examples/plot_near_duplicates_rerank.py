"""
Finding near-duplicates with spatial re-ranking
===============================================

A global vector (here VLAD of sparse RootSIFT) ranks a database quickly but only roughly.
Spatial verification (Philbin et al., CVPR 2007) then re-ranks the top of that list: the
query's local features are matched to each candidate's and a similarity transformation is
fitted robustly; a copy of the query has many matches consistent with one transformation
(*inliers*), an unrelated photo only the few that chance gives.

vladkit's API for this: :func:`vladkit.write_feature_store` stores the database's local
features (what ``vladkit index build --rerank-features`` does), :class:`vladkit.FeatureStore`
reads them back memory-mapped, :func:`vladkit.rerank` re-ranks a query's candidates and
:func:`vladkit.spatial_score` verifies one pair (its inliers are drawn below).

The data are the near-duplicate benchmark of ``vladkit demo``, built from the sample photos
of scikit-learn, scikit-image and matplotlib (nothing is downloaded).
"""

# %%
# Global search
# -------------

import tempfile
import time

import cv2
import matplotlib.pyplot as plt
import numpy as np

from vladkit import (SIFT, FeatureStore, KMeansVocabulary, VectorIndex, VLADEncoder, mean_average_precision,
                     recall_at_k, rerank, spatial_score, write_feature_store)
from vladkit.datasets.near_duplicates import demo_photos, near_duplicate_set

start_all = time.perf_counter()
photos = demo_photos(max_side=320)
data = near_duplicate_set(photos, learning_per_photo=8, seed=0)
database_images = [image for _, image in data.database]
database_ids = [name for name, _ in data.database]
query_ids = [name for name, _, _ in data.queries]
print(f"{len(data.database)} database images, {len(data.queries)} queries")

extractor = SIFT(root=True, n_jobs=-1)
learning = extractor.transform(data.learning)
sample = np.concatenate([f.descriptors for f in learning])
encoder = VLADEncoder(vocabulary=KMeansVocabulary(32, max_iter=30, random_state=0).fit_sample(sample))
encoder.fit(learning[:1])
index = VectorIndex("flat")
index.add(encoder.transform(extractor.transform(database_images)), database_ids)
query_vectors = encoder.transform(extractor.transform([image for _, image, _ in data.queries]))
R = 10  # candidates verified per query
_, global_top = index.search(query_vectors, k=len(index))
global_rankings = dict(zip(query_ids, global_top))

# %%
# Re-ranking the top 10
# ---------------------
# The feature store holds every database image's sparse RootSIFT (at most 1,000 features,
# uint8 descriptors); queries are extracted with the store's own extractor.

folder = tempfile.TemporaryDirectory()
write_feature_store(database_images, folder.name)
store = FeatureStore(folder.name)
row_of = {name: row for row, name in enumerate(database_ids)}
query_features = store.extractor.transform([image for _, image, _ in data.queries])

start = time.perf_counter()
reranked_rankings, inliers_of = {}, {}
for query, features in zip(query_ids, query_features):
    top = list(global_rankings[query][:R])
    result = rerank(features, [row_of[name] for name in top], store)
    reranked_rankings[query] = [top[i] for i in result.order] + list(global_rankings[query][R:])
    inliers_of[query] = {top[i]: int(result.inliers[i]) for i in range(len(top))}
rerank_seconds = time.perf_counter() - start

for label, rankings in (("global VLAD K=32", global_rankings), (f"+ re-ranking top {R}", reranked_rankings)):
    print(f"{label:<22} mAP {mean_average_precision(rankings, data.ground_truth):.3f}  "
          f"recall@1 {recall_at_k(rankings, data.ground_truth, k=1)[1]:.3f}")
print(f"verification: {rerank_seconds / len(query_ids) * 1000:.0f} ms per query ({R} candidates)")

# %%
# Queries and their results
# -------------------------
# One row per query (left, grey frame): its verified first result with the inlier matches
# drawn, then its top 4 after re-ranking, framed in green for the query's original and red
# for another image, with their inlier counts. The rows are queries whose original the
# global search did *not* rank first, where re-ranking had something to do.

images = dict(data.database)
query_images = {name: image for name, image, _ in data.queries}
moved = [q for q in query_ids
         if global_rankings[q][0] not in data.ground_truth[q] and reranked_rankings[q][0] in data.ground_truth[q]]
others = [q for q in query_ids if q not in moved]
chosen = (moved + others)[:5]
print(f"re-ranking put the original first for {len(moved)} of the "
      f"{sum(global_rankings[q][0] not in data.ground_truth[q] for q in query_ids)} queries the global search missed")


def side_by_side(a, b, height=160):
    """Both images at the same height, side by side; the scale factors and b's x offset."""
    scale_a, scale_b = height / a.shape[0], height / b.shape[0]
    a = cv2.resize(a, (round(a.shape[1] * scale_a), height))
    b = cv2.resize(b, (round(b.shape[1] * scale_b), height))
    return np.concatenate([a, np.full((height, 8, 3), 255, np.uint8), b], axis=1), scale_a, scale_b, a.shape[1] + 8


fig = plt.figure(figsize=(12, 2.3 * len(chosen)))
grid = fig.add_gridspec(len(chosen), 6, width_ratios=[2.6, 1, 1, 1, 1, 0.01])
for row, query in enumerate(chosen):
    first = reranked_rankings[query][0]
    verification = spatial_score(query_features[query_ids.index(query)], store[row_of[first]], ratio=0.9)
    pair, scale_q, scale_c, offset = side_by_side(query_images[query], images[first])
    axis = fig.add_subplot(grid[row, 0])
    axis.imshow(pair)
    q_xy = query_features[query_ids.index(query)].positions
    c_xy = store[row_of[first]].positions
    for i, j in verification.matches[verification.inliers][:60]:  # at most 60 lines drawn
        axis.plot([q_xy[i, 0] * scale_q, c_xy[j, 0] * scale_c + offset],
                  [q_xy[i, 1] * scale_q, c_xy[j, 1] * scale_c], color="yellow", linewidth=0.5, alpha=0.8)
    axis.set_title(f"{query}: {verification.n_inliers} inliers", fontsize=8)
    axis.axis("off")
    for column, found in enumerate(reranked_rankings[query][:4], start=1):
        axis = fig.add_subplot(grid[row, column])
        axis.imshow(images[found])
        colour = "green" if found in data.ground_truth[query] else "red"
        for spine in axis.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(3)
        axis.set_xticks([])
        axis.set_yticks([])
        global_rank = list(global_rankings[query]).index(found) + 1
        axis.set_title(f"{inliers_of[query].get(found, 0)} inliers (was #{global_rank})", fontsize=7)
fig.tight_layout()
print(f"total {time.perf_counter() - start_all:.1f} s")
folder.cleanup()
plt.show()
