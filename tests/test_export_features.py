"""Feature-vector exports (`outputs="features"`): every format returns the pooled pre-logits embedding.

The embedding is checked against the Keras feature model (the classifier cut at its head's input) and against
the independent float64 NumPy forward pass of `reference.py` (final GroupNorm + ReLU, averaged over space).
"""

import json
import os

import keras
import numpy as np
import pytest

import reference
from helpers import TINY, TINY_SIZE, encode, keras_probabilities, tiny_checkpoint, tiny_model, uint8_images
from keras_bit.export import export_model, export_saved_model, load_exported
from keras_bit.predict import predict_files

FILES = {"tf_saved_model": "saved_model", "litert": "model.tflite", "onnx": "model.onnx", "openvino": "model.xml"}
RUNTIMES = {"tf_saved_model": "tensorflow", "litert": "ai_edge_litert", "onnx": "onnxruntime", "openvino": "openvino"}
TOLERANCE = 1e-4  # float32 in each runtime, features up to ~3: measured 6e-6 (TF) to 1.1e-5 (ONNX Runtime)


def _installed(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny 5-class classifier with random weights (head included) and its official-layout checkpoint dict."""
    folder = tmp_path_factory.mktemp("tiny")
    checkpoint = tiny_checkpoint(folder / "classifier.npz", classes=5, seed=4)
    return tiny_model(weights=str(folder / "classifier.npz")), checkpoint, folder


@pytest.fixture(scope="module")
def exports(tiny, tmp_path_factory):
    """One feature export per format whose runtime is installed (shared by the tests below)."""
    model, _, _ = tiny
    folder = tmp_path_factory.mktemp("exports")
    # A stale labels file where the ONNX export goes: overwriting with a feature export must remove it.
    (folder / "model.onnx.labels.txt").write_text("old\n")
    return {fmt: export_model(model, folder / name, fmt, outputs="features", overwrite=True)
            for fmt, name in FILES.items() if _installed(RUNTIMES[fmt])}


def _reference(checkpoint, images):
    """Independent float64 features of uint8 `images` (resized as the export does, bilinear, then [-1, 1])."""
    import tensorflow as tf

    import keras_bit

    x = keras_bit.preprocess_input(tf.image.resize(tf.cast(images, tf.float32), (TINY_SIZE, TINY_SIZE)).numpy())
    return reference.forward(checkpoint, x, groups=TINY["groups"], features=True).mean(axis=(1, 2))


def _keras_features(model, images):
    """The Keras feature model: the classifier cut at its head's input (the average-pooled GroupNorm + ReLU)."""
    return keras_probabilities(keras.Model(model.input, model.get_layer("avg_pool").output), images)


@pytest.fixture(scope="module")
def cases(tiny):
    """Images of three sizes (resized inside the exports) with their reference and Keras features."""
    model, checkpoint, _ = tiny
    rng = np.random.default_rng(7)
    batches = (uint8_images(rng, 2, 64, 64), uint8_images(rng, 3, 91, 47), uint8_images(rng, 1, 20, 200))
    return [(images, _reference(checkpoint, images), _keras_features(model, images)) for images in batches]


@pytest.mark.parametrize("fmt", list(FILES))
def test_every_format_returns_the_keras_features(exports, cases, fmt):
    if fmt not in exports:
        pytest.skip(f"{RUNTIMES[fmt]} is not installed (pip install 'keras-bit[export]')")
    exported = load_exported(exports[fmt])
    assert exported.kind == "features" and exported.outputs == ("features",) and exported.class_names is None
    for images, expected, in_keras in cases:
        out = exported(images)
        assert list(out) == ["features"] and out["features"].dtype == np.float32
        assert out["features"].shape == (len(images), 1024) and np.ptp(expected) > 1e-1  # varies: a real check
        np.testing.assert_allclose(in_keras, expected, atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(out["features"], expected, atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(out["features"], in_keras, atol=TOLERANCE, rtol=0)
    # Negative control: features 0.1% off are caught.
    assert np.abs(exported(images)["features"] - expected * 1.001).max() > TOLERANCE


def test_no_labels_file_and_a_stale_one_is_removed(exports):
    if "onnx" not in exports:
        pytest.skip("onnxruntime is not installed")
    folder = os.path.dirname(exports["onnx"])
    assert not os.path.lexists(exports["onnx"] + ".labels.txt")
    assert not os.path.lexists(os.path.join(folder, "saved_model", "assets.extra", "class_names.txt"))


def test_the_files_name_their_output_features(exports):
    """What a user of the raw runtime sees: one output named `features` in each file."""
    for fmt in ("onnx", "openvino", "litert"):
        if fmt not in exports:
            continue
        path = exports[fmt]
        if fmt == "onnx":
            import onnxruntime as ort

            assert [o.name for o in ort.InferenceSession(path).get_outputs()] == ["features"]
        elif fmt == "openvino":
            import openvino as ov

            assert [sorted(o.names) for o in ov.Core().read_model(path).outputs] == [["features"]]
        else:
            from ai_edge_litert.interpreter import Interpreter

            signature = Interpreter(model_path=path).get_signature_list()["serving_default"]
            assert signature == {"inputs": ["images"], "outputs": ["features"]}


def test_saved_model_bytes_signature_and_empty_batches(tiny, exports, rng):
    import tensorflow as tf

    _, checkpoint, _ = tiny
    signatures = tf.saved_model.load(exports["tf_saved_model"]).signatures
    images = uint8_images(rng, 2, 40, 52)
    encoded = tf.constant([encode(image, "PNG") for image in images])
    out = signatures["serving_bytes"](image_bytes=encoded)
    assert set(out) == {"features"}
    np.testing.assert_allclose(out["features"].numpy(), _reference(checkpoint, images), atol=TOLERANCE, rtol=0)
    assert signatures["serving_default"](images=tf.zeros([0, 8, 8, 3], tf.uint8))["features"].shape == (0, 1024)
    assert signatures["serving_bytes"](image_bytes=tf.zeros([0], tf.string))["features"].shape == (0, 1024)


@pytest.mark.parametrize("pooling", ["avg", None])
def test_a_model_without_a_head_exports_the_same_features(tiny, tmp_path, rng, pooling):
    """include_top=False, pooled or not (the export then average-pools): the classifier's features."""
    _, checkpoint, folder = tiny
    headless = tiny_model(weights=str(folder / "classifier.npz"), include_top=False, pooling=pooling)
    path = export_saved_model(headless, tmp_path, name="headless", outputs="features")
    images = uint8_images(rng, 2, 64, 64)
    np.testing.assert_allclose(load_exported(path)(images)["features"], _reference(checkpoint, images),
                               atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"outputs": "logits"}, ValueError, r"`outputs` must be one of \('probabilities', 'features'\)\. "
                                        r"Received: outputs='logits'"),
    ({"outputs": None}, ValueError, r"Received: outputs=None"),
    ({"outputs": "features", "class_names": list("abcde")}, ValueError, r"`class_names` is for "
                                                                         r"outputs='probabilities'"),
    ({"outputs": "features", "activation": "softmax"}, ValueError, r"`activation` is for outputs='probabilities'"),
])
def test_argument_errors_write_nothing(tiny, tmp_path, kwargs, error, message):
    model, _, _ = tiny
    with pytest.raises(error, match=message):
        export_model(model, tmp_path / "m.onnx", "onnx", **kwargs)
    assert os.listdir(tmp_path) == []


def test_a_model_whose_features_cannot_be_found_is_refused(tiny, tmp_path):
    model, _, _ = tiny
    odd = keras.Model(model.input, keras.layers.Identity()(model.output))
    with pytest.raises(ValueError, match=r"Cannot find the pooled features of .* last layer Identity"):
        export_model(odd, tmp_path / "m.onnx", "onnx", outputs="features")
    assert os.listdir(tmp_path) == []


def test_predict_and_the_cli_save_the_vectors(tiny, exports, tmp_path, rng, capsys):
    from keras_bit import cli

    _, checkpoint, _ = tiny
    images = uint8_images(rng, 2, 30, 45)
    for i, image in enumerate(images):
        (tmp_path / f"{i}.png").write_bytes(encode(image, "PNG"))
    (tmp_path / "2.png").write_bytes(b"not a png")
    rows = predict_files([tmp_path], exports["tf_saved_model"])
    assert [sorted(row) for row in rows] == [["features", "image"]] * 2 + [["error", "image"]]
    expected = _reference(checkpoint, images)
    np.testing.assert_allclose(np.stack([r["features"] for r in rows[:2]]), expected, atol=TOLERANCE, rtol=0)

    target = tmp_path / "out" / "features.npy"
    target.parent.mkdir()
    assert cli.main(["predict", str(tmp_path), "--model", exports["tf_saved_model"],
                     "--save-features", str(target)]) == 1  # the unreadable file: named, the others saved
    captured = capsys.readouterr()
    assert captured.err.strip().startswith(f"keras-bit predict: error: {tmp_path / '2.png'}: not a readable ")
    assert len(captured.err.strip().splitlines()) == 1
    lines = captured.out.strip().splitlines()
    assert lines[0] == f"{tmp_path / '0.png'}  row 0  dim 1024  norm {np.linalg.norm(expected[0]):.4f}"
    assert lines[-1] == f"features: [2, 1024] float32 saved to {target}"
    saved = np.load(target)
    assert saved.dtype == np.float32 and os.listdir(target.parent) == ["features.npy"]
    np.testing.assert_allclose(saved, expected, atol=TOLERANCE, rtol=0)

    assert cli.main(["predict", str(tmp_path / "0.png"), "--model", exports["tf_saved_model"]]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "features: [1, 1024] float32 (not saved; pass --save-features FILE.npy)" and len(out) == 2
    assert cli.main(["predict", str(tmp_path / "0.png"), "--model", exports["tf_saved_model"], "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["dim"] == 1024 and np.isclose(row["norm"], np.linalg.norm(expected[0]), atol=1e-3)
    np.testing.assert_allclose(row["features"], expected[0], atol=TOLERANCE, rtol=0)
    # An existing file is never replaced; checked before the model loads.
    assert cli.main(["predict", str(tmp_path / "0.png"), "--model", exports["tf_saved_model"],
                     "--save-features", str(target)]) == 2
    assert "already exists; existing files are never replaced" in capsys.readouterr().err


def test_a_keras_model_gives_its_pre_logits_and_kinds_must_match(tiny, exports, tmp_path, rng):
    model, checkpoint, _ = tiny
    model.save(tmp_path / "classifier.keras")
    images = uint8_images(rng, 1, 64, 64)
    (tmp_path / "a.png").write_bytes(encode(images[0], "PNG"))
    rows = predict_files([tmp_path / "a.png"], str(tmp_path / "classifier.keras"), outputs="features")
    np.testing.assert_allclose(rows[0]["features"][None], _reference(checkpoint, images), atol=TOLERANCE, rtol=0)
    assert "top" in predict_files([tmp_path / "a.png"], str(tmp_path / "classifier.keras"))[0]  # classes by default
    with pytest.raises(ValueError, match=r"is a features export, not a probabilities one; export the model with "
                                         r"outputs='probabilities' \(without --features\)"):
        predict_files([tmp_path / "a.png"], exports["tf_saved_model"], outputs="probabilities")


def test_a_fine_tuning_runs_classifier_is_cut_at_its_head(tiny):
    """`finetune` ends its model with an Activation after the linear head: the features are still the head's input."""
    from keras_bit.export.serving import feature_network

    _, _, folder = tiny
    logits = tiny_model(weights=str(folder / "classifier.npz"), classifier_activation=None)
    run_model = keras.Model(logits.input, keras.layers.Activation("softmax", name="probabilities")(logits.output))
    for model in (logits, run_model):
        network = feature_network(model)
        assert network.output is model.get_layer("avg_pool").output and len(network.layers) == len(model.layers) - (
            1 if model is logits else 2)
