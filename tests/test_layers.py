import keras
import numpy as np
import pytest

import reference
from keras_bit.layers import GroupNormalization, StandardizedConv2D, standardize_kernel

pytestmark = pytest.mark.backend_agnostic  # .ci/backend runs these on JAX and PyTorch


def _conv(rng, filters=16, kernel_size=3, **kwargs):
    layer = StandardizedConv2D(filters, kernel_size, **kwargs)
    layer.build((None, 9, 9, 8))
    layer.kernel.assign(rng.normal(2.0, 3.0, size=layer.kernel.shape))
    return layer


def test_standardized_kernel_has_zero_mean_unit_variance(rng):
    k = keras.ops.convert_to_numpy(standardize_kernel(rng.normal(5.0, 7.0, size=(3, 3, 8, 16))))
    np.testing.assert_allclose(k.mean(axis=(0, 1, 2)), 0.0, atol=1e-6)
    np.testing.assert_allclose(k.var(axis=(0, 1, 2)), 1.0, atol=1e-5)


def test_standardized_conv_matches_numpy(rng):
    layer = _conv(rng, strides=2)
    x = rng.normal(size=(2, 9, 9, 8)).astype("float32")
    expected = reference.conv2d(x, reference.standardize(layer.kernel.numpy()), stride=2)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), expected, atol=1e-5, rtol=1e-5)
    assert layer.bias is None  # BiT convolutions have no bias


def test_standardized_conv_epsilon_is_the_authors(rng):
    layer = StandardizedConv2D(4, 1)
    assert layer.epsilon == 1e-10
    # A constant kernel has zero variance: the epsilon alone keeps it finite.
    layer.build((None, 4, 4, 2))
    layer.kernel.assign(np.ones(layer.kernel.shape))
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(layer(np.ones((1, 4, 4, 2), "float32")))))


def test_standardized_conv_config_round_trip():
    layer = StandardizedConv2D(8, 3, strides=2, epsilon=1e-8, name="c")
    config = layer.get_config()
    assert config["epsilon"] == 1e-8 and config["use_bias"] is False
    clone = StandardizedConv2D.from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, StandardizedConv2D) and restored.get_config() == config


def test_standardized_conv_rejects_bad_epsilon():
    with pytest.raises(ValueError, match=r"`epsilon` must be a non-negative float. Received: epsilon=-1"):
        StandardizedConv2D(8, 3, epsilon=-1)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("use_bias", [False, True])
def test_standardized_conv_mixed_precision_standardizes_in_float32(rng, policy, use_bias):
    layer = StandardizedConv2D(16, 3, dtype=policy, use_bias=use_bias)
    layer.build((None, 9, 9, 8))
    # A large common offset: standardizing a float16-rounded kernel would lose it all.
    kernel = (1000.0 + rng.normal(size=layer.kernel.shape)).astype("float32")
    layer.kernel.assign(kernel)
    x = rng.normal(size=(1, 9, 9, 8)).astype("float32")
    y = layer(x)
    assert layer.kernel.dtype == "float32"
    assert keras.backend.standardize_dtype(y.dtype) == policy.split("_")[1]
    compute = policy.split("_")[1]
    exact_kernel = keras.ops.cast(standardize_kernel(kernel), compute)
    expected = keras.ops.conv(keras.ops.cast(x, compute), exact_kernel)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(keras.ops.cast(y, "float32")),
        keras.ops.convert_to_numpy(keras.ops.cast(expected, "float32")),
        atol=0.05 if compute == "bfloat16" else 5e-3,
    )


def test_group_norm_defaults_are_bits():
    gn = GroupNormalization()
    assert gn.groups == 32 and gn.epsilon == 1e-5
    config = gn.get_config()
    assert GroupNormalization.from_config(config).get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(gn))
    assert isinstance(restored, GroupNormalization) and restored.epsilon == 1e-5
    assert gn.activation is keras.activations.linear


def test_group_norm_activation_config_and_values(rng):
    gn = GroupNormalization(groups=4, activation="relu", name="gn")
    config = gn.get_config()
    assert config["activation"] == "relu" and GroupNormalization.from_config(config).get_config() == config
    x = rng.normal(size=(2, 5, 3, 8)).astype("float32")
    expected = np.maximum(reference.group_norm(x, np.ones(8), np.zeros(8), groups=4), 0)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(gn(x)), expected, atol=1e-5)
    # Other activations are applied after the normalisation (not fused); other ranks too.
    tanh = GroupNormalization(groups=4, activation="tanh")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(tanh(x)),
                               np.tanh(reference.group_norm(x, np.ones(8), np.zeros(8), groups=4)), atol=1e-5)
    seq = GroupNormalization(groups=4, activation="relu")(x[:, :, 0, :])
    assert float(keras.ops.min(seq)) == 0.0
    message = r"`activation` must be None or a Keras activation. Received: activation='nope'"
    with pytest.raises(ValueError, match=message):
        GroupNormalization(activation="nope")


def test_group_norm_matches_numpy(rng):
    gn = GroupNormalization()
    x = rng.normal(3.0, 2.0, size=(2, 5, 5, 64)).astype("float32")
    gn.build(x.shape)
    gamma, beta = rng.normal(size=64), rng.normal(size=64)
    gn.gamma.assign(gamma)
    gn.beta.assign(beta)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(gn(x)), reference.group_norm(x, gamma, beta), atol=1e-5)


@pytest.mark.parametrize("policy", ["float32", "mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("value", [0.0, 1.0, 300.0])
def test_group_norm_constant_input_gives_beta_not_nan(policy, value):
    gn = GroupNormalization(dtype=policy)
    x = np.full((2, 4, 4, 64), value, "float32")
    gn.build(x.shape)
    gn.beta.assign(np.linspace(-1, 1, 64))
    y = keras.ops.convert_to_numpy(keras.ops.cast(gn(x), "float32"))
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, np.broadcast_to(np.linspace(-1, 1, 64), y.shape), atol=1e-2)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_group_norm_half_precision_large_activations(rng, policy):
    # float16 squares overflow past ~256: statistics must be computed in float32.
    x = rng.normal(500.0, 100.0, size=(1, 8, 8, 64)).astype("float16")
    y = GroupNormalization(dtype=policy)(x)
    y = keras.ops.convert_to_numpy(keras.ops.cast(y, "float32"))
    assert np.all(np.isfinite(y))
    expected = reference.group_norm(x.astype("float64"), np.ones(64), np.zeros(64))
    np.testing.assert_allclose(y, expected, atol=0.05)


@pytest.mark.parametrize("center,scale", [(True, True), (False, True), (True, False)])
def test_group_norm_fast_path_matches_keras_layer_and_gradients(rng, center, scale):
    # The NHWC path combines per-channel moments; it must equal Keras' generic
    # implementation in value and in gradient (w.r.t. inputs, gamma and beta).
    if keras.backend.backend() != "tensorflow":
        pytest.skip("float64 gradients through tf.GradientTape")
    import tensorflow as tf

    x = tf.constant(rng.normal(2.0, 3.0, size=(3, 7, 5, 64)), "float64")
    ours = GroupNormalization(center=center, scale=scale, dtype="float64")
    theirs = keras.layers.GroupNormalization(groups=32, epsilon=1e-5, center=center, scale=scale, dtype="float64")
    ours.build(x.shape)
    theirs.build(x.shape)
    weights = [rng.normal(size=w.shape) for w in ours.weights]
    ours.set_weights(weights)
    theirs.set_weights(weights)
    upstream = tf.constant(rng.normal(size=x.shape), "float64")
    results = []
    for layer in (ours, theirs):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * upstream)
        results.append((y, tape.gradient(loss, [x] + layer.trainable_weights)))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


def test_group_norm_dynamic_shapes_and_other_ranks_fall_back(rng):
    gn = GroupNormalization(groups=4)
    inputs = keras.Input((None, None, 8))
    fn = keras.Model(inputs, gn(inputs)).predict
    x = rng.normal(size=(2, 3, 5, 8)).astype("float32")
    gamma, beta = np.ones(8), np.zeros(8)
    np.testing.assert_allclose(fn(x, verbose=0), reference.group_norm(x, gamma, beta, groups=4), atol=1e-5)
    # 3D (sequence) inputs take Keras' generic path and still normalise per group.
    seq = rng.normal(size=(2, 6, 8)).astype("float32")
    expected = reference.group_norm(seq[:, :, None, :], gamma, beta, groups=4)[:, :, 0, :]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(GroupNormalization(groups=4)(seq)), expected, atol=1e-5)


@pytest.mark.parametrize("center,scale", [(True, True), (False, True), (True, False)])
def test_group_norm_fast_path_matches_keras_layer_values(rng, center, scale):
    x = rng.normal(2.0, 3.0, size=(3, 7, 5, 64)).astype("float32")
    ours = GroupNormalization(center=center, scale=scale)
    theirs = keras.layers.GroupNormalization(groups=32, epsilon=1e-5, center=center, scale=scale)
    ours.build(x.shape)
    theirs.build(x.shape)
    weights = [rng.normal(size=w.shape) for w in ours.weights]
    ours.set_weights(weights)
    theirs.set_weights(weights)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(ours(x)), keras.ops.convert_to_numpy(theirs(x)), atol=1e-5)
