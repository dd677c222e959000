"""The NetVLAD layer (Arandjelovic et al., CVPR 2016) as a Keras 3 layer.

Written with ``keras.ops`` only: the same code runs on every Keras backend. It computes
the function of :class:`vladkit.netvlad.NetVLAD` (the PyTorch layer) with the same
options, epsilons and parameters, so :meth:`NetVLAD.from_params` / :meth:`NetVLAD.to_params`
move trained values between the two (and :func:`vladkit.encoders.netvlad_params.save_netvlad`
files). Memory: the residual sums are the matrix form V = A^T X - (A^T 1) c, never a
(B, N, K, D) tensor.
"""

from __future__ import annotations

import numbers

import keras
from keras import ops

__all__ = ["NetVLAD", "LAYOUTS", "INPUT_EPS", "INTRA_EPS", "L2_EPS"]

#: Output layouts: "KxD" (each word's D values together, VLADEncoder's layout) or "DxK"
#: (MATLAB's: K varies fastest, the flattening of V^T).
LAYOUTS = ("KxD", "DxK")
#: x / sqrt(sum(x^2) + INPUT_EPS): MATLAB's "preL2" (vl_nnnormalize).
INPUT_EPS = 1e-12
#: V_k / sqrt(sum(V_k^2) + INTRA_EPS): MATLAB's vlad_preL2_intra.
INTRA_EPS = 1e-12
#: V / (sqrt(sum(V^2)) + L2_EPS): MATLAB's final L2 (epsilon added to the norm).
L2_EPS = 1e-12


@keras.saving.register_keras_serializable(package="vladkit")
class NetVLAD(keras.layers.Layer):
    r"""NetVLAD pooling: VLAD with a learnt soft assignment and learnt centers (Keras 3).

    For a set of N descriptors x_i in R^D (one item of the batch):

    1. ``normalize_input`` (MATLAB's "preL2"): x_i <- x_i / sqrt(sum_d x_id^2 + 1e-12)
    2. soft assignment: a_ik = softmax_k(w_k . x_i + b_k) (b = 0 without bias)
    3. residual sums: V_k = sum_i a_ik (x_i - c_k) = (A^T X)_k - (sum_i a_ik) c_k; rows
       masked out (``mask`` False) contribute nothing: their input and their a_ik are set
       to 0
    4. ``intra_norm``: V_k <- V_k / sqrt(sum_d V_kd^2 + 1e-12)
    5. flatten by ``layout``: "KxD" gives [V_1, ..., V_K] (index k * D + d; the layout of
       :class:`vladkit.VLADEncoder`); "DxK" gives V^T flattened (index d * K + k; MATLAB's)
    6. ``l2``: V <- V / (sqrt(sum V^2) + 1e-12)

    The same function, options, epsilons (module constants ``INPUT_EPS``, ``INTRA_EPS``,
    ``L2_EPS``) and parameters as the PyTorch layer :class:`vladkit.netvlad.NetVLAD` and
    the framework-free :class:`vladkit.encoders.netvlad.NetVLADEncoder`. An empty set
    (N = 0, or every row masked) gives the zero vector, and finite gradients.

    Parameters
    ----------
    n_clusters : int
        K, the number of clusters.
    dim : int
        D, the descriptor dimension.
    bias : bool, default=True
        Learn a bias b (K,). MATLAB's default layer ("v1" initialisation) has none;
        "v2" has one.
    normalize_input, intra_norm, l2 : bool, default=True
        Steps 1, 4 and 6 above.
    layout : {"KxD", "DxK"}, default="KxD"
    metadata : dict or None
        JSON-able description (descriptor type, initialisation, alpha, ...), kept in the
        layer's config and carried into :meth:`to_params`.
    **kwargs
        Keras layer arguments (``name``, ``dtype``, ``trainable``, ...).

    Attributes
    ----------
    weight : Variable (K, D)
    bias : Variable (K,) or None
    centers : Variable (K, D)
        All trainable, created at build (the first call, :meth:`build`, or
        :meth:`from_params`). A new layer holds random values: weight and centers uniform
        in +-1/sqrt(D) (as the torch layer), bias 0; load trained values with
        :meth:`from_params`.

    Input of :meth:`call`: ``(B, N, D)`` sets of descriptors with an optional boolean
    ``mask`` ``(B, N)`` (True = a real row; padding rows are ignored, whatever they hold;
    a mask that Keras propagates, e.g. from ``Masking``, is used the same way), or
    channels-last ``(B, H, W, D)`` feature maps (Keras' convention: H * W descriptors
    each; the torch layer takes channels-first ``(B, D, H, W)``). Output ``(B, K * D)``, in
    the layer's compute dtype; under a float16 or bfloat16 policy (mixed precision) the
    layer computes in float32 and returns float32, as the torch layer does under autocast
    (1e-12 is 0 in float16: a padding row would give 0 / 0). NaN or inf in real rows is
    not searched for (the torch layer's opt-in ``check_finite`` has no counterpart: no
    data-dependent checks, so the layer compiles on every backend); it gives NaN.

    Examples
    --------
    >>> import keras                                              # doctest: +SKIP
    >>> from vladkit.keras import NetVLAD                         # doctest: +SKIP
    >>> layer = NetVLAD(64, 128)                                  # doctest: +SKIP
    >>> layer(keras.random.normal((2, 500, 128))).shape           # doctest: +SKIP
    (2, 8192)
    """

    def __init__(self, n_clusters, dim, *, bias=True, normalize_input=True, intra_norm=True,
                 l2=True, layout="KxD", metadata=None, **kwargs):
        for name, value in (("n_clusters", n_clusters), ("dim", dim)):
            # numbers.Integral: Python and numpy integers (np.int64 from an array's shape).
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("bias", bias), ("normalize_input", normalize_input),
                            ("intra_norm", intra_norm), ("l2", l2)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if metadata is not None and not isinstance(metadata, dict):
            raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
        super().__init__(**kwargs)
        self.n_clusters = int(n_clusters)
        self.dim = int(dim)
        self.use_bias = bias
        self.normalize_input = normalize_input
        self.intra_norm = intra_norm
        self.l2 = l2
        self.layout = layout
        self.metadata = dict(metadata or {})
        # Padding masks are consumed here: the output (B, K * D) carries none.
        self.supports_masking = True
        self.weight = self.bias = self.centers = None

    @property
    def n_features_out(self):
        """K * D, the length of the output vectors."""
        return self.n_clusters * self.dim

    def build(self, input_shape=None):
        """Create ``weight``, ``bias`` (when ``bias``) and ``centers``.

        input_shape : tuple or None
            ``(B, N, D)`` or ``(B, H, W, D)``, checked for D; None builds without a check
            (the weights' shapes depend on K and D only).
        """
        if input_shape is not None:
            self._check_shape(tuple(input_shape))
        bound = self.dim ** -0.5
        uniform = keras.initializers.RandomUniform(-bound, bound)
        # autocast=False: call() reads the variables in the dtype it computes in, float32
        # under a mixed policy (a bfloat16 copy would round the weights to 3 digits).
        self.weight = self.add_weight(shape=(self.n_clusters, self.dim), initializer=uniform,
                                      name="weight", autocast=False)
        if self.use_bias:
            self.bias = self.add_weight(shape=(self.n_clusters,), initializer="zeros",
                                        name="bias", autocast=False)
        self.centers = self.add_weight(shape=(self.n_clusters, self.dim), initializer=uniform,
                                       name="centers", autocast=False)
        self.built = True

    def _check_shape(self, shape):
        if len(shape) not in (3, 4):
            raise ValueError(
                f"NetVLAD expected (B, N, D) or channels-last (B, H, W, D) input with D = "
                f"{self.dim}, got {len(shape)} dimensions, shape {shape}"
                + (" (one set: add a batch dimension, x[None])" if len(shape) == 2 else ""))
        if shape[-1] is not None and shape[-1] != self.dim:
            what = "(B, N, D)" if len(shape) == 3 else "channels-last (B, H, W, D)"
            raise ValueError(f"NetVLAD expected {what} input with D = {self.dim}, got shape "
                             f"{shape} (last dimension {shape[-1]})")

    # ------------------------------------------------------------------ forward
    def call(self, inputs, mask=None):
        """Encode a batch of descriptor sets.

        Parameters
        ----------
        inputs : tensor (B, N, D) or (B, H, W, D), floating
        mask : bool tensor (B, N) or None
            For (B, N, D) input only: True marks a real descriptor, False a padding row,
            which contributes nothing. Without a mask a zero row is a descriptor: it still
            gets softmax weights (1/K each without a bias) and adds -a_ik c_k to every V_k.

        Returns
        -------
        tensor (B, K * D)
        """
        shape = tuple(inputs.shape)
        self._check_shape(shape)
        # float16 and bfloat16 (mixed precision policies) compute in float32, as the torch
        # layer does under autocast: the epsilons (1e-12) vanish in 16 bits, so a zero or
        # padding row would give 0 / 0, and the softmax and norms lose their precision.
        work = "float32" if self.compute_dtype in ("float16", "bfloat16") else self.compute_dtype
        x = ops.cast(inputs, work)
        weight, centers = ops.cast(self.weight, work), ops.cast(self.centers, work)
        if len(shape) == 4:
            if mask is not None:
                raise ValueError("mask applies to (B, N, D) input only; for (B, H, W, D) give "
                                 "the map reshaped to (B, H * W, D) with a (B, H * W) mask")
            rows = shape[1] * shape[2] if shape[1] is not None and shape[2] is not None else -1
            x = ops.reshape(x, (ops.shape(x)[0], rows, self.dim))
        keep = None
        if mask is not None:
            keep = ops.expand_dims(ops.cast(mask, "bool"), -1)             # (B, N, 1)
            # Zero the padding (it may hold NaN, which 0 * NaN would spread) ...
            x = ops.where(keep, x, ops.zeros_like(x))
        if self.normalize_input:
            x = x / ops.sqrt(ops.sum(ops.square(x), axis=-1, keepdims=True) + INPUT_EPS)
        scores = ops.matmul(x, ops.transpose(weight))                       # (B, N, K)
        if self.bias is not None:
            scores = scores + ops.cast(self.bias, work)
        assignment = ops.softmax(scores, axis=-1)
        if keep is not None:
            # ... and its assignments: a zero row would still get softmax weights.
            assignment = ops.where(keep, assignment, ops.zeros_like(assignment))
        sums = ops.matmul(ops.transpose(assignment, (0, 2, 1)), x)          # (B, K, D)
        masses = ops.sum(assignment, axis=1)                                # (B, K)
        vlad = sums - ops.expand_dims(masses, -1) * centers
        if self.intra_norm:
            vlad = vlad / ops.sqrt(ops.sum(ops.square(vlad), axis=-1, keepdims=True) + INTRA_EPS)
        if self.layout == "DxK":
            vlad = ops.transpose(vlad, (0, 2, 1))
        vlad = ops.reshape(vlad, (-1, self.n_clusters * self.dim))
        if self.l2:
            vlad = vlad / (_norm(vlad) + L2_EPS)
        return vlad

    def compute_output_shape(self, input_shape):
        """``(B, K * D)``."""
        return (input_shape[0], self.n_clusters * self.dim)

    def compute_mask(self, inputs, mask=None):
        """None: the padding mask is consumed (one vector per set)."""
        return None

    # ------------------------------------------------------------------ config, params
    def get_config(self):
        """The constructor's arguments (and the Keras layer's), for saving and cloning."""
        config = super().get_config()
        config.update({"n_clusters": self.n_clusters, "dim": self.dim, "bias": self.use_bias,
                       "normalize_input": self.normalize_input, "intra_norm": self.intra_norm,
                       "l2": self.l2, "layout": self.layout, "metadata": dict(self.metadata)})
        return config

    @classmethod
    def from_params(cls, params, **kwargs):
        """A built layer holding a :class:`~vladkit.encoders.netvlad_params.NetVLADParams`'
        values and options (from the torch layer's ``to_params``, or ``load_netvlad``);
        its metadata is kept in ``metadata``. ``kwargs``: Keras layer arguments (``name``,
        ``dtype``, ...)."""
        from ..encoders.netvlad_params import NetVLADParams

        if not isinstance(params, NetVLADParams):
            raise TypeError(f"params must be a NetVLADParams (vladkit.encoders.netvlad_params; "
                            f"load_netvlad reads one from a file), got {type(params).__name__}")
        layer = cls(int(params.n_clusters), int(params.dim), bias=params.bias is not None,
                    normalize_input=params.normalize_input, intra_norm=params.intra_norm,
                    l2=params.l2, layout=params.layout, metadata=params.metadata, **kwargs)
        layer.build()
        layer.weight.assign(params.weight)
        layer.centers.assign(params.centers)
        if params.bias is not None:
            layer.bias.assign(params.bias)
        return layer

    def to_params(self, metadata=None):
        """The values and options as a :class:`~vladkit.encoders.netvlad_params.NetVLADParams`
        (float32 numpy copies, for ``save_netvlad``, ``NetVLADEncoder`` and the torch
        layer's ``from_params``).

        metadata : dict or None
            JSON-able entries added to (and overriding) the layer's ``metadata``.
        """
        from ..encoders.netvlad_params import NetVLADParams

        if not self.built:
            raise ValueError("the layer has no weights yet: call it, build() it, or make it "
                             "with from_params")
        merged = dict(self.metadata)
        merged.update(metadata or {})
        def array(variable):
            # The backend's tensor (a variable's own __array__ warns under numpy 2).
            return ops.convert_to_numpy(variable.value)

        return NetVLADParams(
            array(self.weight), None if self.bias is None else array(self.bias), array(self.centers),
            normalize_input=self.normalize_input, intra_norm=self.intra_norm, l2=self.l2,
            layout=self.layout, metadata=merged)


def _norm(v):
    """The L2 norm of each row, (B, 1), with gradient 0 (not NaN) at the zero vector."""
    squares = ops.sum(ops.square(v), axis=-1, keepdims=True)
    positive = squares > 0
    # sqrt's gradient at 0 is infinite: take it of 1 there, and return 0.
    return ops.where(positive, ops.sqrt(ops.where(positive, squares, ops.ones_like(squares))),
                     ops.zeros_like(squares))
