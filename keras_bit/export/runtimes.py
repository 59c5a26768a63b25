"""Running an exported model with its own runtime: TensorFlow, LiteRT, ONNX Runtime or OpenVINO.

`load_exported(path)` returns an `Exported` callable: uint8 images
`[batch, height, width, 3]` -> `{"probabilities", "top_k_indices",
"top_k_scores"}` (a feature export: `{"features"}`) as NumPy arrays, whatever
the format. It is how the tests and
`benchmarks/` measure that every format computes what the Keras model does,
and how `keras-bit predict` runs exports.

`check_runs` is the test run every new export gets before `export_model`
says it is done: an artifact its own runtime cannot run is never handed over.
"""

import importlib.util
import io
import logging
import os
import signal
import subprocess
import sys

import numpy as np

from keras_bit.backend import require
from keras_bit.console import native_stderr_silenced
from keras_bit.export import runners
from keras_bit.export.labels import labels_path, read_labels
from keras_bit.io import check_regular_file

logger = logging.getLogger("keras_bit")

EXTENSIONS = {"litert": ".tflite", "onnx": ".onnx", "openvino": ".xml"}
TEST_RUN_TIMEOUT = 600  # seconds; loading and running a BiT-M-R152x4 once on CPU takes well under a minute


class ExportError(RuntimeError):
    """The converter produced an artifact its own runtime cannot run (nothing is written)."""


def export_format(path):
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
    """An exported model: `exported(images)` -> dict of NumPy outputs; `class_names` when known.

    `outputs` names what it returns: `runners.OUTPUTS` (a classifier) or
    `runners.FEATURE_OUTPUTS` (a feature export); `kind` is "probabilities" or
    "features" accordingly.
    """

    def __init__(self, path, fmt, run, class_names=None):
        self.path, self.format, self._run, self.class_names = os.fspath(path), fmt, run, class_names
        self.outputs = run.names if isinstance(run, runners.Runner) else runners.OUTPUTS

    @property
    def kind(self):
        return "features" if self.outputs == runners.FEATURE_OUTPUTS else "probabilities"

    def __call__(self, images):
        images = check_images(images)
        with native_stderr_silenced():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." on first use
            outputs = self._run(images)
        return {name: np.asarray(outputs[name]) for name in self.outputs}

    def __repr__(self):
        return f"Exported({self.path!r}, format={self.format!r})"


def _openvino(path, precision="f32"):
    """OpenVINO at another inference precision (`benchmarks/export_formats.py` measures the CPU default, None)."""
    return runners.open_openvino(path, precision)


def load_exported(path):
    """Loads the export at `path` with its format's runtime.

    Example:
        >>> exported = load_exported("bit.tflite")
        >>> exported(np.zeros((1, 224, 224, 3), np.uint8))["probabilities"].shape
        (1, 1000)
        >>> load_exported("bit_features.onnx")(images)["features"].shape  # outputs="features"
        (1, 2048)
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No exported model at {path}")
    fmt = export_format(path)
    if fmt is None:
        raise ValueError(f"{path} is not an export: expected a SavedModel folder (with saved_model.pb) or a "
                         ".tflite, .onnx or .xml file")
    for file in _files(path, fmt):  # a FIFO would hang the runtime that opens it
        check_regular_file(file, f"{fmt} export file")
    require(runners.RUNTIME_MODULES[fmt], f"Running {fmt} exports", "tensorflow" if fmt == "tf_saved_model"
            else "export")
    try:
        with native_stderr_silenced():
            run = runners.OPENERS[fmt](path)
    except Exception as e:  # each runtime has its own error types for a corrupt file
        raise ValueError(f"Cannot load {path} as a {fmt} export: {runners.first_line(e)}") from e
    labels = labels_path(path, fmt)
    classifier = run.names == runners.OUTPUTS  # a feature export has no classes (a stray labels file is not read)
    return Exported(path, fmt, run, read_labels(labels) if classifier and os.path.lexists(labels) else None)


def _files(path, fmt):
    """The files the runtime of the `fmt` export at `path` reads (a SavedModel: every file in its folder)."""
    if fmt == "tf_saved_model":
        # A linked folder inside is not walked (links can loop): it is listed, so it is refused as a folder.
        return [os.path.join(root, name) for root, folders, names in os.walk(path)
                for name in names + [f for f in folders if os.path.islink(os.path.join(root, f))]]
    companion = os.path.splitext(path)[0] + ".bin"
    return [path] + ([companion] if fmt == "openvino" and os.path.lexists(companion) else [])


def sample_images(height, width, count=2):
    """`count` fixed uint8 images one pixel off `(height, width)`: the test run goes through the export's resize."""
    return np.random.default_rng(0).integers(0, 256, (count, height + 1, width + 1, 3), dtype=np.uint8)


def child_command(fmt, path):
    """The child that test-runs an export: this Python, loading only `runners.py` (`-P`: nothing from the cwd)."""
    source = ("import importlib.util, sys\n"
              "spec = importlib.util.spec_from_file_location('keras_bit_export_runners', sys.argv[1])\n"
              "runners = importlib.util.module_from_spec(spec)\n"
              "spec.loader.exec_module(runners)\n"
              "runners.main(sys.argv[2:])\n")
    return [sys.executable, "-P", "-c", source, runners.__file__, fmt, os.fspath(path)]


def _installed(module):
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package; a module set to None in sys.modules
        return False


def _run_in_child(fmt, path, images, expected=None):
    """None when the child runs the export, else why not (the runtime's error line, or the signal)."""
    buffer = io.BytesIO()
    np.save(buffer, images)
    command = child_command(fmt, path) + ([",".join(expected)] if expected else [])
    try:
        proc = subprocess.run(command, input=buffer.getvalue(), capture_output=True, check=False,
                              env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=TEST_RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"no result after {TEST_RUN_TIMEOUT} s"
    if proc.returncode == 0:
        return None
    lines = [line for line in proc.stderr.decode("utf-8", "replace").splitlines()
             if line.strip() and not line.startswith("INFO:")]
    marked = [line[len(runners.ERROR_MARK):] for line in lines if line.startswith(runners.ERROR_MARK)]
    if marked:
        return marked[-1]
    if proc.returncode < 0:
        try:
            how = f"killed by {signal.Signals(-proc.returncode).name}"
        except ValueError:
            how = f"killed by signal {-proc.returncode}"
    else:
        how = f"exit status {proc.returncode}"
    return how + (f": {lines[-1].strip()[:200]}" if lines else "")


def check_runs(path, fmt, images, shown=None, what=None, advice="", expected=None):
    """Runs the new `fmt` export at `path` once on `images`; ExportError naming the runtime's error if it cannot.

    A SavedModel is loaded in this process (TensorFlow wrote it and is loaded
    already; its failures are Python exceptions). LiteRT, ONNX and OpenVINO
    files run in a child process (`child_command`): a runtime that aborts
    on a broken file ends the child, and the caller gets an ExportError. A
    runtime that is not installed gets one warning: the file was not test-run.

    Args:
        path: the export, at its temporary place.
        fmt: one of `runners.OPENERS`.
        images: uint8 `[n, height, width, 3]`.
        shown: the path the messages name (where the export was going).
        what: the export's name in messages (default `fmt`, e.g. "int8 litert").
        advice: appended to the ExportError's message.
        expected: the outputs it must return (`runners.OUTPUTS` or
            `runners.FEATURE_OUTPUTS`; None: either).
    """
    shown, what = shown or path, what or fmt
    module = runners.RUNTIME_MODULES[fmt]
    if not _installed(module):
        logger.warning("%s is not installed: the %s export %s was not test-run (pip install 'keras-bit[export]').",
                       module.split(".")[0], what, shown)
        return
    if fmt == "tf_saved_model":
        try:
            runners.run_once(fmt, os.fspath(path), images, expected)
            return
        except Exception as e:  # noqa: BLE001 - whatever TensorFlow raises, the export is refused with it
            reason = runners.first_line(e)
    else:
        reason = _run_in_child(fmt, path, images, expected)
        if reason is None:
            return
    raise ExportError(f"The {what} export {os.fspath(shown)} fails in {runners.RUNTIME_NAMES[fmt]} on a test image "
                      f"({reason}), so it was not written.{advice}")
