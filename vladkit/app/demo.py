"""``vladkit demo``: the whole product on a built-in near-duplicate retrieval benchmark.

From the photos that ship with scikit-learn, scikit-image and matplotlib
(:func:`vladkit.datasets.demo_photos`) it builds an INRIA Copydays-style benchmark
(:func:`vladkit.datasets.near_duplicate_set`: originals + distractors in the database,
seven attacks of every original as queries), trains vocabularies on a separate learning
set, encodes everything with BoF, VLAD and Fisher vectors, indexes the vectors exactly and
compressed (PCA-whitening, then product quantization), and measures mAP and recall@1.
"""

from __future__ import annotations

import base64
import html
import io
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .._util.io import atomic_output
from ..datasets.near_duplicates import ATTACKS, demo_photos, near_duplicate_set
from ..encoders import BoFEncoder, FisherEncoder, VLADEncoder
from ..retrieval.metrics import mean_average_precision, recall_at_k
from ..features.extractors import SIFT
from ..retrieval.whitening import PCAWhitening
from ..retrieval.index import VectorIndex
from ..vocabulary.sampling import DescriptorSampler
from ..vocabulary.gmm import GMMVocabulary
from ..vocabulary.kmeans import KMeansVocabulary

__all__ = ["DemoResult", "run_demo"]

#: PCA dimension before indexing compressed vectors, and the product quantizers tried.
PCA_DIM = 256
#: Partial whitening (variances to the power -0.25): the learning set has only a few
#: hundred vectors, and full whitening amplifies the weakest, worst-estimated components.
WHITEN = 0.25
PQ_CODES = ("64x8", "16x8")
SAMPLE = 60_000  # descriptors per vocabulary


@dataclass
class DemoResult:
    """One row of the demo's table."""

    encoding: str
    bytes_per_image: int
    mean_average_precision: float
    recall_at_1: float
    seconds: float
    rankings: dict


def _encodings(seed):
    """(name, vocabulary, encoder factory) of the three encodings compared."""
    return [
        ("BoF K=1000 (Hellinger)",
         KMeansVocabulary(1000, algorithm="minibatch", max_descriptors=SAMPLE, random_state=seed),
         lambda vocabulary: BoFEncoder(vocabulary=vocabulary, power=0.5, norm="l2")),
        ("VLAD K=64",
         KMeansVocabulary(64, max_iter=50, max_descriptors=SAMPLE, random_state=seed),
         lambda vocabulary: VLADEncoder(vocabulary=vocabulary)),
        ("FV K=64 PCA-64",
         GMMVocabulary(64, pca=64, max_iter=50, max_descriptors=SAMPLE, random_state=seed),
         lambda vocabulary: FisherEncoder(vocabulary=vocabulary)),
    ]


def _search(index, queries, query_ids):
    """Rank the whole database for every query: query id -> ranked database ids."""
    _, ranked = index.search(queries, k=len(index))
    return dict(zip(query_ids, ranked))


def run_demo(out=None, *, seed=0, log=None):
    """Run the benchmark; write ``report.html`` (and its images) into ``out`` if given.

    Parameters
    ----------
    out : path or None
        Folder for the report.
    seed : int
        Seeds the benchmark's attacks, the vocabularies and the quantizers: the same seed
        gives the same table with the same vladkit and library versions, on the same
        machine and thread count. Not across machines: OpenCV's SIFT (SIMD code chosen
        for the CPU), the BLAS kernels (chosen for the CPU) and the threads' share of each
        sum (the core count) change the last bits, and k-means / GMM training turns those
        into slightly different vocabularies and quantizers: a few mAP points, mostly in
        the PCA and PQ rows.
    log : callable or None
        Called with progress messages (e.g. ``print`` to stderr).

    Returns
    -------
    list of DemoResult
    """
    log = log or (lambda message: None)
    photos = demo_photos()
    data = near_duplicate_set(photos, learning_per_photo=32, seed=seed)
    database_ids = [name for name, _ in data.database]
    query_ids = [name for name, _, _ in data.queries]
    log(f"benchmark: {len(photos)} photos -> {len(data.database)} database images "
        f"({len(photos)} originals + distractors), {len(data.queries)} queries "
        f"({len(ATTACKS)} attacks each), {len(data.learning)} learning images")

    extractor = SIFT(root=True, n_jobs=-1)
    start = time.perf_counter()
    learning = extractor.transform(data.learning)
    database = extractor.transform([image for _, image in data.database])
    queries = extractor.transform([image for _, image, _ in data.queries])
    extraction = time.perf_counter() - start
    log(f"RootSIFT: {sum(len(f.descriptors) for f in database + queries + learning):,} "
        f"descriptors in {extraction:.1f} s")
    sampler = DescriptorSampler(len(learning), SAMPLE, seed=seed)
    for i, features in enumerate(learning):
        sampler.add(i, features.descriptors)
    sample = sampler.sample()

    results = []
    for name, vocabulary, make_encoder in _encodings(seed):
        start = time.perf_counter()
        encoder = make_encoder(vocabulary.fit_sample(sample)).fit(learning[:1])
        X_learning, X_database, X_queries = (encoder.transform(features)
                                             for features in (learning, database, queries))
        encoding_seconds = time.perf_counter() - start
        index = VectorIndex("flat")
        index.add(X_database, database_ids)
        results.append(_result(name, index, X_queries, query_ids, data.ground_truth, encoding_seconds))
        log(f"{name}: {results[-1].mean_average_precision:.3f} mAP ({encoding_seconds:.1f} s)")
        if name.startswith("BoF"):
            continue  # compressed variants for the aggregated residuals only
        start = time.perf_counter()
        whitening = PCAWhitening(PCA_DIM, whiten=WHITEN, random_state=seed).fit(X_learning)
        index = VectorIndex("flat", whitening=whitening)
        index.add(X_database, database_ids)
        results.append(_result(f"{name} + PCA-{PCA_DIM}", index, X_queries, query_ids,
                               data.ground_truth, time.perf_counter() - start))
        for code in PQ_CODES:
            start = time.perf_counter()
            index = VectorIndex("pq", pq=code, whitening=whitening)
            index.train(X_learning)
            index.add(X_database, database_ids)
            results.append(_result(f"{name} + PCA-{PCA_DIM} + PQ {code}", index, X_queries,
                                   query_ids, data.ground_truth, time.perf_counter() - start))
    if out is not None:
        write_report(out, results, data)
    return results


def _result(name, index, X_queries, query_ids, ground_truth, seconds):
    rankings = _search(index, X_queries, query_ids)
    return DemoResult(
        encoding=name,
        bytes_per_image=index.bytes_per_vector,
        mean_average_precision=mean_average_precision(rankings, ground_truth),
        recall_at_1=recall_at_k(rankings, ground_truth, k=1)[1],
        seconds=seconds,
        rankings=rankings,
    )


def format_table(results):
    """The results as a markdown table (deterministic: no timings)."""
    lines = ["| encoding | bytes / image | mAP | recall@1 |", "|---|---:|---:|---:|"]
    lines += [f"| {r.encoding} | {r.bytes_per_image:,} | {r.mean_average_precision:.3f} | "
              f"{r.recall_at_1:.3f} |" for r in results]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ report


def _png(image_rgb):
    _, data = cv2.imencode(".png", np.ascontiguousarray(image_rgb[..., ::-1]))
    return data.tobytes()


def _thumbnail(image, height=96, border=None):
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    h, w = image.shape[:2]
    thumb = cv2.resize(image, (max(1, round(w * height / h)), height), interpolation=cv2.INTER_AREA)
    return cv2.copyMakeBorder(thumb, 4, 4, 4, 4, cv2.BORDER_CONSTANT, value=border or (255, 255, 255))


def montage(result, data, top=5):
    """One row per attack: a query (grey frame), then its top results (green: the
    original, red: another image). Each row shows a different photo."""
    images = dict(data.database)
    n_attacks = len(ATTACKS)
    n_photos = len(data.queries) // n_attacks
    rows = []
    for row in range(n_attacks):
        # queries are photo-major: photo p's attack a is query p * n_attacks + a
        query, image, _ = data.queries[(row % n_photos) * n_attacks + row]
        tiles = [_thumbnail(image, border=(80, 80, 80))]
        positives = set(data.ground_truth[query])
        for found in result.rankings[query][:top]:
            tiles.append(_thumbnail(images[found], border=(40, 170, 60) if found in positives else (210, 50, 40)))
        rows.append(np.concatenate(tiles, axis=1))
    width = max(row.shape[1] for row in rows)
    rows = [cv2.copyMakeBorder(row, 0, 0, 0, width - row.shape[1], cv2.BORDER_CONSTANT, value=(255, 255, 255))
            for row in rows]
    return np.concatenate(rows, axis=0)


def plot(results):
    """mAP against bytes per image (PNG bytes), or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    families = {}
    for r in results:
        families.setdefault(r.encoding.split(" + ")[0], []).append(r)
    for family, rows in families.items():
        rows = sorted(rows, key=lambda r: r.bytes_per_image)
        axis.plot([r.bytes_per_image for r in rows], [r.mean_average_precision for r in rows],
                  marker="o", label=family)
    axis.set_xscale("log")
    axis.set_xlabel("bytes per image")
    axis.set_ylabel("mAP")
    axis.set_title("near-duplicate retrieval (built-in demo benchmark)")
    axis.grid(True, alpha=0.3)
    axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def write_report(out, results, data):
    """``report.html`` with the table, the plot and a montage of queries and results
    (images embedded, so the file can be moved or mailed on its own)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    best = max((r for r in results if r.bytes_per_image <= 64), key=lambda r: r.mean_average_precision,
               default=results[0])
    rows = "".join(
        f"<tr><td>{html.escape(r.encoding)}</td><td>{r.bytes_per_image:,}</td>"
        f"<td>{r.mean_average_precision:.3f}</td><td>{r.recall_at_1:.3f}</td><td>{r.seconds:.1f}</td></tr>"
        for r in results
    )
    figures = []
    chart = plot(results)
    if chart is not None:
        figures.append(("mAP against bytes per image", chart))
    figures.append((f"Queries (grey) and their top 5 with {best.encoding} (green: the original, "
                    "red: another image)", _png(montage(best, data))))
    images = "".join(
        f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
        f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
        for title, png in figures
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>vladkit demo</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}</style>
</head><body><h1>vladkit demo: near-duplicate retrieval</h1>
<p>{len(data.database)} database images, {len(data.queries)} queries ({", ".join(ATTACKS)}),
RootSIFT, vocabularies and PCA / PQ learnt on {len(data.learning)} separate images.</p>
<table><tr><th>encoding</th><th>bytes / image</th><th>mAP</th><th>recall@1</th><th>seconds</th></tr>
{rows}</table>{images}</body></html>
"""
    with atomic_output(out / "report.html", "w") as handle:
        handle.write(page)
    return out / "report.html"
