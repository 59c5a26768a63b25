import os

import keras
import numpy as np
import pytest
from keras.src.applications import imagenet_utils  # the decoder keras_bit reuses

import keras_bit
from keras_bit import presets
from keras_bit.imagenet import IMAGENET21K_FILES

pytestmark = pytest.mark.backend_agnostic  # .ci/backend runs these on JAX and PyTorch


def test_decode_1000_uses_keras_decoder(monkeypatch):
    index = {str(i): [f"n{i:08d}", f"class_{i}"] for i in range(1000)}
    monkeypatch.setattr(imagenet_utils, "CLASS_INDEX", index)
    preds = np.zeros((2, 1000), "float32")
    preds[0, [3, 7]] = [0.9, 0.1]
    preds[1, 999] = 1.0
    decoded = keras_bit.decode_predictions(preds, top=2)
    assert [tuple(d[:2]) for d in decoded[0]] == [("n00000003", "class_3"), ("n00000007", "class_7")]
    assert decoded[1][0][:2] == ("n00000999", "class_999")
    assert decoded[0][0][2] == pytest.approx(0.9)


def test_decode_1000_offline_error(monkeypatch, keras_home):
    monkeypatch.setattr(imagenet_utils, "CLASS_INDEX", None)
    monkeypatch.setattr(imagenet_utils, "CLASS_INDEX_PATH", "file:///nonexistent/imagenet_class_index.json")
    target = os.path.join(keras_home, "models", "imagenet_class_index.json")
    with pytest.raises(keras_bit.DownloadError, match=f"place imagenet_class_index.json at {target}"):
        keras_bit.decode_predictions(np.zeros((1, 1000)))


def _write_21k_labels(folder):
    os.makedirs(folder, exist_ok=True)
    ids = [f"n{i:08d}" for i in range(presets.IMAGENET21K_CLASSES)]
    with open(os.path.join(folder, IMAGENET21K_FILES[0]), "w") as f:
        f.write("\n".join(ids) + "\n")
    with open(os.path.join(folder, IMAGENET21K_FILES[1]), "w") as f:
        f.write("\n".join(f"lemma {i}, alias {i}" for i in range(presets.IMAGENET21K_CLASSES)) + "\n")


def test_decode_21k_downloads_once_then_uses_cache(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    _write_21k_labels(mirror)
    monkeypatch.setenv("KERAS_BIT_BASE_URL", mirror.as_uri())
    preds = np.zeros((1, presets.IMAGENET21K_CLASSES), "float32")
    preds[0, 21842], preds[0, 5] = 0.7, 0.2
    decoded = keras_bit.decode_predictions(preds, top=2, cache_dir=tmp_path / "cache")
    assert decoded == [[
        ("n00021842", "lemma 21842, alias 21842", pytest.approx(0.7)),
        ("n00000005", "lemma 5, alias 5", pytest.approx(0.2)),
    ]]
    assert (tmp_path / "cache" / "bit_models" / IMAGENET21K_FILES[1]).is_file()
    for f in IMAGENET21K_FILES:
        (mirror / f).unlink()  # the second call must not need the source
    assert keras_bit.decode_predictions(preds, top=1, cache_dir=tmp_path / "cache")[0][0][0] == "n00021842"


def test_decode_21k_offline_error_names_url_and_path(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_BIT_BASE_URL", "file:///nonexistent/bit_models/")
    target = tmp_path / "bit_models" / IMAGENET21K_FILES[0]
    with pytest.raises(keras_bit.DownloadError) as info:
        keras_bit.decode_predictions(np.zeros((1, presets.IMAGENET21K_CLASSES)), cache_dir=tmp_path)
    message = str(info.value)
    assert f"Could not download file:///nonexistent/bit_models/{IMAGENET21K_FILES[0]}" in message
    assert f"place it at {target}" in message


def test_decode_21k_wrong_label_file_length(tmp_path):
    folder = tmp_path / "bit_models"
    folder.mkdir()
    for f in IMAGENET21K_FILES:
        (folder / f).write_text("n0\n")
    with pytest.raises(ValueError, match="Expected 21843 lines"):
        keras_bit.decode_predictions(np.zeros((1, presets.IMAGENET21K_CLASSES)), cache_dir=tmp_path)


@pytest.mark.parametrize("shape", [(1, 10), (1000,), (2, 21842)])
def test_decode_rejects_other_widths(shape):
    with pytest.raises(ValueError, match=r"shape \(samples, 1000\) or \(samples, 21843\). Received array of shape"):
        keras_bit.decode_predictions(np.zeros(shape))


def test_decode_rejects_bad_top():
    with pytest.raises(ValueError, match="`top` must be a positive integer. Received: top=0"):
        keras_bit.decode_predictions(np.zeros((1, 1000)), top=0)


# --- Scores and arguments as a user gives them (issue 22, property 5) ---

def _fake_index(monkeypatch):
    monkeypatch.setattr(imagenet_utils, "CLASS_INDEX", {str(i): [f"n{i:08d}", f"class_{i}"] for i in range(1000)})


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_decode_refuses_non_finite_scores(monkeypatch, tmp_path, bad):
    """A NaN used to rank first (argsort puts it last); refused for 1k and, before any download, for 21k."""
    _fake_index(monkeypatch)
    monkeypatch.setenv("KERAS_BIT_BASE_URL", "file:///nonexistent/")
    for width in (1000, presets.IMAGENET21K_CLASSES):
        preds = np.full((3, width), 0.001, "float32")
        preds[2, 5] = bad
        with pytest.raises(ValueError, match=r"non-finite scores \(NaN or infinity\) in 1 of 3 rows \(first: row 2\)"):
            keras_bit.decode_predictions(preds, cache_dir=tmp_path)


def test_decode_top_as_numpy_integer_and_beyond_the_class_count(monkeypatch):
    _fake_index(monkeypatch)
    preds = np.linspace(0, 1, 1000, dtype="float32")[None]
    assert [d[1] for d in keras_bit.decode_predictions(preds, top=np.int64(3))[0]] == ["class_999", "class_998",
                                                                                      "class_997"]
    assert len(keras_bit.decode_predictions(preds, top=np.int32(5000))[0]) == 1000  # as Keras: every class
    tensor = keras.ops.convert_to_tensor(preds)
    assert keras_bit.decode_predictions(tensor, top=1)[0][0][1] == "class_999"


@pytest.mark.parametrize("top", [0, -1, 2.0, True, np.True_, "5", None])
def test_decode_rejects_bad_top_values(top):
    with pytest.raises(ValueError, match=r"`top` must be a positive integer. Received: top="):
        keras_bit.decode_predictions(np.zeros((1, 1000)), top=top)


@pytest.mark.parametrize("preds,kind,message", [
    (np.zeros((1, 1, 1000)), ValueError, r"Received array of shape: \(1, 1, 1000\)"),
    (np.zeros(()), ValueError, r"Received array of shape: \(\)"),
    (np.zeros((1, 1000), bool), TypeError, r"expects real-valued scores. Received: preds of dtype bool"),
    (np.full((1, 1000), "0.1"), TypeError, r"dtype <U3"),
    (np.zeros((1, 1000), complex), TypeError, r"dtype complex128"),
    (np.zeros((1, 1000), object), TypeError, r"dtype object"),
])
def test_decode_rejects_bad_prediction_arrays(preds, kind, message):
    with pytest.raises(kind, match=message):
        keras_bit.decode_predictions(preds)
