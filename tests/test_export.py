import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import keras_bit
from helpers import TINY_SIZE, tiny_checkpoint, tiny_model
from keras_bit.export import export_saved_model, fold_standardization, next_version

CLASS_NAMES = [f"class_{i}" for i in range(5)]


@pytest.fixture
def model(tmp_path):
    tiny_checkpoint(tmp_path / "t.npz", classes=5, seed=4)  # random head: outputs depend on the input
    return tiny_model(weights=str(tmp_path / "t.npz"))


def _uint8(rng, n, h, w):
    return rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def _keras_probs(model, images):
    x = tf.image.resize(tf.cast(images, tf.float32), (TINY_SIZE, TINY_SIZE))
    return model.predict(keras_bit.preprocess_input(x.numpy()), verbose=0)


def _encode(image, fmt):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **({"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}))
    return buf.getvalue()


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
    r = loaded.signatures["serving_bytes"](image_bytes=tf.constant(list(inputs["png"])))
    out["png"] = r["probabilities"].numpy().tolist()
    r = loaded.signatures["serving_bytes"](image_bytes=tf.constant(list(inputs["jpeg"])))
    out["jpeg"] = r["probabilities"].numpy().tolist()
    try:
        loaded.signatures["serving_bytes"](image_bytes=tf.constant([b"not an image"]))
        out["corrupt"] = "no error"
    except tf.errors.InvalidArgumentError as e:
        out["corrupt"] = "InvalidArgumentError"
    r = loaded.signatures["serving_bytes"](image_bytes=tf.constant(list(inputs["png"][:1])))
    out["after_corrupt"] = r["probabilities"].numpy().tolist()
    print(json.dumps(out))
    """
)


def test_export_loads_without_keras_bit_and_matches(model, tmp_path, rng):
    path = export_saved_model(model, tmp_path / "exports", class_names=CLASS_NAMES, top_k=3)
    assert path == str(tmp_path / "exports" / model.name / "1")
    a, b = _uint8(rng, 2, 64, 64), _uint8(rng, 3, 91, 47)  # two sizes, resized inside the graph
    smooth = np.stack([np.asarray(Image.fromarray(img).resize((64, 64))) for img in _uint8(rng, 2, 16, 16)])
    np.savez(tmp_path / "inputs.npz", a=a, b=b, png=np.array([_encode(i, "PNG") for i in a], dtype=object),
             jpeg=np.array([_encode(i, "JPEG") for i in smooth], dtype=object))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, path, str(tmp_path / "inputs.npz")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    expected_a, expected_b = _keras_probs(model, a), _keras_probs(model, b)
    assert np.ptp(expected_a) > 1e-3  # outputs vary with the input, so agreement means something
    np.testing.assert_allclose(out["a"], expected_a, atol=1e-5)
    np.testing.assert_allclose(out["b"], expected_b, atol=1e-5)
    np.testing.assert_allclose(out["png"], expected_a, atol=1e-5)  # PNG is lossless
    # JPEG is lossy: the served scores must equal the Keras model on the JPEG's decoded pixels (TF's decoder,
    # the one inside the graph) to float precision, and those pixels must be the same images up to JPEG's
    # quality-95, 4:4:4 loss (under 4 grey levels on average on these noisy images). PIL's decoder is not used: its chroma upsampling differs.
    jpeg_pixels = np.stack([tf.io.decode_jpeg(_encode(i, "JPEG"), channels=3).numpy() for i in smooth])
    np.testing.assert_allclose(out["jpeg"], _keras_probs(model, jpeg_pixels), atol=1e-5)
    assert np.abs(jpeg_pixels.astype(int) - smooth).mean() < 4.0
    top = np.argsort(-expected_a, axis=1)[:, :3]
    assert out["a_labels"] == [[CLASS_NAMES[i] for i in row] for row in top]
    assert out["corrupt"] == "InvalidArgumentError"
    np.testing.assert_allclose(out["after_corrupt"], expected_a[:1], atol=1e-5)


def test_saved_model_cli_lists_both_signatures(model, tmp_path):
    path = export_saved_model(model, tmp_path, class_names=CLASS_NAMES)
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    proc = subprocess.run([cli, "show", "--dir", path, "--all"], capture_output=True, text=True, timeout=300)
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
    x = keras_bit.preprocess_input(_uint8(rng, 2, TINY_SIZE, TINY_SIZE))
    np.testing.assert_allclose(folded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
    path = export_saved_model(model, tmp_path / "folded", class_names=CLASS_NAMES)
    assert _kernel_moment_ops(path, "serving_default") == []
    unfolded = export_saved_model(model, tmp_path / "unfolded", class_names=CLASS_NAMES, fold=False)
    assert _kernel_moment_ops(unfolded, "serving_default")  # the check can fail: WS ops are visible when present


def test_versions_increment_and_never_overwrite(model, tmp_path):
    first = export_saved_model(model, tmp_path, name="bit", class_names=CLASS_NAMES)
    second = export_saved_model(model, tmp_path, name="bit", class_names=CLASS_NAMES)
    assert [os.path.basename(first), os.path.basename(second)] == ["1", "2"]
    assert next_version(tmp_path / "bit") == 3
    with pytest.raises(ValueError, match=r"Export version .*bit/1 already exists"):
        export_saved_model(model, tmp_path, name="bit", version=1, class_names=CLASS_NAMES)


def test_signature_rejects_wrong_dtype_and_rank(model, tmp_path):
    path = export_saved_model(model, tmp_path, class_names=CLASS_NAMES)
    serve = tf.saved_model.load(path).signatures["serving_default"]
    signature_errors = (TypeError, ValueError, tf.errors.InvalidArgumentError)
    with pytest.raises(signature_errors, match="uint8"):
        serve(images=tf.zeros((1, 64, 64, 3), tf.float32))
    with pytest.raises(signature_errors):  # rank 3 instead of 4
        serve(images=tf.zeros((64, 64, 3), tf.uint8))


def test_export_argument_errors(model, tmp_path):
    with pytest.raises(ValueError, match="`class_names` has 2 names for a model with 5 classes"):
        export_saved_model(model, tmp_path, class_names=["a", "b"])
    free = tiny_model(include_top=False, pooling="avg", input_shape=None)
    with pytest.raises(ValueError, match=r"input size is not fixed .*pass `image_size=\(height, width\)`"):
        export_saved_model(free, tmp_path, class_names=[str(i) for i in range(1024)])


def test_export_and_predict_commands(model, tmp_path, rng, capsys):
    from keras_bit.cli import main

    model.save(tmp_path / "model.keras")
    (tmp_path / "class_names.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    images = _uint8(rng, 2, 70, 50)
    files = []
    for i, image in enumerate(images):
        files.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(image).save(files[-1])
    assert main(["export", str(tmp_path / "model.keras"), "--export-dir", str(tmp_path / "sm"), "--name", "tiny",
                 "--class-names", str(tmp_path / "class_names.txt"), "--top", "2"]) == 0
    exported = str(tmp_path / "sm" / "tiny" / "1")
    assert capsys.readouterr().out.strip().endswith(exported)
    expected = _keras_probs(model, images)
    for source in (exported, str(tmp_path / "model.keras")):
        assert main(["predict", *files, "--model", source, "--top", "2", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert [r["image"] for r in report] == files
        for row, probs in zip(report, expected):
            best = np.argsort(-probs)[:2]
            assert [e["index"] for e in row["top"]] == best.tolist()
            assert [e["label"] for e in row["top"]] == [CLASS_NAMES[i] for i in best]
            np.testing.assert_allclose([e["score"] for e in row["top"]], probs[best], atol=1e-5)
    assert main(["predict", files[0], "--model", exported]) == 0
    assert "class_" in capsys.readouterr().out
    assert main(["predict", str(tmp_path / "missing.png"), "--model", exported]) == 2
    assert "Image file(s) not found" in capsys.readouterr().err


def test_bytes_signature_bounds_memory_for_huge_images(model, tmp_path, rng):
    served = tf.saved_model.load(export_saved_model(model, tmp_path, class_names=CLASS_NAMES, max_pixels=300_000))
    bytes_fn = served.signatures["serving_bytes"]
    small = _encode(_uint8(rng, 1, 40, 30)[0], "PNG")
    # A PNG whose header claims 100000 x 100000 pixels (30 GB decoded) is refused from the
    # header alone: the payload is a small image's, so a decode attempt would fail differently.
    huge = small[:16] + (100_000).to_bytes(4, "big") + (100_000).to_bytes(4, "big") + small[24:]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"image too large to decode .*max_pixels=300000"):
        bytes_fn(image_bytes=tf.constant([huge]))
    bmp = _encode(_uint8(rng, 1, 600, 700)[0], "BMP")  # 420k pixels > 300k
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_pixels=300000"):
        bytes_fn(image_bytes=tf.constant([bmp]))
    gif = _encode(_uint8(rng, 1, 20, 30)[0], "GIF")
    assert bytes_fn(image_bytes=tf.constant([gif]))["probabilities"].shape == (1, 5)
    # A 1200 x 1000 JPEG (1.2M pixels, over the limit at full size) is decoded at 1/8 scale in
    # the DCT (150 x 125, still >= the 64 x 64 input): exactly the model on those pixels...
    image = np.kron(rng.integers(0, 256, size=(12, 10, 3)), np.ones((100, 100, 1))).astype(np.uint8)
    jpeg = _encode(image, "JPEG")
    probs = bytes_fn(image_bytes=tf.constant([jpeg]))["probabilities"].numpy()
    scaled = tf.io.decode_jpeg(jpeg, channels=3, ratio=8)[None]
    np.testing.assert_allclose(probs, _keras_probs(model, scaled), atol=1e-5)
    # ... which, at the model's size, are the full-size image's pixels: within one grey level
    # for most pixels (only the sharp edges between the random-colour blocks resample differently).
    full = tf.image.resize(tf.cast(tf.io.decode_jpeg(jpeg, channels=3)[None], tf.float32), (TINY_SIZE, TINY_SIZE),
                           antialias=True)
    difference = np.abs(tf.image.resize(tf.cast(scaled, tf.float32), (TINY_SIZE, TINY_SIZE)) - full)
    assert np.median(difference) <= 1.0
    # The next request is served normally.
    assert bytes_fn(image_bytes=tf.constant([small]))["probabilities"].shape == (1, 5)
    with pytest.raises(ValueError, match="`max_pixels` must be a positive integer"):
        export_saved_model(model, tmp_path, class_names=CLASS_NAMES, max_pixels=0)


def test_signatures_accept_an_empty_batch(model, tmp_path):
    served = tf.saved_model.load(export_saved_model(model, tmp_path, class_names=CLASS_NAMES))
    out = served.signatures["serving_default"](images=tf.zeros([0, 50, 50, 3], tf.uint8))
    assert out["probabilities"].shape == (0, 5) and out["top_k_labels"].shape == (0, 5)
    out = served.signatures["serving_bytes"](image_bytes=tf.constant([], tf.string))
    assert out["probabilities"].shape == (0, 5)
