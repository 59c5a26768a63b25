"""transformers checkpoints (`BitForImageClassification` / `BitModel` `.safetensors`), local and via `hf://`."""

import os
import re
import logging

import keras
import numpy as np
import pytest
from safetensors.numpy import save_file

import keras_bit
import reference
from helpers import (
    DEFECTS, assert_safetensors_refused, bit_config, hub_repo, images, offline_hub, relative_error, tiny_model,
    tiny_weights, with_defect,
)
from keras_bit.weights import sources

pytestmark = pytest.mark.backend_agnostic  # .ci/backend runs these on JAX and PyTorch

REPO = "someone/bit-tiny"


def _features(model, x):
    return keras.Model(model.input, model.get_layer("post_relu").output).predict(x, verbose=0)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty, offline Hugging Face cache."""
    return offline_hub(monkeypatch, tmp_path / "hf_cache")


@pytest.fixture
def tiny_repo(hub):
    """hf://someone/bit-tiny: a tiny transformers BiT (10 classes) in the cache; returns its weights dict."""
    d = tiny_weights()
    hub_repo(hub, REPO, {"config.json": bit_config(), "model.safetensors": reference.to_transformers(d)})
    return d


def test_reference_layout_is_transformers():
    t = reference.to_transformers(reference.random_checkpoint((3, 4, 6, 3), classes=1000))
    assert len(t) == 153
    assert t["bit.embedder.convolution.weight"].shape == (64, 3, 7, 7)
    assert t["bit.encoder.stages.0.layers.0.downsample.conv.weight"].shape == (256, 64, 1, 1)
    assert t["bit.encoder.stages.3.layers.2.conv2.weight"].shape == (512, 512, 3, 3)
    assert t["bit.norm.weight"].shape == (2048,) and t["classifier.1.weight"].shape == (1000, 2048)
    base = reference.to_transformers(reference.random_checkpoint((3, 4, 6, 3), classes=1000), prefix="")
    assert len(base) == 151 and "embedder.convolution.weight" in base and not any("classifier" in k for k in base)


def test_tiny_parity_load_weights_and_constructor(tmp_path, rng):
    d = tiny_weights()
    path = tmp_path / "model.safetensors"
    save_file(reference.to_transformers(d), str(path))
    x = images(rng)
    expected = reference.forward(d, x, groups=8)
    model = tiny_model(classes=10, classifier_activation=None)
    keras_bit.load_weights(model, path)
    assert relative_error(model.predict(x, verbose=0), expected) <= 1e-5
    built = tiny_model(weights=str(path), classifier_activation=None)
    assert built.output_shape == (None, 10)
    assert relative_error(built.predict(x, verbose=0), expected) <= 1e-5


def test_bitmodel_keys_without_prefix(tmp_path, rng):
    """A `BitModel` file (no `bit.` prefix, no classifier): the backbone loads; with a head, a new zero one."""
    d = tiny_weights(classes=None)
    path = tmp_path / "model.safetensors"
    save_file(reference.to_transformers(d, prefix=""), str(path))
    x = images(rng)
    expected = reference.forward(d, x, groups=8, features=True)
    headless = tiny_model(weights=str(path), include_top=False)
    assert relative_error(headless.predict(x, verbose=0), expected) <= 1e-5
    with_top = tiny_model(weights=str(path))
    assert with_top.output_shape == (None, 1000) and not np.any(with_top.get_layer("head").kernel.numpy())
    assert relative_error(_features(with_top, x), expected) <= 1e-5


def test_hub_handle_tiny_parity(tiny_repo, rng):
    x = images(rng)
    expected = reference.forward(tiny_repo, x, groups=8)
    model = tiny_model(weights=f"hf://{REPO}", classifier_activation=None)
    assert model.output_shape == (None, 10)  # len(id2label)
    assert relative_error(model.predict(x, verbose=0), expected) <= 1e-5
    again = tiny_model(classes=10, classifier_activation=None)
    keras_bit.load_weights(again, f"hf://{REPO}")
    np.testing.assert_array_equal(again.predict(x, verbose=0), model.predict(x, verbose=0))


def test_hub_handle_wide_model(hub, rng):
    """transformers does not scale embedding_size by width_factor: a x2 model states 2 * 32."""
    d = tiny_weights(width=2)
    hub_repo(hub, REPO, {"config.json": bit_config(width_factor=2, embedding_size=64),
                         "model.safetensors": reference.to_transformers(d)})
    model = tiny_model(weights=f"hf://{REPO}", width_factor=2, classifier_activation=None)
    x = images(rng)
    assert relative_error(model.predict(x, verbose=0), reference.forward(d, x, groups=8)) <= 1e-5


def test_hub_other_classes_load_backbone_and_zero_head(tiny_repo, rng, caplog):
    with caplog.at_level(logging.WARNING, logger="keras_bit"):
        model = tiny_model(weights=f"hf://{REPO}", classes=3)
    assert any("zero-initialised with 3 classes (the checkpoint has 10)" in r.getMessage() for r in caplog.records)
    head = model.get_layer("head")
    assert not np.any(head.kernel.numpy()) and not np.any(head.bias.numpy())
    x = images(rng)
    assert relative_error(_features(model, x), reference.forward(tiny_repo, x, groups=8, features=True)) <= 1e-5


def test_hub_revision(hub, rng):
    assert sources.parse_hub_handle("hf://google/bit-50@v1.0") == ("google/bit-50", "v1.0")
    assert sources.parse_hub_handle("hf://google/bit-50") == ("google/bit-50", None)
    d = tiny_weights(seed=3)
    hub_repo(hub, REPO, {"config.json": bit_config(), "model.safetensors": reference.to_transformers(d)},
             revision="v1.0")
    model = tiny_model(weights=f"hf://{REPO}@v1.0", classifier_activation=None)
    x = images(rng)
    assert relative_error(model.predict(x, verbose=0), reference.forward(d, x, groups=8)) <= 1e-5


@pytest.mark.parametrize("handle", ["hf://x", "hf://a/b/c", "hf://a/b@", "hf://", "hf:///b", "hf://a/"])
def test_malformed_handles(handle):
    message = rf"'hf://<owner>/<repo>'.*Received: weights={handle!r}"
    with pytest.raises(ValueError, match=message):
        tiny_model(weights=handle)
    with pytest.raises(ValueError, match=message):
        keras_bit.load_weights(tiny_model(), handle)


def test_not_cached_offline_is_download_error(hub):
    with pytest.raises(keras_bit.DownloadError, match=r"config.json of hf://nobody/nothing.*HF_HUB_OFFLINE"):
        tiny_model(weights="hf://nobody/nothing")


def test_not_cached_offline_is_refused(hub):
    """Today's behaviour, whatever its class: refused with an error naming the repository."""
    with pytest.raises((ValueError, OSError), match=r"hf://nobody/nothing"):
        tiny_model(weights="hf://nobody/nothing")


def test_hub_architecture_mismatch_names_both(tiny_repo):
    with pytest.raises(ValueError, match=r"hf://someone/bit-tiny holds a BiT with block_units=\(2, 1, 1, 1\).*"
                                         r"the model asks for block_units=\(2, 1, 2, 1\)"):
        keras_bit.ResNetV2((2, 1, 2, 1), base_width=32, groups=8, weights=f"hf://{REPO}")
    with pytest.raises(ValueError, match=r"groups=8.*groups=32"):
        keras_bit.ResNetV2((2, 1, 1, 1), base_width=32, weights=f"hf://{REPO}")


@pytest.mark.parametrize("override,message", [
    ({"global_padding": "SAME"}, r"global_padding='SAME'"),
    ({"layer_type": "bottleneck"}, r"layer_type='bottleneck'"),
    ({"layer_type": "bottleneck", "global_padding": "SAME"}, r"layer_type='bottleneck'.*global_padding='SAME'"),
    ({"embedding_dynamic_padding": True}, r"global_padding"),
    ({"model_type": "vit-hybrid"}, r"model_type='vit-hybrid'"),
])
def test_hub_config_not_bit_refused(hub, override, message):
    """ViT-hybrid backbones (bottleneck units, TF "SAME" padding) compute another function: refused."""
    tensors = reference.to_transformers(tiny_weights())
    hub_repo(hub, REPO, {"config.json": bit_config(**override), "model.safetensors": tensors})
    with pytest.raises(ValueError, match=rf"hf://{REPO} is not a BiT checkpoint keras_bit can load: .*{message}"):
        tiny_model(weights=f"hf://{REPO}")


def test_cached_truncated_weights_named(hub):
    tensors = reference.to_transformers(tiny_weights())
    paths = hub_repo(hub, REPO, {"config.json": bit_config(), "model.safetensors": tensors})
    with open(paths["model.safetensors"], "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match=r"Could not read .*model.safetensors: not a valid .safetensors file"):
        tiny_model(weights=f"hf://{REPO}")


@pytest.mark.parametrize("defect", DEFECTS)
def test_strict_refusal_assigns_nothing(tmp_path, defect):
    tensors, message = with_defect(reference.to_transformers(tiny_weights()), defect,
                                   "bit.encoder.stages.1.layers.0.norm2.weight",
                                   ("bit.encoder.stages.1.layers.1.norm1.weight", np.ones(256, np.float32)))
    assert_safetensors_refused(tmp_path / "bad.safetensors", tensors, message)


def test_conv_head_refused(tmp_path):
    """timm's 1x1-convolution head in a transformers file: refused by shape."""
    t = reference.to_transformers(tiny_weights())
    t["classifier.1.weight"] = t["classifier.1.weight"][:, :, None, None].copy()
    assert_safetensors_refused(tmp_path / "bad.safetensors", t,
                               r"key 'classifier.1.weight' has shape \(10, 1024, 1, 1\), model .* expects \(10, 1024\)")


def test_cached_truncated_weights_say_which_blob_to_delete(hub):
    tensors = reference.to_transformers(tiny_weights())
    paths = hub_repo(hub, REPO, {"config.json": bit_config(), "model.safetensors": tensors})
    blob = os.path.realpath(paths["model.safetensors"])
    with open(blob, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match=rf"delete {re.escape(blob)} to download it again"):
        tiny_model(weights=f"hf://{REPO}")


def test_headless_bitmodel_repo_head_size_comes_from_the_file(hub, rng):
    """transformers configs always carry labels; a BitModel file has no head, so there is none to load."""
    d = tiny_weights()
    hub_repo(
        hub, REPO, {"config.json": bit_config(classes=2), "model.safetensors": reference.to_transformers(d, prefix="")}
    )
    model = tiny_model(weights=f"hf://{REPO}", classes=10)
    assert not np.any(model.get_layer("head").kernel.numpy())  # a new zero head, not "the checkpoint has 2"
    x = images(rng)
    np.testing.assert_allclose(_features(model, x), reference.forward(d, x, groups=8, features=True), atol=1e-4)


@pytest.mark.parametrize("handle", ["hf://a/b..c", "hf://a b/c", "hf://-a/b"])
def test_invalid_repo_ids_are_named(handle):
    with pytest.raises(ValueError, match=r"A Hugging Face handle is 'hf://<owner>/<repo>'.*Received: weights="):
        tiny_model(weights=handle)
