"""The fused GroupNorm(+ReLU) kernel against the layer's keras.ops path and the NumPy reference (TensorFlow only)."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import reference
from keras_bit import kernels
from keras_bit.kernels import cache
from keras_bit.layers import GroupNormalization
from keras_bit.models.resnet_v2 import build_resnet_v2

if keras.backend.backend() != "tensorflow":
    pytest.skip("the fused kernel is a TensorFlow op", allow_module_level=True)

import tensorflow as tf  # noqa: E402

OP = "KerasBitGroupNorm"


@pytest.fixture(scope="module")
def library():
    found = kernels.library()
    if found is None:  # no compiler here: the layers use keras.ops, which the other layer tests cover
        pytest.skip("the fused kernel could not be built on this machine (see the warning)")
    return found


def _graph_ops(fn, *args):
    """Every op type in `fn`'s traced graph, including the functions it calls."""
    graph_def = fn.get_concrete_function(*args).graph.as_graph_def()
    nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
    return {n.op for n in nodes}


def _layer(rng, channels, groups=32, activation="relu", dtype=None):
    layer = GroupNormalization(groups, activation=activation, dtype=dtype)
    layer.build((None, None, None, channels))
    layer.set_weights([rng.normal(1.0, 0.5, channels), rng.normal(0.0, 0.5, channels)])
    return layer


def _value_and_gradients(layer, x, upstream, fused, monkeypatch):
    """The layer's output and d(sum(output * upstream)) / d(x, gamma, beta), with or without the kernel."""
    monkeypatch.setenv(kernels.ENV_SWITCH, "1" if fused else "0")
    x = tf.cast(tf.constant(x), layer.compute_dtype)  # as the previous layer hands it over

    @tf.function
    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
        return y, tape.gradient(loss, [x] + layer.trainable_weights)

    assert (OP in _graph_ops(run, x)) == fused  # the path under test is the one that ran
    y, grads = run(x)
    return [np.asarray(tf.cast(t, tf.float32)) for t in [y, *grads]]


# Batch 1 splits each sample across threads; batch 5 gives each thread whole samples.
@pytest.mark.parametrize("shape,groups", [((1, 9, 7, 64), 32), ((5, 3, 4, 64), 32), ((2, 6, 6, 48), 8),
                                          ((3, 2, 1, 64), 16)])
@pytest.mark.parametrize("activation", ["relu", None])
def test_kernel_matches_ops_path_values_and_gradients(library, rng, monkeypatch, shape, groups, activation):
    layer = _layer(rng, shape[-1], groups, activation)
    x = rng.normal(2.0, 3.0, shape).astype("float32")
    upstream = rng.normal(size=shape).astype("float32")
    fused = _value_and_gradients(layer, x, upstream, True, monkeypatch)
    ops_path = _value_and_gradients(layer, x, upstream, False, monkeypatch)
    expected = reference.group_norm(x.astype("float64"), *layer.get_weights(), groups=groups)
    np.testing.assert_allclose(fused[0], np.maximum(expected, 0) if activation else expected, atol=1e-5)
    for got, want, name in zip(fused, ops_path, ["y", "dx", "dgamma", "dbeta"]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(), err_msg=name)


def test_kernel_bfloat16_matches_float32_rounded(library, rng, monkeypatch):
    """bfloat16 in and out, float32 inside: within one bfloat16 rounding of the float32 result."""
    shape = (4, 8, 8, 64)
    layer = _layer(rng, 64, dtype="mixed_bfloat16")
    x = rng.normal(2.0, 3.0, shape).astype("float32")
    x16 = np.asarray(tf.cast(tf.cast(x, tf.bfloat16), tf.float32))
    upstream = rng.normal(size=shape).astype("float32")
    fused = _value_and_gradients(layer, x16, upstream, True, monkeypatch)
    ops_path = _value_and_gradients(layer, x16, upstream, False, monkeypatch)
    for got, want, name in zip(fused, ops_path, ["y", "dx", "dgamma", "dbeta"]):
        scale = np.abs(want).max()
        np.testing.assert_allclose(got, want, atol=2 ** -7 * scale, err_msg=name)
    expected = np.maximum(reference.group_norm(x16.astype("float64"), *layer.get_weights()), 0)
    np.testing.assert_allclose(fused[0], expected, rtol=2 ** -8, atol=2 ** -8 * np.abs(expected).max())


def test_kernel_results_do_not_depend_on_the_batch(library, rng):
    """Each sample's output and input gradient are the same bits in any batch (and on any thread count), and
    gamma / beta gradients of a batch are the float sums of its halves', as data-parallel replicas add them."""
    shape = (8, 20, 18, 64)  # 360 rows: two 256-row chunks, so batch 1 splits its sample across threads
    x = tf.constant(rng.normal(5.0, 0.01, shape).astype("float32"))  # |mean| >> std: rounding differences show
    dy = tf.constant(rng.normal(size=shape).astype("float32"))
    gamma, beta = tf.constant(rng.normal(size=64).astype("float32")), tf.constant(rng.normal(size=64).astype("float32"))

    def run(rows):
        y, mean, rstd = library.keras_bit_group_norm(x[rows], gamma, beta, groups=32, epsilon=1e-5, relu=True)
        return [y.numpy()] + [t.numpy() for t in library.keras_bit_group_norm_grad(
            dy[rows], x[rows], gamma, beta, mean, rstd, groups=32, relu=True)]

    whole = run(slice(0, 8))
    halves = [run(slice(0, 4)), run(slice(4, 8))]
    single = run(slice(2, 3))
    for i in (0, 1):  # y, dx
        np.testing.assert_array_equal(np.concatenate([h[i] for h in halves]), whole[i])
        np.testing.assert_array_equal(single[i], whole[i][2:3])
    for i in (2, 3):  # dgamma, dbeta
        np.testing.assert_array_equal(halves[0][i] + halves[1][i], whole[i])


def test_kernel_propagates_nan_and_inf_like_the_ops_path(library, rng, monkeypatch):
    """A NaN or Inf input poisons its sample's group in both paths; the fused ReLU must not turn NaN into 0."""
    layer = _layer(rng, 64)
    x = rng.normal(size=(3, 4, 4, 64)).astype("float32")
    x[0, 1, 2, 5], x[1, 0, 0, 40] = np.nan, np.inf
    outputs = []
    for fused in ("1", "0"):
        monkeypatch.setenv(kernels.ENV_SWITCH, fused)
        outputs.append(np.asarray(tf.function(layer)(tf.constant(x))))
    np.testing.assert_array_equal(np.isnan(outputs[0]), np.isnan(outputs[1]))
    assert np.isnan(outputs[0][0, ..., 4:6]).all() and np.isnan(outputs[0][1, ..., 40:42]).all()
    assert np.isfinite(outputs[0][2]).all()


def test_kernel_constant_and_empty_inputs(library, rng, monkeypatch):
    layer = _layer(rng, 64)
    _, beta = layer.get_weights()
    expected = np.broadcast_to(np.maximum(beta, 0), (2, 3, 3, 64)).astype("float32")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(np.zeros((2, 3, 3, 64), "float32"))), expected)
    # x * scale + shift with scale ~ gamma / sqrt(epsilon): float32 rounding of ~2000, as in the keras.ops path.
    y = keras.ops.convert_to_numpy(layer(np.full((2, 3, 3, 64), 7.5, "float32")))
    np.testing.assert_allclose(y, expected, atol=1e-3)
    assert keras.ops.convert_to_numpy(layer(np.zeros((0, 4, 4, 64), "float32"))).shape == (0, 4, 4, 64)


def test_tiny_bit_fused_equals_ops_path_forward_and_training_step(library, rng, monkeypatch):
    model = build_resnet_v2((1, 1, 1, 1), base_width=32, groups=8, input_shape=(40, 40, 3), classes=5)
    head = model.get_layer("head")
    head.set_weights([rng.normal(size=w.shape) * 0.1 for w in head.get_weights()])  # a zero head hides everything
    x = rng.normal(size=(3, 40, 40, 3)).astype("float32")
    labels = np.array([0, 3, 4])
    results = []
    for fused in (True, False):
        monkeypatch.setenv(kernels.ENV_SWITCH, "1" if fused else "0")

        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                loss = keras.losses.sparse_categorical_crossentropy(labels, logits)
            return logits, tape.gradient(loss, model.trainable_weights)

        assert (OP in _graph_ops(step, x)) == fused
        results.append(step(x))
    np.testing.assert_allclose(results[0][0], results[1][0], atol=1e-5)
    for a, b, v in zip(results[0][1], results[1][1], model.trainable_weights):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * np.abs(np.asarray(b)).max(), err_msg=v.path)


def test_kernel_stays_out_of_xla_and_saved_models(library, rng, tmp_path):
    layer = _layer(rng, 64)
    x = tf.constant(rng.normal(size=(2, 4, 4, 64)).astype("float32"))
    assert OP in _graph_ops(tf.function(layer), x)
    xla = tf.function(layer, jit_compile=True)
    assert OP not in _graph_ops(xla, x)
    np.testing.assert_allclose(xla(x), layer(x), atol=1e-5)
    inputs = keras.Input((4, 4, 64))
    model = keras.Model(inputs, layer(inputs))
    for path, save in ((tmp_path / "tf_saved_model", lambda p: tf.saved_model.save(model, str(p))),
                       (tmp_path / "keras_export", lambda p: model.export(str(p), verbose=False))):
        save(path)
        assert OP.encode() not in (path / "saved_model.pb").read_bytes(), path
        (served,) = tf.saved_model.load(str(path)).signatures["serving_default"](x).values()
        np.testing.assert_allclose(served, layer(x), atol=1e-5)


def test_kernel_built_once_into_the_cache_with_its_record(library, keras_home):
    folder = os.path.join(keras_home, cache.SUBDIR)
    files = sorted(os.listdir(folder))
    cached = cache.locate(tf)
    assert files == sorted(os.path.basename(p) for p in (cached.path, cached.record))  # no .part left behind
    with open(cached.record) as f:
        record = json.load(f)
    with open(cached.path, "rb") as f:
        data = f.read()
    assert record["size"] == len(data) and record["sha256"] == hashlib.sha256(data).hexdigest()
    assert record["key"] == cached.key and record["built_from"]["tensorflow"] == tf.__version__
    assert cache.read_verified(cached) == data


@pytest.mark.slow  # another process (a Python start with TensorFlow: seconds)
def test_no_compiler_warns_once_and_falls_back(tmp_path):
    script = textwrap.dedent("""
        import numpy as np
        from keras_bit.layers import GroupNormalization
        layer = GroupNormalization(activation="relu")
        for _ in range(3):
            y = layer(np.ones((1, 4, 4, 64), "float32") * np.arange(64, dtype="float32"))
        print(float(np.asarray(y).max()))
    """)
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "KERAS_HOME": str(tmp_path)}
    env.pop(kernels.ENV_SWITCH, None)
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    maximum = done.stdout.strip().splitlines()[-1]
    messages = [line for line in done.stderr.splitlines() if "could not be built" in line]
    assert len(messages) == 1 and "no-such-compiler" in messages[0] and "keras.ops GroupNorm" in messages[0]
    # Each group holds two constant channels k, k + 1: normalised to -1 and +1 (up to epsilon), ReLU keeps +1.
    assert float(maximum) == pytest.approx(0.5 / np.sqrt(0.25 + 1e-5), rel=1e-5)
    assert not (tmp_path / "keras_bit_kernels").exists() or not os.listdir(tmp_path / "keras_bit_kernels")
