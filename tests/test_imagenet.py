import os

import keras
import numpy as np
import pytest
from keras.src.applications import imagenet_utils  # the decoder keras_bit reuses

import keras_bit
from keras_bit import presets
from keras_bit.imagenet import IMAGENET21K_FILES


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
    assert decoded == [[("n00021842", "lemma 21842, alias 21842", pytest.approx(0.7)), ("n00000005", "lemma 5, alias 5", pytest.approx(0.2))]]
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
