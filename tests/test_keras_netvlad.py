"""The Keras 3 NetVLAD layer (vladkit.keras, the keras extra) on each installed backend:
the same function as the torch layer (every option, layout, masks, feature maps, empty
sets) and as a float64 numpy loop, gradients, a training step, config and .keras round
trips, parameters to and from NetVLADParams / save_netvlad files, bad input.

Keras picks its backend from KERAS_BACKEND when first imported, so each backend runs in
one subprocess (the script ``CHILD`` below) that computes everything and writes it to an
.npz; the comparisons are made here. This process never imports keras.
"""

import importlib.util
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

K, D, B, N = 4, 5, 3, 7
#: (bias, normalize_input, intra_norm, l2, layout): every combination.
CASES = [dict(zip(("bias", "normalize_input", "intra_norm", "l2"), flags), layout=layout)
         for flags in itertools.product([True, False], repeat=4) for layout in ("KxD", "DxK")]
#: The case of the gradient, training and round-trip checks.
MAIN = dict(bias=True, normalize_input=True, intra_norm=True, l2=True, layout="DxK")
TOLERANCE = 1e-5
#: The backend package each Keras backend needs ("tensorflow" also names the CPU wheel's).
BACKENDS = {"jax": "jax", "torch": "torch", "tensorflow": "tensorflow"}

CHILD = r'''
import json, sys
from pathlib import Path

import numpy as np

folder, backend = Path(sys.argv[1]), sys.argv[2]
import keras
from keras import ops

from vladkit.encoders.netvlad_params import NetVLADParams, save_netvlad
from vladkit.keras import NetVLAD

assert keras.backend.backend() == backend, keras.backend.backend()
if backend == "torch":
    import torch
    torch.set_num_threads(1)
data = dict(np.load(folder / "inputs.npz"))
cases, main = json.loads(str(data["cases"])), json.loads(str(data["main"]))
x, x_masked, mask, x_zeroed = data["x"], data["x_masked"], data["mask"], data["x_zeroed"]
(K, D), N = data["weight"].shape, x.shape[1]
out, info = {}, {}


def params(case):
    return NetVLADParams(data["weight"], data["bias"] if case["bias"] else None, data["centers"],
                         **{k: v for k, v in case.items() if k != "bias"}, metadata={"case": case})


def run(layer, *args, **kwargs):
    return ops.convert_to_numpy(layer(*args, **kwargs))


for i, case in enumerate(cases):
    layer = NetVLAD.from_params(params(case))
    out[f"plain{i}"] = run(layer, x)
    out[f"masked{i}"] = run(layer, x_masked, mask=mask)
    out[f"empty{i}"] = run(layer, data["x_empty"])
    out[f"map{i}"] = run(layer, data["fmap"])

# Gradients of sum(output * r) with respect to the parameters and the input.
layer = NetVLAD.from_params(params(main))
names = [v.name for v in layer.trainable_variables]
if backend == "jax":
    import jax
    import jax.numpy as jnp

    def loss(values, inputs):
        y, _ = layer.stateless_call(values, [], inputs, mask=jnp.asarray(mask))
        return jnp.sum(y * data["r"])

    grads, grad_x = jax.grad(loss, argnums=(0, 1))([v.value for v in layer.trainable_variables],
                                                   jnp.asarray(x_masked))
elif backend == "torch":
    inputs = ops.convert_to_tensor(x_masked).requires_grad_()
    (layer(inputs, mask=ops.convert_to_tensor(mask)) * ops.convert_to_tensor(data["r"])).sum().backward()
    grads, grad_x = [v.value.grad for v in layer.trainable_variables], inputs.grad
else:
    import tensorflow as tf
    inputs = tf.constant(x_masked)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        value = tf.reduce_sum(layer(inputs, mask=tf.constant(mask)) * data["r"])
    grad_x, *grads = tape.gradient(value, [inputs] + layer.trainable_variables)
for name, grad in zip(names, grads):
    out[f"grad_{name}"] = ops.convert_to_numpy(grad)
out["grad_x"] = ops.convert_to_numpy(grad_x)

# A model: Keras' Masking gives the mask; one training step; parameters back to a file.
layer = NetVLAD.from_params(params(main), name="vlad")
inp = keras.Input((N, D))
model = keras.Model(inp, layer(keras.layers.Masking(0.0)(inp)))
out["masking"] = run(model, x_zeroed)
out["explicit"] = run(layer, x_zeroed, mask=mask)


def mse():
    return float(np.mean((run(model, x_zeroed) - data["target"]) ** 2))


# fit compiles the step (jax.jit, tf.function): the layer traces with a propagated mask.
model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
before = mse()
model.fit(x_zeroed, data["target"], batch_size=len(x_zeroed), epochs=1, verbose=0)
info["losses"] = [before, mse()]
info["finite_weights"] = all(bool(np.isfinite(w).all()) for w in layer.get_weights())
out["trained"] = run(model, x_zeroed)
save_netvlad(layer.to_params(metadata={"trained": backend}), folder / "trained.npz")
model.save(folder / "model.keras")
reloaded = keras.saving.load_model(folder / "model.keras")
out["reloaded"] = run(reloaded, x_zeroed)
info["reloaded_metadata"] = reloaded.get_layer("vlad").metadata
clone = NetVLAD.from_config(layer.get_config())
clone.build((None, N, D))
clone.set_weights(layer.get_weights())
out["clone"] = run(clone, x_zeroed, mask=mask)
info["same_config"] = clone.get_config() == layer.get_config()
# Feature maps of any size through a symbolic model, compiled by predict.
inp = keras.Input((None, None, D))
out["map_model"] = keras.Model(inp, layer(inp)).predict(data["fmap"], verbose=0)
out["map_trained"] = run(layer, data["fmap"])

# Mixed precision: computed in float32 (in float16, 1e-12 is 0: padding would give 0 / 0).
mixed = NetVLAD.from_params(params(main), dtype="mixed_float16")
y = mixed(x_masked, mask=mask)
info["mixed_dtype"] = keras.backend.standardize_dtype(y.dtype)
out["mixed"], out["mixed_reference"] = ops.convert_to_numpy(y), run(
    NetVLAD.from_params(params(main)), ops.cast(ops.cast(x_masked, "float16"), "float32"), mask=mask)
# numpy integers (an array's shape) are accepted; the config holds Python ints.
info["int_config"] = [NetVLAD(np.int64(K), np.int64(D)).get_config()[k] for k in ("n_clusters", "dim")]

errors = {}
for label, make in {
    "dim": lambda: layer(np.zeros((2, 3, D + 1), "float32")),
    "map_dim": lambda: layer(np.zeros((2, 3, 3, D + 1), "float32")),
    "one_set": lambda: layer(np.zeros((3, D), "float32")),
    "map_mask": lambda: layer(data["fmap"], mask=np.ones((2, 12), bool)),
    "clusters": lambda: NetVLAD(0, D),
    "flag": lambda: NetVLAD(K, D, l2="yes"),
    "layout": lambda: NetVLAD(K, D, layout="KD"),
    "unbuilt": lambda: NetVLAD(K, D).to_params(),
    "params": lambda: NetVLAD.from_params({"weight": data["weight"]}),
}.items():
    try:
        make()
        errors[label] = None
    except Exception as error:
        errors[label] = [type(error).__name__, str(error)]
info["errors"] = errors
np.savez(folder / "outputs.npz", info=json.dumps(info), **out)
'''


# ---------------------------------------------------------------------------- no keras needed


def test_import_vladkit_never_imports_keras():
    code = "import sys, vladkit; print(sorted({'keras', 'jax', 'vladkit.keras'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_without_keras_the_import_error_says_how_to_install():
    code = ("import sys; sys.modules['keras'] = None\n"
            "try:\n    import vladkit.keras\nexcept ImportError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert 'pip install "vladkit[keras]"' in result.stdout and "jax" in result.stdout \
        and "torch" in result.stdout, result.stdout + result.stderr


# ---------------------------------------------------------------------------- data, references


def _inputs():
    rng = np.random.default_rng(33)
    weight = rng.normal(0, 2.0, (K, D)).astype(np.float32)     # sharp, varied assignments
    centers = rng.normal(0, 0.5, (K, D)).astype(np.float32)
    bias = rng.normal(0, 0.5, K).astype(np.float32)
    x = rng.normal(size=(B, N, D)).astype(np.float32)
    mask = np.zeros((B, N), bool)
    mask[0], mask[1, :4] = True, True                          # set 2: every row masked
    x_masked = x.copy()
    x_masked[1, 5], x_masked[2, 0], x_masked[2, 1:] = np.nan, np.inf, 1e30  # padding
    x_zeroed = np.where(mask[..., None], x, 0).astype(np.float32)
    return {"weight": weight, "centers": centers, "bias": bias, "x": x, "mask": mask,
            "x_masked": x_masked, "x_zeroed": x_zeroed,
            "x_empty": np.zeros((2, 0, D), np.float32),
            "fmap": rng.normal(size=(2, 3, 4, D)).astype(np.float32),        # channels-last
            "r": rng.normal(size=(B, K * D)).astype(np.float32),
            "target": rng.normal(0, 0.3, (B, K * D)).astype(np.float32),
            "cases": json.dumps(CASES), "main": json.dumps(MAIN)}


INPUTS = _inputs()


def numpy_netvlad(x, mask, weight, bias, centers, *, normalize_input, intra_norm, l2, layout):
    """NetVLAD of one set, float64, descriptor by descriptor: a_ik and sum_i a_ik (x_i - c_k)."""
    weight, centers = np.float64(weight), np.float64(centers)
    vlad = np.zeros(centers.shape)
    for i, row in enumerate(np.float64(x)):
        if mask is not None and not mask[i]:
            continue
        if normalize_input:
            row = row / np.sqrt(np.sum(row ** 2) + 1e-12)
        scores = weight @ row + (0 if bias is None else np.float64(bias))
        a = np.exp(scores - scores.max())
        a /= a.sum()
        for k in range(len(centers)):
            vlad[k] += a[k] * (row - centers[k])
    if intra_norm:
        vlad /= np.sqrt(np.sum(vlad ** 2, axis=1, keepdims=True) + 1e-12)
    vlad = (vlad if layout == "KxD" else vlad.T).ravel()
    if l2:
        vlad /= np.sqrt(np.sum(vlad ** 2)) + 1e-12
    return vlad


def _params(case):
    from vladkit.encoders.netvlad_params import NetVLADParams

    return NetVLADParams(INPUTS["weight"], INPUTS["bias"] if case["bias"] else None, INPUTS["centers"],
                         **{k: v for k, v in case.items() if k != "bias"})


@pytest.fixture(scope="module")
def torch_layer():
    """A factory of torch NetVLAD layers (float32) from NetVLADParams, one torch thread."""
    torch = pytest.importorskip("torch", reason="the reference is the torch layer (the torch extra)")
    from vladkit.netvlad import NetVLAD

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield lambda params: NetVLAD.from_params(params)
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- the subprocesses


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every installed backend's subprocess at once (they are mostly imports);
    {backend: (folder, process) or the reason it is skipped}."""
    if importlib.util.find_spec("keras") is None:
        pytest.skip('keras is not installed (the keras extra: pip install ".[keras]" jax jaxlib)')
    started = {}
    for backend, package in BACKENDS.items():
        if importlib.util.find_spec(package) is None:
            started[backend] = f"{package} is not installed (Keras' {backend} backend)"
            continue
        folder = tmp_path_factory.mktemp(f"keras_{backend}")
        np.savez(folder / "inputs.npz", **INPUTS)
        (folder / "child.py").write_text(CHILD, encoding="utf-8")
        env = {**os.environ, "KERAS_BACKEND": backend, "KERAS_HOME": str(folder / "keras_home"),
               "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2", "TF_NUM_INTEROP_THREADS": "1",
               "TF_NUM_INTRAOP_THREADS": "1", "OMP_NUM_THREADS": "1"}
        process = subprocess.Popen([sys.executable, str(folder / "child.py"), str(folder), backend],
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        started[backend] = (folder, process)
    yield started
    for value in started.values():
        if not isinstance(value, str) and value[1].poll() is None:
            value[1].kill()
            value[1].wait()


@pytest.fixture(scope="module", params=list(BACKENDS))
def backend(request, runs):
    """(backend name, outputs, info, folder) of one backend's finished subprocess."""
    value = runs[request.param]
    if isinstance(value, str):
        pytest.skip(value)
    folder, process = value
    try:
        log, _ = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"the {request.param} subprocess ran over 600 s")
    assert process.returncode == 0, f"{request.param} backend failed:\n{log[-6000:]}"
    with np.load(folder / "outputs.npz") as archive:
        outputs = {key: archive[key] for key in archive.files}
    return request.param, outputs, json.loads(str(outputs.pop("info"))), folder


# ---------------------------------------------------------------------------- the checks


def _close(actual, expected, what, tolerance=TOLERANCE):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert np.isfinite(actual).all(), f"{what}: NaN or inf"
    error = float(np.max(np.abs(actual - expected), initial=0.0))
    assert error <= tolerance, f"{what}: max abs difference {error:.2e}"


def test_every_option_and_layout_matches_the_torch_layer(backend, torch_layer):
    import torch

    name, outputs, _, _ = backend
    x, mask = torch.from_numpy(INPUTS["x"]), torch.from_numpy(INPUTS["mask"])
    # Masked rows may hold anything (NaN, inf, huge), in both layers.
    x_masked = torch.from_numpy(INPUTS["x_masked"])
    fmap = torch.from_numpy(INPUTS["fmap"]).permute(0, 3, 1, 2)      # channels-first
    with torch.no_grad():
        for i, case in enumerate(CASES):
            layer = torch_layer(_params(case))
            what = f"{name} {case}"
            _close(outputs[f"plain{i}"], layer(x).numpy(), f"{what} plain")
            _close(outputs[f"masked{i}"], layer(x_masked, mask).numpy(), f"{what} masked")
            _close(outputs[f"map{i}"], layer(fmap).numpy(), f"{what} feature map")


def test_every_option_and_layout_matches_a_numpy_loop(backend):
    name, outputs, _, _ = backend
    for i, case in enumerate(CASES):
        options = {k: v for k, v in case.items() if k != "bias"}
        bias = INPUTS["bias"] if case["bias"] else None
        for key, x, mask in (("plain", INPUTS["x"], None), ("masked", INPUTS["x_masked"], INPUTS["mask"])):
            expected = [numpy_netvlad(x[b], None if mask is None else mask[b], INPUTS["weight"], bias,
                                      INPUTS["centers"], **options) for b in range(B)]
            _close(outputs[f"{key}{i}"], expected, f"{name} {case} {key}")


def test_empty_sets_give_zeros(backend):
    name, outputs, _, _ = backend
    for i, case in enumerate(CASES):
        _close(outputs[f"empty{i}"], np.zeros((2, K * D)), f"{name} {case} N = 0", 0.0)
        _close(outputs[f"masked{i}"][2], np.zeros(K * D), f"{name} {case} all rows masked", 0.0)


def test_gradients_match_the_torch_layer(backend, torch_layer):
    import torch

    name, outputs, _, _ = backend
    layer = torch_layer(_params(MAIN))
    x = torch.from_numpy(INPUTS["x_masked"]).requires_grad_()
    (layer(x, torch.from_numpy(INPUTS["mask"])) * torch.from_numpy(INPUTS["r"])).sum().backward()
    expected = {"weight": layer.weight.grad, "bias": layer.bias.grad, "centers": layer.centers.grad,
                "x": x.grad}
    for key, grad in expected.items():
        # Finite everywhere (padding rows included: zero there), the empty set's too.
        scale = max(1.0, float(grad.abs().max()))
        _close(outputs[f"grad_{key}"], grad.numpy(), f"{name} gradient of {key}", 1e-5 * scale)
    assert not np.any(outputs["grad_x"][~INPUTS["mask"]])


def test_keras_masks_and_a_training_step(backend):
    name, outputs, info, _ = backend
    # Keras' Masking layer: the same mask as given explicitly.
    _close(outputs["masking"], outputs["explicit"], f"{name} Masking vs mask=")
    before, after = info["losses"]
    assert info["finite_weights"] and np.isfinite(after) and after < before, info["losses"]
    assert np.isfinite(outputs["trained"]).all()


def test_trained_parameters_load_into_the_torch_layer(backend, torch_layer):
    import torch

    from vladkit.encoders.netvlad_params import load_netvlad

    name, outputs, _, folder = backend
    params = load_netvlad(folder / "trained.npz")
    assert params.options == {k: v for k, v in MAIN.items() if k != "bias"} and params.bias is not None
    assert params.metadata == {"case": MAIN, "trained": name}
    assert not np.allclose(params.weight, INPUTS["weight"])       # the step changed them
    layer = torch_layer(params)
    with torch.no_grad():
        expected = layer(torch.from_numpy(INPUTS["x_zeroed"]), torch.from_numpy(INPUTS["mask"]))
        _close(outputs["trained"], expected.numpy(), f"{name} trained, in torch")
        expected = layer(torch.from_numpy(INPUTS["fmap"]).permute(0, 3, 1, 2))
        _close(outputs["map_trained"], expected.numpy(), f"{name} trained, feature map in torch")


def test_config_and_keras_file_round_trips(backend):
    name, outputs, info, _ = backend
    assert info["same_config"]
    _close(outputs["clone"], outputs["trained"], f"{name} from_config", 1e-6)
    _close(outputs["reloaded"], outputs["trained"], f"{name} .keras reloaded", 1e-6)
    assert info["reloaded_metadata"] == {"case": MAIN}
    # A symbolic model with (None, None, D) feature maps, as called directly.
    _close(outputs["map_model"], outputs["map_trained"], f"{name} feature-map model", 1e-6)


def test_mixed_precision_computes_in_float32(backend):
    name, outputs, info, _ = backend
    assert info["mixed_dtype"] == "float32", info["mixed_dtype"]
    # The same as float32 on the inputs rounded to float16; the empty set still zeros.
    _close(outputs["mixed"], outputs["mixed_reference"], f"{name} mixed_float16")
    assert not np.any(outputs["mixed"][2])


def test_numpy_integers_give_a_plain_config(backend):
    assert backend[2]["int_config"] == [K, D]


def test_bad_input_is_refused_saying_why(backend):
    name, _, info, _ = backend
    errors = info["errors"]
    expected = {"dim": ("ValueError", "D = 5"), "map_dim": ("ValueError", "(B, H, W, D)"),
                "one_set": ("ValueError", "add a batch dimension"), "map_mask": ("ValueError", "mask"),
                "clusters": ("ValueError", "n_clusters"), "flag": ("TypeError", "l2"),
                "layout": ("ValueError", "layout"), "unbuilt": ("ValueError", "no weights"),
                "params": ("TypeError", "NetVLADParams")}
    for label, (kind, words) in expected.items():
        assert errors[label] is not None, f"{name}: {label} was accepted"
        assert errors[label][0] == kind and words in errors[label][1], (name, label, errors[label])
