"""Console hygiene for the `keras-bit` command: TensorFlow's C++ log lines stay off the terminal.

TensorFlow 2.21 logs INFO lines from C++ (oneDNN, CUDA stubs) while it is
imported, before absl's logging is initialised, and absl prints those whatever
`TF_CPP_MIN_LOG_LEVEL` says (tensorflow/tensorflow#102212,
abseil/abseil-cpp#1957). So the command sets `TF_CPP_MIN_LOG_LEVEL=3` for what
TensorFlow logs later and imports TensorFlow with file descriptor 2 pointed at
/dev/null. Only the command does this, never a program that imports keras_bit.
`TF_CPP_MIN_LOG_LEVEL=0` (or 1) in the environment keeps every line.
"""

import contextlib
import importlib
import importlib.util
import json
import os
import sys

_QUIET = False  # set by the command: only then is native stderr ever redirected


@contextlib.contextmanager
def native_stderr_silenced():
    """Within the command (unless TF_CPP_MIN_LOG_LEVEL asks for logs), C/C++ writes to stderr go nowhere.

    Also used around the up-front decoding of every image: libjpeg prints its own
    line ("Improper call to JPEG library in state 201") for a truncated JPEG, beside
    the error keras_bit raises naming the file.
    """
    if not _QUIET or os.environ.get("TF_CPP_MIN_LOG_LEVEL") in ("0", "1"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        # Restored before any exception propagates, so a Python error is still printed.
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _keras_backend():
    """The backend Keras will pick ($KERAS_BACKEND, else keras.json, else "tensorflow"), without importing Keras."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as f:
            return json.load(f).get("backend", "tensorflow")
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


def quiet_tensorflow_import():
    """Imports TensorFlow with its start-up C++ log lines silenced, unless the user asked for them.

    Only when Keras will run on TensorFlow and it is installed: other backends never import it.
    """
    global _QUIET
    _QUIET = True
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if _keras_backend() != "tensorflow" or importlib.util.find_spec("tensorflow") is None:
        return
    if "tensorflow" not in sys.modules:
        with native_stderr_silenced():
            importlib.import_module("tensorflow")
