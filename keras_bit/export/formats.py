"""One export entry point for every deployment format: TF SavedModel, LiteRT, ONNX and OpenVINO.

Each format holds the same function, `serving.serving_model`: uint8 pixels
`[batch, height, width, 3]` of any size in, `probabilities` (then
`top_k_indices`, `top_k_scores`) out, preprocessing inside; or, with
`outputs="features"`, `features`: the pooled pre-logits embedding. LiteRT, ONNX and
OpenVINO are written by Keras itself (`keras.Model.export`); the SavedModel
adds an encoded-bytes signature for TF Serving (see `saved_model`).

Class names go to a text file (one per line) that `keras-bit predict` and
`load_exported` read: `<path>.labels.txt` beside a LiteRT / ONNX / OpenVINO
file, `assets.extra/class_names.txt` inside a SavedModel (TF Serving's folder
for extra files; the SavedModel also returns them as `top_k_labels`).
"""

import logging
import os
import warnings

import numpy as np

from keras_bit import kernels
from keras_bit.backend import require
from keras_bit.backend import tensorflow as _tensorflow
from keras_bit.console import native_stderr_silenced
from keras_bit.export import artifact, labels, runtimes, saved_model, serving
from keras_bit.export.runtimes import EXTENSIONS, ExportError  # noqa: F401 (ExportError: public from here too)

tf = _tensorflow("Model export")

logger = logging.getLogger("keras_bit")

FORMATS = ("tf_saved_model", "litert", "onnx", "openvino")
QUANTIZATIONS = (None, "float16", "int8", "bfloat16")
# Which formats take which quantization: LiteRT's converter quantizes; a SavedModel can hold bfloat16 weights.
QUANTIZATION_FORMATS = {"float16": ("litert",), "int8": ("litert",), "bfloat16": ("tf_saved_model",)}
# Python packages each format's writer needs (the `export` extra installs them and the runtimes).
_WRITERS = {"onnx": ("tf2onnx", "onnx"), "openvino": ("openvino",)}


def _check_arguments(path, format, quantization, representative_data, outputs):
    serving.check_outputs(outputs)
    if format not in FORMATS:
        raise ValueError(f"`format` must be one of {FORMATS}. Received: format={format!r}")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"`quantization` must be one of {QUANTIZATIONS}. Received: quantization={quantization!r}")
    if quantization is not None and format not in QUANTIZATION_FORMATS[quantization]:
        raise ValueError(f"quantization={quantization!r} is only available for format="
                         f"{' or '.join(map(repr, QUANTIZATION_FORMATS[quantization]))}. "
                         f"Received: format={format!r}")
    if quantization == "int8" and representative_data is None:
        raise ValueError("quantization='int8' needs `representative_data`: uint8 images [n, height, width, 3] "
                         "(a few hundred typical inputs) to calibrate the integer ranges.")
    if representative_data is not None and quantization != "int8":
        raise ValueError("`representative_data` is only used with quantization='int8'.")
    extension = EXTENSIONS.get(format)
    if extension and not os.fspath(path).lower().endswith(extension):
        raise ValueError(f"A {format} export is a '{extension}' file. Received: path={os.fspath(path)!r}")
    for module in _WRITERS.get(format, ()):
        require(module, f"{format} export", "export")


def _representative(data):
    """The LiteRT calibration generator: one uint8 image per step from a `[n, h, w, 3]` array."""
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 4 or data.shape[-1] != 3 or not len(data):
        raise ValueError(f"`representative_data` must be uint8 images [n, height, width, 3] with n > 0. "
                         f"Received: an array of dtype {data.dtype} and shape {data.shape}")
    return lambda: ([image[None]] for image in data)


def _litert_options(quantization, representative_data):
    if quantization == "float16":
        return {"optimizations": [tf.lite.Optimize.DEFAULT], "target_spec": {"supported_types": [tf.float16]}}
    if quantization == "int8":
        # Integer-only op set with calibrated ranges: the convolutions run in int8; GroupNorm's statistics stay
        # float between quantize/dequantize pairs (benchmarks/RESULTS.md counts them).
        return {"optimizations": [tf.lite.Optimize.DEFAULT],
                "representative_dataset": _representative(representative_data),
                "target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]}}
    return {}


def export_model(model, path, format="tf_saved_model", *, class_names=None, quantization=None,
                 representative_data=None, top_k=5, image_size=None, activation="auto", overwrite=False,
                 max_pixels=saved_model.DEFAULT_MAX_PIXELS, jpeg_dct_scaling=False, outputs="probabilities"):
    """Exports a keras_bit model for deployment: uint8 pixels in, probabilities (or pooled features) out.

    Args:
        model: a keras_bit classifier (any head: logits get a softmax, a
            softmax / sigmoid head keeps its own activation); with
            `outputs="features"` also an include_top=False model (pooled, or
            average-pooled by the export).
        path: the artifact: a folder for "tf_saved_model", a `.tflite`,
            `.onnx` or `.xml` (+ `.bin`) file for the others.
        format: "tf_saved_model" (TF Serving: pixel and encoded-bytes
            signatures), "litert" (TFLite), "onnx" or "openvino".
        class_names: list of names in label order (SavedModel: `top_k_labels`;
            others: `<path>.labels.txt`); default ImageNet names for
            1000/21843-class heads when available.
        quantization: None: float32 for LiteRT, ONNX and OpenVINO whatever
            the model's dtype policy (a mixed-precision model is rebuilt in
            float32 from the same weights); a SavedModel keeps the policy.
            LiteRT: "float16" (weights), or "int8" (integer kernels calibrated
            on `representative_data`). SavedModel: "bfloat16" (weights stored
            and run in bfloat16, see `fold_standardization`).
        representative_data: uint8 images `[n, height, width, 3]` for int8.
        top_k: how many classes `top_k_indices` / `top_k_scores` hold.
        image_size: `(height, width)` inputs are resized to (default: the
            model's input size; required when it is not fixed).
        activation: "auto", "softmax" or "none" (see `serving.needs_softmax`).
        overwrite: replace an existing export at `path`.
        max_pixels: SavedModel bytes signature: largest image decoded.
        jpeg_dct_scaling: SavedModel bytes signature: decode large JPEGs at
            reduced scale (see `saved_model.export_saved_model`).
        outputs: "probabilities" (classes and top-k), or "features": the
            export returns only `features`, the pooled pre-logits embedding
            float32 `[batch, channels]` (a classifier's head input; TF Hub's
            BiT feature vectors) for retrieval, clustering, kNN or linear
            probes. No class names (`class_names` refused), no labels file.

    Returns:
        `path`, absolute.

    Raises:
        ExportError: the artifact's own runtime (TensorFlow, the LiteRT
            interpreter, ONNX Runtime, OpenVINO) cannot run it: every export
            is run once on two images before it is moved to `path`
            (LiteRT, ONNX, OpenVINO in a child process, so that a runtime
            that aborts cannot end the caller); nothing is written. Without
            the runtime installed, a warning says the file was not test-run.

    Example:
        >>> export_model(model, "bit.onnx", format="onnx", class_names=names)
        >>> runner = keras_bit.export.load_exported("bit.onnx")
        >>> export_model(model, "bit_features.onnx", format="onnx", outputs="features")
    """
    _check_arguments(path, format, quantization, representative_data, outputs)
    # LiteRT, ONNX and OpenVINO get float32 whatever the model's dtype policy: a mixed_bfloat16 network would
    # reach them as bfloat16 convolutions that ONNX Runtime and OpenVINO refuse and LiteRT runs only with
    # TensorFlow's own kernels (Select TF ops). The SavedModel keeps the model's policy (or "bfloat16").
    dtype = quantization if format == "tf_saved_model" else "float32"
    served = serving.serving_model(model, image_size, top_k, activation, dtype=dtype, outputs=outputs)
    class_names = labels.class_names_for(model, class_names, outputs)
    targets = [path] if format == "tf_saved_model" else [path, labels.labels_path(path, format)]
    targets += [os.path.splitext(path)[0] + ".bin"] if format == "openvino" else []
    existing = [os.fspath(t) for t in targets if os.path.lexists(t)]
    if existing and not overwrite:  # refused before the (slow) conversion
        raise FileExistsError(f"{', '.join(existing)} already exist(s); pass overwrite=True (--overwrite) to replace")
    artifact.check_replaceable(path, folder=format == "tf_saved_model")

    def write(tmp):
        if format == "tf_saved_model":
            saved_model.save(served, tmp, class_names, max_pixels, jpeg_dct_scaling)
        else:
            _convert(served, tmp, format, quantization, representative_data)
        height, width = served.get_layer("classify").input_shape[1:3]
        images = (np.asarray(representative_data)[:2] if quantization == "int8"
                  else runtimes.sample_images(height, width))
        runtimes.check_runs(tmp, format, images, shown=os.path.abspath(path),
                            what=f"{quantization} {format}" if quantization else format,
                            expected=serving.OUTPUT_NAMES[outputs],
                            advice=" Export with quantization='float16' (or none) instead; benchmarks/RESULTS.md "
                                   "records where this happens." if quantization == "int8" else "")
        labels.write_labels(tmp, format, class_names)

    path = artifact.write_atomically(path, write, overwrite=overwrite, replaces=targets[1:])
    logger.info("Exported %s as %s to %s", model.name, format, path)
    return path


def _convert(served, path, format, quantization, representative_data):
    """Keras' own LiteRT / ONNX / OpenVINO writer on the serving model."""
    # Standard ops only: LiteRT, tf2onnx and OpenVINO know nothing of keras_bit's fused kernel.
    with kernels.portable():
        # Keras' ONNX writer refuses a model that was never called.
        served(np.zeros((1, *served.get_layer("classify").input_shape[1:3], 3), np.uint8))
        # tf2onnx's NumPy 2 notices and the TFLite converter's C++ prints ("fully_quantize: 0, ...") are
        # not the user's concern.
        with warnings.catch_warnings(), native_stderr_silenced():
            warnings.simplefilter("ignore", FutureWarning)
            served.export(path, format=format, verbose=False, **_litert_options(quantization, representative_data))
