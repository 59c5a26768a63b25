"""Classify image files with any export (SavedModel, LiteRT, ONNX, OpenVINO), a `.keras` model or a BiT name.

Each file is read and decoded on its own (bounded: the size is read from the
header first), so one bad file is reported by name and never stops the others.
Images of the same size are classified together in batches.
"""

import os

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
BATCH_SIZE = 32
# Decoded pixels held at once before they are classified (images wait to be batched with others of their size).
PIXEL_BUDGET = 16_000_000


def load_model(spec):
    """A Keras model from a `.keras` file, or a named BiT model (`keras_bit.BiT(spec)`).

    A `.keras` file that is missing raises FileNotFoundError; one that is not
    a regular file, not a complete zip archive (truncated: a `.keras` file is
    a zip whose index is at its end) or that Keras cannot read raises
    ValueError naming the file.
    """
    import zipfile

    import keras

    import keras_bit  # registers the layers that .keras files refer to
    from keras_bit.io import check_regular_file

    if not spec.endswith(".keras"):
        return keras_bit.BiT(spec)
    if not os.path.lexists(spec):
        raise FileNotFoundError(f"Model file not found: {spec}")
    check_regular_file(spec, "model file")
    if not zipfile.is_zipfile(spec):
        raise ValueError(f"model file {spec} is truncated or corrupt: a .keras file is a zip archive and this one "
                         f"({os.path.getsize(spec)} bytes) has no complete zip index")
    try:
        return keras.saving.load_model(spec)
    except Exception as e:  # zipfile, h5py and JSON errors for a damaged member; Keras' own refusals
        message = " ".join(str(e).split())[:400] or type(e).__name__
        if isinstance(e, ValueError) and spec in message:
            raise
        raise ValueError(f"Cannot load model file {spec}: {message}") from e


def load_classifier(spec, activation="auto"):
    """`(classify, class_names)`: `classify(uint8 [n, h, w, 3]) -> {"probabilities", ...}` for `spec`.

    `spec` is an export (SavedModel folder, `.tflite`, `.onnx`, `.xml`), a
    `.keras` file (class names from a `class_names.txt` beside it) or a BiT
    model name such as "BiT-M-R50x1". `activation`: see
    `keras_bit.export.serving.needs_softmax` (not for exports: theirs is fixed).
    """
    from keras_bit.export import labels, runtimes, serving
    from keras_bit.train.run_dir import RunDir

    if runtimes.export_format(spec):
        if activation != "auto":
            raise ValueError(f"activation={activation!r} (--activation) is for a .keras model or a BiT name: the "
                             f"export {spec} applies the activation it was exported with")
        exported = runtimes.load_exported(spec)
        return exported, exported.class_names
    if os.path.isdir(spec):
        raise ValueError(f"--model {spec} is a folder but not a SavedModel (no saved_model.pb in it)")
    looks_like_path = os.sep in spec or spec.lower().endswith((".keras", *runtimes.EXTENSIONS.values()))
    if looks_like_path and not os.path.exists(spec):
        raise FileNotFoundError(f"Model not found: {spec} (expected a SavedModel folder, a .keras, .tflite, "
                                ".onnx or .xml file, or a BiT model name)")
    model = load_model(spec)
    served = serving.serving_model(model, activation=activation)
    beside = RunDir(os.path.dirname(os.path.abspath(spec))).class_names_txt
    if spec.endswith(".keras") and os.path.isfile(beside):  # a fine-tuning run's output folder
        names = labels.read_labels(beside)
    else:
        names = labels.imagenet_class_names(int(model.output_shape[-1]))
    return (lambda images: {k: np.asarray(v) for k, v in served(images).items()}), names


def expand_paths(paths):
    """Files as given and the images inside given folders (sorted); missing paths are kept to be reported."""
    files = []
    for path in paths:
        try:
            names = os.listdir(path) if os.path.isdir(path) else None
        except OSError:  # an unreadable folder is reported with the others
            names = None
        if names is None:
            files.append(path)
            continue
        inside = sorted(os.path.join(path, n) for n in names
                        if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, n)))
        files.extend(inside or [path])  # an empty folder is reported, not silently skipped
    return files


def decode_file(path, max_pixels):
    """uint8 `(h, w, 3)` pixels of one image file; ValueError / OSError saying what is wrong with it."""
    from keras_bit.backend import tensorflow
    from keras_bit.console import native_stderr_silenced
    from keras_bit.export import image_decode

    tf = tensorflow("Decoding image files")
    if os.path.isdir(path):
        os.listdir(path)  # an unreadable folder says so (PermissionError)
        raise ValueError(f"no {'/'.join(IMAGE_EXTENSIONS)} images in this folder")
    if os.path.exists(path) and not os.path.isfile(path):
        raise ValueError("not a regular file")
    # No image of max_pixels needs more than 8 bytes per pixel (16-bit RGBA, stored); bigger files are not read.
    if os.path.getsize(path) > 8 * max_pixels + 2**20:
        raise ValueError(f"{os.path.getsize(path)} bytes: too large for an image of at most max_pixels={max_pixels}")
    with open(path, "rb") as f:
        data = tf.constant(f.read())
    # libjpeg prints its own line for a broken JPEG ("Unsupported marker type"); the file is named instead.
    with native_stderr_silenced():
        try:
            height, width = (int(v) for v in _image_size(data).numpy())
        except tf.errors.OpError:
            height = width = -1
        if height < 0:
            raise ValueError(f"not a readable {'/'.join(image_decode.FORMATS)} image (unknown format, or a corrupt "
                             "or cut-short header)")
        if height * width > max_pixels:
            raise ValueError(f"{width}x{height} image is over max_pixels={max_pixels}")
        try:
            return _decode(data, max_pixels).numpy()
        except tf.errors.OpError as e:
            first = (e.message.strip().splitlines() or ["no message"])[0]
            raise ValueError(f"corrupt or unsupported image ({first[:200]})") from None


_GRAPHS = {}


def _image_size(data):
    return _graph("size")(data)


def _decode(data, max_pixels):
    return _graph("decode")(data, max_pixels)


def _graph(name):
    """The bounded decoder as a traced `tf.function` (its GIF walk is a loop: fast in a graph, slow eagerly)."""
    from keras_bit.backend import tensorflow
    from keras_bit.export import image_decode

    if name not in _GRAPHS:
        tf = tensorflow("Decoding image files")
        data = tf.TensorSpec([], tf.string)
        _GRAPHS["size"] = tf.function(image_decode.image_size, input_signature=[data])
        _GRAPHS["decode"] = tf.function(lambda d, m: image_decode.decode(d, m),
                                        input_signature=[data, tf.TensorSpec([], tf.int64)])
    return _GRAPHS[name]


def _top(row, top, names):
    best = np.argsort(-row, kind="stable")[:top]
    return [{"index": int(i), "score": float(row[i]), "label": names[i] if names and i < len(names) else None}
            for i in best]


def predict_files(paths, model, top=5, max_pixels=None, activation="auto"):
    """Top-`top` classes of each image file; a file that cannot be read gets an `error` instead.

    Args:
        paths: image files (JPEG/PNG/GIF/BMP/WebP) or folders of them.
        model: an export (SavedModel folder, `.tflite`, `.onnx`, `.xml`), a
            `.keras` file (class names from a `class_names.txt` beside it), or
            a model name accepted by `keras_bit.BiT` (e.g. "BiT-M-R50x1").
        top: how many classes to report.
        max_pixels: largest image decoded (default 40 million pixels,
            `keras_bit.export.DEFAULT_MAX_PIXELS`).
        activation: for a `.keras` model or a name: "auto", "softmax"
            (logits) or "none" (see `keras_bit.export.serving.needs_softmax`).

    Returns:
        A list, in input order, of `{"image": path, "top": [{"index", "score",
        "label"}, ...]}` or `{"image": path, "error": message}`.
    """
    from keras_bit.backend import tensorflow
    from keras_bit.io import DEFAULT_MAX_PIXELS
    from keras_bit.validation import check_positive_int

    tensorflow("Prediction from image files")
    top = check_positive_int(top, "top")
    max_pixels = check_positive_int(DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels, "max_pixels")
    classify, names = load_classifier(model, activation)
    files = expand_paths(paths)
    results = [{"image": path} for path in files]
    pending, held = {}, 0

    def run(items):
        try:
            probabilities = classify(np.stack([image for _, image in items]))["probabilities"]
        except Exception as e:  # noqa: BLE001 - a runtime's failure on this batch: its files are reported
            for i, _ in items:
                results[i]["error"] = f"the model failed on this image ({str(e).strip()[:200] or type(e).__name__})"
            return
        if names is not None and len(names) != probabilities.shape[-1]:
            raise ValueError(f"The model's class names list {len(names)} names for {probabilities.shape[-1]} classes")
        for (i, _), row in zip(items, probabilities):
            results[i]["top"] = _top(row, top, names)

    for i, path in enumerate(files):
        try:
            image = decode_file(path, max_pixels)
        except (ValueError, OSError) as e:
            results[i]["error"] = str(e) if not isinstance(e, OSError) else (e.strerror or str(e))
            continue
        pending.setdefault(image.shape, []).append((i, image))
        held += image.shape[0] * image.shape[1]
        if len(pending[image.shape]) == BATCH_SIZE:
            held -= sum(im.shape[0] * im.shape[1] for _, im in pending[image.shape])
            run(pending.pop(image.shape))
        if held > PIXEL_BUDGET:  # memory stays bounded whatever the mix of sizes
            for items in pending.values():
                run(items)
            pending, held = {}, 0
    for items in pending.values():
        run(items)
    return results
