"""Running an exported model with its own runtime: TensorFlow, LiteRT, ONNX Runtime or OpenVINO.

`load_exported(path)` returns an `Exported` callable: uint8 images
`[batch, height, width, 3]` -> `{"probabilities", "top_k_indices",
"top_k_scores"}` as NumPy arrays, whatever the format. It is how the tests and
`benchmarks/` measure that every format computes what the Keras model does,
and how `keras-bit predict` runs exports.
"""

import os

import numpy as np

from keras_bit.backend import require
from keras_bit.console import native_stderr_silenced
from keras_bit.export.formats import EXTENSIONS
from keras_bit.export.serving import labels_path, read_labels

OUTPUTS = ("probabilities", "top_k_indices", "top_k_scores")


def format_of(path):
    """The export format stored at `path` (a SavedModel folder, `.tflite`, `.onnx` or `.xml`), else None."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return "tf_saved_model" if os.path.isfile(os.path.join(path, "saved_model.pb")) else None
    return {ext: fmt for fmt, ext in EXTENSIONS.items()}.get(os.path.splitext(path)[1].lower())


def check_images(images):
    """`images` as a uint8 `[batch, height, width, 3]` array, else ValueError naming the expected input."""
    array = np.asarray(images)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3 or 0 in array.shape[1:3]:
        raise ValueError(f"`images` must be uint8 pixels [batch, height, width, 3] (RGB, 0-255; height, width > 0). "
                         f"Received: dtype {array.dtype}, shape {array.shape}")
    return np.ascontiguousarray(array)


class Exported:
    """An exported model: `exported(images)` -> dict of NumPy outputs; `class_names` when known."""

    def __init__(self, path, fmt, run, class_names=None):
        self.path, self.format, self._run, self.class_names = os.fspath(path), fmt, run, class_names

    def __call__(self, images):
        images = check_images(images)
        outputs = self._run(images)
        return {name: np.asarray(outputs[name]) for name in OUTPUTS}

    def __repr__(self):
        return f"Exported({self.path!r}, format={self.format!r})"


def _saved_model(path):
    tf = require("tensorflow", "Running SavedModel exports", "tensorflow")
    signatures = tf.saved_model.load(path).signatures
    if "serving_default" not in signatures or set(OUTPUTS) - set(signatures["serving_default"].structured_outputs):
        raise ValueError(f"{path} is a SavedModel without keras_bit's serving_default signature "
                         f"(outputs {', '.join(OUTPUTS)})")
    serve = signatures["serving_default"]
    return lambda images: {k: v.numpy() for k, v in serve(images=tf.constant(images)).items()}


def _litert(path):
    litert = require("ai_edge_litert.interpreter", "Running LiteRT exports", "export")
    runner = litert.Interpreter(model_path=path).get_signature_runner()

    def run(images):
        with native_stderr_silenced():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." on first use
            return runner(images=images)

    return run


def _onnx(path):
    ort = require("onnxruntime", "Running ONNX exports", "export")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda images: dict(zip(names, session.run(names, {"images": images})))


def _openvino(path, precision="f32"):
    ov = require("openvino", "Running OpenVINO exports", "export")
    # OpenVINO computes in bfloat16 by default on CPUs that support it: ask for the float32 the model was
    # exported in (precision=None keeps the CPU default; benchmarks/RESULTS.md measures both).
    config = {"INFERENCE_PRECISION_HINT": precision} if precision else {}
    compiled = ov.Core().compile_model(path, "CPU", config)

    def run(images):
        result = compiled(images)
        return {name: result[output] for output in compiled.outputs for name in output.names if name in OUTPUTS}

    return run


_LOADERS = {"tf_saved_model": _saved_model, "litert": _litert, "onnx": _onnx, "openvino": _openvino}


def load_exported(path):
    """Loads the export at `path` with its format's runtime.

    Example:
        >>> exported = load_exported("bit.tflite")
        >>> exported(np.zeros((1, 224, 224, 3), np.uint8))["probabilities"].shape
        (1, 1000)
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No exported model at {path}")
    fmt = format_of(path)
    if fmt is None:
        raise ValueError(f"{path} is not an export: expected a SavedModel folder (with saved_model.pb) or a "
                         ".tflite, .onnx or .xml file")
    try:
        run = _LOADERS[fmt](path)
    except (ValueError, ImportError):
        raise
    except Exception as e:  # each runtime has its own error types for a corrupt file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"Cannot load {path} as a {fmt} export: {first[:300]}") from e
    labels = labels_path(path, fmt)
    return Exported(path, fmt, run, read_labels(labels) if os.path.isfile(labels) else None)
