"""Slow, obvious numpy implementations of the encodings, written from the formulas
(ARCHITECTURE.md, "Formulas", and VLFeat's documentation), in float64, one image at a time."""

import numpy as np


def squared_distances(X, centers):
    return ((X[:, None, :].astype(np.float64) - centers[None].astype(np.float64)) ** 2).sum(-1)


def hard_weights(X, centers):
    d = squared_distances(X, centers)
    Q = np.zeros_like(d)
    Q[np.arange(len(X)), d.argmin(1)] = 1
    return Q


def knn_weights(X, centers, n_neighbors, alpha):
    d = squared_distances(X, centers)
    Q = np.zeros_like(d)
    for i in range(len(X)):
        nearest = np.argsort(d[i], kind="stable")[:n_neighbors]
        w = np.exp(-alpha * d[i, nearest])
        Q[i, nearest] = w / w.sum()
    return Q


def soft_weights(X, centers, alpha):
    s = -alpha * squared_distances(X, centers)
    e = np.exp(s - s.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def normalize(v, power, blocks, l2):
    v = v.copy()
    if power is not None:
        v = np.sign(v) * np.abs(v) ** power
    if blocks:
        v = v.reshape(blocks, -1)
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        v = v.ravel()
    if l2:
        v = v / max(np.linalg.norm(v), 1e-12)
    return v


def vlad(X, centers, Q, normalize_mass=False, power=0.5, intra_norm=True, l2=True):
    K, D = centers.shape
    v = np.zeros((K, D))
    for k in range(K):
        mask = Q[:, k] > 0
        mass = Q[mask, k].sum()
        if mass == 0:
            continue
        total = (Q[mask, k, None] * X[mask]).sum(0)
        v[k] = total / mass - centers[k] if normalize_mass else total - mass * centers[k]
    return normalize(v.ravel(), power, K if intra_norm else 0, l2)


def posteriors(X, means, variances, weights, fast=False):
    log_w = np.where(weights < 1e-6, -np.inf, np.log(np.maximum(weights, 1e-300)))
    log_p = (log_w - 0.5 * np.log(2 * np.pi * variances).sum(1)
             - 0.5 * (((X[:, None, :] - means[None]) ** 2) / variances[None]).sum(-1))
    q = np.exp(log_p - log_p.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    if fast:
        q = np.eye(len(means))[q.argmax(1)]
    return np.where(q < 1e-6, 0, q)


def fisher(X, means, variances, weights, improved=True, power=0.5, l2=True, fast=False,
           include_weights=False):
    X, means, variances, weights = (np.asarray(a, np.float64) for a in (X, means, variances, weights))
    K, D = means.shape
    N = len(X)
    u, v, w = np.zeros((K, D)), np.zeros((K, D)), np.zeros(K)
    if N:
        q = posteriors(X, means, variances, weights, fast)
        sigma = np.sqrt(variances)
        for k in range(K):
            if weights[k] < 1e-6:
                continue
            z = (X - means[k]) / sigma[k]
            u[k] = (q[:, k, None] * z).sum(0) / (N * np.sqrt(weights[k]))
            v[k] = (q[:, k, None] * (z**2 - 1)).sum(0) / (N * np.sqrt(2 * weights[k]))
            w[k] = (q[:, k] - weights[k]).sum() / (N * np.sqrt(weights[k]))
    parts = [u.ravel(), v.ravel()] + ([w] if include_weights else [])
    if improved:
        power, l2 = 0.5, True
    return normalize(np.concatenate(parts), power, 0, l2)


def bof(X, centers, Q_fn, idf=None, power=None, norm="l2"):
    h = Q_fn(X, centers).sum(0) if len(X) else np.zeros(len(centers))
    if idf is not None:
        h = h * idf
    if power is not None:
        h = h**power
    if norm == "l2":
        h = h / max(np.linalg.norm(h), 1e-12)
    elif norm == "l1":
        h = h / max(np.abs(h).sum(), 1e-12)
    return h


def llc_codes(X, centers, n_neighbors=5, beta=1e-4, distances=None):
    """(N, K) approximated LLC codes, descriptor by descriptor, as Wang et al.'s
    LLC_coding_appr.m: the k nearest words by sorting the distances (``distances``, (N, K),
    if given, else reference.squared_distances), z = B - x, C = z z^T + beta tr(C) I,
    w = C^-1 1 normalised to sum 1. When x is each of its k words (tr C = 0), vladkit's
    rule: uniform weights 1 / k."""
    X, B = np.asarray(X, np.float64), np.asarray(centers, np.float64)
    d = squared_distances(X, B) if distances is None else distances
    k = min(n_neighbors, len(B))
    codes = np.zeros((len(X), len(B)))
    for i in range(len(X)):
        nearest = np.argsort(d[i], kind="stable")[:k]
        z = B[nearest] - X[i]
        C = z @ z.T
        trace = np.trace(C)
        if trace == 0:
            w = np.full(k, 1.0 / k)
        else:
            w = np.linalg.solve(C + beta * trace * np.eye(k), np.ones(k))
            w /= w.sum()
        codes[i, nearest] = w
    return codes


def llc(X, centers, n_neighbors=5, beta=1e-4, pooling="max", l2=True, distances=None):
    """LLC codes pooled over the image (max or sum; zeros without descriptors), then L2."""
    codes = llc_codes(X, centers, n_neighbors, beta, distances)
    if not len(X):
        v = np.zeros(len(centers))
    else:
        v = codes.max(0) if pooling == "max" else codes.sum(0)
    return normalize(v, None, 0, l2)


def supervector(X, centers, Q, s=1.0, l2=True):
    """Super-vector coding (Zhou et al. 2010) with assignment weights Q (N, K), word by word:
    block_k = sqrt(n_k / N) [s, sum_i q_ik (x_i - c_k) / n_k], n_k = sum_i q_ik, 0 if n_k = 0."""
    X, centers = np.asarray(X, np.float64), np.asarray(centers, np.float64)
    K, D = centers.shape
    v = np.zeros((K, D + 1))
    for k in range(K):
        n_k = Q[:, k].sum()
        if n_k == 0:
            continue
        mean = (Q[:, k, None] * (X - centers[k])).sum(0) / n_k
        v[k, 0] = s
        v[k, 1:] = mean
        v[k] *= np.sqrt(n_k / len(X))
    return normalize(v.ravel(), None, 0, l2)
