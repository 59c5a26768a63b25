"""Console hygiene for the `keras-bit` command: TensorFlow's C++ log lines stay off the terminal.

TensorFlow 2.21 logs INFO lines from C++ (oneDNN, CUDA stubs) while it is
imported, before absl's logging is initialised, and absl prints those whatever
`TF_CPP_MIN_LOG_LEVEL` says (tensorflow/tensorflow#102212,
abseil/abseil-cpp#1957). So the command sets `TF_CPP_MIN_LOG_LEVEL=3` for what
TensorFlow logs later and imports TensorFlow with file descriptor 2 pointed at
/dev/null. Only the command does this, never a program that imports keras_bit.
`TF_CPP_MIN_LOG_LEVEL=0` (or 1) in the environment keeps every line.
"""

import importlib
import os
import sys


def quiet_tensorflow_import():
    """Imports TensorFlow with its start-up C++ log lines silenced, unless the user asked for them."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if os.environ["TF_CPP_MIN_LOG_LEVEL"] in ("0", "1") or "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        importlib.import_module("tensorflow")
    finally:
        # Restored before any exception propagates, so an import error is still printed.
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
