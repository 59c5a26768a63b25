"""timm checkpoints (`.safetensors`, timm's ResNetV2 key layout), local and through `hf://` handles."""

import json
import pathlib
import struct

import keras
import numpy as np
import pytest
from safetensors.numpy import save_file

import keras_bit
import reference
from helpers import (
    DEFECTS, assert_refused, assert_safetensors_refused, hub_repo, images, offline_hub, relative_error, timm_config,
    tiny_model, tiny_weights, with_defect,
)
from keras_bit.weights import sources

pytestmark = pytest.mark.backend_agnostic  # .ci/backend runs these on JAX and PyTorch

R50 = (3, 4, 6, 3)
TIMM_R50X1_IN21K = "timm/resnetv2_50x1_bit.goog_in21k"


def _write_timm(path, d):
    save_file(reference.to_timm(d), str(path))  # to_timm's arrays are contiguous, as save_file needs
    return str(path)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty, offline Hugging Face cache."""
    return offline_hub(monkeypatch, tmp_path / "hf_cache")


def test_reference_layout_is_timms():
    """The test's converter follows timm's published layout: 153 keys for an R50, PyTorch shapes."""
    t = reference.to_timm(reference.random_checkpoint(R50, classes=1000))
    assert len(t) == 153
    assert t["stem.conv.weight"].shape == (64, 3, 7, 7)
    assert t["stages.0.blocks.0.downsample.conv.weight"].shape == (256, 64, 1, 1)
    assert t["stages.3.blocks.2.conv2.weight"].shape == (512, 512, 3, 3)
    assert t["stages.2.blocks.5.norm3.bias"].shape == (256,)
    assert t["head.fc.weight"].shape == (1000, 2048, 1, 1) and t["norm.weight"].shape == (2048,)


def test_tiny_parity_load_weights(tmp_path, rng):
    d = tiny_weights()
    path = _write_timm(tmp_path / "model.safetensors", d)
    model = tiny_model(classes=10, classifier_activation=None)
    keras_bit.load_weights(model, path)
    x = images(rng)
    assert relative_error(model.predict(x, verbose=0), reference.forward(d, x, groups=8)) <= 1e-5


@pytest.mark.parametrize("width", [1, 2])
def test_tiny_parity_constructor(tmp_path, rng, width):
    d = tiny_weights(width=width)
    path = _write_timm(tmp_path / "model.safetensors", d)
    model = tiny_model(weights=path, width_factor=width, classifier_activation=None)
    assert model.output_shape == (None, 10)  # the file's class count
    x = images(rng)
    assert relative_error(model.predict(x, verbose=0), reference.forward(d, x, groups=8)) <= 1e-5


def test_negative_control_kernel_orientation(tmp_path, rng):
    """Kernels stored (O, I, W, H) instead of (O, I, H, W) load (same shapes) but must break parity."""
    d = tiny_weights()
    t = reference.to_timm(d)
    # safetensors' save_file writes an array's buffer as is: views must be made contiguous.
    t = {k: (np.ascontiguousarray(v.transpose(0, 1, 3, 2)) if v.ndim == 4 else v) for k, v in t.items()}
    save_file(t, str(tmp_path / "flipped.safetensors"))
    model = tiny_model(weights=str(tmp_path / "flipped.safetensors"), classifier_activation=None)
    x = images(rng)
    assert relative_error(model.predict(x, verbose=0), reference.forward(d, x, groups=8)) > 1e-2


def test_other_classes_load_backbone_and_zero_head(tmp_path, rng):
    d = tiny_weights()
    model = tiny_model(weights=_write_timm(tmp_path / "model.safetensors", d), classes=3)
    head = model.get_layer("head")
    assert head.kernel.shape == (1024, 3) and not np.any(head.kernel.numpy()) and not np.any(head.bias.numpy())
    x = images(rng)
    backbone = keras.Model(model.input, model.get_layer("post_relu").output)
    assert relative_error(backbone.predict(x, verbose=0), reference.forward(d, x, groups=8, features=True)) <= 1e-5


def test_headless_model(tmp_path, rng):
    d = tiny_weights()
    model = tiny_model(weights=_write_timm(tmp_path / "model.safetensors", d), include_top=False)
    x = images(rng)
    assert relative_error(model.predict(x, verbose=0), reference.forward(d, x, groups=8, features=True)) <= 1e-5


def test_full_r50x1_hub_handle_parity(hub):
    """`BiTM_R50x1(weights="hf://timm/...")` from the Hugging Face cache equals the reference (full size, 64 px)."""
    d = reference.random_checkpoint(R50, classes=21843, seed=11)
    hub_repo(hub, TIMM_R50X1_IN21K, {"config.json": timm_config(), "model.safetensors": reference.to_timm(d)})
    source = sources.fetch(sources.resolve_source("hf://" + TIMM_R50X1_IN21K))
    assert (source.format, source.classes, source.resolution) == ("timm", 21843, 224)
    model = keras_bit.BiTM_R50x1(weights="hf://" + TIMM_R50X1_IN21K, input_shape=(64, 64, 3),
                                 classifier_activation=None)
    assert model.output_shape == (None, 21843)
    x = images(np.random.default_rng(4), size=64)
    assert relative_error(model.predict(x, verbose=0), reference.forward(d, x)) <= 1e-4


def test_hub_architecture_mismatch_names_both(hub):
    """A timm R101x1 repository refused by the R50x1 constructor, naming both architectures."""
    repo = "timm/resnetv2_101x1_bit.goog_in21k"
    tensors = {"stem.conv.weight": np.zeros((64, 3, 7, 7), np.float32)}  # the architecture check comes first
    hub_repo(hub, repo, {"config.json": timm_config("resnetv2_101x1_bit"), "model.safetensors": tensors})
    with pytest.raises(ValueError, match=r"block_units=\(3, 4, 23, 3\).*block_units=\(3, 4, 6, 3\)"):
        keras_bit.BiTM_R50x1(weights=f"hf://{repo}")


def test_hub_architecture_mismatch_refused_before_weights_download(hub):
    repo = "timm/resnetv2_101x1_bit.goog_in21k"
    hub_repo(hub, repo, {"config.json": timm_config("resnetv2_101x1_bit")})  # weights not downloaded yet
    with pytest.raises(ValueError, match=r"block_units=\(3, 4, 23, 3\).*block_units=\(3, 4, 6, 3\)"):
        keras_bit.BiTM_R50x1(weights=f"hf://{repo}")


def test_hub_config_of_another_model_refused(hub):
    hub_repo(hub, "timm/resnet50.a1_in1k", {"config.json": timm_config("resnet50")})
    with pytest.raises(ValueError, match=r"hf://timm/resnet50.a1_in1k is not a timm BiT model.*"
                                         r"architecture='resnet50'"):
        keras_bit.BiTM_R50x1(weights="hf://timm/resnet50.a1_in1k")


def test_hub_config_and_weights_disagree(hub):
    """A timm config.json beside a transformers model.safetensors: refused, naming both formats."""
    tensors = reference.to_transformers(tiny_weights())
    hub_repo(hub, "someone/mixed", {"config.json": timm_config(), "model.safetensors": tensors})
    with pytest.raises(ValueError, match="config.json describes a timm model but model.safetensors holds "
                                         "transformers keys"):
        keras_bit.BiTM_R50x1(weights="hf://someone/mixed")


@pytest.mark.parametrize("defect", DEFECTS)
def test_strict_refusal_assigns_nothing(tmp_path, defect):
    tensors, message = with_defect(reference.to_timm(tiny_weights()), defect, "stages.2.blocks.0.conv2.weight",
                                   ("stages.2.blocks.1.conv1.weight", np.zeros((256, 512, 1, 1), np.float32)))
    assert_safetensors_refused(tmp_path / "bad.safetensors", tensors, message)


@pytest.mark.parametrize("layout", ["tf_kernel", "linear_head"])
def test_other_layouts_refused(tmp_path, layout):
    """A TF-layout kernel, or transformers' Linear head, in a timm file: refused by shape."""
    t = reference.to_timm(tiny_weights())
    if layout == "tf_kernel":
        key = "stages.2.blocks.0.conv2.weight"
        t[key] = t[key].transpose(2, 3, 1, 0).copy()  # (H, W, I, O)
        message = rf"key '{key}' has shape \(3, 3, 128, 128\), model .* expects \(128, 128, 3, 3\)"
    else:
        t["head.fc.weight"] = t["head.fc.weight"][:, :, 0, 0].copy()  # (C, in)
        message = r"key 'head.fc.weight' has shape \(10, 1024\), model .* expects \(10, 1024, 1, 1\)"
    assert_safetensors_refused(tmp_path / "bad.safetensors", t, message)


def test_bfloat16_tensor_loads_exactly_as_float32(tmp_path):
    """A bfloat16 tensor (safetensors hands it over as ml_dtypes' bfloat16) loads, widened exactly to float32."""
    t = reference.to_timm(tiny_weights())
    header, data, expected = {}, b"", None
    for key, value in sorted(t.items()):
        if key == "norm.weight":
            bits = (np.ascontiguousarray(value, np.float32).view(np.uint32) >> 16).astype(np.uint16)
            expected = (bits.astype(np.uint32) << 16).view(np.float32)
            dtype, raw = "BF16", bits.tobytes()
        else:
            dtype, raw = "F32", np.ascontiguousarray(value).tobytes()
        header[key] = {"dtype": dtype, "shape": list(value.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    model = tiny_model(classes=10)
    keras_bit.load_weights(model, path)
    np.testing.assert_array_equal(model.get_layer("post_gn").gamma.numpy(), expected)
    assert not np.array_equal(expected, t["norm.weight"])  # the bf16 rounding is visible: the file was read as bf16


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.999])
def test_truncated_file_named(tmp_path, keep):
    path = _write_timm(tmp_path / "model.safetensors", tiny_weights())
    data = pathlib.Path(path).read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: int(len(data) * keep)])
    model = tiny_model(classes=10)
    assert_refused(model, lambda: keras_bit.load_weights(model, bad), rf"Could not read {bad}")
    with pytest.raises(ValueError, match=rf"Could not read {bad}"):
        tiny_model(weights=str(bad))


def test_foreign_safetensors_refused(tmp_path):
    save_file({"encoder.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="holds neither timm nor transformers BiT tensors"):
        tiny_model(weights=str(tmp_path / "x.safetensors"))
