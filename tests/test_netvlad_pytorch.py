"""NetVLAD as PyTorch users run it: autocast, torch.compile, torch.export, the meta device,
tracing; one default initialisation; metadata through the state_dict; the GeM, PCA
whitening, L2 and ImageRetrievalModel modules; torchvision backbones; checkpoints of
Nanne/pytorch-NetVlad."""

import io

import numpy as np
import pytest

from vladkit import KMeansVocabulary  # noqa: F401  (vladkit before torch: its thread settings)

torch = pytest.importorskip(
    "torch", reason="torch is not installed (optional: pip install torch==2.14.1 torchvision==0.29.1, "
                    "then pip install '.[torch]')")

from torch.nn import functional as F  # noqa: E402

from vladkit.encoders.netvlad_params import (  # noqa: E402
    DEFAULT_INIT, init_netvlad, load_netvlad, save_netvlad)
from vladkit.netvlad import (  # noqa: E402
    GeM, ImageRetrievalModel, L2Normalize, NetVLAD, PCAWhitening, model_from_pytorch_netvlad,
    netvlad_from_pytorch_netvlad)


@pytest.fixture(autouse=True, scope="module")
def two_torch_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _layer(K=8, D=32, seed=0, **options):
    torch.manual_seed(seed)
    layer = NetVLAD(K, D, **options)
    with torch.no_grad():
        layer.weight.normal_(0, 2.0)
        layer.centers.normal_(0, 0.5)
        if layer.bias is not None:
            layer.bias.normal_(0, 0.5)
    return layer


def _backbone():
    torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed (the torch extra)")
    del torchvision
    from vladkit.netvlad import build_backbone

    torch.manual_seed(0)
    return build_backbone("resnet18", layer="layer3", weights=None).eval()


# ------------------------------------------------------------------ defect 1: autocast


def test_autocast_bfloat16_runs_in_float32_and_stays_close():
    layer = _layer()
    x = torch.randn(3, 40, 32)
    mask = torch.rand(3, 40) > 0.2
    exact = layer(x, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = layer(x.to(torch.bfloat16), mask)
        from_float = layer(x, mask)     # autocast would run the matmuls in bfloat16
    assert mixed.dtype == torch.float32 and from_float.dtype == torch.float32
    assert (mixed - exact).abs().max() < 1e-2
    assert (from_float - exact).abs().max() < 1e-6   # autocast is off inside: float32 sums
    # A convolution under autocast gives bfloat16 maps; NetVLAD takes them, gradients flow.
    conv = torch.nn.Conv2d(3, 32, 3)
    images = torch.randn(2, 3, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = conv(images)
        out = layer(maps)
    assert maps.dtype == torch.bfloat16 and out.dtype == torch.float32
    out.square().sum().backward()
    assert torch.isfinite(conv.weight.grad).all() and torch.isfinite(layer.weight.grad).all()
    assert (out - layer(conv(images))).abs().max() < 1e-2


def test_more_precise_input_than_the_parameters_is_refused_outside_autocast():
    layer = _layer()
    with pytest.raises(TypeError, match="float64, more precise"):
        layer(torch.randn(1, 5, 32, dtype=torch.float64))
    # bfloat16 and float16 inputs are converted up, outside autocast too.
    x = torch.randn(1, 5, 32)
    assert (layer(x.half()) - layer(x.half().float())).abs().max() == 0


# ------------------------------------------------------------------ defect 2: compile, export, meta


@pytest.mark.parametrize("masked", [False, True])
def test_compile_fullgraph_matches_eager(masked):
    torch._dynamo.reset()
    layer = _layer(bias=True)
    compiled = torch.compile(layer, fullgraph=True)
    for n in (30, 45):
        x = torch.randn(2, n, 32)
        mask = (torch.rand(2, n) > 0.3) if masked else None
        assert (compiled(x, mask) - layer(x, mask)).abs().max() < 1e-5


def test_export_with_a_dynamic_number_of_descriptors():
    layer = _layer()
    batch, n = torch.export.Dim("batch"), torch.export.Dim("n", min=0)
    program = torch.export.export(layer, (torch.randn(2, 50, 32), torch.ones(2, 50, dtype=torch.bool)),
                                  dynamic_shapes={"x": {0: batch, 1: n}, "mask": {0: batch, 1: n}})
    module = program.module()
    for size in (0, 7, 150_000):   # 150,000 rows: three chunks when run eagerly
        x = torch.randn(2, size, 32)
        mask = torch.rand(2, size) > 0.5
        assert (module(x, mask) - layer(x, mask)).abs().max() < 1e-5
    assert torch.equal(module(torch.zeros(2, 0, 32), torch.zeros(2, 0, dtype=torch.bool)), torch.zeros(2, 256))
    # Saved and loaded as a file.
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    x = torch.randn(1, 11, 32)
    again = torch.export.load(buffer).module()
    assert (again(x, torch.ones(1, 11, dtype=torch.bool)) - layer(x)).abs().max() < 1e-5


def test_meta_device_infers_shapes():
    layer = NetVLAD(8, 32).to("meta")
    assert layer(torch.empty(4, 100, 32, device="meta")).shape == (4, 256)
    assert layer(torch.empty(4, 32, 5, 6, device="meta")).shape == (4, 256)
    mask = torch.empty(4, 100, dtype=torch.bool, device="meta")
    assert layer(torch.empty(4, 100, 32, device="meta"), mask).device.type == "meta"


# ------------------------------------------------------------------ defect 3: trace and script


def test_trace_holds_for_any_number_of_descriptors():
    layer = _layer(K=64, D=128)
    with pytest.warns(Warning):   # torch's deprecation and constant-shape warnings
        traced = torch.jit.trace(layer, (torch.randn(1, 50, 128),))
    # 70,000 rows are three chunks eagerly (CHUNK_ELEMENTS // 128 = 32,768 rows each).
    x = torch.randn(1, 70_000, 128)
    assert (traced(x) - layer(x)).abs().max() < 1e-5


def test_script_is_refused_with_the_supported_ways():
    with pytest.raises(RuntimeError, match="torch.export.export"):
        torch.jit.script(NetVLAD(4, 8))


# ------------------------------------------------------------------ defect 4: one default


def test_every_default_initialisation_loads_into_a_default_layer():
    rng = np.random.default_rng(0)
    descriptors = rng.random((400, 16)).astype(np.float32)
    initialised = NetVLAD.from_vocabulary(8, descriptors, random_state=0)
    assert DEFAULT_INIT == "v2" and initialised.metadata["init"] == DEFAULT_INIT
    NetVLAD(8, 16).load_state_dict(initialised.state_dict())          # was: missing "bias"
    centers = KMeansVocabulary(8, random_state=0).fit_sample(descriptors).centers_
    params = init_netvlad(centers, descriptors)
    assert params.bias is not None
    NetVLAD(8, 16).load_state_dict(NetVLAD.from_params(params).state_dict())
    from vladkit.netvlad.training import train_netvlad

    sets = [rng.random((30, 16)).astype(np.float32) for _ in range(8)]
    trained = train_netvlad(sets, [0, 0, 1, 1, 2, 2, 3, 3], n_clusters=4, epochs=0, progress=False,
                            n_threads=1)
    assert trained.bias is not None and trained.metadata["init"] == DEFAULT_INIT
    from vladkit.app.cli import build_parser

    train = build_parser()._subparsers._group_actions[0].choices["netvlad"]
    train = train._subparsers._group_actions[0].choices["train"]
    assert next(a for a in train._actions if a.dest == "init").default == DEFAULT_INIT


# ------------------------------------------------------------------ defect 5: metadata


def test_metadata_survives_the_state_dict_and_encode_accepts_the_file(tmp_path):
    import cv2
    from conftest import textured_image

    from vladkit import DenseSIFT
    from vladkit.app.cli import main
    from vladkit.pipeline.encodings import load_encodings
    from vladkit.pipeline.recipe import describe_extractor

    extractor = DenseSIFT(root=True)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.png"), textured_image(i, (64, 72)))
    sample = np.concatenate([f.descriptors for f in extractor.transform(sorted(map(str, folder.iterdir())))])
    original = NetVLAD.from_vocabulary(4, sample, random_state=0,
                                       metadata={"descriptor_type": describe_extractor(extractor)})
    save_netvlad(original.to_params(), tmp_path / "original.npz")

    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = NetVLAD(4, 128)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.metadata == original.metadata and "descriptor_type" in restored.metadata
    save_netvlad(restored.to_params(), tmp_path / "restored.npz")
    assert load_netvlad(tmp_path / "restored.npz") == load_netvlad(tmp_path / "original.npz")
    for name in ("original", "restored"):
        assert main(["encode", str(folder), "--vocab", str(tmp_path / f"{name}.npz"), "-q",
                     "-o", str(tmp_path / f"{name}-vectors.npz")]) == 0
    assert np.array_equal(load_encodings(tmp_path / "original-vectors.npz").vectors,
                          load_encodings(tmp_path / "restored-vectors.npz").vectors)
    # A state_dict without the extra state (an older file, another port) still loads.
    old = {k: v for k, v in original.state_dict().items() if k != "_extra_state"}
    kept = NetVLAD(4, 128)
    kept.metadata = {"mine": 1}
    kept.load_state_dict(old)
    assert kept.metadata == {"mine": 1}


# ------------------------------------------------------------------ defect 7: numpy integers


def test_numpy_integers_are_accepted():
    layer = NetVLAD(np.int64(8), np.int32(32))
    assert layer.n_clusters == 8 and type(layer.n_clusters) is int and layer(torch.randn(1, 3, 32)).shape == (1, 256)
    assert PCAWhitening(np.int64(32), np.int64(4)).n_components == 4
    with pytest.raises(ValueError, match="n_clusters"):
        NetVLAD(np.float64(8), 32)


# ------------------------------------------------------------------ modules


def gem_reference(x, p, eps=1e-6):
    """GeM of (N, D) descriptors, float64 numpy: (mean_i max(x_id, eps)^p)^(1/p)."""
    x = np.maximum(np.asarray(x, np.float64), eps)
    return np.mean(x ** p, axis=0) ** (1 / p) if len(x) else np.zeros(x.shape[1])


def test_gem_matches_the_formula_with_masks_and_empty_sets():
    rng = np.random.default_rng(1)
    gem = GeM(p=2.5).double()
    maps = torch.from_numpy(np.abs(rng.standard_normal((2, 6, 4, 5))))
    expected = [gem_reference(m.reshape(6, -1).T, 2.5) for m in maps.numpy()]
    assert np.allclose(gem(maps).detach().numpy(), expected, atol=1e-12)
    sets = torch.from_numpy(rng.standard_normal((3, 7, 6)))
    mask = torch.from_numpy(np.array([[1] * 7, [1] * 3 + [0] * 4, [0] * 7], bool))
    out = gem(sets, mask)
    for i in range(3):
        rows = sets[i][mask[i]].numpy()
        assert np.allclose(out[i].detach().numpy(), gem_reference(rows, 2.5), atol=1e-12)
    out.sum().backward()
    assert torch.isfinite(gem.p.grad).all() and gem.p.grad.abs() > 0
    assert not isinstance(GeM(trainable=False).p, torch.nn.Parameter)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert GeM()(maps.float().bfloat16()).dtype == torch.float32


def test_pca_whitening_equals_the_estimator_and_goes_back():
    from vladkit import PCAWhitening as Estimator

    rng = np.random.default_rng(2)
    train = rng.standard_normal((300, 24)).astype(np.float32) @ rng.standard_normal((24, 24)).astype(np.float32)
    test = rng.standard_normal((20, 24)).astype(np.float32)
    test[3] = 0
    for power in (None, 0.5):
        estimator = Estimator(8, power=power, svd_solver="full").fit(train)
        layer = PCAWhitening.from_estimator(estimator)
        out = layer(torch.from_numpy(test)).numpy()
        assert np.allclose(out, estimator.transform(test), atol=1e-5)
        assert not out[3].any()                            # a zero row stays zero
        back = layer.to_estimator()
        assert np.allclose(back.transform(test), estimator.transform(test), atol=1e-6)
    fitted = PCAWhitening.fit(torch.from_numpy(train), 8, trainable=True)
    assert isinstance(fitted.projection, torch.nn.Parameter)
    assert np.allclose(fitted(torch.from_numpy(test)).detach().numpy(),
                       Estimator(8, svd_solver="full").fit(train).transform(test), atol=1e-5)


def test_l2_normalize_keeps_zero_vectors_and_their_gradient_finite():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]], requires_grad=True)
    y = L2Normalize()(x)
    assert torch.allclose(y, torch.tensor([[0.6, 0.8], [0.0, 0.0]]))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_image_retrieval_model_compile_export_and_autocast():
    """The issue's check: resnet18 + NetVLAD compiled (fullgraph) and exported match eager
    within 1e-5; under bfloat16 autocast within 1e-2."""
    backbone = _backbone()
    model = ImageRetrievalModel(backbone, _layer(K=16, D=backbone.out_channels)).eval()
    images = torch.rand(2, 3, 96, 112)
    with torch.no_grad():
        eager = model(images)
        assert eager.shape == (2, 16 * 256) and torch.allclose(eager.norm(dim=1), torch.ones(2))
        torch._dynamo.reset()
        assert (torch.compile(model, fullgraph=True)(images) - eager).abs().max() < 1e-5
        program = torch.export.export(model, (images,))
        assert (program.module()(images) - eager).abs().max() < 1e-5
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(images)
        assert mixed.dtype == torch.float32 and (mixed - eager).abs().max() < 1e-2


def test_image_retrieval_model_with_gem_and_learnt_whitening():
    backbone = _backbone()
    model = ImageRetrievalModel(backbone, GeM())
    images = torch.rand(40, 3, 64, 64)
    model.fit_whitening(images, 16, batch_size=8)
    vectors = model.embed(images[:5])
    assert vectors.shape == (5, 16) and torch.allclose(vectors.norm(dim=1), torch.ones(5), atol=1e-5)
    assert model.training    # embed restores the mode


# ------------------------------------------------------------------ Nanne/pytorch-NetVlad


class NanneNetVLAD(torch.nn.Module):
    """Nanne/pytorch-NetVlad's layer, written from its forward: a 1x1 convolution and a
    softmax over clusters, residuals x - c_k summed cluster by cluster, F.normalize at each
    step (x / max(||x||, 1e-12))."""

    def __init__(self, num_clusters, dim, vladv2):
        super().__init__()
        self.conv = torch.nn.Conv2d(dim, num_clusters, kernel_size=(1, 1), bias=vladv2)
        self.centroids = torch.nn.Parameter(torch.rand(num_clusters, dim))

    def forward(self, x):
        n, c = x.shape[:2]
        x = F.normalize(x, p=2, dim=1)
        assignment = F.softmax(self.conv(x).view(n, self.centroids.shape[0], -1), dim=1)
        flat = x.view(n, c, -1)
        vlad = torch.stack([((flat - self.centroids[k][None, :, None]) * assignment[:, k:k + 1]).sum(-1)
                            for k in range(self.centroids.shape[0])], dim=1)
        vlad = F.normalize(vlad, p=2, dim=2).view(n, -1)
        return F.normalize(vlad, p=2, dim=1)


@pytest.mark.parametrize("vladv2", [False, True])
def test_nanne_layer_state_dict_imports(vladv2, tmp_path):
    torch.manual_seed(3)
    theirs = NanneNetVLAD(8, 32, vladv2)
    with torch.no_grad():
        theirs.conv.weight.normal_(0, 3)
        if vladv2:
            theirs.conv.bias.normal_(0, 1)
    maps = torch.randn(2, 32, 5, 7)
    # As its main.py saves: {"state_dict": model.state_dict(), ...}, the pool under
    # DataParallel (module.), next to an encoder.
    model = torch.nn.Module()
    model.add_module("pool", torch.nn.DataParallel(theirs))
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 3, "best_score": 0.5, "state_dict": model.state_dict()}, path)
    for source in (path, theirs.state_dict()):
        ours = netvlad_from_pytorch_netvlad(source)
        assert (ours.bias is not None) == vladv2 and ours.metadata["imported_from"] == "Nanne/pytorch-NetVlad"
        assert (ours(maps) - theirs(maps)).abs().max() < 1e-6
    with pytest.raises(ValueError, match="not a pytorch-NetVlad state_dict"):
        netvlad_from_pytorch_netvlad({"weight": torch.zeros(2, 2)})


def test_nanne_whole_model_imports_with_its_vgg16_encoder(tmp_path):
    torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed (the torch extra)")
    torch.manual_seed(4)
    encoder = torch.nn.Sequential(*list(torchvision.models.vgg16(weights=None).features.children())[:-2])
    pool = NanneNetVLAD(4, 512, vladv2=False)
    model = torch.nn.Module()
    model.add_module("encoder", encoder)
    model.add_module("pool", pool)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "checkpoint.pth.tar")
    ours = model_from_pytorch_netvlad(tmp_path / "checkpoint.pth.tar").eval()
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert (ours(images) - pool(encoder(images))).abs().max() < 1e-6


# ------------------------------------------------------------------ backbones


@pytest.mark.parametrize("name, layer, channels, stride", [
    ("vgg16", "conv5_3", 512, 16), ("resnet18", "layer4", 512, 32), ("resnet50", "layer3", 1024, 16)])
def test_backbones_are_torchvision_cut_at_the_named_layer(name, layer, channels, stride):
    torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed (the torch extra)")
    from vladkit.netvlad import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone(name, layer=layer)
    assert (backbone.out_channels, backbone.stride, backbone.name) == (channels, stride, f"{name}/{layer}")
    with torch.no_grad():
        maps = backbone(torch.rand(1, 3, 64, 96))
    assert maps.shape == (1, channels, 64 // stride, 96 // stride)
    # torchvision's names and shapes: its weights (a state_dict of the whole network) load.
    full = torchvision.models.get_model(name, weights=None).state_dict()
    prefix = "features." if name == "vgg16" else ""
    ours = backbone.state_dict()
    assert all(full[prefix + key].shape == value.shape for key, value in ours.items())
    backbone.load_state_dict({key: full[prefix + key] for key in ours})
    if name == "vgg16":   # the paper's cut: conv5_3 before its ReLU, so negative values remain
        assert isinstance(backbone[-1], torch.nn.Conv2d) and (maps < 0).any()
    with pytest.raises(ValueError, match="can be cut at"):
        build_backbone(name, layer="fc")


def test_unknown_backbone_is_refused_with_the_choices():
    from vladkit.netvlad import build_backbone

    with pytest.raises(ValueError, match="resnet18.*any nn.Module"):
        build_backbone("alexnet")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (the GPU path is the same code: "
                                                          "float16 autocast, compile and export)")
def test_cuda_float16_autocast_and_compile():
    layer = _layer(K=16, D=64).cuda()
    x = torch.randn(4, 500, 64, device="cuda")
    mask = torch.rand(4, 500, device="cuda") > 0.2
    exact = layer(x, mask)
    with torch.autocast("cuda", dtype=torch.float16):
        mixed = layer(x.half(), mask)
    assert mixed.dtype == torch.float32 and (mixed - exact).abs().max() < 1e-2
    torch._dynamo.reset()
    assert (torch.compile(layer, fullgraph=True)(x, mask) - exact).abs().max() < 1e-5
