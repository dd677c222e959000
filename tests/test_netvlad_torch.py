"""The torch NetVLAD layer (vladkit.netvlad): the formula, gradients, masks, layouts,
initialisation, agreement with VLADEncoder and the torch-free NetVLADEncoder, bad input."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# vladkit before torch: its OMP_WAIT_POLICY=PASSIVE then reaches the libgomp torch loads
# (imported after torch, vladkit's BLAS and numba kernels ran up to 10x slower here).
from vladkit import KMeansVocabulary, VLADEncoder

torch = pytest.importorskip(
    "torch", reason="torch is not installed (optional: pip install torch==2.14.1 torchvision==0.29.1, then "
                    "pip install '.[torch]')")

from torch.autograd import gradcheck  # noqa: E402
from torch.func import functional_call  # noqa: E402

from vladkit.encoders.netvlad_params import NetVLADParams, load_netvlad, save_netvlad  # noqa: E402
from vladkit.netvlad import NetVLAD  # noqa: E402
from vladkit.netvlad import layer as layer_module  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCENE15 = ROOT.parent / "shared" / "data" / "scene15"

OPTIONS = list(itertools.product([True, False], repeat=3))     # normalize_input, intra_norm, l2


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The tensors here are tiny: torch's thread pool only costs (10x on a loaded 2-core
    machine, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _layer(K, D, *, bias=True, normalize_input=True, intra_norm=True, l2=True, layout="KxD",
           dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    layer = NetVLAD(K, D, bias=bias, normalize_input=normalize_input, intra_norm=intra_norm,
                    l2=l2, layout=layout).to(dtype)
    with torch.no_grad():
        # Sharper, varied assignments than the default init; bias not zero.
        layer.weight.normal_(0, 2.0)
        layer.centers.normal_(0, 0.5)
        if layer.bias is not None:
            layer.bias.normal_(0, 0.5)
    return layer


def reference(x, weight, bias, centers, *, normalize_input, intra_norm, l2, layout):
    """NetVLAD of one set, float64 numpy, from the residuals themselves (N, K, D)."""
    x = np.asarray(x, np.float64)
    weight, centers = np.asarray(weight, np.float64), np.asarray(centers, np.float64)
    K, D = weight.shape
    if len(x) == 0:
        return np.zeros(K * D)
    if normalize_input:
        x = x / np.sqrt((x ** 2).sum(1, keepdims=True) + 1e-12)
    scores = x @ weight.T + (0 if bias is None else np.asarray(bias, np.float64))
    scores -= scores.max(1, keepdims=True)
    a = np.exp(scores)
    a /= a.sum(1, keepdims=True)
    v = (a[:, :, None] * (x[:, None, :] - centers[None])).sum(0)      # (K, D)
    if intra_norm:
        v = v / np.sqrt((v ** 2).sum(1, keepdims=True) + 1e-12)
    v = v.ravel() if layout == "KxD" else v.T.ravel()
    if l2:
        v = v / (np.sqrt((v ** 2).sum()) + 1e-12)
    return v


def _params_of(layer):
    b = None if layer.bias is None else layer.bias.detach().numpy()
    return layer.weight.detach().numpy(), b, layer.centers.detach().numpy()


def _padded(sets, D, dtype=torch.float64, fill=0.0):
    """(B, N_max, D) zero-padded (or ``fill``-padded) batch and its mask."""
    n_max = max(len(s) for s in sets)
    x = torch.full((len(sets), n_max, D), fill, dtype=dtype)
    mask = torch.zeros(len(sets), n_max, dtype=torch.bool)
    for i, s in enumerate(sets):
        x[i, :len(s)] = torch.as_tensor(s, dtype=dtype)
        mask[i, :len(s)] = True
    return x, mask


# ----------------------------------------------------------------------------- imports


def _run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_import_vladkit_does_not_import_torch():
    result = _run("import sys, vladkit, vladkit.encoders.netvlad; "
                  "print('torch' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_import_without_torch_says_how_to_install():
    result = _run("import sys\n"
                  "class NoTorch:\n"
                  "    def find_spec(self, name, path=None, target=None):\n"
                  "        if name.split('.')[0] == 'torch':\n"
                  "            raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n"
                  "sys.meta_path.insert(0, NoTorch())\n"
                  "import vladkit\n"
                  "try:\n    import vladkit.netvlad\n"
                  "except ImportError as e:\n    print(e)\nelse:\n    print('imported')")
    assert result.returncode == 0, result.stderr
    assert "pip install torch==2.14.1 torchvision==0.29.1" in result.stdout
    assert "[torch]" in result.stdout


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["KxD", "DxK"])
@pytest.mark.parametrize("normalize_input,intra_norm,l2", OPTIONS)
def test_forward_matches_formula(bias, layout, normalize_input, intra_norm, l2):
    K, D = 5, 7
    layer = _layer(K, D, bias=bias, normalize_input=normalize_input, intra_norm=intra_norm,
                   l2=l2, layout=layout)
    rng = np.random.default_rng(1)
    sets = [rng.normal(size=(n, D)) * 3 for n in (9, 1, 4)]
    x, mask = _padded(sets, D)
    out = layer(x, mask).detach().numpy()
    assert out.shape == (3, K * D) and out.dtype == np.float64
    w, b, c = _params_of(layer)
    options = dict(normalize_input=normalize_input, intra_norm=intra_norm, l2=l2, layout=layout)
    for s, encoded in zip(sets, out):
        np.testing.assert_allclose(encoded, reference(s, w, b, c, **options), rtol=1e-10, atol=1e-12)


def test_float32_output_and_attributes():
    layer = NetVLAD(8, 16)
    out = layer(torch.randn(2, 30, 16))
    assert out.dtype == torch.float32 and out.shape == (2, layer.n_features_out) == (2, 128)
    assert torch.allclose(out.norm(dim=1), torch.ones(2))
    assert [name for name, _ in layer.named_parameters()] == ["weight", "bias", "centers"]
    assert all(p.requires_grad for p in layer.parameters())
    assert [name for name, _ in NetVLAD(8, 16, bias=False).named_parameters()] == ["weight", "centers"]
    assert "layout='KxD'" in repr(layer)


# ----------------------------------------------------------------------------- gradients


def _gradcheck(layer, x, mask):
    names = [name for name, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]
    x = x.detach().clone().requires_grad_(True)

    def f(x, *values):
        return functional_call(layer, dict(zip(names, values)), (x,), {"mask": mask})

    assert gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("normalize_input,intra_norm,l2", OPTIONS)
def test_gradcheck(bias, masked, normalize_input, intra_norm, l2):
    """Input, weight, bias and centers, float64, every combination of the options."""
    K, D = 4, 3
    layer = _layer(K, D, bias=bias, normalize_input=normalize_input, intra_norm=intra_norm, l2=l2,
                   layout="DxK" if masked else "KxD")
    x = torch.randn(2, 5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[True, True, False, True, False], [True] * 5]) if masked else None
    _gradcheck(layer, x, mask)


def test_gradcheck_feature_map():
    layer = _layer(3, 4)
    x = torch.randn(2, 4, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    _gradcheck(layer, x, None)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_chunked_forward_and_gradients_equal_whole(monkeypatch, checkpointed):
    """Inputs over CHUNK_ELEMENTS are aggregated chunk by chunk (checkpointed under
    autograd above CHECKPOINT_BYTES): same values, same gradients, gradcheck passes."""
    K, D = 3, 3
    layer = _layer(K, D)
    x = torch.randn(2, 7, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    mask = torch.rand(2, 7, generator=torch.Generator().manual_seed(6)) > 0.3

    def run():
        layer.zero_grad()
        xg = x.clone().requires_grad_(True)
        out = layer(xg, mask)
        (out * torch.arange(out.shape[1], dtype=out.dtype)).sum().backward()
        return out.detach(), xg.grad, [p.grad.clone() for p in layer.parameters()]

    whole = run()
    monkeypatch.setattr(layer_module, "CHUNK_ELEMENTS", 2 * 3 * max(K, D))   # 3 chunks of <= 3 rows
    monkeypatch.setattr(layer_module, "CHECKPOINT_BYTES", 0 if checkpointed else 1 << 40)
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(layer_module, "checkpoint", counted)
    chunked = run()
    assert len(calls) == (3 if checkpointed else 0)
    torch.testing.assert_close(chunked[0], whole[0])
    torch.testing.assert_close(chunked[1], whole[1])
    for a, b in zip(chunked[2], whole[2]):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, mask), whole[0])
    _gradcheck(layer, x, mask)


# ----------------------------------------------------------------------------- masks, empty sets


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("normalize_input,intra_norm,l2", OPTIONS)
def test_padded_masked_batch_equals_each_set_alone(bias, normalize_input, intra_norm, l2):
    K, D = 6, 8
    layer = _layer(K, D, bias=bias, normalize_input=normalize_input, intra_norm=intra_norm, l2=l2)
    rng = np.random.default_rng(2)
    sets = [rng.normal(size=(n, D)) for n in (20, 3, 11, 1)]
    x, mask = _padded(sets, D)
    batch = layer(x, mask)
    for s, encoded in zip(sets, batch):
        alone = layer(torch.as_tensor(s)[None])[0]
        torch.testing.assert_close(encoded, alone, rtol=1e-12, atol=1e-13)
    # Padding rows are ignored whatever they hold (NaN included) ...
    x_nan, _ = _padded(sets, D, fill=float("nan"))
    torch.testing.assert_close(layer(x_nan, mask), batch, rtol=1e-12, atol=1e-13)
    # ... and without the mask the zero rows change every set but the longest.
    unmasked = layer(x)
    torch.testing.assert_close(unmasked[0], batch[0], rtol=1e-12, atol=1e-13)
    for i in (1, 2, 3):
        assert (unmasked[i] - batch[i]).abs().max() > 1e-3


def test_unmasked_zero_padding_adds_minus_c_over_k():
    """Without a bias a zero row gets a_ik = 1/K and adds -c_k / K to every V_k: exactly
    what the mask prevents."""
    K, D = 5, 4
    layer = _layer(K, D, bias=False, intra_norm=False, l2=False)
    s = torch.randn(1, 6, D, dtype=torch.float64)
    padded = torch.cat([s, torch.zeros(1, 3, D, dtype=torch.float64)], dim=1)
    mask = torch.tensor([[True] * 6 + [False] * 3])
    alone = layer(s)
    torch.testing.assert_close(layer(padded, mask), alone)
    leak = -(3 / K) * layer.centers.detach().reshape(1, -1)
    torch.testing.assert_close(layer(padded), alone + leak)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("normalize_input,intra_norm,l2", OPTIONS)
def test_empty_sets_give_zeros_and_finite_gradients(bias, normalize_input, intra_norm, l2):
    K, D = 4, 3
    layer = _layer(K, D, bias=bias, normalize_input=normalize_input, intra_norm=intra_norm, l2=l2)
    # N = 0
    x = torch.zeros(3, 0, D, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert out.shape == (3, K * D) and torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    for p in layer.parameters():
        assert torch.equal(p.grad, torch.zeros_like(p))
    # every row of a set masked out, next to a real set; padding holds NaN and zeros
    layer.zero_grad()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    x[1, :2] = float("nan")
    x = x.requires_grad_(True)
    mask = torch.tensor([[True, False, True, True, False], [False] * 5])
    out = layer(x, mask)
    assert torch.equal(out[1], torch.zeros(K * D, dtype=torch.float64))
    assert out[0].abs().sum() > 0
    (out * torch.randn(out.shape, dtype=out.dtype)).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.equal(x.grad[1], torch.zeros(5, D, dtype=torch.float64))
    for p in layer.parameters():
        assert torch.isfinite(p.grad).all()


def test_feature_map_equals_set():
    B, D, H, W, K = 2, 6, 3, 5, 4
    layer = _layer(K, D, dtype=torch.float32)
    x = torch.randn(B, D, H, W)
    as_set = x.flatten(2).transpose(1, 2).contiguous()       # (B, H * W, D), row-major positions
    torch.testing.assert_close(layer(x), layer(as_set), rtol=1e-6, atol=1e-7)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(layer(channels_last), layer(as_set), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("l2", [True, False])
def test_dxk_layout_is_kxd_permuted(l2):
    K, D = 5, 7
    kxd = _layer(K, D, l2=l2)
    dxk = _layer(K, D, l2=l2, layout="DxK")
    dxk.load_state_dict(kxd.state_dict())
    x = torch.randn(3, 10, D, dtype=torch.float64)
    a, b = kxd(x), dxk(x)
    torch.testing.assert_close(b, a.reshape(3, K, D).transpose(1, 2).reshape(3, K * D))
    # MATLAB's: the first center's values at indices 0, K, 2K, ...
    torch.testing.assert_close(b[:, 0::K], a[:, :D])


# ----------------------------------------------------------------------------- parameters


def test_params_round_trip(tmp_path):
    layer = _layer(6, 5, layout="DxK", intra_norm=False, dtype=torch.float32)
    layer.metadata = {"descriptor_type": "test"}
    params = layer.to_params(metadata={"note": "x"})
    assert isinstance(params, NetVLADParams)
    assert params.options == {"normalize_input": True, "intra_norm": False, "l2": True, "layout": "DxK"}
    assert params.metadata == {"descriptor_type": "test", "note": "x"}
    np.testing.assert_array_equal(params.weight, layer.weight.detach().numpy())
    np.testing.assert_array_equal(params.bias, layer.bias.detach().numpy())
    save_netvlad(params, tmp_path / "p.npz")
    loaded = NetVLAD.from_params(load_netvlad(tmp_path / "p.npz"))
    assert loaded.layout == "DxK" and not loaded.intra_norm and loaded.metadata == params.metadata
    x = torch.randn(2, 9, 5)
    torch.testing.assert_close(loaded(x), layer(x), rtol=0, atol=0)
    params.weight[:] = 0      # a copy: the layer is untouched
    assert layer.weight.abs().sum() > 0
    no_bias = NetVLAD.from_params(NetVLADParams(params.weight, None, params.centers))
    assert no_bias.bias is None and no_bias.to_params().bias is None
    with pytest.raises(TypeError, match="NetVLADParams"):
        NetVLAD.from_params({"weight": params.weight})


def _clustered_unit(rng, centers, n, noise=0.25):
    labels = rng.integers(0, len(centers), n)
    x = centers[labels] + noise * rng.standard_normal((n, centers.shape[1]))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def unit_data():
    rng = np.random.default_rng(7)
    K, D = 8, 16
    words = rng.normal(size=(K, D))
    words /= np.linalg.norm(words, axis=1, keepdims=True)
    sets = [_clustered_unit(rng, words, n) for n in (50, 120, 7, 300)]
    vocabulary = KMeansVocabulary(K, random_state=0).fit(sets)
    return sets, vocabulary


def test_v2_init_equals_soft_vlad(unit_data):
    """softmax_k(2 alpha c_k . x - alpha ||c_k||^2) = softmax_k(-alpha ||x - c_k||^2)."""
    sets, vocabulary = unit_data
    layer = NetVLAD.from_vocabulary(vocabulary, sets, version="v2", random_state=0)
    alpha = layer.metadata["alpha"]
    assert layer.metadata["init"] == "v2" and alpha > 0
    c = vocabulary.centers_.astype(np.float64)
    np.testing.assert_allclose(layer.centers.detach().numpy(), c, rtol=1e-6)
    np.testing.assert_allclose(layer.weight.detach().numpy(), 2 * alpha * c, rtol=1e-6)
    np.testing.assert_allclose(layer.bias.detach().numpy(), -alpha * (c ** 2).sum(1), rtol=1e-6)
    expected = VLADEncoder(vocabulary=vocabulary, assignment="soft", alpha=alpha, power=None) \
        .fit(sets).transform(sets)
    x, mask = _padded(sets, c.shape[1], dtype=torch.float32)
    with torch.no_grad():
        out = layer(x, mask).numpy()
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


def test_v1_init_and_alpha_from_the_formula(unit_data):
    sets, vocabulary = unit_data
    layer = NetVLAD.from_vocabulary(vocabulary, np.concatenate(sets), version="v1")
    assert layer.bias is None and layer.metadata["init"] == "v1"
    c = vocabulary.centers_.astype(np.float64)
    c_hat = c / np.linalg.norm(c, axis=1, keepdims=True)
    X = np.concatenate(sets).astype(np.float64)
    X /= np.sqrt((X ** 2).sum(1, keepdims=True) + 1e-12)
    top = np.sort(X @ c_hat.T, axis=1)[:, ::-1]
    alpha = -np.log(0.01) / np.mean(top[:, 0] - top[:, 1])
    assert layer.metadata["alpha"] == pytest.approx(alpha, rel=1e-9)
    np.testing.assert_allclose(layer.weight.detach().numpy(), alpha * c_hat, rtol=1e-6)
    np.testing.assert_allclose(layer.centers.detach().numpy(), c, rtol=1e-6)
    with_bias = NetVLAD.from_vocabulary(vocabulary, np.concatenate(sets), version="v1", bias=True)
    assert torch.equal(with_bias.bias, torch.zeros(len(c)))
    torch.testing.assert_close(with_bias(torch.as_tensor(sets[0])[None]),
                               layer(torch.as_tensor(sets[0])[None]))


def test_from_vocabulary_sampling_and_kmeans(unit_data, tmp_path):
    sets, vocabulary = unit_data
    a = NetVLAD.from_vocabulary(vocabulary, sets, "v2", random_state=3, n_descriptors=40, per_image=10)
    b = NetVLAD.from_vocabulary(vocabulary, sets, "v2", random_state=3, n_descriptors=40, per_image=10)
    assert a.metadata == b.metadata and a.metadata["n_init_descriptors"] == 37   # 10 a set, one has 7
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    # k-means run here on the (input-normalised) sample: an int K or an unfitted vocabulary
    c = NetVLAD.from_vocabulary(8, sets, "v1", random_state=0)
    d = NetVLAD.from_vocabulary(KMeansVocabulary(8, random_state=0), sets, "v1", random_state=0)
    assert c.weight.shape == (8, 16) and torch.equal(c.centers, d.centers)
    # a (K, D) array of centers or a tensor
    e = NetVLAD.from_vocabulary(torch.as_tensor(vocabulary.centers_), torch.as_tensor(sets[3]), "v2")
    f = NetVLAD.from_vocabulary(vocabulary, sets[3], "v2")
    assert torch.equal(e.weight, f.weight)
    # a vocabulary file
    vocabulary.save(tmp_path / "vocabulary.npz")
    g = NetVLAD.from_vocabulary(tmp_path / "vocabulary.npz", sets[3], "v2")
    assert torch.equal(g.weight, f.weight)
    with pytest.raises(ValueError, match="version"):
        NetVLAD.from_vocabulary(vocabulary, sets, "v3")
    with pytest.raises(ValueError, match="bias=False"):
        NetVLAD.from_vocabulary(vocabulary, sets, "v2", bias=False)
    with pytest.raises(ValueError, match="PCA|pca"):
        NetVLAD.from_vocabulary(KMeansVocabulary(4, pca=8, random_state=0).fit(sets), sets)


# ----------------------------------------------------------------------------- torch-free encoder


@pytest.fixture(scope="module")
def scene15_rootsift():
    if not (SCENE15 / "train").is_dir():
        pytest.skip(f"15-Scene not found at {SCENE15}")
    from vladkit import DenseSIFT

    classes = sorted(p for p in (SCENE15 / "train").iterdir() if p.is_dir())[:4]
    paths = [str(sorted(c.iterdir())[0]) for c in classes]
    sets = [f.descriptors for f in DenseSIFT(root=True).transform(paths)]
    vocabulary = KMeansVocabulary(16, max_descriptors=5_000, random_state=0).fit(sets)
    return sets, vocabulary


@pytest.mark.parametrize("l2", [True, False])
def test_v2_init_equals_soft_vlad_on_rootsift(scene15_rootsift, l2):
    """On real dense RootSIFT (unit rows, and zero rows where the contrast is low), without
    intra-normalisation. With it, a word of (numerically) no mass in an image differs by
    the epsilon convention alone: VLADEncoder's v_k / max(||v_k||, 1e-12) (VLFeat) makes a
    block of norm 6e-8 a unit vector, NetVLAD's v_k / sqrt(||v_k||^2 + 1e-12) (MATLAB)
    leaves it near 0 (seen on these images at K = 16); test_v2_init_equals_soft_vlad
    covers intra_norm where no word is empty."""
    sets, vocabulary = scene15_rootsift
    layer = NetVLAD.from_vocabulary(vocabulary, sets, "v2", random_state=0, intra_norm=False, l2=l2)
    expected = VLADEncoder(vocabulary=vocabulary, assignment="soft", alpha=layer.metadata["alpha"],
                           power=None, intra_norm=False, l2=l2, n_jobs=1).fit(sets).transform(sets)
    x, mask = _padded(sets, 128, dtype=torch.float32)
    with torch.no_grad():
        out = layer(x, mask).numpy()
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(out, expected, atol=1e-5 * scale, rtol=0)


def _netvlad_encoder():
    try:
        from vladkit.encoders.netvlad import NetVLADEncoder
    except ImportError:
        pytest.skip("vladkit.encoders.netvlad.NetVLADEncoder is not available")
    return NetVLADEncoder


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["KxD", "DxK"])
@pytest.mark.parametrize("normalize_input,intra_norm,l2", OPTIONS)
def test_equals_torch_free_encoder_on_rootsift(scene15_rootsift, bias, layout, normalize_input,
                                               intra_norm, l2):
    NetVLADEncoder = _netvlad_encoder()
    sets, vocabulary = scene15_rootsift
    layer = NetVLAD.from_vocabulary(vocabulary, sets, "v2" if bias else "v1", random_state=0,
                                    n_descriptors=5_000, normalize_input=normalize_input,
                                    intra_norm=intra_norm, l2=l2, layout=layout)
    with torch.no_grad():   # move away from the initialisation, as training would
        g = torch.Generator().manual_seed(0)
        for p in layer.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g))
    x, mask = _padded(sets, 128, dtype=torch.float32)
    with torch.no_grad():
        expected = layer(x, mask).numpy()
    encoder = NetVLADEncoder(params=layer.to_params(), n_jobs=1)
    out = encoder.fit(sets).transform(sets)
    assert out.shape == expected.shape and out.dtype == np.float32
    scale = max(1.0, float(np.abs(expected).max()))      # unnormalised vectors: relative
    np.testing.assert_allclose(out, expected, atol=1e-5 * scale, rtol=0)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_with_what_was_expected():
    layer = NetVLAD(4, 8)
    with pytest.raises(ValueError, match=r"D = 8.*\(2, 5, 7\)"):
        layer(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match=r"D = 8 channels.*\(2, 7, 3, 3\)"):
        layer(torch.randn(2, 7, 3, 3))
    with pytest.raises(ValueError, match=r"\(B, N, D\) or \(B, D, H, W\).*x\[None\]"):
        layer(torch.randn(5, 8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer(np.zeros((1, 5, 8), np.float32))
    with pytest.raises(TypeError, match="dtype torch.float64.*float32"):
        layer(torch.randn(1, 5, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype torch.float64.*float32"):
        layer(torch.ones(1, 5, 8, dtype=torch.int64).double())
    x = torch.randn(2, 5, 8)
    for value, options in itertools.product((float("nan"), float("inf"), -float("inf")),
                                            itertools.product([True, False], repeat=2)):
        bad = x.clone()
        bad[1, 3, 2] = value
        other = NetVLAD(4, 8, normalize_input=options[0], bias=options[1], check_finite=True)
        with pytest.raises(ValueError, match="NaN or inf: set 1, descriptor 3"):
            other(bad)
        # Without the opt-in check (no host read of the data), NaN propagates, as in torch's
        # own layers, and only into the set that holds it.
        quiet = NetVLAD(4, 8, normalize_input=options[0], bias=options[1])
        out = quiet(bad)
        assert torch.isfinite(out[0]).all() and not torch.isfinite(out[1]).all()
    layer = NetVLAD(4, 8, check_finite=True)
    bad = torch.randn(2, 8, 2, 3)
    bad[1, 5, 1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf: set 1, descriptor 5"):   # row 1 * 3 + 2
        layer(bad)
    bad = x.clone()
    bad[1, 3, 2] = float("nan")
    mask = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="unmasked"):
        layer(bad, mask)
    mask[1, 3] = False
    assert torch.isfinite(layer(bad, mask)).all()        # a masked row may hold anything
    with pytest.raises(ValueError, match=r"mask must have shape \(B, N\) = \(2, 5\).*\(2, 4\)"):
        layer(x, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must have shape \(B, N\) = \(2, 5\).*\(2, 5, 1\)"):
        layer(x, torch.ones(2, 5, 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must have dtype torch.bool.*float32"):
        layer(x, torch.ones(2, 5))
    with pytest.raises(TypeError, match="mask must have dtype torch.bool.*int64"):
        layer(x, torch.ones(2, 5, dtype=torch.int64))
    with pytest.raises(TypeError, match="mask must be a bool torch.Tensor"):
        layer(x, np.ones((2, 5), bool))
    with pytest.raises(ValueError, match="mask applies to"):
        layer(torch.randn(2, 8, 2, 2), torch.ones(2, 4, dtype=torch.bool))


def test_bad_construction():
    with pytest.raises(ValueError, match="layout"):
        NetVLAD(4, 8, layout="K x D")
    with pytest.raises(ValueError, match="n_clusters"):
        NetVLAD(0, 8)
    with pytest.raises(ValueError, match="dim"):
        NetVLAD(4, 8.0)
    with pytest.raises(TypeError, match="l2"):
        NetVLAD(4, 8, l2="yes")
