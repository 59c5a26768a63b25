"""LiteRT, ONNX and OpenVINO exports run with their own runtimes and equal the Keras model."""

import os

import numpy as np
import pytest

from helpers import (EXPORT_CLASSES, EXPORT_FILES, EXPORT_RUNTIMES, encode, export_classifier, keras_probabilities,
                     uint8_images)
from keras_bit.export import export_model, load_exported
from keras_bit.export.runtimes import check_images

CLASSIFIER_OUTPUTS = ("probabilities", "top_k_indices", "top_k_scores")
FLOAT_FORMATS, RUNTIMES = EXPORT_FILES, EXPORT_RUNTIMES


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return export_classifier(tmp_path_factory.mktemp("model"))


@pytest.mark.parametrize("fmt", list(FLOAT_FORMATS))
def test_every_format_equals_the_keras_model(model, classifier_exports, rng, fmt):
    pytest.importorskip(RUNTIMES[fmt])
    path = classifier_exports[fmt]  # export_model(model, ..., fmt, class_names=EXPORT_CLASSES, top_k=3), shared
    exported = load_exported(path)
    assert exported.format == fmt and exported.class_names == EXPORT_CLASSES
    for images in (uint8_images(rng, 2, 64, 64), uint8_images(rng, 3, 91, 47), uint8_images(rng, 1, 20, 200)):
        out = exported(images)
        expected = keras_probabilities(model, images)
        assert np.ptp(expected) > 1e-3  # the outputs depend on the input: agreement means something
        assert next(iter(out)) == "probabilities" and set(out) == {"probabilities", "top_k_indices", "top_k_scores"}
        np.testing.assert_allclose(out["probabilities"], expected, atol=1e-4)
        np.testing.assert_array_equal(out["top_k_indices"], np.argsort(-expected, axis=1, kind="stable")[:, :3])
        np.testing.assert_allclose(out["top_k_scores"], np.sort(expected, axis=1)[:, ::-1][:, :3], atol=1e-4)
    if fmt != "tf_saved_model":  # output order inside the file, not only in `load_exported`'s dict: the raw runtime's
        assert _raw_output_names(fmt, path) == list(CLASSIFIER_OUTPUTS)


def _raw_output_names(fmt, path):
    if fmt == "onnx":
        import onnxruntime

        return [o.name for o in onnxruntime.InferenceSession(path).get_outputs()]
    if fmt == "openvino":
        import openvino

        # An OpenVINO output has a set of names (ours and the converter's tensor names).
        return [min(o.names & set(CLASSIFIER_OUTPUTS), default=min(o.names))
                for o in openvino.Core().read_model(path).outputs]
    from ai_edge_litert.interpreter import Interpreter

    signature = Interpreter(model_path=path).get_signature_list()["serving_default"]
    assert signature["inputs"] == ["images"]
    return signature["outputs"]


@pytest.fixture(scope="module")
def mixed_models(tmp_path_factory):
    """The export classifier built under each mixed-precision policy (same weights as `model`)."""
    import keras

    models = {}
    for policy in ("mixed_bfloat16", "mixed_float16"):
        keras.config.set_dtype_policy(policy)
        try:
            models[policy] = export_classifier(tmp_path_factory.mktemp(policy))
        finally:
            keras.config.set_dtype_policy("float32")
    return models


# ONNX Runtime refused a mixed_bfloat16 export ("Type 'tensor(bfloat16)' ... (Conv)"), OpenVINO could not read it,
# and LiteRT needed Select TF ops for both policies: each is now written in float32. `global_policy`: exported
# while the mixed policy is still the global one, as in the process that fine-tuned the model.
@pytest.mark.parametrize("policy, fmt, global_policy", [
    ("mixed_bfloat16", "onnx", False), ("mixed_bfloat16", "litert", True), ("mixed_bfloat16", "openvino", False),
    ("mixed_float16", "litert", False)])
def test_mixed_precision_models_export_in_float32(model, mixed_models, tmp_path, rng, policy, fmt, global_policy):
    import keras

    pytest.importorskip(RUNTIMES[fmt])
    mixed = mixed_models[policy]
    if global_policy:
        keras.config.set_dtype_policy(policy)
    path = export_model(mixed, tmp_path / FLOAT_FORMATS[fmt], fmt)
    keras.config.set_dtype_policy("float32")
    images = uint8_images(rng, 4, 64, 64)
    out = load_exported(path)(images)["probabilities"]
    in_float32, in_policy = keras_probabilities(model, images), keras_probabilities(mixed, images)
    # The export computes what the same weights compute in float32; the Keras model itself rounds to 8 (bfloat16)
    # or 11 (float16) significant bits, so it is further away: measured up to 1.7e-2 (bfloat16) and 1.2e-3
    # (float16) on 8 images, against 1.7e-6 for the export.
    assert np.abs(in_policy - in_float32).max() > 1e-4  # the policy does change the outputs: the check means something
    np.testing.assert_allclose(out, in_float32, atol=1e-5)
    assert np.abs(out - in_policy).max() < (5e-2 if policy == "mixed_bfloat16" else 5e-3)


def test_the_test_run_refuses_the_bfloat16_file_of_issue_22(mixed_models, tmp_path, monkeypatch):
    """Without the float32 rebuild the converter writes bfloat16 convolutions: the test run now refuses the file."""
    pytest.importorskip("onnxruntime")
    from keras_bit.export import ExportError, serving

    as_is = serving.serving_model
    monkeypatch.setattr(serving, "serving_model", lambda *args, dtype=None, **kwargs: as_is(*args, **kwargs))
    with pytest.raises(ExportError, match=r"The onnx export .*model\.onnx fails in ONNX Runtime on a test image "
                                          r"\(.*tensor\(bfloat16\).*\), so it was not written"):
        export_model(mixed_models["mixed_bfloat16"], tmp_path / "model.onnx", "onnx", class_names=EXPORT_CLASSES)
    assert os.listdir(tmp_path) == []


def test_a_mixed_bfloat16_saved_model_keeps_its_policy(mixed_models, tmp_path, rng):
    images = uint8_images(rng, 4, 64, 64)
    mixed = mixed_models["mixed_bfloat16"]
    out = load_exported(export_model(mixed, tmp_path / "sm", "tf_saved_model"))(images)["probabilities"]
    # Folding rounds differently from the Keras layers in bfloat16: measured 3.6e-3.
    assert np.abs(out - keras_probabilities(mixed, images)).max() < 2e-2


@pytest.mark.parametrize("quantization", ["float16", "int8"])
def test_quantized_litert_is_smaller_and_close(model, tmp_path, rng, quantization):
    pytest.importorskip("ai_edge_litert")
    calibration = uint8_images(rng, 16, 64, 64) if quantization == "int8" else None
    float32 = export_model(model, tmp_path / "float32.tflite", "litert")
    quantized = export_model(model, tmp_path / f"{quantization}.tflite", "litert", quantization=quantization,
                             representative_data=calibration)
    ratio = os.path.getsize(quantized) / os.path.getsize(float32)
    assert ratio < (0.6 if quantization == "float16" else 0.35), ratio
    images = uint8_images(rng, 8, 64, 64)
    reference = load_exported(float32)(images)["probabilities"]
    out = load_exported(quantized)(images)["probabilities"]
    assert out.shape == reference.shape and np.isfinite(out).all()
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=0.02)
    # float16 weights barely move the outputs; int8 is coarser on a random tiny network.
    assert np.abs(out - reference).max() < (0.01 if quantization == "float16" else 0.25)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(format="tflite"), ValueError, r"`format` must be one of \('tf_saved_model', 'litert', 'onnx', 'openvino'\)"),
    (dict(format="onnx", path="model.tflite"), ValueError, r"A onnx export is a '\.onnx' file"),
    (dict(format="onnx", quantization="int8"), ValueError,
     r"quantization='int8' is only available for format='litert'. Received: format='onnx'"),
    (dict(quantization="bfloat16"), ValueError,
     r"quantization='bfloat16' is only available for format='tf_saved_model'. Received: format='litert'"),
    (dict(quantization="int4"), ValueError, "`quantization` must be one of"),
    (dict(quantization="int8"), ValueError, "quantization='int8' needs `representative_data`"),
    (dict(representative_data=np.zeros((1, 8, 8, 3), np.uint8)), ValueError, "only used with quantization='int8'"),
    (dict(quantization="int8", representative_data=np.zeros((4, 8, 8), np.uint8)), ValueError,
     r"`representative_data` must be uint8 images \[n, height, width, 3\]"),
    (dict(class_names="abcde"), TypeError, "`class_names` must be a list of strings"),
    (dict(top_k=-3), ValueError, "`top_k` must be a positive integer"),
])
def test_argument_errors_write_nothing(model, tmp_path, kwargs, error, message):
    kwargs = {"format": "litert", "path": "model.tflite", **kwargs}
    path = tmp_path / kwargs.pop("path")
    with pytest.raises(error, match=message):
        export_model(model, path, **kwargs)
    assert os.listdir(tmp_path) == []


def test_existing_files_are_never_replaced_without_overwrite(model, tmp_path, rng):
    pytest.importorskip("onnxruntime")
    path = tmp_path / "model.onnx"
    path.write_bytes(b"someone else's file")
    with pytest.raises(FileExistsError, match=r"model\.onnx already exist.*overwrite=True"):
        export_model(model, path, "onnx")
    assert path.read_bytes() == b"someone else's file"
    export_model(model, path, "onnx", overwrite=True, class_names=EXPORT_CLASSES)
    assert load_exported(path).class_names == EXPORT_CLASSES
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.onnx.labels.txt"]  # no temporary left over


def test_overwriting_drops_the_old_class_names(model, tmp_path, rng):
    pytest.importorskip("onnxruntime")
    path = tmp_path / "model.onnx"
    export_model(model, path, "onnx", class_names=EXPORT_CLASSES)
    export_model(model, path, "onnx", overwrite=True)  # this model has no names: the old ones must not stay
    assert os.listdir(tmp_path) == ["model.onnx"] and load_exported(path).class_names is None


def test_a_folder_that_is_not_a_saved_model_is_never_replaced(model, tmp_path):
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is a folder that is not a SavedModel; it is never replaced"):
        export_model(model, tmp_path / "project", "tf_saved_model", overwrite=True)
    assert (tmp_path / "project" / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["project"]


def test_a_failed_export_leaves_nothing(model, tmp_path, monkeypatch):
    import keras

    def fail(*args, **kwargs):
        raise RuntimeError("converter crashed")

    monkeypatch.setattr(keras.Model, "export", fail)
    with pytest.raises(RuntimeError, match="converter crashed"):
        export_model(model, tmp_path / "model.tflite", "litert", class_names=EXPORT_CLASSES)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("images", [np.zeros((64, 64, 3), np.uint8), np.zeros((1, 64, 64, 4), np.uint8),
                                    np.zeros((1, 64, 64, 3), np.float32), [[1, 2, 3]]])
def test_exports_refuse_wrong_pixels_naming_the_expected_input(images):
    with pytest.raises(ValueError, match=r"`images` must be uint8 pixels \[batch, height, width, 3\]"):
        check_images(images)


def test_load_exported_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No exported model at"):
        load_exported(tmp_path / "missing.onnx")
    (tmp_path / "photo.png").write_bytes(encode(np.zeros((4, 4, 3), np.uint8), "PNG"))
    with pytest.raises(ValueError, match="is not an export: expected a SavedModel folder"):
        load_exported(tmp_path / "photo.png")
    with pytest.raises(ValueError, match="is not an export"):
        load_exported(tmp_path)
