"""The NetVLAD layer (Arandjelovic et al., CVPR 2016) as a ``torch.nn.Module``.

Memory: the residual sums are the matrix form V = A^T X - (A^T 1) c, never an (N, K, D)
tensor, and large inputs are processed in chunks of rows, checkpointed under autograd when
what backward needs would be large (:data:`CHUNK_ELEMENTS`, :data:`CHECKPOINT_BYTES`).

Compilers: ``forward`` has no Python branch on tensor values (no host synchronisation), so
``torch.compile(fullgraph=True)``, ``torch.export.export`` (with a dynamic number of
descriptors) and the meta device work; when compiling, exporting or tracing, the set is
aggregated in one piece (the compiled graph then holds for any N).
"""

from __future__ import annotations

import numbers
import os

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from ..encoders.netvlad_params import DEFAULT_INIT

__all__ = ["NetVLAD", "LAYOUTS", "INPUT_EPS", "INTRA_EPS", "L2_EPS", "CHUNK_ELEMENTS",
           "CHECKPOINT_BYTES", "DEFAULT_INIT"]


#: Output layouts: "KxD" (each word's D values together, VLADEncoder's layout) or "DxK"
#: (MATLAB's: K varies fastest, the flattening of V^T).
LAYOUTS = ("KxD", "DxK")
#: x / sqrt(sum(x^2) + INPUT_EPS): MATLAB's "preL2" (vl_nnnormalize).
INPUT_EPS = 1e-12
#: V_k / sqrt(sum(V_k^2) + INTRA_EPS): MATLAB's vlad_preL2_intra.
INTRA_EPS = 1e-12
#: V / (sqrt(sum(V^2)) + L2_EPS): MATLAB's final L2 (epsilon added to the norm).
L2_EPS = 1e-12
#: Rows per chunk: at most this many elements in one chunk's (B, rows, max(K, D)) block
#: (16 MB in float32). An input of more rows is aggregated chunk by chunk, so the forward
#: never holds more than a chunk of scores, assignments or normalised descriptors.
CHUNK_ELEMENTS = 1 << 22
#: Under autograd, what the chunks keep for backward (normalised descriptors, scores,
#: assignments: about B N (D + 2K) values, B N (2D + 2K) with a mask) is estimated; above
#: this many bytes each chunk is checkpointed instead (only its input is kept, the rest is
#: recomputed in backward: about one more forward pass of time).
CHECKPOINT_BYTES = 256 << 20


class NetVLAD(nn.Module):
    r"""NetVLAD pooling: VLAD with a learnt soft assignment and learnt centers.

    For a set of N descriptors x_i in R^D (one item of the batch):

    1. ``normalize_input`` (MATLAB's "preL2"): x_i <- x_i / sqrt(sum_d x_id^2 + 1e-12)
    2. soft assignment: a_ik = softmax_k(w_k . x_i + b_k) (b = 0 without bias)
    3. residual sums: V_k = sum_i a_ik (x_i - c_k) = (A^T X)_k - (sum_i a_ik) c_k; rows
       masked out (``mask`` False) contribute nothing: their a_ik are set to 0
    4. ``intra_norm``: V_k <- V_k / sqrt(sum_d V_kd^2 + 1e-12)
    5. flatten by ``layout``: "KxD" gives [V_1, ..., V_K] (index k * D + d; the layout of
       :class:`vladkit.VLADEncoder`); "DxK" gives V^T flattened (index d * K + k; MATLAB's)
    6. ``l2``: V <- V / (sqrt(sum V^2) + 1e-12)

    The epsilons are MATLAB's ``vlad_preL2_intra`` (module constants ``INPUT_EPS``,
    ``INTRA_EPS``, ``L2_EPS``); the torch-free
    :class:`vladkit.encoders.netvlad.NetVLADEncoder` computes the same function. An empty
    set (N = 0, or every row masked) gives the zero vector, and finite gradients.

    Parameters
    ----------
    n_clusters : int
        K, the number of clusters.
    dim : int
        D, the descriptor dimension.
    bias : bool, default=True
        Learn a bias b (K,). The paper's layer (Eq. 3, the "v2" initialisation,
        :data:`DEFAULT_INIT`) has one; MATLAB's default ("v1") has none.
    normalize_input, intra_norm, l2 : bool, default=True
        Steps 1, 4 and 6 above.
    layout : {"KxD", "DxK"}, default="KxD"
    check_finite : bool, default=False
        Raise ValueError naming the set and row when a real row holds NaN or inf. It reads
        a tensor value on the host, so it synchronises a GPU and breaks a compiled graph:
        off by default (NaN then propagates, as in torch's own layers); it is skipped while
        compiling, exporting or tracing.

    Attributes
    ----------
    weight : Parameter (K, D)
    bias : Parameter (K,) or None
    centers : Parameter (K, D)
        All trainable. A new layer holds random values (``reset_parameters``, torch's
        global generator); initialise from k-means with :meth:`from_vocabulary`, or load
        trained values with :meth:`from_params`.
    metadata : dict
        JSON-able description carried into :meth:`to_params` (descriptor type,
        initialisation, alpha, ...). It travels in the ``state_dict`` (its
        ``_extra_state`` entry), so ``load_state_dict`` restores it; a state_dict without
        that entry (an older file, another port's) leaves it as it is.

    Input of :meth:`forward`: ``(B, N, D)`` sets of descriptors with an optional boolean
    mask ``(B, N)`` (True = a real row; padding rows are ignored, whatever they hold), or
    ``(B, D, H, W)`` feature maps (H * W descriptors each). Output ``(B, K * D)``.

    Precision: the layer computes in its parameters' dtype, whatever the input's. Under
    ``torch.autocast`` (CPU bfloat16, CUDA float16) a half-precision input is converted
    up and autocast is switched off inside, so the softmax, the sums and the norms run in
    float32, and the output is float32 (as autocast's own float32 ops, softmax and norms,
    give); a layer converted with ``.half()`` or ``.to(torch.bfloat16)`` computes in that
    dtype. An input of more precision than the parameters (float64 into a float32 layer)
    is refused outside autocast, rather than rounded silently.

    Compilers: ``torch.compile(layer, fullgraph=True)``, ``torch.export.export`` (the
    number of descriptors may be dynamic), the meta device and ``torch.jit.trace`` (the
    traced graph holds for any N) work; ``torch.jit.script`` is refused, pointing at
    ``torch.export``.
    """

    def __init__(self, n_clusters, dim, *, bias=True, normalize_input=True, intra_norm=True,
                 l2=True, layout="KxD", check_finite=False):
        super().__init__()
        for name, value in (("n_clusters", n_clusters), ("dim", dim)):
            # numbers.Integral: Python and numpy integers (np.int64 from an array's shape).
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("bias", bias), ("normalize_input", normalize_input),
                            ("intra_norm", intra_norm), ("l2", l2), ("check_finite", check_finite)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.n_clusters = int(n_clusters)
        self.dim = int(dim)
        self.normalize_input = normalize_input
        self.intra_norm = intra_norm
        self.l2 = l2
        self.layout = layout
        self.check_finite = check_finite
        self.metadata = {}
        self.weight = nn.Parameter(torch.empty(self.n_clusters, self.dim))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.n_clusters))
        else:
            self.register_parameter("bias", None)
        self.centers = nn.Parameter(torch.empty(self.n_clusters, self.dim))
        self.reset_parameters()

    def reset_parameters(self):
        """Random values: weight and centers uniform in +-1/sqrt(D) (as nn.Linear), bias 0."""
        bound = self.dim ** -0.5
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            self.centers.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.zero_()

    @property
    def n_features_out(self):
        """K * D, the length of the output vectors."""
        return self.n_clusters * self.dim

    def extra_repr(self):
        return (f"n_clusters={self.n_clusters}, dim={self.dim}, bias={self.bias is not None}, "
                f"normalize_input={self.normalize_input}, intra_norm={self.intra_norm}, "
                f"l2={self.l2}, layout={self.layout!r}")

    # ------------------------------------------------------------------ state
    def get_extra_state(self):
        """``{"metadata": ...}``: saved in the state_dict as ``_extra_state``."""
        return {"metadata": dict(self.metadata)}

    def set_extra_state(self, state):
        if not isinstance(state, dict) or not isinstance(state.get("metadata", {}), dict):
            raise ValueError(f"NetVLAD's _extra_state must be {{'metadata': dict}}, got {state!r}")
        self.metadata = dict(state.get("metadata", {}))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A state_dict without _extra_state (saved before it existed, or converted from
        # another port) keeps the layer's metadata rather than failing a strict load.
        state_dict.setdefault(prefix + "_extra_state", self.get_extra_state())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __prepare_scriptable__(self):
        raise RuntimeError(
            "NetVLAD does not support torch.jit.script (TorchScript is in maintenance in "
            "PyTorch 2): use torch.export.export(layer, (x,)) (a dynamic number of "
            "descriptors works: dynamic_shapes={'x': {1: torch.export.Dim('n')}}), "
            "torch.compile, or torch.jit.trace, whose graph holds for any N")

    # ------------------------------------------------------------------ forward
    def forward(self, x, mask=None):
        """Encode a batch of descriptor sets.

        Parameters
        ----------
        x : Tensor (B, N, D) or (B, D, H, W), floating
            Real rows must be finite (masked-out rows may hold anything). A wrong shape,
            dimension, dtype or mask raises TypeError/ValueError saying what was expected;
            with ``check_finite``, NaN or inf in a real row raises ValueError naming the
            set and the row.
        mask : bool Tensor (B, N) or None
            For (B, N, D) input only: True marks a real descriptor, False a padding row,
            which contributes nothing. Without a mask a zero row is a descriptor: it still
            gets softmax weights (1/K each without a bias) and adds -a_ik c_k to every V_k.

        Returns
        -------
        Tensor (B, K * D), the parameters' dtype
        """
        x, mask = self._check_input(x, mask)
        device = x.device.type
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            # float32 sums and softmax whatever autocast would choose for the matmuls.
            with torch.autocast(device, enabled=False):
                return self._encode(x.to(self.weight.dtype), mask)
        return self._encode(x.to(self.weight.dtype), mask)

    def _encode(self, x, mask):
        batch = x.shape[0]
        if _graph_capture():
            # One piece: a graph captured for one N then holds for every N (a chunk loop
            # would unroll to the traced number of chunks).
            sums, masses = self._aggregate(x, mask)
        else:
            if self.check_finite:
                self._check_finite(x, mask)
            sums, masses = self._aggregate_in_chunks(x, mask)
        vlad = sums - masses.unsqueeze(-1) * self.centers          # (B, K, D)
        if self.intra_norm:
            vlad = vlad / torch.sqrt(vlad.square().sum(dim=-1, keepdim=True) + INTRA_EPS)
        if self.layout == "DxK":
            vlad = vlad.transpose(1, 2)
        vlad = vlad.reshape(batch, self.n_clusters * self.dim)
        if self.l2:
            # vector_norm's gradient at 0 is 0 (sqrt(sum(v^2)) would give NaN): an empty
            # set stays differentiable.
            vlad = vlad / (torch.linalg.vector_norm(vlad, dim=-1, keepdim=True) + L2_EPS)
        return vlad

    def _aggregate_in_chunks(self, x, mask):
        """(A^T X, A^T 1) summed over chunks of rows (see :data:`CHUNK_ELEMENTS`)."""
        batch = x.shape[0]
        rows = max(1, CHUNK_ELEMENTS // max(1, batch * max(self.n_clusters, self.dim)))
        # torch.split, not slicing: the input's gradient is then one concatenation of the
        # chunks' gradients, not a full-size zero tensor per chunk. N = 0 gives one empty
        # chunk, so an empty set is still a function of the parameters (zero gradients
        # rather than an output outside the graph).
        x_chunks = torch.split(x, rows, dim=1)
        mask_chunks = (None,) * len(x_chunks) if mask is None else torch.split(mask, rows, dim=1)
        kept = (x.shape[0] * x.shape[1] * x.element_size()
                * (self.dim * (1 if mask is None else 2) + 2 * self.n_clusters))
        checkpointed = len(x_chunks) > 1 and kept > CHECKPOINT_BYTES and torch.is_grad_enabled() \
            and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        sums = masses = None
        for x_chunk, mask_chunk in zip(x_chunks, mask_chunks):
            if checkpointed:
                # Keep only this chunk's input for backward; recompute the rest there.
                part_sums, part_masses = checkpoint(self._aggregate, x_chunk, mask_chunk,
                                                    use_reentrant=False)
            else:
                part_sums, part_masses = self._aggregate(x_chunk, mask_chunk)
            sums = part_sums if sums is None else sums + part_sums
            masses = part_masses if masses is None else masses + part_masses
        return sums, masses

    def _aggregate(self, x, mask):
        """(A^T X, A^T 1) of one chunk of rows: (B, K, D) and (B, K)."""
        if mask is not None:
            # Zero the padding (it may hold NaN, which 0 * NaN would spread) ...
            x = torch.where(mask.unsqueeze(-1), x, x.new_zeros(()))
        if self.normalize_input:
            x = x / torch.sqrt(x.square().sum(dim=-1, keepdim=True) + INPUT_EPS)
        assignment = torch.softmax(F.linear(x, self.weight, self.bias), dim=-1)   # (B, n, K)
        if mask is not None:
            # ... and its assignments: a zero row would still get softmax weights (1/K
            # each without bias) and take -a_ik c_k from every cluster.
            assignment = torch.where(mask.unsqueeze(-1), assignment, assignment.new_zeros(()))
        return assignment.transpose(1, 2) @ x, assignment.sum(dim=1)

    # ------------------------------------------------------------------ input checks
    def _check_input(self, x, mask):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"NetVLAD expects a torch.Tensor (B, N, D) or (B, D, H, W), "
                            f"got {type(x).__name__}")
        dtype = self.weight.dtype
        if not x.dtype.is_floating_point:
            raise TypeError(f"NetVLAD input has dtype {x.dtype}, expected a floating dtype "
                            f"(the layer computes in its parameters' dtype, {dtype})")
        device = x.device.type
        autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        if torch.finfo(x.dtype).bits > torch.finfo(dtype).bits and not autocast:
            raise TypeError(f"NetVLAD input has dtype {x.dtype}, more precise than the "
                            f"parameters' {dtype}: convert the input, or the layer with "
                            f".to({x.dtype})")
        if x.ndim == 3:
            if x.shape[2] != self.dim:
                raise ValueError(f"NetVLAD expected (B, N, D) input with D = {self.dim}, got "
                                 f"shape {tuple(x.shape)} (descriptors of dimension {x.shape[2]})")
        elif x.ndim == 4:
            if x.shape[1] != self.dim:
                raise ValueError(f"NetVLAD expected (B, D, H, W) input with D = {self.dim} "
                                 f"channels, got shape {tuple(x.shape)} ({x.shape[1]} channels)")
            if mask is not None:
                raise ValueError("mask applies to (B, N, D) input only; for (B, D, H, W) give "
                                 "x.flatten(2).transpose(1, 2) with a (B, H * W) mask")
            x = x.flatten(2).transpose(1, 2)           # (B, H * W, D), a view
        else:
            raise ValueError(f"NetVLAD expected (B, N, D) or (B, D, H, W) input with D = "
                             f"{self.dim}, got {x.ndim} dimensions, shape {tuple(x.shape)}"
                             + (" (one set: add a batch dimension, x[None])" if x.ndim == 2 else ""))
        if mask is not None:
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"mask must be a bool torch.Tensor of shape (B, N) = "
                                f"{tuple(x.shape[:2])}, got {type(mask).__name__}")
            if mask.dtype != torch.bool:
                raise TypeError(f"mask must have dtype torch.bool (True = real descriptor), "
                                f"got {mask.dtype}")
            message = (f"mask must have shape (B, N) = {tuple(x.shape[:2])} for input of shape "
                       f"{tuple(x.shape)}, got {tuple(mask.shape)}")
            if mask.ndim != 2:
                raise ValueError(message)
            if _graph_capture():
                # Sizes may be symbolic (export with a dynamic N): an `if` on them would
                # specialise the graph to one size; torch._check records the relation.
                torch._check(mask.shape[0] == x.shape[0])
                torch._check(mask.shape[1] == x.shape[1])
            elif tuple(mask.shape) != tuple(x.shape[:2]):
                raise ValueError(message)
            if mask.device != x.device:
                raise ValueError(f"mask is on {mask.device}, the input on {x.device}")
        return x, mask

    @staticmethod
    def _check_finite(x, mask):
        """Raise ValueError naming the first real row holding NaN or inf, if any."""
        with torch.no_grad():
            bad = ~torch.isfinite(x).all(dim=-1)
            if mask is not None:
                bad &= mask
            where = bad.nonzero()
        if len(where):
            set_index, row = (int(i) for i in where[0])
            raise ValueError(
                f"NetVLAD input holds NaN or inf: set {set_index}, descriptor {row} (expected "
                f"finite values{' in every unmasked row' if mask is not None else ''})")

    # ------------------------------------------------------------------ parameters
    @classmethod
    def from_params(cls, params):
        """A layer holding a :class:`~vladkit.encoders.netvlad_params.NetVLADParams`' values
        (float32 copies) and options; its metadata is kept in ``metadata``."""
        from ..encoders.netvlad_params import NetVLADParams

        if not isinstance(params, NetVLADParams):
            raise TypeError(f"params must be a NetVLADParams (vladkit.encoders.netvlad; "
                            f"load_netvlad reads one from a file), got {type(params).__name__}")
        weight = torch.as_tensor(params.weight, dtype=torch.float32)
        centers = torch.as_tensor(params.centers, dtype=torch.float32)
        if weight.ndim != 2 or centers.shape != weight.shape:
            raise ValueError(f"params.weight and params.centers must both be (K, D), got "
                             f"{tuple(weight.shape)} and {tuple(centers.shape)}")
        n_clusters, dim = weight.shape
        bias = None if params.bias is None else torch.as_tensor(params.bias, dtype=torch.float32)
        if bias is not None and tuple(bias.shape) != (n_clusters,):
            raise ValueError(f"params.bias must be (K,) = ({n_clusters},), got {tuple(bias.shape)}")
        layer = cls(int(n_clusters), int(dim), bias=bias is not None,
                    normalize_input=bool(params.normalize_input), intra_norm=bool(params.intra_norm),
                    l2=bool(params.l2), layout=params.layout)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.centers.copy_(centers)
            if bias is not None:
                layer.bias.copy_(bias)
        layer.metadata = dict(params.metadata or {})
        return layer

    @classmethod
    def from_vocabulary(cls, vocabulary_or_centers, descriptors, version=DEFAULT_INIT, random_state=None, *,
                        bias=None, normalize_input=True, intra_norm=True, l2=True, layout="KxD",
                        n_descriptors=50_000, per_image=100, metadata=None):
        """A layer initialised from k-means words, as Arandjelovic et al.'s code does.

        - "v1" (their default, used in all their experiments): weight = alpha c / ||c||, no
          bias, alpha = -log(0.01) / mean(top1 - top2) of the sorted (c / ||c||) . x;
        - "v2": weight = 2 alpha c, bias = -alpha ||c||^2, alpha = -log(0.01) /
          mean(d2^2 - d1^2) (squared distances to the two nearest centers), so the
          assignment is exactly softmax_k(-alpha ||x - c_k||^2), that of
          ``VLADEncoder(assignment="soft", alpha=alpha)``;

        centers = c in both (see :func:`vladkit.encoders.netvlad_params.init_netvlad`).

        Parameters
        ----------
        vocabulary_or_centers : fitted KMeansVocabulary (no PCA) or its file, (K, D) array
            or tensor of centers, an unfitted KMeansVocabulary or an int K
            The last two run k-means (a clone of the vocabulary, or
            ``KMeansVocabulary(K, random_state=random_state)``) on the sample, input-normalised
            if ``normalize_input`` (MATLAB clusters the preL2-normalised sample).
        descriptors : (n, D) array or tensor, or a list of (n_i, D) arrays / LocalFeatures
            The sample alpha is estimated from (input-normalised first if
            ``normalize_input``). A list is sampled as MATLAB's ``getClusters.m`` does:
            ``per_image`` descriptors from each of ceil(n_descriptors / per_image) random
            images (:func:`vladkit.encoders.netvlad_params.sample_descriptors`); an array of more
            than ``n_descriptors`` rows is subsampled uniformly.
        version : {"v1", "v2"}, default="v2" (:data:`DEFAULT_INIT`)
        random_state : None, int or RandomState
            The sample (and k-means when run here). None gives a fixed sample.
        bias : bool or None
            None: the version's (v1 none, v2 the initialised one); True with "v1" adds a
            trainable bias starting at 0; False with "v2" is refused (the v2 assignment
            needs its bias).
        normalize_input, intra_norm, l2, layout
            The layer's options.
        n_descriptors, per_image : int, default 50,000 and 100 (MATLAB's)
        metadata : dict or None
            JSON-able; ``init``, ``alpha`` (and a vocabulary's ``descriptor_type``) are
            added.

        Returns
        -------
        NetVLAD (float32)
        """
        import numpy as np
        from sklearn.base import clone
        from sklearn.utils import check_random_state

        from ..encoders.netvlad_params import init_netvlad, input_normalize, sample_descriptors
        from ..vocabulary.kmeans import KMeansVocabulary
        from ..vocabulary.loading import load_vocabulary

        if version not in ("v1", "v2"):
            raise ValueError(f"version must be 'v1' or 'v2', got {version!r}")
        if bias is False and version == "v2":
            raise ValueError("bias=False with version='v2': the v2 initialisation is a bias "
                             "(-alpha ||c||^2); use version='v1' for a layer without bias")
        if bias not in (None, True, False):
            raise TypeError(f"bias must be None, True or False, got {bias!r}")
        for name, value in (("n_descriptors", n_descriptors), ("per_image", per_image)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

        def numpy(value):
            if isinstance(value, torch.Tensor):
                return value.detach().cpu().numpy()
            return value

        descriptors = numpy(descriptors)
        if isinstance(descriptors, (list, tuple)):
            sample = sample_descriptors([numpy(d) for d in descriptors], n_descriptors, per_image,
                                        random_state)
        else:
            sample = np.asarray(getattr(descriptors, "descriptors", descriptors))
            if sample.ndim != 2:
                raise ValueError(f"descriptors must be an (n, D) array or a list of (n_i, D) "
                                 f"arrays / LocalFeatures, got an array of shape {sample.shape}")
            if len(sample) > n_descriptors:
                seed = 0 if random_state is None else int(
                    check_random_state(random_state).randint(2**31 - 1))
                rows = np.random.default_rng([seed, 7]).choice(len(sample), n_descriptors,
                                                              replace=False)
                sample = sample[np.sort(rows)]

        vocabulary = numpy(vocabulary_or_centers)
        if isinstance(vocabulary, (str, os.PathLike)):
            vocabulary = load_vocabulary(vocabulary)
        if isinstance(vocabulary, (int, np.integer)) and not isinstance(vocabulary, bool):
            vocabulary = KMeansVocabulary(int(vocabulary), random_state=random_state)
        if isinstance(vocabulary, KMeansVocabulary) and not hasattr(vocabulary, "descriptor_dim_"):
            vocabulary = clone(vocabulary)
            if vocabulary.pca is not None:
                raise ValueError("NetVLAD's centers live in the descriptor space: give a "
                                 "KMeansVocabulary with pca=None")
            training = np.asarray(sample)
            if training.dtype.kind != "f":
                training = training.astype(np.float32)
            vocabulary.fit_sample(input_normalize(training) if normalize_input else training)

        params = init_netvlad(vocabulary, sample, version, normalize_input=normalize_input,
                              intra_norm=intra_norm, l2=l2, layout=layout, metadata=metadata)
        layer = cls.from_params(params)
        if bias and params.bias is None:
            layer = cls(params.n_clusters, params.dim, bias=True, normalize_input=normalize_input,
                        intra_norm=intra_norm, l2=l2, layout=layout)
            with torch.no_grad():
                layer.weight.copy_(torch.from_numpy(params.weight))
                layer.centers.copy_(torch.from_numpy(params.centers))
                layer.bias.zero_()
            layer.metadata = dict(params.metadata)
        return layer

    def to_params(self, metadata=None):
        """The values and options as a :class:`~vladkit.encoders.netvlad_params.NetVLADParams`
        (float32 numpy copies, for ``save_netvlad`` and ``NetVLADEncoder``).

        metadata : dict or None
            JSON-able entries added to (and overriding) the layer's ``metadata``.
        """
        from ..encoders.netvlad_params import NetVLADParams

        def array(tensor):
            return tensor.detach().to(device="cpu", dtype=torch.float32).numpy().copy()

        merged = dict(self.metadata)
        merged.update(metadata or {})
        return NetVLADParams(
            weight=array(self.weight),
            bias=None if self.bias is None else array(self.bias),
            centers=array(self.centers),
            normalize_input=self.normalize_input,
            intra_norm=self.intra_norm,
            l2=self.l2,
            layout=self.layout,
            metadata=merged,
        )


def _graph_capture():
    """Whether forward is being compiled, exported or traced (not run eagerly)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()
