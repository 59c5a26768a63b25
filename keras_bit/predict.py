"""Classify image files with any export (SavedModel, LiteRT, ONNX, OpenVINO), a `.keras` model or a BiT name.

Each file is read and decoded on its own (bounded: the size is read from the
header first), so one bad file is reported by name and never stops the others.
Images of the same size are classified together in batches. A feature export
(`export_model(..., outputs="features")`) or a model without a head gives each
image's pooled feature vector instead (`save_features` writes them as `.npy`).
"""

import io
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


def load_predictor(spec, activation="auto", outputs=None):
    """`(run, class_names, kind)`: `run(uint8 [n, h, w, 3])` -> {"probabilities", ...} or {"features"} for `spec`.

    `spec` is an export (SavedModel folder, `.tflite`, `.onnx`, `.xml`), a
    `.keras` file (class names from a `class_names.txt` beside it) or a BiT
    model name such as "BiT-M-R50x1". `kind` is "probabilities" or
    "features": an export's own kind; for a model, "features" when it has no
    head (include_top=False) or when `outputs="features"` asks for a
    classifier's pooled pre-logits. `outputs` None: whatever `spec` returns;
    an export of the other kind is refused (ValueError). `activation`: see
    `keras_bit.export.serving.needs_softmax` (not for exports: theirs is fixed).
    """
    from keras_bit.export import labels, runtimes, serving
    from keras_bit.train.run_dir import RunDir

    if outputs is not None:
        serving.check_outputs(outputs)
    if runtimes.export_format(spec):
        if activation != "auto":
            raise ValueError(f"activation={activation!r} (--activation) is for a .keras model or a BiT name: the "
                             f"export {spec} applies the activation it was exported with")
        exported = runtimes.load_exported(spec)
        if outputs is not None and outputs != exported.kind:
            raise ValueError(f"{spec} is a {exported.kind} export, not a {outputs} one; export the model with "
                             f"outputs={outputs!r} ({'--features' if outputs == 'features' else 'without --features'})")
        return exported, exported.class_names, exported.kind
    if os.path.isdir(spec):
        raise ValueError(f"--model {spec} is a folder but not a SavedModel (no saved_model.pb in it)")
    looks_like_path = os.sep in spec or spec.lower().endswith((".keras", *runtimes.EXTENSIONS.values()))
    if looks_like_path and not os.path.exists(spec):
        raise FileNotFoundError(f"Model not found: {spec} (expected a SavedModel folder, a .keras, .tflite, "
                                ".onnx or .xml file, or a BiT model name)")
    model = load_model(spec)
    kind = outputs or ("features" if serving.is_feature_model(model) else "probabilities")
    served = serving.serving_model(model, activation=activation, outputs=kind)
    beside = RunDir(os.path.dirname(os.path.abspath(spec))).class_names_txt
    if kind == "features":
        names = None
    elif spec.endswith(".keras") and os.path.isfile(beside):  # a fine-tuning run's output folder
        names = labels.read_labels(beside)
    else:
        names = labels.imagenet_class_names(int(model.output_shape[-1]))
    return (lambda images: {k: np.asarray(v) for k, v in served(images).items()}), names, kind


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


def predict_files(paths, model, top=5, max_pixels=None, activation="auto", outputs=None):
    """Top-`top` classes (or the feature vector) of each image file; a file that cannot be read gets an `error`.

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
        outputs: None (what `model` returns: classes, or features for a
            feature export / a model without a head), "probabilities" or
            "features" (see `load_predictor`).

    Returns:
        A list, in input order, of `{"image": path, "top": [{"index", "score",
        "label"}, ...]}`, `{"image": path, "features": float32 vector}` or
        `{"image": path, "error": message}`.
    """
    from keras_bit.backend import tensorflow
    from keras_bit.io import DEFAULT_MAX_PIXELS
    from keras_bit.validation import check_positive_int

    tensorflow("Prediction from image files")
    top = check_positive_int(top, "top")
    max_pixels = check_positive_int(DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels, "max_pixels")
    predict, names, kind = load_predictor(model, activation, outputs)
    files = expand_paths(paths)
    results = [{"image": path} for path in files]
    pending, held = {}, 0

    def run(items):
        try:
            scores = predict(np.stack([image for _, image in items]))[kind]
        except Exception as e:  # noqa: BLE001 - a runtime's failure on this batch: its files are reported
            for i, _ in items:
                results[i]["error"] = f"the model failed on this image ({str(e).strip()[:200] or type(e).__name__})"
            return
        if kind == "features":
            for (i, _), row in zip(items, scores):
                results[i]["features"] = np.asarray(row, np.float32)
            return
        if names is not None and len(names) != scores.shape[-1]:
            raise ValueError(f"The model's class names list {len(names)} names for {scores.shape[-1]} classes")
        for (i, _), row in zip(items, scores):
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


def check_features_path(path):
    """`path` when `save_features` may write it: a new `.npy` file in an existing folder, else ValueError."""
    text = os.fspath(path)
    if not text.lower().endswith(".npy"):
        raise ValueError(f"--save-features must name a .npy file. Received: {text!r}")
    if os.path.lexists(text):
        raise ValueError(f"--save-features {text} already exists; existing files are never replaced (choose a new "
                         "name or remove it)")
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise ValueError(f"--save-features {text}: folder {folder} does not exist")
    return text


def save_features(path, results):
    """Writes the feature vectors of `results` (see `predict_files`) to `path` as one float32 `.npy` array.

    Row k is the k-th image with features, in `results`' order (images that
    failed have no row). Written atomically (`keras_bit.io`): a complete file
    or none. Returns the array; ValueError when no image has features.
    """
    from keras_bit import io as kb_io

    rows = [item["features"] for item in results if "features" in item]
    if not rows:
        raise ValueError(f"--save-features {os.fspath(path)}: no image gave features, nothing was written")
    array = np.stack(rows).astype(np.float32)
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    kb_io.write_bytes(check_features_path(path), buffer.getvalue())
    return array


def feature_report(results, save_path=None, as_json=False):
    """What `keras-bit predict` prints for feature vectors (after `save_features(save_path)` when given).

    One line per image (its row, dim and L2 norm), then the array's shape and
    where it was saved; `as_json`: a JSON list with each vector.
    """
    import json

    rows = [item for item in results if "features" in item]
    if save_path and rows:
        save_features(save_path, rows)
    if as_json:
        return json.dumps([{"image": item["image"], "dim": int(item["features"].size),
                            "norm": float(np.linalg.norm(item["features"])),
                            "features": item["features"].tolist()} if "features" in item else item
                           for item in results], indent=2)
    lines = [f"{item['image']}  row {row}  dim {item['features'].size}  norm {np.linalg.norm(item['features']):.4f}"
             for row, item in enumerate(rows)]
    shape = f"[{len(rows)}, {rows[0]['features'].size if rows else 0}]"
    if save_path and rows:
        lines.append(f"features: {shape} float32 saved to {save_path}")
    elif save_path:
        lines.append(f"features: none (no image could be read); {save_path} not written")
    else:
        lines.append(f"features: {shape} float32 (not saved; pass --save-features FILE.npy)")
    return "\n".join(lines)
