"""Diagonal-Gaussian log-densities as one matrix product: the GMM's log posteriors and
log-likelihoods (the vocabulary's EM, the Fisher encoder's terms)."""

from __future__ import annotations

import math

import numpy as np

from .products import _chunks, matmul


def diagonal_gaussian_terms(means, variances, weights):
    """Coefficients that turn diagonal-Gaussian log-densities into one matrix product.

    log(pi_k N(x; mu_k, diag(s2_k))) = [x^2, x] . [-1/(2 s2_k), mu_k / s2_k] + c_k with
    c_k = log pi_k - D/2 log(2 pi) - 1/2 sum_d log s2_kd - 1/2 sum_d mu_kd^2 / s2_kd.

    Returns
    -------
    coefficients : (2D, K) float64, the matrix to multiply ``[x^2, x]`` by
    constants : (K,) float64, c_k (-inf where pi_k is 0)
    """
    means = np.asarray(means, np.float64)
    precisions = 1.0 / np.asarray(variances, np.float64)
    dim = means.shape[1]
    with np.errstate(divide="ignore"):
        log_weights = np.log(np.asarray(weights, np.float64))
    constants = (
        log_weights
        - 0.5 * dim * math.log(2 * math.pi)
        + 0.5 * np.log(precisions).sum(axis=1)
        - 0.5 * (means**2 * precisions).sum(axis=1)
    )
    coefficients = np.concatenate([-0.5 * precisions, means * precisions], axis=1).T
    return np.ascontiguousarray(coefficients), constants


def gaussian_features(X):
    """(n, 2D) ``[x^2, x]``, in X's dtype: the rows :func:`diagonal_gaussian_terms`'
    coefficients multiply."""
    n, dim = X.shape
    features = np.empty((n, 2 * dim), dtype=X.dtype)
    np.multiply(X, X, out=features[:, :dim])
    features[:, dim:] = X
    return features


def gaussian_log_densities(X, coefficients, constants=None):
    """(n, K) log(pi_k N(x_i; mu_k, s2_k)) from :func:`diagonal_gaussian_terms`, in X's
    dtype; without ``constants``, the part that depends on x only (add c_k later)."""
    out = matmul(gaussian_features(X), coefficients)
    if constants is not None:
        out += constants.astype(X.dtype, copy=False)
    return out


def log_posteriors(X, coefficients, constants):
    """(n, K) log posteriors log q_ik and (n,) log-likelihoods log sum_k pi_k N(x_i).

    q_ik = exp(l_ik - max_k l_ik) / sum_k exp(l_ik - max_k l_ik), the log-sum-exp being
    taken in float64 rows so that far-away descriptors still get finite posteriors.
    """
    n = X.shape[0]
    n_words = constants.shape[0]
    log_q = np.empty((n, n_words), dtype=X.dtype)
    log_likelihood = np.empty(n, dtype=np.float64)
    for rows in _chunks(n, n_words):
        block = gaussian_log_densities(X[rows], coefficients, constants).astype(np.float64)
        top = block.max(axis=1, keepdims=True)
        total = top[:, 0] + np.log(np.exp(block - top).sum(axis=1))
        log_q[rows] = block - total[:, None]
        log_likelihood[rows] = total
    return log_q, log_likelihood
