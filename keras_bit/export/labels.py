"""Class names beside an export: where the labels file lives, writing it, reading one (hostile) back.

Line k of a labels file names class k - 1: `assets.extra/class_names.txt` in
a SavedModel, `<path>.labels.txt` beside a LiteRT, ONNX or OpenVINO file, and
a fine-tuning run's `class_names.txt`.
"""

import logging
import os
import unicodedata

import numpy as np

from keras_bit import imagenet, io, presets, validation
from keras_bit.weights.download import DownloadError

logger = logging.getLogger("keras_bit")

MAX_LABELS_BYTES = 64 * 2**20  # ImageNet-21k's 21843 names take 0.3 MB


def check_class_names(class_names, classes):
    """`class_names` as a list of `classes` distinct one-line strings (None stays None)."""
    return None if class_names is None else validation.check_class_names(class_names, classes, "`class_names`")


def class_names_for(model, class_names, outputs="probabilities"):
    """The class names an export of `model` holds: `class_names` checked, else ImageNet's names for a
    1000 / 21843-class head (when available), else None; always None for a feature export."""
    if outputs == "features":
        if class_names is not None:
            raise ValueError("`class_names` is for outputs='probabilities': a feature export has no classes. "
                             "Received: class_names with outputs='features'")
        return None
    classes = int(model.output_shape[-1])
    class_names = check_class_names(class_names, classes)
    return imagenet_class_names(classes) if class_names is None else class_names


def imagenet_class_names(classes, cache_dir=None):
    """Human-readable ImageNet names for 1000 or 21843 classes (label files cached, or downloaded), else None."""
    try:
        if classes == presets.IMAGENET21K_CLASSES:
            return imagenet.imagenet21k_labels(cache_dir)[1]
        if classes == presets.IMAGENET_CLASSES:
            decoded = imagenet.decode_predictions(np.eye(classes, dtype="float32"), top=1)
            return [row[0][1] for row in decoded]
    except (DownloadError, ValueError) as e:
        logger.warning("Exporting without class names: ImageNet class names unavailable (%s).", e)
    return None


def labels_path(path, format):
    """Where the class names of the `format` export at `path` live."""
    if format == "tf_saved_model":
        return os.path.join(os.fspath(path), "assets.extra", "class_names.txt")
    return os.fspath(path) + ".labels.txt"


def write_labels(path, format, class_names):
    """Writes `class_names` (one per line) where `labels_path` says; nothing when None."""
    if class_names is None:
        return
    target = labels_path(path, format)
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    io.write_text(target, "".join(f"{name}\n" for name in class_names))


def read_labels(path):
    """Class names from a UTF-8 text file, line k naming class k - 1 (`class_names.txt`, an export's labels).

    Names are stripped of surrounding spaces; CRLF line ends, a byte-order
    mark and blank lines after the last name are fine. A blank line before the
    last name would shift every later label, so it is refused, as are binary
    content (not UTF-8, control characters), files that are not regular files
    (a FIFO would never end) and files over `MAX_LABELS_BYTES`: ValueError
    naming the file and line.
    """
    data = io.read_bounded(path, MAX_LABELS_BYTES, "class names file")
    path = os.fsdecode(os.fspath(path))
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"class names file {path}, line {line}: not UTF-8 text "
                         f"(byte {e.start} is {data[e.start:e.start + 1]!r}); expected one class name per line"
                         ) from None
    lines = [line.rstrip("\r") for line in text.split("\n")]  # not splitlines: it also splits at \x0b, \x1c ...
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError(f"class names file {path} is empty; expected one class name per line")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise ValueError(f"class names file {path}, line {number}: blank; line k names class k - 1, so a blank "
                             "line would shift every later name (remove it)")
        control = next((c for c in line if unicodedata.category(c) == "Cc" and c != "\t"), None)
        if control is not None:
            raise ValueError(f"class names file {path}, line {number}: control character {control!r} (binary "
                             "content?); expected one class name per line")
    return [line.strip() for line in lines]
