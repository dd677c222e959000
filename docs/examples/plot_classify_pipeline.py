"""
Classify images in a scikit-learn pipeline
==========================================

:class:`vladkit.ImageEncoder` turns images into one vector each (here dense RootSIFT
aggregated into Fisher vectors), so it slots into a scikit-learn
:func:`~sklearn.pipeline.make_pipeline` in front of any classifier.

The data ship with the installed packages, nothing is downloaded: eight sample photos (three of them grey textures) of
scikit-image and scikit-learn (:func:`vladkit.datasets.demo_photos`) each make one class.
Training images are random crops of the photo (30-70% of its area, rescaled); test images
are *attacked copies* of it (:func:`vladkit.datasets.near_duplicates.attacked_copies`: a crop, JPEG at
quality 8, a rotation, a downscale, a blur, a contrast change, a combination), which the
classifier never saw.
"""

# %%
# The classes
# -----------
# Photos are read at 256 pixels on the long side to keep the example fast.

import time

import cv2
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import ConfusionMatrixDisplay, accuracy_score, confusion_matrix
from sklearn.pipeline import make_pipeline
from sklearn.svm import LinearSVC

from vladkit import DenseSIFT, FisherEncoder, ImageEncoder
from vladkit.datasets.near_duplicates import attacked_copies, demo_photos

CLASSES = ["skimage/astronaut.png", "skimage/brick.png", "skimage/chelsea.png", "skimage/coffee.png",
           "skimage/grass.png", "skimage/gravel.png", "skimage/rocket.jpg", "sklearn/china.jpg"]
photos = dict(demo_photos(max_side=256))
photos = {name: photos[name] for name in CLASSES if name in photos}
names = [name.split("/")[1].split(".")[0] for name in photos]
rng = np.random.default_rng(0)


def random_crop(image):
    """A crop of 30-70% of the area, rescaled to 0.7-1.2 of its size."""
    h, w = image.shape[:2]
    fraction = rng.uniform(0.3, 0.7) ** 0.5
    ch, cw = int(h * fraction), int(w * fraction)
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    scale = rng.uniform(0.7, 1.2)
    return cv2.resize(image[y:y + ch, x:x + cw], (int(cw * scale), int(ch * scale)),
                      interpolation=cv2.INTER_AREA)


train_images, train_labels, test_images, test_labels = [], [], [], []
for label, photo in zip(names, photos.values()):
    for _ in range(6):
        train_images.append(random_crop(photo))
        train_labels.append(label)
    for index in range(2):  # 14 copies: every attack twice
        for _, copy in attacked_copies(photo, 7, seed=1, index=len(test_images) + index):
            test_images.append(copy)
            test_labels.append(label)
print(f"{len(names)} classes, {len(train_images)} training crops, {len(test_images)} attacked test copies")

fig, axes = plt.subplots(1, len(names), figsize=(1.6 * len(names), 2))
for axis, label, photo in zip(axes, names, photos.values()):
    axis.imshow(photo)
    axis.set_title(label, fontsize=9)
    axis.axis("off")
fig.tight_layout()

# %%
# The pipeline
# ------------
# Dense RootSIFT (every 4 pixels, 4 sizes), a 16-Gaussian GMM learnt on PCA-64 descriptors
# (Fisher vectors of 2 x 16 x 64 = 2,048 dimensions), then a linear SVM. The GMM is fitted
# on a sample of 20,000 of the training descriptors (``max_descriptors``).

classifier = make_pipeline(
    ImageEncoder(DenseSIFT(root=True), FisherEncoder(16, pca=64, random_state=0),
                 max_descriptors=20_000, random_state=0),
    LinearSVC(),
)
start = time.perf_counter()
classifier.fit(train_images, train_labels)
fit_seconds = time.perf_counter() - start
start = time.perf_counter()
predicted = classifier.predict(test_images)
predict_seconds = time.perf_counter() - start
accuracy = accuracy_score(test_labels, predicted)
print(f"fit {fit_seconds:.1f} s, predict {predict_seconds:.1f} s; "
      f"accuracy on attacked copies: {accuracy:.3f} ({sum(p == t for p, t in zip(predicted, test_labels))}"
      f"/{len(test_labels)})")

# %%
# The confusion matrix
# --------------------
# Rows are the true classes, columns the predicted ones.

matrix = confusion_matrix(test_labels, predicted, labels=names)
fig, axis = plt.subplots(figsize=(5.5, 4.8))
ConfusionMatrixDisplay(matrix, display_labels=names).plot(ax=axis, colorbar=False, xticks_rotation=45)
axis.set_title(f"Fisher vectors + linear SVM: accuracy {accuracy:.2f}")
fig.tight_layout()

# %%
# Which attacks fool it? The misclassified copies:

wrong = [i for i, (p, t) in enumerate(zip(predicted, test_labels)) if p != t]
print(f"misclassified: {len(wrong)}")
if wrong:
    fig, axes = plt.subplots(1, min(6, len(wrong)), figsize=(2 * min(6, len(wrong)), 2.4), squeeze=False)
    for axis, i in zip(axes[0], wrong):
        axis.imshow(test_images[i])
        axis.set_title(f"{test_labels[i]} -> {predicted[i]}", fontsize=8)
        axis.axis("off")
    fig.tight_layout()
plt.show()
