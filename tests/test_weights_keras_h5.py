"""Keras `.weights.h5` files (`model.save_weights`), loaded through the strict core."""

import h5py
import keras
import numpy as np
import pytest

import keras_bit
from helpers import TINY, assert_refused, images, randomize, tiny_model
from keras_bit.weights import keras_h5

pytestmark = pytest.mark.backend_agnostic  # .ci/backend runs these on JAX and PyTorch


def _saved(tmp_path, name="saved.weights.h5", seed=0, **kwargs):
    """A tiny model with random weights everywhere (head included), saved; returns (model, path)."""
    kwargs.setdefault("classes", 10)
    model = randomize(tiny_model(**kwargs), seed)
    path = tmp_path / name
    model.save_weights(path)
    return model, path


def _datasets(path):
    with h5py.File(path, "r") as f:
        found = {}
        f.visititems(lambda name, obj: found.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return found


def _features(model, x):
    return keras.Model(model.input, model.get_layer("post_relu").output).predict(x, verbose=0)


@pytest.mark.parametrize("kwargs", [
    dict(classes=10),
    dict(include_top=False, pooling="max"),
    dict(include_top=False, output_stride=8),
    dict(block_units=(1, 2, 1, 3), base_width=16, groups=4, classes=3, input_shape=(64, 64, 3)),
], ids=["top", "headless_max", "os8", "deeper"])
def test_key_map_matches_what_save_weights_writes(tmp_path, kwargs):
    """Guard: if Keras changes how save_weights names variables, this fails (and the loader must follow)."""
    if "block_units" in kwargs:
        model = randomize(keras_bit.ResNetV2(**kwargs))
    else:
        model = randomize(tiny_model(**kwargs))
    model.save_weights(tmp_path / "m.weights.h5")
    written = _datasets(tmp_path / "m.weights.h5")
    mapping = keras_h5.key_map(model)
    assert set(written) == set(mapping)
    assert len(mapping) == len(model.weights)
    for key, (variable, _) in mapping.items():
        np.testing.assert_array_equal(written[key], variable.numpy(), err_msg=f"{key} is not {variable.path}")


def test_round_trip(tmp_path, rng):
    model, path = _saved(tmp_path)
    loaded = tiny_model(classes=10)
    keras_bit.load_weights(loaded, path)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    built = tiny_model(weights=str(path))
    assert built.output_shape == (None, 10)
    x = images(rng)
    np.testing.assert_array_equal(built.predict(x, verbose=0), model.predict(x, verbose=0))


def test_nan_refused_naming_dataset_and_file(tmp_path):
    _, path = _saved(tmp_path)
    key = min(k for k in _datasets(path) if k.startswith("layers/standardized_conv2d_3/"))
    with h5py.File(path, "r+") as f:
        data = f[key][()]
        data.flat[7] = np.nan
        f[key][...] = data
    model = tiny_model(classes=10)
    error = assert_refused(model, lambda: keras_bit.load_weights(model, path),
                           rf"key '{key}' contains NaN or infinite values")
    assert str(path) in str(error)


@pytest.mark.parametrize("other", [
    dict(block_units=(2, 1, 2, 1)),  # more layers: unexpected datasets
    dict(block_units=(1, 2, 1, 1)),  # the same dataset names (5 units, 4 projections), other shapes
    dict(block_units=(2, 1, 1, 1), width_factor=2),
], ids=["deeper", "same_names", "wider"])
def test_other_architecture_refused_and_nothing_assigned(tmp_path, other):
    """The old Keras loader overwrote 15-43 of the 45 variables before failing; this one assigns none."""
    source = randomize(keras_bit.ResNetV2(**{**TINY, **other}, classes=10, input_shape=(64, 64, 3)))
    source.save_weights(tmp_path / "other.weights.h5")
    model = tiny_model(classes=10)
    error = assert_refused(model, lambda: keras_bit.load_weights(model, tmp_path / "other.weights.h5"),
                           r"(unexpected keys|has shape)")
    assert str(tmp_path / "other.weights.h5") in str(error)


def test_extra_dataset_refused(tmp_path):
    _, path = _saved(tmp_path)
    with h5py.File(path, "r+") as f:
        f.create_dataset("layers/extra/vars/0", data=np.zeros(3, "float32"))
    model = tiny_model(classes=10)
    assert_refused(model, lambda: keras_bit.load_weights(model, path), r"1 unexpected keys: layers/extra/vars/0")


def test_missing_dataset_refused(tmp_path):
    _, path = _saved(tmp_path)
    with h5py.File(path, "r+") as f:
        del f["layers/group_normalization_2/vars/1"]
    model = tiny_model(classes=10)
    assert_refused(model, lambda: keras_bit.load_weights(model, path),
                   r"1 missing keys: layers/group_normalization_2/vars/1")


@pytest.mark.parametrize("corruption", ["truncated", "garbage", "empty"])
def test_corrupt_file_named(tmp_path, corruption):
    _, path = _saved(tmp_path)
    data = path.read_bytes()
    hdf5_signature = b"\x89HDF\r\n\x1a\n"
    data = {"truncated": data[: len(data) // 2], "garbage": hdf5_signature + b"x" * 5000, "empty": b""}[corruption]
    bad = tmp_path / "bad.weights.h5"
    bad.write_bytes(data)
    model = tiny_model(classes=10)
    assert_refused(model, lambda: keras_bit.load_weights(model, bad), rf"{bad}")
    with pytest.raises(ValueError, match=rf"Could not read Keras weights file {bad}"):
        tiny_model(weights=str(bad))


def test_headless_model_from_file_with_head(tmp_path, rng):
    model, path = _saved(tmp_path)
    x = images(rng)
    headless = tiny_model(weights=str(path), include_top=False, pooling="avg")
    assert headless.output_shape == (None, 1024)
    np.testing.assert_allclose(headless.predict(x, verbose=0), _features(model, x).mean(axis=(1, 2)),
                               rtol=1e-5, atol=1e-6)
    loaded = tiny_model(include_top=False)
    keras_bit.load_weights(loaded, path, load_head=False)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), _features(model, x))


def test_other_classes_load_backbone_and_zero_head(tmp_path, rng):
    model, path = _saved(tmp_path)
    other = tiny_model(weights=str(path), classes=4)
    head = other.get_layer("head")
    assert head.kernel.shape == (1024, 4) and not np.any(head.kernel.numpy()) and not np.any(head.bias.numpy())
    x = images(rng)
    np.testing.assert_array_equal(_features(other, x), _features(model, x))
    wrong = tiny_model(classes=4)
    assert_refused(wrong, lambda: keras_bit.load_weights(wrong, path),
                   r"key 'layers/dense/vars/0' has shape \(1024, 10\), model .* expects \(1024, 4\)")


def test_load_weights_into_headless_model_skips_the_files_head(tmp_path, rng):
    model, path = _saved(tmp_path)
    headless = tiny_model(include_top=False)
    keras_bit.load_weights(headless, path)
    x = images(rng)
    np.testing.assert_array_equal(headless.predict(x, verbose=0), _features(model, x))


def test_weights_saved_after_training_load(tmp_path, rng):
    """Keras writes the optimizer state into .weights.h5 after compile/fit: not model weights, skipped."""
    model = randomize(tiny_model(classes=3, input_shape=(32, 32, 3)), seed=4)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.fit(rng.uniform(-1, 1, (4, 32, 32, 3)).astype("float32"), np.array([0, 1, 2, 0]), epochs=1, verbose=0)
    model.save_weights(tmp_path / "trained.weights.h5")
    with h5py.File(tmp_path / "trained.weights.h5") as f:
        assert "optimizer" in f  # the case under test
    again = tiny_model(classes=3, input_shape=(32, 32, 3), weights=str(tmp_path / "trained.weights.h5"))
    for a, b in zip(model.weights, again.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
