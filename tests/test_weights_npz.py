import logging
import os

import keras
import numpy as np
import pytest

import keras_bit
import reference
from helpers import TINY, TINY_SIZE, images, tiny_checkpoint, tiny_model
from keras_bit import presets
from keras_bit.presets import Preset
from keras_bit.weights.npz import checkpoint_scope

pytestmark = pytest.mark.backend_agnostic  # .ci/backend runs these on JAX and PyTorch

R50 = (3, 4, 6, 3)


def _relative_error(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.fixture(scope="module")
def r50_1k(tmp_path_factory):
    """A full-size BiT-S-R50x1 checkpoint (1000 classes) in the official layout."""
    path = tmp_path_factory.mktemp("r50") / "BiT-S-R50x1.npz"
    d = reference.random_checkpoint(R50, width=1, classes=1000, seed=7)
    np.savez(path, **d)
    return path, d


@pytest.mark.parametrize(
    "name,key",
    [
        ("root_block_conv", "resnet/root_block/standardized_conv2d"),
        ("block1_unit01_a_proj_conv", "resnet/block1/unit01/a/proj/standardized_conv2d"),
        ("block3_unit23_b_gn", "resnet/block3/unit23/b/group_norm"),
        ("post_gn", "resnet/group_norm"),
        ("head", "resnet/head/conv2d"),
    ],
)
def test_checkpoint_scope_rule(name, key):
    assert checkpoint_scope(name) == key


def test_checkpoint_scope_rejects_foreign_layers():
    with pytest.raises(ValueError, match="Layer 'dense_1' has no BiT checkpoint key"):
        checkpoint_scope("dense_1")


def test_named_model_loads_from_prefilled_cache_full_r50(r50_1k, keras_home):
    path, d = r50_1k
    cached = os.path.join(keras_home, "bit_models", "BiT-S-R50x1.npz")
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    os.symlink(path, cached)
    try:
        model = keras_bit.BiTS_R50x1(input_shape=(64, 64, 3), classifier_activation=None)
    finally:
        os.unlink(cached)
    x = images(np.random.default_rng(0), n=2, size=64)
    assert _relative_error(model.predict(x, verbose=0), reference.forward(d, x)) <= 1e-4


def test_full_r50_21k_head_parity(tmp_path):
    d = reference.random_checkpoint(R50, width=1, classes=21843, seed=3)
    os.makedirs(tmp_path / "bit_models")
    np.savez(tmp_path / "bit_models" / "BiT-M-R50x1.npz", **d)
    model = keras_bit.BiT("BiT-M-R50x1", input_shape=(64, 64, 3), classifier_activation=None, cache_dir=tmp_path)
    assert model.output_shape == (None, 21843)
    x = images(np.random.default_rng(1), n=2, size=64)
    assert _relative_error(model.predict(x, verbose=0), reference.forward(d, x)) <= 1e-4


@pytest.mark.parametrize("width,classes", [(1, 10), (2, 21843), (1, None)])
def test_tiny_parity_with_and_without_head(tmp_path, rng, width, classes):
    d = tiny_checkpoint(tmp_path / "t.npz", classes=classes, width=width)
    x = images(rng)
    features = tiny_model(weights=str(tmp_path / "t.npz"), width_factor=width, include_top=False)
    ref_features = reference.forward(d, x, groups=8, features=True)
    assert _relative_error(features.predict(x, verbose=0), ref_features) <= 1e-5
    if classes:
        model = tiny_model(weights=str(tmp_path / "t.npz"), width_factor=width, classifier_activation=None)
        assert model.output_shape == (None, classes)
        assert _relative_error(model.predict(x, verbose=0), reference.forward(d, x, groups=8)) <= 1e-5


def test_new_classes_load_backbone_and_zero_head(tmp_path, rng, caplog):
    d = tiny_checkpoint(tmp_path / "t.npz", classes=10)
    with caplog.at_level(logging.WARNING, logger="keras_bit"):
        model = tiny_model(weights=str(tmp_path / "t.npz"), classes=3)
    assert [r.getMessage() for r in caplog.records if "zero-initialised" in r.getMessage()] == [
        (f"Loaded the backbone of {tmp_path / 't.npz'}; the head is new and zero-initialised with 3 classes "
         "(the checkpoint has 10).")
    ]
    head = model.get_layer("head")
    assert head.kernel.shape == (1024, 3) and not np.any(head.kernel.numpy()) and not np.any(head.bias.numpy())
    for name in ("root_block_conv", "block2_unit01_a_proj_conv", "block4_unit01_c_conv"):
        np.testing.assert_array_equal(
            model.get_layer(name).kernel.numpy(), d[checkpoint_scope(name) + "/kernel"]
        )
    np.testing.assert_array_equal(model.get_layer("post_gn").gamma.numpy(), d["resnet/group_norm/gamma"])
    # The backbone is the checkpoint's: features equal the reference's.
    x = images(rng)
    backbone = keras.Model(model.input, model.get_layer("post_relu").output)
    assert _relative_error(backbone.predict(x, verbose=0), reference.forward(d, x, groups=8, features=True)) <= 1e-5


def test_headless_checkpoint_with_top_gives_zero_head(tmp_path):
    tiny_checkpoint(tmp_path / "t.npz", classes=None)
    model = tiny_model(weights=str(tmp_path / "t.npz"))
    assert model.output_shape == (None, 1000)
    assert not np.any(model.get_layer("head").kernel.numpy())


def test_download_with_file_url_then_cache(tmp_path, rng, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    d = tiny_checkpoint(mirror / "tiny.npz", classes=10)
    monkeypatch.setenv("KERAS_BIT_BASE_URL", mirror.as_uri())
    tiny = Preset("tiny", "tiny", "a tiny test checkpoint", 10, TINY_SIZE, bucket_path="tiny.npz")
    kwargs = dict(weights=tiny, cache_dir=tmp_path / "cache", classifier_activation=None)
    model = keras_bit.ResNetV2(**TINY, **kwargs)
    assert model.input_shape == (None, TINY_SIZE, TINY_SIZE, 3)  # the checkpoint's resolution
    assert (tmp_path / "cache" / "bit_models" / "tiny.npz").is_file()
    (mirror / "tiny.npz").unlink()  # second call: from the cache, no source needed
    again = keras_bit.ResNetV2(**TINY, **kwargs)
    x = images(rng)
    np.testing.assert_array_equal(again.predict(x, verbose=0), model.predict(x, verbose=0))
    assert _relative_error(again.predict(x, verbose=0), reference.forward(d, x, groups=8)) <= 1e-5


def test_offline_error_names_url_and_cache_path(keras_home, monkeypatch):
    monkeypatch.setenv("KERAS_BIT_BASE_URL", "file:///no/such/mirror")
    target = os.path.join(keras_home, "bit_models", "BiT-M-R50x1-ILSVRC2012.npz")
    with pytest.raises(keras_bit.DownloadError) as info:
        keras_bit.BiTM_R50x1(weights="imagenet")
    message = str(info.value)
    assert "Could not download file:///no/such/mirror/BiT-M-R50x1-ILSVRC2012.npz" in message
    assert f"place it at {target}" in message


def _assert_load_error(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    model = tiny_model(classes=10)
    before = [w.numpy().copy() for w in model.weights]
    with pytest.raises(ValueError, match=message):
        keras_bit.load_weights(model, tmp_path / "bad.npz")
    # Nothing was assigned: a failed load never leaves a half-loaded model.
    for old, new in zip(before, model.weights):
        np.testing.assert_array_equal(old, new.numpy())


def test_missing_key(tmp_path):
    d = reference.random_checkpoint(TINY["block_units"], base=32, classes=10)
    del d["resnet/block3/unit01/b/group_norm/beta"]
    _assert_load_error(tmp_path, d, r"1 missing keys: resnet/block3/unit01/b/group_norm/beta")


def test_unexpected_key(tmp_path):
    d = reference.random_checkpoint(TINY["block_units"], base=32, classes=10)
    d["resnet/extra/thing"] = np.zeros(3, "float32")
    _assert_load_error(tmp_path, d, r"1 unexpected keys: resnet/extra/thing")


def test_misshaped_key(tmp_path):
    d = reference.random_checkpoint(TINY["block_units"], base=32, classes=10)
    d["resnet/block2/unit01/b/standardized_conv2d/kernel"] = np.zeros((1, 1, 64, 64), "float32")
    _assert_load_error(
        tmp_path, d,
        r"key 'resnet/block2/unit01/b/standardized_conv2d/kernel' has shape \(1, 1, 64, 64\), "
        r"model .* expects \(3, 3, 64, 64\)",
    )


def test_other_architecture(tmp_path):
    deeper = reference.random_checkpoint((2, 1, 2, 1), base=32, classes=10)
    _assert_load_error(tmp_path, deeper, r"9 unexpected keys: resnet/block3/unit02/.*another architecture")
    wider = reference.random_checkpoint(TINY["block_units"], base=64, classes=10)
    _assert_load_error(tmp_path, wider, r"has shape .* expects .*another architecture")


def test_wrong_dtype_and_nan(tmp_path):
    d = reference.random_checkpoint(TINY["block_units"], base=32, classes=10)
    key = "resnet/block1/unit02/c/group_norm/gamma"
    d[key] = d[key].astype(np.int32)
    _assert_load_error(tmp_path, d, rf"key '{key}' has dtype int32, expected floating point")
    d[key] = np.full(d[key].shape, np.nan, np.float32)
    _assert_load_error(tmp_path, d, rf"key '{key}' contains NaN or infinite values")


def test_wrong_head_shape_when_loading_head(tmp_path):
    d = reference.random_checkpoint(TINY["block_units"], base=32, classes=10)
    d["resnet/head/conv2d/kernel"] = d["resnet/head/conv2d/kernel"][0, 0]  # (C, K): not the 1x1 conv layout
    _assert_load_error(
        tmp_path, d, r"key 'resnet/head/conv2d/kernel' has shape \(1024, 10\), .* expects \(1, 1, 1024, 10\)"
    )


@pytest.mark.parametrize("corruption", ["truncated", "garbage", "empty"])
def test_corrupt_files(tmp_path, corruption):
    tiny_checkpoint(tmp_path / "good.npz", classes=10)
    data = (tmp_path / "good.npz").read_bytes()
    data = {"truncated": data[: len(data) // 2], "garbage": b"not a zip file" * 100, "empty": b""}[corruption]
    (tmp_path / "bad.npz").write_bytes(data)
    with pytest.raises(ValueError, match=f"Could not read checkpoint {tmp_path / 'bad.npz'}"):
        tiny_model(weights=str(tmp_path / "bad.npz"))


def test_truncated_member_is_reported(tmp_path):
    """A zip whose directory survives but whose data is cut: the key read fails clearly."""
    tiny_checkpoint(tmp_path / "good.npz", classes=10)
    data = bytearray((tmp_path / "good.npz").read_bytes())
    data[2000:200000] = b"\0" * (200000 - 2000)  # clobber member data, keep the central directory
    (tmp_path / "bad.npz").write_bytes(bytes(data))
    model = tiny_model(classes=10)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'bad.npz'}"):
        keras_bit.load_weights(model, tmp_path / "bad.npz")


def test_weights_path_errors(tmp_path):
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(
        ValueError,
        match=r"must be the path to an official-layout .npz, a Keras .weights.h5 or a timm / transformers "
        r".safetensors file \(or a TF Hub / Kaggle SavedModel folder\). Received: weights=.*weights.txt",
    ):
        tiny_model(weights=str(tmp_path / "weights.txt"))
    with pytest.raises(ValueError, match=r"`weights` file not found. Received: weights=.*nope.npz"):
        tiny_model(weights=str(tmp_path / "nope.npz"))


def test_keras_weights_file_round_trip_and_new_head(tmp_path, rng):
    tiny_checkpoint(tmp_path / "t.npz", classes=10)
    model = tiny_model(weights=str(tmp_path / "t.npz"))
    model.save_weights(tmp_path / "t.weights.h5")
    x = images(rng)
    same = tiny_model(weights=str(tmp_path / "t.weights.h5"))
    np.testing.assert_array_equal(same.predict(x, verbose=0), model.predict(x, verbose=0))
    other = tiny_model(weights=str(tmp_path / "t.weights.h5"), classes=4)
    assert not np.any(other.get_layer("head").kernel.numpy())
    np.testing.assert_array_equal(
        other.get_layer("block4_unit01_b_conv").kernel.numpy(), model.get_layer("block4_unit01_b_conv").kernel.numpy()
    )
    headless = tiny_model(weights=str(tmp_path / "t.weights.h5"), include_top=False, pooling="avg")
    assert headless.output_shape == (None, 1024)
    with pytest.raises(
        ValueError,
        match=r"Checkpoint .*t.weights.h5: key 'layers/group_normalization_4/vars/0' has shape \(32,\), "
        r"model 'bit_resnetv2' expects \(64,\)",
    ):
        keras_bit.ResNetV2((1, 1, 2, 1), base_width=32, groups=8, weights=str(tmp_path / "t.weights.h5"), classes=10)


def test_save_npz_round_trip(tmp_path, rng):
    tiny_checkpoint(tmp_path / "t.npz", classes=10)
    model = tiny_model(weights=str(tmp_path / "t.npz"))
    keras_bit.save_npz(model, tmp_path / "again.npz")
    with np.load(tmp_path / "t.npz") as a, np.load(tmp_path / "again.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])


def test_convert_command(r50_1k, tmp_path, rng):
    from keras_bit.cli import main

    path, d = r50_1k
    out = tmp_path / "bit_s_r50x1.weights.h5"
    assert main(["convert", str(path), str(out), "--model", "BiT-S-R50x1"]) == 0
    model = keras_bit.BiTS_R50x1(weights=str(out), input_shape=(64, 64, 3), classifier_activation=None)
    x = images(rng, size=64)
    assert _relative_error(model.predict(x, verbose=0), reference.forward(d, x)) <= 1e-4
    assert main(["convert", str(path), str(tmp_path / "x.h5"), "--model", "BiT-S-R50x1"]) == 2
    assert main(["convert", str(path), str(tmp_path / "y.weights.h5"), "--model", "BiT-S-R101x1"]) == 2
    assert not (tmp_path / "y.weights.h5").exists()


def test_vtab_weights_download_and_head_size_from_file(tmp_path, monkeypatch):
    """`weights="vtab/<task>"` fetches vtab/<model>-run0-<task>.npz; the head size comes from the file."""
    mirror = tmp_path / "mirror"
    (mirror / "vtab").mkdir(parents=True)
    d = reference.random_checkpoint(R50, classes=102, seed=5)
    np.savez(mirror / "vtab" / "BiT-M-R50x1-run0-caltech101.npz", **d)
    monkeypatch.setenv("KERAS_BIT_BASE_URL", mirror.as_uri())
    model = keras_bit.BiT(
        "BiT-M-R50x1", weights="vtab/caltech101", input_shape=(64, 64, 3),
        classifier_activation=None, cache_dir=tmp_path / "cache",
    )
    assert model.output_shape == (None, 102)
    assert (tmp_path / "cache" / "bit_models" / "vtab-BiT-M-R50x1-run0-caltech101.npz").is_file()
    x = images(np.random.default_rng(2), size=64)
    assert _relative_error(model.predict(x, verbose=0), reference.forward(d, x)) <= 1e-4
    with pytest.raises(ValueError,
                       match=r"must be .auto. \(the checkpoint.s own: .softmax.\), .softmax., .sigmoid. or None"):
        keras_bit.BiT(
            "BiT-M-R50x1", weights="vtab/caltech101", classifier_activation="relu", cache_dir=tmp_path / "cache"
        )


def test_unknown_weights_message_mentions_vtab():
    with pytest.raises(ValueError, match=r"'imagenet-distilled-224', 'imagenet-distilled-160', 'vtab/<task>' \(a task "
                                         r"of presets.VTAB_TASKS, e.g. 'vtab/caltech101'\), 'expert/<subtree>'"):
        keras_bit.BiTM_R50x1(weights="imagenet-1k")


def test_hdf5_named_npz_says_what_it_is(tmp_path):
    model = tiny_model(classes=10)
    model.save_weights(tmp_path / "real.weights.h5")
    (tmp_path / "real.weights.h5").rename(tmp_path / "fake.npz")
    with pytest.raises(ValueError, match=r"fake.npz: it is an HDF5 file \(a .weights.h5\?\), not an .npz"):
        keras_bit.load_weights(model, tmp_path / "fake.npz")


def test_preset_of_another_model_refused_before_any_download(monkeypatch):
    monkeypatch.setenv("KERAS_BIT_BASE_URL", "file:///nonexistent/")
    other = presets.PRESETS[("BiT-M-R50x3", "imagenet21k")]
    with pytest.raises(ValueError, match=r"`weights` is a checkpoint of BiT-M-R50x3, not of BiT-S-R50x1"):
        keras_bit.BiT("BiT-S-R50x1", weights=other)
    with pytest.raises(ValueError, match=r"holds a BiT with block_units=\(3, 4, 6, 3\), width_factor=1.*"
                                         r"the model asks for block_units=\(1, 1, 1, 1\)"):
        keras_bit.ResNetV2((1, 1, 1, 1), model_name="BiT-M-R50x1", weights="imagenet21k")
