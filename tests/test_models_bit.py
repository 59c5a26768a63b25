import inspect

import keras
import numpy as np
import pytest

import keras_bit
import reference
from helpers import TINY_SIZE, images, tiny_checkpoint, tiny_model
from keras_bit import presets as configs

pytestmark = pytest.mark.backend_agnostic  # .ci/backend runs these on JAX and PyTorch

# (no head, 1000 classes, 21843 classes), from the authors' architecture (issue table).
PARAMS = {
    "R50x1": (23_500_352, 25_549_352, 68_256_659),
    "R101x1": (42_492_480, 44_541_480, 87_248_787),
    "R50x3": (211_174_080, 217_319_080, 345_399_315),
    "R101x3": (381_789_888, 387_934_888, 516_015_123),
    "R152x2": (232_238_208, 236_335_208, 321_728_979),
    "R152x4": (928_340_224, 936_533_224, 1_107_299_923),
}
SMALL = ["R50x1", "R101x1"]
LARGE = ["R50x3", "R101x3", "R152x2", "R152x4"]


def _check_param_counts(arch):
    no_head, k1, k21 = PARAMS[arch]
    model = keras_bit.BiT(f"BiT-M-{arch}", weights=None, include_top=False)
    assert model.count_params() == no_head
    # The 1000-class model is the same backbone plus a 2048w x 1000 dense head.
    model = keras_bit.BiT(f"BiT-S-{arch}", weights=None)
    assert model.count_params() == k1
    assert model.output_shape == (None, 1000)
    del model
    keras.backend.clear_session()
    model = keras_bit.BiT(f"BiT-M-{arch}", weights=None, classes=configs.IMAGENET21K_CLASSES)
    assert model.count_params() == k21
    assert model.output_shape == (None, configs.IMAGENET21K_CLASSES)


@pytest.mark.parametrize("arch", SMALL)
def test_parameter_counts(arch):
    _check_param_counts(arch)


@pytest.mark.large
@pytest.mark.parametrize("arch", LARGE)
def test_parameter_counts_large(arch):
    _check_param_counts(arch)


def test_twelve_named_constructors():
    names = [f"BiT{f[-1]}_{a}" for f in configs.FAMILIES for a in configs.ARCHITECTURES]
    assert len(names) == 12 == len(configs.MODEL_NAMES)
    for name in names:
        fn = getattr(keras_bit, name)
        assert fn.__name__ == name
        params = inspect.signature(fn).parameters
        assert list(params) == [
            "include_top", "weights", "input_tensor", "input_shape", "pooling",
            "classes", "classifier_activation", "name", "output_stride",
        ]
        assert params["output_stride"].kind is inspect.Parameter.KEYWORD_ONLY
        default = "imagenet21k" if name.startswith("BiTM") else "imagenet"
        assert params["weights"].default == default
        assert params["classes"].default is None
        assert "Reference:" in fn.__doc__ and name in fn.__doc__


def test_named_constructor_builds_expected_architecture():
    model = keras_bit.BiTS_R50x1(weights=None)
    assert model.name == "bit_s_r50x1"
    assert model.input_shape == (None, 224, 224, 3)
    assert model.output_shape == (None, 1000)
    layer_names = {layer.name for layer in model.layers}
    assert {"root_block_conv", "block1_unit01_a_proj_conv", "block4_unit03_c_conv", "post_gn", "head"} <= layer_names
    assert "block4_unit04_a_conv" not in layer_names
    assert [f"block{b}_unit{u:02d}_a_proj_conv" in layer_names for b in range(1, 5) for u in (1, 2)] == [
        True, False
    ] * 4
    # The stride sits on the 3x3 convolution (and the projection), never on the 1x1 'a'.
    assert model.get_layer("block2_unit01_b_conv").strides == (2, 2)
    assert model.get_layer("block2_unit01_a_conv").strides == (1, 1)
    assert model.get_layer("block2_unit01_a_proj_conv").strides == (2, 2)
    # No 'same' padding anywhere: explicit symmetric zero padding as in the authors' code.
    windowed = [layer for layer in model.layers if isinstance(layer, (keras.layers.Conv2D, keras.layers.MaxPooling2D))]
    assert len(windowed) == 1 + 16 * 3 + 4 + 1 and all(layer.padding == "valid" for layer in windowed)


@pytest.mark.parametrize(
    "size,strides", [(224, (56, 28, 14, 7)), (97, (25, 13, 7, 4)), (32, (8, 4, 2, 1))]
)
def test_feature_model_block_outputs(size, strides):
    model = keras_bit.BiTM_R50x1(weights=None, include_top=False)
    features = keras_bit.feature_model(model)
    outs = features.predict(np.zeros((1, size, size, 3), "float32"), verbose=0)
    assert [o.shape for o in outs] == [(1, s, s, c) for s, c in zip(strides, (256, 512, 1024, 2048))]
    with pytest.raises(ValueError, match=r"`out_indices` must be a non-empty sequence of indices in 0..4"):
        keras_bit.feature_model(model, ["nope"])
    with pytest.raises(ValueError, match=r"no layer named \['root_block_conv'"):
        keras_bit.feature_model(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]))


@pytest.mark.parametrize(
    "pooling,size,shape",
    [(None, 64, (1, 2, 2, 1024)), (None, 100, (1, 4, 4, 1024)), ("avg", 80, (1, 1024)), ("max", 33, (1, 1024))],
)
def test_include_top_false_shapes_and_variable_size(pooling, size, shape):
    model = tiny_model(include_top=False, pooling=pooling, input_shape=None)
    assert model.input_shape == (None, None, None, 3)
    assert model.predict(np.zeros((1, size, size, 3), "float32"), verbose=0).shape == shape


def test_fresh_head_is_zero_so_outputs_are_uniform(rng):
    model = tiny_model(classes=7)
    head = model.get_layer("head")
    assert not np.any(head.kernel.numpy()) and not np.any(head.bias.numpy())
    np.testing.assert_allclose(model.predict(images(rng), verbose=0), 1 / 7, rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_tiny_forward_matches_numpy_reference(tmp_path, rng, seed):
    """float32 Keras vs the float64 NumPy oracle: max error <= 1e-5 of the output scale."""
    d = tiny_checkpoint(tmp_path / "tiny.npz", classes=10, seed=seed)
    x = images(rng)
    for include_top, expected in ((True, reference.forward(d, x, groups=8)),
                                  (False, reference.forward(d, x, groups=8, features=True))):
        model = tiny_model(weights=str(tmp_path / "tiny.npz"), include_top=include_top, classifier_activation=None)
        got = model.predict(x, verbose=0)
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_tiny_forward_float64_matches_numpy_reference_exactly(tmp_path, rng):
    """In float64 the only differences left are summation order: any architecture slip shows."""
    if keras.backend.backend() == "jax":
        import jax

        if not jax.config.jax_enable_x64:
            pytest.skip("JAX computes float64 in float32 unless jax_enable_x64 is set")
    d = tiny_checkpoint(tmp_path / "tiny.npz", classes=10, seed=2)
    x = images(rng).astype("float64")
    keras.config.set_dtype_policy("float64")
    model = tiny_model(weights=str(tmp_path / "tiny.npz"), classifier_activation=None)
    # Keras on PyTorch runs a float64 Dense matmul in float32 (keras-team/keras#23704): logits to ~1e-6 there.
    logits_atol = 2e-6 if keras.backend.backend() == "torch" else 1e-10
    np.testing.assert_allclose(model.predict(x, verbose=0), reference.forward(d, x, groups=8), atol=logits_atol, rtol=0)
    features = tiny_model(weights=str(tmp_path / "tiny.npz"), include_top=False)
    np.testing.assert_allclose(
        features.predict(x, verbose=0), reference.forward(d, x, groups=8, features=True), atol=1e-10, rtol=0
    )


def test_reference_catches_a_wrong_architecture(tmp_path, rng):
    """The oracle can fail: the same weights through a different padding rule disagree."""
    d = tiny_checkpoint(tmp_path / "tiny.npz")
    x = images(rng)
    model = tiny_model(weights=str(tmp_path / "tiny.npz"), classifier_activation=None)
    saved_pad = reference.pad
    try:
        reference.pad = lambda t, p: np.pad(t, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=-1.0)
        wrong = reference.forward(d, x, groups=8)
    finally:
        reference.pad = saved_pad
    assert np.abs(model.predict(x, verbose=0) - wrong).max() > 1e-3


def test_keras_file_round_trip(tmp_path, rng):
    tiny_checkpoint(tmp_path / "tiny.npz", classes=5)
    model = tiny_model(weights=str(tmp_path / "tiny.npz"))
    x = images(rng)
    expected = model.predict(x, verbose=0)
    assert expected.std() > 1e-3  # the random head makes outputs input-dependent
    model.save(tmp_path / "m.keras")
    restored = keras.saving.load_model(tmp_path / "m.keras")  # no custom_objects: layers are registered
    np.testing.assert_array_equal(restored.predict(x, verbose=0), expected)
    assert isinstance(restored.get_layer("block1_unit01_a_conv"), keras_bit.StandardizedConv2D)
    assert isinstance(restored.get_layer("post_gn"), keras_bit.GroupNormalization)


def test_input_tensor(rng):
    inputs = keras.Input((TINY_SIZE, TINY_SIZE, 3), name="pixels")
    model = tiny_model(input_tensor=inputs, include_top=False, pooling="avg", input_shape=None)
    assert model.inputs[0] is inputs
    assert model.output_shape == (None, 1024)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_model(tmp_path, rng, policy):
    tiny_checkpoint(tmp_path / "tiny.npz", classes=10)
    x = images(rng)
    expected = tiny_model(weights=str(tmp_path / "tiny.npz")).predict(x, verbose=0)
    keras.config.set_dtype_policy(policy)
    model = tiny_model(weights=str(tmp_path / "tiny.npz"))
    assert model.get_layer("block1_unit01_b_conv").compute_dtype == policy.split("_")[1]
    assert model.get_layer("head").compute_dtype == "float32"  # scores stay float32
    y = model.predict(x, verbose=0)
    assert y.dtype == np.float32 and np.all(np.isfinite(y))
    np.testing.assert_allclose(y, expected, atol=0.05)
    assert (y.argmax(-1) == expected.argmax(-1)).mean() >= 0.5


def test_classes_default_and_softmax():
    assert tiny_model().output_shape == (None, 1000)
    model = tiny_model(classes=3, classifier_activation="sigmoid")
    assert model.get_layer("head").activation is keras.activations.sigmoid


ERRORS = [
    (
        dict(weights="imagenet22k"),
        r"Unknown `weights` name. Expected one of None, 'imagenet21k', 'imagenet'.*Received: weights='imagenet22k'",
    ),
    (dict(weights=3), r"`weights` must be one of .*Received: weights=3"),
    (dict(weights="missing/file.npz"), r"`weights` file not found. Received: weights='missing/file.npz'"),
    (
        dict(pooling="mean", include_top=False),
        r"`pooling` must be one of \(None, 'avg', 'max'\). Received: pooling='mean'",
    ),
    (
        dict(classifier_activation="nope", weights=None),
        r"`classifier_activation` must be None, a callable or the name of a Keras activation. "
        r"Received: classifier_activation='nope'",
    ),
    (
        dict(classifier_activation="relu"),
        r"With the pretrained head loaded .*`classifier_activation` must be 'auto' \(the checkpoint's own: "
        r"'sigmoid'\), 'softmax', 'sigmoid' or None \(logits\). Received: classifier_activation='relu'",
    ),
    (
        dict(input_shape=(224, 224, 1)),
        r"Pretrained BiT weights expect 3 input channels \(RGB\). Received: input_shape=\(224, 224, 1\)",
    ),
    (dict(input_shape=(224, 224, 4)), r"expect 3 input channels"),
    (
        dict(input_shape=(31, 224, 3), weights=None),
        r"Input height and width must be None or integers >= 32. Received: input_shape=\(31, 224, 3\)",
    ),
    (
        dict(input_shape=(224, 224), weights=None),
        r"`input_shape` must be a tuple of 3 values .*Received: input_shape=\(224, 224\)",
    ),
    (dict(input_shape=(64, 64, 0), weights=None), r"channel count in `input_shape` must be a positive integer"),
    (dict(classes=0, weights=None), r"`classes` must be a positive integer. Received: classes=0"),
    (dict(classes=-3, weights=None), r"`classes` must be a positive integer. Received: classes=-3"),
    (dict(classes=2.5, weights=None), r"`classes` must be a positive integer. Received: classes=2.5"),
    (dict(include_top="yes", weights=None), r"`include_top` must be True or False. Received: include_top='yes'"),
    # Issue 22: each with the published (default) weights, so each is refused before any download.
    (dict(classes=1), r"A softmax over one class is always 1\.0: for a binary .*classifier_activation='softmax'"),
    (dict(include_top=False, classes=10), r"`classes` sizes the classification head, which include_top=False"),
    (dict(classes=10**9), r"the head \(classes\) would hold 2,048,000,000,000 weights"),
    (dict(input_shape=(224, 224, 2)), r"expect 3 input channels \(RGB\). Received: input_shape=\(224, 224, 2\)"),
    (dict(input_shape=(224.0, 224, 3)), r"Input height and width must be None or integers >= 32"),
    (dict(name=7), r"`name` must be a non-empty string without '/'. Received: name=7"),
    (dict(name="a/b"), r"`name` must be a non-empty string without '/'"),
    (dict(output_stride=np.float64(16)), r"`output_stride` must be one of \(8, 16, 32\)"),
]


@pytest.mark.parametrize("kwargs,message", ERRORS)
def test_argument_errors(kwargs, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KERAS_BIT_BASE_URL", "file:///nonexistent/")  # a download attempt fails differently
    with pytest.raises(ValueError, match=message):
        keras_bit.BiTM_R50x1(**kwargs)


def test_errors_are_raised_before_any_download(tmp_path, monkeypatch):
    # Pretrained weights with a bad argument: the error comes first, no fetch is tried.
    monkeypatch.setenv("KERAS_BIT_BASE_URL", "file:///nonexistent/")
    with pytest.raises(ValueError, match="`pooling`"):
        keras_bit.BiTM_R152x4(pooling="mean", include_top=False)
    with pytest.raises(ValueError, match="`output_stride` must be one of \\(8, 16, 32\\). Received: output_stride=4"):
        keras_bit.BiTM_R152x4(output_stride=4)


def test_pooling_with_head_is_ignored_with_a_warning_as_keras_does():
    with pytest.warns(UserWarning, match=r"`pooling='avg'` is ignored with include_top=True"):
        model = tiny_model(pooling="avg", classes=3)
    assert model.output_shape == (None, 3)


def test_unknown_model_and_architecture_errors():
    with pytest.raises(
        ValueError, match=r"Unknown BiT model name. Expected one of BiT-S-R50x1, .*Received: model_name='BiT-L-R50x1'"
    ):
        keras_bit.BiT("BiT-L-R50x1")
    with pytest.raises(ValueError, match=r"`block_units` must be a sequence of 4 positive integers"):
        keras_bit.ResNetV2((3, 4, 6))
    with pytest.raises(ValueError, match=r"not a multiple of groups=32"):
        keras_bit.ResNetV2(base_width=16)
    with pytest.raises(ValueError, match=r"`width_factor` must be a positive integer. Received: width_factor=0"):
        keras_bit.ResNetV2(width_factor=0)


def test_numpy_integers_with_weights_give_the_same_model(tmp_path, rng):
    """ResNetV2 with np.int64 / array arguments loads a checkpoint exactly as with Python ints."""
    tiny_checkpoint(tmp_path / "tiny.npz", classes=10)
    x = images(rng)
    plain = tiny_model(weights=str(tmp_path / "tiny.npz"), classes=10, output_stride=16)
    numpy = keras_bit.ResNetV2(np.array([2, 1, 1, 1]), np.int64(1), weights=str(tmp_path / "tiny.npz"),
                               input_shape=np.array([TINY_SIZE, TINY_SIZE, 3]), classes=np.int64(10),
                               base_width=np.int32(32), groups=np.int64(8), output_stride=np.int64(16),
                               default_size=np.int64(TINY_SIZE))
    expected = plain.predict(x, verbose=0)
    assert expected.std() > 1e-3  # the checkpoint's random head: outputs depend on the input
    np.testing.assert_array_equal(numpy.predict(x, verbose=0), expected)
    assert numpy.to_json() == plain.to_json()


def test_one_class_checkpoint_needs_another_activation(tmp_path, rng):
    tiny_checkpoint(tmp_path / "one.npz", classes=1)
    with pytest.raises(ValueError, match=r"A softmax over one class is always 1\.0: pass classifier_activation=None"):
        tiny_model(weights=str(tmp_path / "one.npz"))  # classes=None: the checkpoint's single class
    model = tiny_model(weights=str(tmp_path / "one.npz"), classifier_activation=None)
    scores = model.predict(images(rng, n=4), verbose=0)
    assert scores.shape == (4, 1) and np.ptp(scores) > 1e-4  # loaded (random) head: input-dependent


def test_classes_none_without_head_with_weights(tmp_path):
    tiny_checkpoint(tmp_path / "tiny.npz", classes=10)
    model = tiny_model(weights=str(tmp_path / "tiny.npz"), include_top=False, classes=None, pooling="avg")
    assert model.output_shape == (None, 1024)


# Issue 23: the head's activation is the checkpoint's own (sigmoid for the ImageNet-21k upstream heads).
def test_every_preset_records_its_head_activation():
    for (model, weights), preset in configs.PRESETS.items():
        expected = "sigmoid" if weights == "imagenet21k" else "softmax"
        assert preset.head_activation == expected, (model, weights)
    for name in ("BiTM_R50x1", "BiTS_R50x1"):
        params = inspect.signature(getattr(keras_bit, name)).parameters
        assert params["classifier_activation"].default == "auto"
    assert "sigmoid for \"imagenet21k\"" in keras_bit.BiTM_R50x1.__doc__
    assert "softmax for \"imagenet\"" in keras_bit.BiTS_R50x1.__doc__


def test_checkpoint_activation_of_files_and_handles():
    from keras_bit.models.bit import checkpoint_activation
    from keras_bit.weights.sources import Source

    preset = configs.PRESETS[("BiT-M-R50x1", "imagenet21k")]
    assert checkpoint_activation(Source("imagenet21k", preset=preset)) == "sigmoid"
    assert checkpoint_activation(Source("imagenet", preset=configs.PRESETS[("BiT-M-R50x1", "imagenet")])) == "softmax"
    # No preset (a file, a Hub handle): an ImageNet-21k-sized head is the upstream sigmoid head.
    assert checkpoint_activation(Source("x.npz", classes=configs.IMAGENET21K_CLASSES)) == "sigmoid"
    assert checkpoint_activation(Source("x.npz", classes=1000)) == "softmax"


def _narrow_21k(tmp_path):
    """A narrow (base 8) network with an ImageNet-21k-sized random head, as an official-layout file."""
    d = reference.random_checkpoint((1, 1, 1, 1), base=8, classes=configs.IMAGENET21K_CLASSES, seed=3)
    path = tmp_path / "k21.npz"
    np.savez(path, **d)
    return dict(block_units=(1, 1, 1, 1), base_width=8, groups=8, input_shape=(TINY_SIZE, TINY_SIZE, 3),
                weights=str(path))


def test_21k_head_is_sigmoid_by_default_and_softmax_is_explained(tmp_path, rng, caplog):
    kwargs = _narrow_21k(tmp_path)
    x = images(rng)
    logits = keras_bit.ResNetV2(classifier_activation=None, **kwargs).predict(x, verbose=0)
    assert logits.std() > 1e-3  # a random head: the comparison below can fail
    with caplog.at_level("WARNING", logger="keras_bit"):
        auto = keras_bit.ResNetV2(**kwargs)
    assert not caplog.records  # the checkpoint's own activation: nothing to explain
    assert auto.get_layer("head").activation is keras.activations.sigmoid
    expected = 1 / (1 + np.exp(-logits.astype("float64")))
    np.testing.assert_allclose(auto.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)
    with caplog.at_level("WARNING", logger="keras_bit"):
        softmax = keras_bit.ResNetV2(classifier_activation="softmax", **kwargs)
    assert softmax.get_layer("head").activation is keras.activations.softmax
    assert "trained with sigmoid (one binary classifier per label)" in caplog.text
    assert "classifier_activation='softmax'" in caplog.text


def test_auto_activation_of_a_new_head_and_a_single_label_checkpoint(tmp_path, caplog):
    tiny_checkpoint(tmp_path / "tiny.npz", classes=10)
    assert tiny_model().get_layer("head").activation is keras.activations.softmax  # no weights
    assert tiny_model(weights=str(tmp_path / "tiny.npz")).get_layer("head").activation is keras.activations.softmax
    new = tiny_model(weights=str(tmp_path / "tiny.npz"), classes=3)  # a new (fine-tuning) head: softmax
    assert new.get_layer("head").activation is keras.activations.softmax
    with caplog.at_level("WARNING", logger="keras_bit"):
        sigmoid = tiny_model(weights=str(tmp_path / "tiny.npz"), classifier_activation="sigmoid")
    assert sigmoid.get_layer("head").activation is keras.activations.sigmoid  # allowed, and explained
    assert "trained with softmax (one label per image)" in caplog.text
    with pytest.raises(ValueError, match=r"A softmax over one class is always 1\.0: for a binary"):
        tiny_model(weights=str(tmp_path / "tiny.npz"), classes=1)  # "auto" is softmax for a new head
