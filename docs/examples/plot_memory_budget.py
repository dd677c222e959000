"""
Phone-size photos under a memory budget
=======================================

Dense SIFT at full resolution makes a lot of descriptors: a 12-megapixel phone photo,
sampled every 4 pixels at 4 sizes, gives about 3 million of them, 1.6 GB with their
positions. :class:`vladkit.ImageEncoder` plans its work by bytes, not by image count:
each image's size is read first, the extractor and the encoder estimate the memory they
will need, and images join a batch while the total fits ``max_memory``. An image too large
for the budget on its own is extracted and encoded in horizontal bands; the encoders'
statistics are sums, so the vector is the same as the whole image's.

This example enlarges two sample photos (scikit-image, scikit-learn; nothing is
downloaded) to 4 megapixels, a phone photo's order of size (12 MP takes proportionally
longer: this example must run in under a minute), encodes them with Fisher vectors of
full-resolution dense RootSIFT under budgets of 256 MB to 3 GB, and measures the peak resident memory the
encoding added (Linux's ``VmHWM``, reset before each run through ``/proc/self/clear_refs``:
OpenCV's and numba's buffers are invisible to :mod:`tracemalloc`).
"""

# %%
# The photos
# ----------
# Upscaled by about 4x (bicubic) with a little sensor-like noise, 2304 x 1728 pixels each.

import sys
import time

import cv2
import matplotlib.pyplot as plt
import numpy as np

from vladkit import DenseSIFT, FisherEncoder, ImageEncoder
from vladkit.datasets.near_duplicates import demo_photos

WIDTH, HEIGHT = 2304, 1728
rng = np.random.default_rng(0)
chosen = dict(demo_photos(max_side=640))
names = ["skimage/chelsea.png", "sklearn/china.jpg"]
phone_photos = []
for name in names:
    photo = chosen[name]
    h, w = photo.shape[:2]
    scale = max(WIDTH / w, HEIGHT / h)
    large = cv2.resize(photo, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_CUBIC)
    y, x = (large.shape[0] - HEIGHT) // 2, (large.shape[1] - WIDTH) // 2
    large = large[y:y + HEIGHT, x:x + WIDTH].astype(np.float32)
    large += rng.normal(0, 3, large.shape).astype(np.float32)
    phone_photos.append(np.clip(large, 0, 255).astype(np.uint8))
megapixels = WIDTH * HEIGHT / 1e6
print(f"{len(phone_photos)} photos of {WIDTH} x {HEIGHT} ({megapixels:.1f} MP, "
      f"{phone_photos[0].nbytes / 1e6:.0f} MB each as RGB)")

# %%
# The encoder
# -----------
# Fitted once on small images (the GMM is learnt on a sample of 20,000 descriptors); the photos
# are then encoded under each budget. ``max_side=None`` keeps the full resolution
# (DenseSIFT's default downscales to 640 pixels, which is what you want for most tasks).

extractor = DenseSIFT(root=True, max_side=None, n_jobs=2)
model = ImageEncoder(extractor, FisherEncoder(16, pca=64, random_state=0), max_descriptors=20_000,
                     random_state=0)
model.fit([cv2.resize(image, (640, 480), interpolation=cv2.INTER_AREA) for image in phone_photos])
model.transform([phone_photos[0][:400, :400]])  # compile and warm up before measuring
output, scratch = extractor.memory_estimate(HEIGHT, WIDTH)
print(f"dense SIFT of one photo, whole: about {(output + scratch) / 1e6:,.0f} MB (vladkit's estimate)")


def status(field):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(field))


def measure(budget):
    """(peak resident memory added by the encoding in bytes or None, seconds, vectors)."""
    linux = sys.platform.startswith("linux")
    if linux:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # VmHWM starts again from the current resident size
        except OSError:  # a sandbox that forbids it: no measurement, the example still runs
            linux = False
        else:
            before = status("VmRSS:")
    start = time.perf_counter()
    vectors = model.set_params(max_memory=budget).transform(phone_photos)
    seconds = time.perf_counter() - start
    return (status("VmHWM:") - before if linux else None), seconds, vectors


# %%
# Encoding under each budget
# --------------------------

budgets = [256 * 10**6, 10**9, 3 * 10**9]
results = []
for budget in budgets:
    peak, seconds, vectors = measure(budget)
    results.append((budget, peak, seconds, vectors))
    peak_text = "not measured (needs Linux's /proc/self/clear_refs)" if peak is None else f"{peak / 1e6:,.0f} MB"
    print(f"budget {budget / 1e6:>5,.0f} MB: peak working memory {peak_text}, {seconds:.1f} s")
reference = results[-1][3]
for budget, _, _, vectors in results[:-1]:
    print(f"budget {budget / 1e6:,.0f} MB: largest difference from the 3 GB vectors "
          f"{np.abs(vectors - reference).max():.1e}")

# %%
# Peak memory against the budget
# ------------------------------
# The working memory follows the budget, not the image: under 256 MB the photos are
# extracted in bands; with 3 GB each is extracted whole (and both fit in one batch).

if all(peak is not None for _, peak, _, _ in results):
    fig, axis = plt.subplots(figsize=(6.5, 3.8))
    positions = np.arange(len(results))
    axis.bar(positions - 0.2, [b / 1e6 for b, _, _, _ in results], width=0.4, label="max_memory",
             color="lightgrey", edgecolor="grey")
    axis.bar(positions + 0.2, [p / 1e6 for _, p, _, _ in results], width=0.4,
             label="measured peak (resident, added)", color="tab:blue")
    for x, (_, peak, seconds, _) in zip(positions, results):
        axis.annotate(f"{peak / 1e6:,.0f} MB\n{seconds:.0f} s", (x + 0.2, peak / 1e6), ha="center",
                      va="bottom", fontsize=8)
    axis.set_xticks(positions, [f"{b / 1e6:,.0f} MB" for b, _, _, _ in results])
    axis.set_xlabel("budget")
    axis.set_ylabel("MB")
    axis.set_yscale("log")
    axis.set_title(f"{len(phone_photos)} photos of {megapixels:.1f} MP, dense RootSIFT + FV K=16")
    axis.legend(loc="upper left")
    fig.tight_layout()
plt.show()
