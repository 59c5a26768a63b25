"""The TF-Serving SavedModel: both signatures equal the Keras model, weights stored once, bad requests named."""

import base64
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_bit
from helpers import (EXPORT_CLASSES, TINY_SIZE, encode, export_classifier, keras_probabilities, tiny_model,
                     uint8_images)
from keras_bit.export import export_saved_model, fold_standardization, next_version

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


@pytest.fixture
def model(tmp_path):
    return export_classifier(tmp_path)


LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    loaded = tf.saved_model.load(sys.argv[1])
    assert "keras_bit" not in sys.modules
    inputs = np.load(sys.argv[2], allow_pickle=True)
    out = {}
    for key in ("a", "b"):
        r = loaded.signatures["serving_default"](images=tf.constant(inputs[key]))
        out[key] = r["probabilities"].numpy().tolist()
        out[key + "_labels"] = [[l.decode() for l in row] for row in r["top_k_labels"].numpy()]
    for key in ("png", "webp", "bmp", "gif", "jpeg"):
        r = loaded.signatures["serving_bytes"](image_bytes=tf.constant(list(inputs[key])))
        out[key] = r["probabilities"].numpy().tolist()
    print(json.dumps(out))
    """
)


def test_export_loads_without_keras_bit_and_matches(model, tmp_path, rng):
    path = export_saved_model(model, tmp_path / "exports", class_names=EXPORT_CLASSES, top_k=3)
    assert path == str(tmp_path / "exports" / model.name / "1")
    a, b = uint8_images(rng, 2, 64, 64), uint8_images(rng, 3, 91, 47)  # two sizes, resized inside the graph
    lossless = {"png": ("PNG", {}), "webp": ("WEBP", {"lossless": True}), "bmp": ("BMP", {})}
    encoded = {k: np.array([encode(i, fmt, **kw) for i in b], dtype=object) for k, (fmt, kw) in lossless.items()}
    # GIF holds 256 colours: one per channel value when the image is grey.
    grey = np.repeat(b[..., :1], 3, axis=-1)
    encoded["gif"] = np.array([encode(i, "GIF") for i in grey], dtype=object)
    encoded["jpeg"] = np.array([encode(i, "JPEG") for i in b], dtype=object)
    np.savez(tmp_path / "inputs.npz", a=a, b=b, **encoded)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, path, str(tmp_path / "inputs.npz")],
                          check=False, capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    expected_a, expected_b = keras_probabilities(model, a), keras_probabilities(model, b)
    assert np.ptp(expected_a) > 1e-3  # outputs vary with the input, so agreement means something
    np.testing.assert_allclose(out["a"], expected_a, atol=1e-5)
    np.testing.assert_allclose(out["b"], expected_b, atol=1e-5)
    for key in lossless:
        np.testing.assert_allclose(out[key], expected_b, atol=1e-5, err_msg=key)
    np.testing.assert_allclose(out["gif"], keras_probabilities(model, grey), atol=1e-5)
    # JPEG is lossy: the served scores equal the Keras model on TF's own decoding of the same files.
    jpeg_pixels = [tf.io.decode_jpeg(data, channels=3)[None] for data in encoded["jpeg"]]
    np.testing.assert_allclose(out["jpeg"], np.concatenate([keras_probabilities(model, p) for p in jpeg_pixels]),
                               atol=1e-5)
    top = np.argsort(-expected_a, axis=1)[:, :3]
    assert out["a_labels"] == [[EXPORT_CLASSES[i] for i in row] for row in top]
    with open(os.path.join(path, "assets.extra", "class_names.txt"), encoding="utf-8") as f:
        assert f.read().splitlines() == EXPORT_CLASSES


def test_large_jpegs_are_decoded_at_full_size_unless_asked(model, tmp_path, rng):
    # A smooth 600 x 480 photo-like image: more than 8x the 64 px input, where DCT scaling would apply.
    image = np.asarray(tf.image.resize(uint8_images(rng, 1, 6, 5)[0].astype("float32"), (600, 480)), np.uint8)
    jpeg = encode(image, "JPEG")
    full = keras_probabilities(model, tf.io.decode_jpeg(jpeg, channels=3)[None])
    exact = tf.saved_model.load(export_saved_model(model, tmp_path, name="exact")).signatures["serving_bytes"]
    np.testing.assert_allclose(exact(image_bytes=tf.constant([jpeg]))["probabilities"], full, atol=1e-5)
    fast = tf.saved_model.load(export_saved_model(model, tmp_path, name="fast", jpeg_dct_scaling=True))
    scaled = fast.signatures["serving_bytes"](image_bytes=tf.constant([jpeg]))["probabilities"].numpy()
    # The shortcut equals the model on the 1/4-scale DCT decode (150 x 120; 1/8 would be under 64 px wide)...
    np.testing.assert_allclose(scaled, keras_probabilities(model, tf.io.decode_jpeg(jpeg, channels=3, ratio=4)[None]),
                               atol=1e-5)
    assert np.abs(scaled - full).max() > 1e-4  # ... which is another function: why it is not the default


def test_weights_are_stored_once(model, tmp_path):
    path = export_saved_model(model, tmp_path, class_names=EXPORT_CLASSES)
    reader = tf.train.load_checkpoint(os.path.join(path, "variables", "variables"))
    shapes = reader.get_variable_to_shape_map()
    stored = sum(int(np.prod(shape)) for key, shape in shapes.items() if key != "_CHECKPOINTABLE_OBJECT_GRAPH")
    assert stored == model.count_params()  # keras-team/keras#23553 stored each weight twice
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(os.path.join(path, "variables"))
               for f in files)
    assert 4 * model.count_params() <= size < 4 * model.count_params() * 1.05


@pytest.mark.slow  # another process (a Python start with TensorFlow: seconds)
def test_saved_model_cli_lists_both_signatures(model, tmp_path):
    path = export_saved_model(model, tmp_path, class_names=EXPORT_CLASSES)
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    proc = subprocess.run([cli, "show", "--dir", path, "--all"], check=False, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    for expected in ("signature_def['serving_default']", "signature_def['serving_bytes']", "inputs['images']",
                     "inputs['image_bytes']", "outputs['probabilities']", "outputs['top_k_indices']",
                     "outputs['top_k_scores']", "outputs['top_k_labels']", "dtype: DT_UINT8", "dtype: DT_STRING"):
        assert expected in text, expected


def _kernel_moment_ops(path, signature):
    graph = tf.saved_model.load(path).signatures[signature].graph
    ops = [op for f in graph.as_graph_def().library.function for op in f.node_def]
    return [op.name for op in ops if op.op in ("Mean", "Sqrt", "SquaredDifference") and "conv" in op.name.lower()]


def test_folded_graph_has_no_kernel_moments_and_matches(model, tmp_path, rng):
    folded = fold_standardization(model)
    assert not any(isinstance(layer, keras_bit.StandardizedConv2D) for layer in folded.layers)
    x = keras_bit.preprocess_input(uint8_images(rng, 2, TINY_SIZE, TINY_SIZE))
    np.testing.assert_allclose(folded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
    path = export_saved_model(model, tmp_path / "folded", class_names=EXPORT_CLASSES)
    assert _kernel_moment_ops(path, "serving_default") == []
    unfolded = export_saved_model(model, tmp_path / "unfolded", class_names=EXPORT_CLASSES, fold=False)
    assert _kernel_moment_ops(unfolded, "serving_default")  # the check can fail: WS ops are visible when present


def test_fold_to_bfloat16_stores_bfloat16_weights_and_keeps_a_float32_head(model, rng):
    folded = fold_standardization(model, dtype="bfloat16")
    head = folded.get_layer("head")
    assert {w.dtype for layer in folded.layers if layer is not head for w in layer.weights} == {"bfloat16"}
    assert {w.dtype for w in head.weights} == {"float32"} and head.compute_dtype == "float32"
    x = keras_bit.preprocess_input(uint8_images(rng, 4, TINY_SIZE, TINY_SIZE))
    features = keras.Model(model.input, model.get_layer("post_relu").output).predict(x, verbose=0)
    low = keras.Model(folded.input, folded.get_layer("post_relu").output).predict(x, verbose=0)
    error = np.abs(np.asarray(low, np.float32) - features).max() / np.abs(features).max()
    assert 1e-4 < error < 0.05  # bfloat16 rounding: visible (the check can fail), small
    with pytest.raises(ValueError, match=r"`dtype` must be one of \(None, 'bfloat16', 'float32'\). Received: "
                                         r"dtype='float16'"):
        fold_standardization(model, dtype="float16")


def test_bfloat16_saved_model_is_half_the_size_and_close(model, tmp_path, rng):
    float32 = export_saved_model(model, tmp_path, name="f32", class_names=EXPORT_CLASSES)
    bfloat16 = export_saved_model(model, tmp_path, name="bf16", class_names=EXPORT_CLASSES, quantization="bfloat16")

    def weight_bytes(path):
        folder = os.path.join(path, "variables")
        return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))

    assert 0.45 < weight_bytes(bfloat16) / weight_bytes(float32) < 0.6
    images = uint8_images(rng, 8, TINY_SIZE, TINY_SIZE)
    outputs = [tf.saved_model.load(p).signatures["serving_default"](images=tf.constant(images))["probabilities"]
               for p in (float32, bfloat16)]
    assert outputs[1].dtype == tf.float32
    error = np.abs(outputs[1].numpy() - outputs[0].numpy()).max()
    assert 1e-6 < error < 0.02, error  # bfloat16 rounding: visible, small
    with pytest.raises(ValueError, match=r"`quantization` must be one of \(None, 'bfloat16'\) for a SavedModel"):
        export_saved_model(model, tmp_path, name="f16", quantization="float16")


@pytest.mark.parametrize("activation", ["sigmoid", "softmax", None])
def test_the_head_keeps_its_own_activation(tmp_path, rng, activation):
    model = tiny_model(classes=5, classifier_activation=activation)
    model.set_weights(export_classifier(tmp_path).get_weights())  # the random head, under another activation
    images = uint8_images(rng, 3, 64, 64)
    logits_or_scores = keras_probabilities(model, images)
    expected = tf.nn.softmax(logits_or_scores).numpy() if activation is None else logits_or_scores
    served = tf.saved_model.load(export_saved_model(model, tmp_path))
    probabilities = served.signatures["serving_default"](images=tf.constant(images))["probabilities"].numpy()
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    if activation == "sigmoid":  # independent per-class scores, not a distribution
        assert np.abs(probabilities.sum(axis=1) - 1).max() > 0.05


def test_versions_increment_and_never_overwrite(model, tmp_path):
    first = export_saved_model(model, tmp_path, name="bit", class_names=EXPORT_CLASSES)
    second = export_saved_model(model, tmp_path, name="bit", class_names=EXPORT_CLASSES)
    assert [os.path.basename(first), os.path.basename(second)] == ["1", "2"]
    assert next_version(tmp_path / "bit") == 3
    with pytest.raises(ValueError, match=r"Export version .*bit/1 already exists"):
        export_saved_model(model, tmp_path, name="bit", version=1, class_names=EXPORT_CLASSES)


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="../escape"), r"`name` must be a plain name .*Received: name='\.\./escape'"),
    (dict(name="a/b"), "`name` must be a plain name"),
    (dict(name=".."), "`name` must be a plain name"),
    (dict(name=""), "`name` must be a plain name"),
    (dict(version=-1), r"`version` must be a positive integer. Received: version=-1"),
    (dict(version=0), "`version` must be a positive integer"),
    (dict(version="2"), "`version` must be a positive integer"),
    (dict(version=True), "`version` must be a positive integer"),
    (dict(class_names=["a", "b"]), "`class_names`: 2 names for 5 classes"),
    (dict(class_names=[1, 2, 3, 4, 5]), "`class_names`: every class name must be a non-empty single-line string"),
    (dict(class_names=["a", "b", "c", "d", "two\nlines"]), "every class name must be a non-empty single-line"),
    (dict(class_names=["a", "a", "b", "c", "d"]), r"class names must be distinct. Repeated: \['a'\]"),
    (dict(top_k=0), "`top_k` must be a positive integer"),
    (dict(max_pixels=0), "`max_pixels` must be a positive integer"),
    (dict(activation="relu"), r"`activation` must be one of \('auto', 'softmax', 'none'\)"),
    (dict(image_size=(64,)), r"`image_size` must be \(height, width\)"),
])
def test_export_argument_errors_write_nothing(model, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        export_saved_model(model, tmp_path / "exports", **kwargs)
    assert not os.path.exists(tmp_path / "exports") and not os.path.exists(tmp_path / "escape")


@pytest.mark.parametrize("class_names", ["abcde", b"abcde", 5])
def test_class_names_must_be_a_list(model, tmp_path, class_names):
    with pytest.raises(TypeError, match="`class_names` must be a list of strings, one per class"):
        export_saved_model(model, tmp_path, class_names=class_names)


def test_a_model_without_a_fixed_input_size_needs_image_size(tmp_path):
    free = tiny_model(include_top=False, pooling="avg", input_shape=None)
    with pytest.raises(ValueError, match=r"input size is not fixed .*pass `image_size=\(height, width\)`"):
        export_saved_model(free, tmp_path, class_names=[str(i) for i in range(1024)], activation="none")
    with pytest.raises(ValueError, match=r"outputs pooled features, not classes .*include_top=False"):
        export_saved_model(free, tmp_path, image_size=(32, 32))
    unknown = keras.Model(free.input, keras.layers.Identity()(free.output))
    with pytest.raises(ValueError, match=r"Cannot tell whether .* outputs logits or probabilities.*--activation"):
        export_saved_model(unknown, tmp_path, image_size=(32, 32))


@pytest.mark.parametrize("images, message", [
    (tf.zeros((64, 64, 3), tf.uint8), r"received shape\] \[64 64 3\]"),
    (tf.zeros((1, 64, 64, 4), tf.uint8), r"received shape\] \[1 64 64 4\]"),
    (tf.zeros((1, 0, 64, 3), tf.uint8), r"received shape\] \[1 0 64 3\]"),
    (tf.zeros((1, 64, 64, 3), tf.float32), "expected to be a uint8 tensor but is a float tensor"),
])
def test_wrong_pixels_are_refused_naming_the_expected_input(model, tmp_path, images, message):
    serve = tf.saved_model.load(export_saved_model(model, tmp_path)).signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=message) as info:
        serve(images=images)
    if images.dtype == tf.uint8:
        assert "expected uint8 RGB pixels of shape [batch, height, width, 3]" in info.value.message


def test_a_bad_image_fails_the_batch_naming_its_index(model, tmp_path, rng):
    served = tf.saved_model.load(export_saved_model(model, tmp_path, max_pixels=100_000))
    serve = served.signatures["serving_bytes"]
    good = encode(uint8_images(rng, 1, 40, 30)[0], "PNG")
    truncated = good[: len(good) // 2]
    too_large = encode(uint8_images(rng, 1, 400, 300)[0], "PNG")
    failed = r"batch indices .*max_pixels=100000 pixels\):\] \[1 3 4\]"
    with pytest.raises(tf.errors.InvalidArgumentError, match=failed):
        serve(image_bytes=tf.constant([good, b"not an image", good, truncated, too_large]))
    # A request where every image is bad (the common single-image case) names them too.
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"batch indices .*\] \[0\]"):
        serve(image_bytes=tf.constant([b"not an image"]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"batch indices .*\] \[0 1\]"):
        serve(image_bytes=tf.constant([truncated, too_large]))
    # The server is not left in a bad state: the next request is answered.
    assert serve(image_bytes=tf.constant([good, good]))["probabilities"].shape == (2, 5)


def test_signatures_accept_an_empty_batch(model, tmp_path):
    served = tf.saved_model.load(export_saved_model(model, tmp_path, class_names=EXPORT_CLASSES))
    out = served.signatures["serving_default"](images=tf.zeros([0, 50, 50, 3], tf.uint8))
    assert out["probabilities"].shape == (0, 5) and out["top_k_labels"].shape == (0, 5)
    out = served.signatures["serving_bytes"](image_bytes=tf.constant([], tf.string))
    assert out["probabilities"].shape == (0, 5)


# --- The TF Serving REST requests the README documents, run against the signatures. ---


def _readme_request(signature):
    """The JSON body of the README's `curl` request for `signature` (the shell splice left in place)."""
    with open(README, encoding="utf-8") as f:
        lines = [line for line in f if line.startswith("curl ") and " -d '" in line]
    bodies = [line.split(" -d '", 1)[1].rstrip().removesuffix("'") for line in lines]
    matches = [b for b in bodies if (f'"signature_name": "{signature}"' in b) == (signature != "serving_default")]
    assert matches, f"no curl request for {signature} in the README"
    return matches[0]


def _tf_serving_rest(signatures, body):
    """What TF Serving's REST API does with a row-format ("instances") request: b64 -> bytes, rows -> batch."""
    request = json.loads(body)
    signature = signatures[request.get("signature_name", "serving_default")]
    (name, spec), = signature.structured_input_signature[1].items()
    rows = [row[name] if isinstance(row, dict) and name in row else row for row in request["instances"]]
    rows = [base64.b64decode(row["b64"]) if isinstance(row, dict) else row for row in rows]
    outputs = signature(**{name: tf.constant(rows, dtype=spec.dtype)})
    return {"predictions": [{k: v[i].numpy().tolist() for k, v in outputs.items()} for i in range(len(rows))]}


def test_readme_rest_requests_match_the_signatures(model, tmp_path, rng):
    served = tf.saved_model.load(export_saved_model(model, tmp_path, class_names=EXPORT_CLASSES))
    body = _readme_request("serving_default")
    pixels = np.array(json.loads(body)["instances"], np.uint8)
    response = _tf_serving_rest(served.signatures, body)
    np.testing.assert_allclose([p["probabilities"] for p in response["predictions"]],
                               keras_probabilities(model, pixels), atol=1e-5)
    image = uint8_images(rng, 1, 40, 30)[0]
    template = _readme_request("serving_bytes")
    splice = "'\"$(base64 < cat.jpg | tr -d '\\n')\"'"
    assert splice in template
    body = template.replace(splice, base64.b64encode(encode(image, "PNG")).decode())
    response = _tf_serving_rest(served.signatures, body)
    prediction, = response["predictions"]
    assert set(prediction) == {"probabilities", "top_k_indices", "top_k_scores", "top_k_labels"}
    np.testing.assert_allclose(prediction["probabilities"], keras_probabilities(model, image[None])[0], atol=1e-5)
