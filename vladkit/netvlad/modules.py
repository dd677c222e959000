r"""The modules around NetVLAD in an image-retrieval network: GeM pooling, PCA whitening,
L2 normalisation, and :class:`ImageRetrievalModel`, which chains a backbone, a pooling and
an optional whitening into unit vectors.

Each follows :class:`~vladkit.netvlad.NetVLAD`'s conventions: no Python branch on tensor
values in ``forward`` (``torch.compile(fullgraph=True)``, ``torch.export`` and the meta
device work), float32 arithmetic under ``torch.autocast``, and an all-zero input gives an
all-zero output, never NaN.

References
----------
F. Radenović, G. Tolias, O. Chum, "Fine-tuning CNN image retrieval with no human
annotation", TPAMI 2018 (GeM pooling, learnt whitening).
H. Jégou, O. Chum, "Negative evidences and co-occurrences in image retrieval: the benefit
of PCA and whitening", ECCV 2012.
"""

from __future__ import annotations

import contextlib
import numbers

import numpy as np
import torch
from torch import nn

from .layer import L2_EPS

__all__ = ["L2Normalize", "GeM", "PCAWhitening", "ImageRetrievalModel"]


def _autocast_off(device_type):
    """A context that switches autocast off on this device (a no-op where it has none)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _float32_or_more(x):
    """x in float32 when it is of less precision (bfloat16, float16), else unchanged."""
    return x.float() if torch.finfo(x.dtype).bits < 32 else x


class L2Normalize(nn.Module):
    r"""Divide by the Euclidean norm: y = x / (||x||_2 + eps) along ``dim``.

    The epsilon is added to the norm (MATLAB NetVLAD's final normalisation, ``L2_EPS``), so
    a zero vector stays zero with a zero gradient. Computed in float32 under autocast.

    Parameters
    ----------
    dim : int, default=-1
    eps : float, default=1e-12
    """

    def __init__(self, dim=-1, eps=L2_EPS):
        super().__init__()
        self.dim = int(dim)
        self.eps = float(eps)

    def extra_repr(self):
        return f"dim={self.dim}, eps={self.eps:g}"

    def forward(self, x):
        x = _float32_or_more(x)
        with _autocast_off(x.device.type):
            return x / (torch.linalg.vector_norm(x, dim=self.dim, keepdim=True) + self.eps)


class GeM(nn.Module):
    r"""Generalised-mean pooling (Radenović, Tolias & Chum, TPAMI 2018).

    For a feature map X (B, D, H, W), per channel d:

    .. math:: f_d = \Big(\frac{1}{HW} \sum_{i} \max(x_{di}, \epsilon)^{p}\Big)^{1/p}

    p = 1 is average pooling, p -> infinity max pooling; the paper learns p (initial 3).
    Sets of descriptors (B, N, D) with an optional boolean mask (B, N) are pooled over
    their real rows; an empty set gives zeros. Computed in float32 under autocast.

    Parameters
    ----------
    p : float, default=3
    eps : float, default=1e-6
        The clamp: max(x, eps) keeps x^p defined (the features are ReLU outputs, >= 0).
    trainable : bool, default=True
        p is a Parameter (learnt with the network) or a buffer.

    Attributes
    ----------
    p : Parameter or buffer (1,)
    """

    def __init__(self, p=3.0, eps=1e-6, trainable=True):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not p > 0:
            raise ValueError(f"p must be a positive number, got {p!r}")
        value = torch.tensor([float(p)])
        if trainable:
            self.p = nn.Parameter(value)
        else:
            self.register_buffer("p", value)
        self.eps = float(eps)

    def extra_repr(self):
        return f"p={float(self.p.detach().cpu()[0]):.4g}, eps={self.eps:g}, trainable={isinstance(self.p, nn.Parameter)}"

    def forward(self, x, mask=None):
        """(B, D, H, W) or (B, N, D) [+ mask (B, N)] -> (B, D)."""
        if x.ndim == 4:
            if mask is not None:
                raise ValueError("mask applies to (B, N, D) input only")
            x = x.flatten(2).transpose(1, 2)
        elif x.ndim != 3:
            raise ValueError(f"GeM expected (B, D, H, W) or (B, N, D) input, got shape {tuple(x.shape)}")
        x = _float32_or_more(x)
        with _autocast_off(x.device.type):
            p = self.p.to(x.dtype)
            powered = x.clamp(min=self.eps).pow(p)
            if mask is None:
                mean = powered.mean(dim=1)
            else:
                weights = mask.to(x.dtype).unsqueeze(-1)
                count = weights.sum(dim=1)
                mean = (powered * weights).sum(dim=1) / count.clamp(min=1)
                # An empty set: zeros (its mean would be 0^(1/p), with an infinite gradient).
                mean = torch.where(count > 0, mean, torch.ones_like(mean))
                return torch.where(count > 0, mean.pow(1 / p), torch.zeros_like(mean))
            return mean.pow(1 / p)


class PCAWhitening(nn.Module):
    r"""PCA whitening as a layer: y = L2(P (x - mu)), optionally then a signed power and L2.

    P = diag(lambda + eps)^(-1/2) U^T (d, D) and mu (D,) are what
    :class:`vladkit.PCAWhitening` learns (Jégou & Chum, ECCV 2012); this module applies
    them to tensors, frozen (buffers, the default) or trainable (Parameters: whitening
    learnt on top of a network, initialised from PCA, as in Radenović et al.). An all-zero
    input row gives an all-zero output row, as the estimator does.

    Build it from an estimator (:meth:`from_estimator`), or learn it from vectors
    (:meth:`fit`: descriptors, or image vectors from :meth:`ImageRetrievalModel.embed`);
    :meth:`to_estimator` gives the fitted ``vladkit.PCAWhitening`` back (for
    ``VectorIndex``, the command line or a pipeline).

    Parameters
    ----------
    n_features : int
        D, the input dimension.
    n_components : int
        d, the output dimension.
    power : float or None, default=None
        Signed power after the first L2 (0.5: signed square root), then L2 again.
    trainable : bool, default=False

    Attributes
    ----------
    mean : (D,) buffer or Parameter
    projection : (d, D) buffer or Parameter
    """

    def __init__(self, n_features, n_components, *, power=None, trainable=False):
        super().__init__()
        for name, value in (("n_features", n_features), ("n_components", n_components)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if power is not None and (isinstance(power, bool) or not isinstance(power, numbers.Real)
                                  or not power > 0):
            raise ValueError(f"power must be a positive number or None, got {power!r}")
        self.n_features, self.n_components = int(n_features), int(n_components)
        self.power = None if power is None else float(power)
        mean = torch.zeros(self.n_features)
        projection = torch.eye(self.n_components, self.n_features)
        if trainable:
            self.mean, self.projection = nn.Parameter(mean), nn.Parameter(projection)
        else:
            self.register_buffer("mean", mean)
            self.register_buffer("projection", projection)

    def extra_repr(self):
        return (f"n_features={self.n_features}, n_components={self.n_components}, power={self.power}, "
                f"trainable={isinstance(self.projection, nn.Parameter)}")

    @classmethod
    def from_estimator(cls, estimator, *, trainable=False):
        """The layer applying a fitted :class:`vladkit.PCAWhitening` (float32 copies)."""
        from ..retrieval.whitening import PCAWhitening as Estimator

        if not isinstance(estimator, Estimator) or not hasattr(estimator, "projection_"):
            raise TypeError(f"estimator must be a fitted vladkit.PCAWhitening, got {estimator!r}")
        projection = np.asarray(estimator.projection_, dtype=np.float32)
        layer = cls(projection.shape[1], projection.shape[0], power=estimator.power, trainable=trainable)
        with torch.no_grad():
            layer.mean.copy_(torch.from_numpy(np.asarray(estimator.mean_, dtype=np.float32)))
            layer.projection.copy_(torch.from_numpy(projection))
        return layer

    @classmethod
    def fit(cls, vectors, n_components, *, whiten=True, eps=1e-9, power=None, trainable=False,
            random_state=0):
        """Learn the whitening from (n, D) vectors (array or tensor) with
        ``vladkit.PCAWhitening(n_components, whiten=whiten, eps=eps, power=power)``."""
        from ..retrieval.whitening import PCAWhitening as Estimator

        if isinstance(vectors, torch.Tensor):
            vectors = vectors.detach().to("cpu", torch.float32).numpy()
        estimator = Estimator(n_components, whiten=whiten, eps=eps, power=power, svd_solver="full",
                              random_state=random_state).fit(vectors)
        return cls.from_estimator(estimator, trainable=trainable)

    def to_estimator(self):
        """A fitted :class:`vladkit.PCAWhitening` applying the same map (float32 copies;
        ``components_`` and the variances are not recoverable from P and are left out)."""
        from ..retrieval.whitening import PCAWhitening as Estimator

        estimator = Estimator(self.n_components, power=self.power)
        estimator.mean_ = self.mean.detach().to("cpu", torch.float32).numpy().copy()
        estimator.projection_ = np.ascontiguousarray(self.projection.detach().to("cpu", torch.float32).numpy())
        estimator.n_components_ = self.n_components
        estimator.n_features_in_ = self.n_features
        return estimator

    def forward(self, x):
        """(B, D) -> (B, d) unit rows (zero rows for zero inputs)."""
        x = _float32_or_more(x)
        with _autocast_off(x.device.type):
            nonzero = (x != 0).any(dim=-1, keepdim=True)
            y = (x - self.mean.to(x.dtype)) @ self.projection.to(x.dtype).T
            y = y / (torch.linalg.vector_norm(y, dim=-1, keepdim=True) + L2_EPS)
            if self.power is not None:
                y = torch.sign(y) * y.abs().pow(self.power)
                y = y / (torch.linalg.vector_norm(y, dim=-1, keepdim=True) + L2_EPS)
            return torch.where(nonzero, y, torch.zeros_like(y))


class ImageRetrievalModel(nn.Module):
    r"""Images to unit vectors: ``L2(whitening(pooling(backbone(images))))``.

    Parameters
    ----------
    backbone : nn.Module
        (B, 3, H, W) images -> (B, D, h, w) feature maps, e.g.
        :func:`vladkit.netvlad.build_backbone` ("vgg16" cut at conv5_3 as in the NetVLAD
        paper, "resnet18" at layer3, ...), or any module of yours.
    pooling : nn.Module
        (B, D, h, w) -> (B, D'): :class:`~vladkit.netvlad.NetVLAD` (D' = K D) or
        :class:`GeM` (D' = D), or your own.
    whitening : nn.Module or None
        (B, D') -> (B, d), e.g. :class:`PCAWhitening` (:meth:`fit_whitening` learns one).

    The output is L2-normalised (:class:`L2Normalize`) whatever the last module gives.
    """

    def __init__(self, backbone, pooling, whitening=None):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.whitening = whitening
        self.normalize = L2Normalize()

    def forward(self, images):
        """(B, 3, H, W) float images -> (B, d) unit vectors."""
        features = self.pooling(self.backbone(images))
        if self.whitening is not None:
            features = self.whitening(features)
        return self.normalize(features)

    @torch.no_grad()
    def embed(self, images, batch_size=32):
        """Vectors of many images without gradients, in eval mode (restored after):
        ``images`` a (n, 3, H, W) tensor or an iterable of (B, 3, H, W) batches (a
        DataLoader yielding tensors, or (tensor, ...) tuples). Returns (n, d) float32 CPU."""
        training = self.training
        self.eval()
        try:
            if isinstance(images, torch.Tensor):
                images = torch.split(images, batch_size)
            parts = []
            device = next(self.parameters()).device
            for batch in images:
                if isinstance(batch, (tuple, list)):
                    batch = batch[0]
                parts.append(self(batch.to(device)).float().cpu())
            return torch.cat(parts) if parts else torch.zeros(0, 0)
        finally:
            self.train(training)

    def fit_whitening(self, images, n_components, *, whiten=True, eps=1e-9, power=None,
                      trainable=False, batch_size=32):
        """Learn a :class:`PCAWhitening` from the pooled vectors of ``images`` (as
        :meth:`embed` takes them) and set it as ``self.whitening`` (replacing any)."""
        self.whitening = None
        vectors = self.embed(images, batch_size=batch_size)
        whitening = PCAWhitening.fit(vectors, n_components, whiten=whiten, eps=eps, power=power,
                                     trainable=trainable)
        self.whitening = whitening.to(next(self.parameters()).device)
        return self
