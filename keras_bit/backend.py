"""Which parts of keras_bit need TensorFlow, and the error when it is missing or another backend is active.

The models, layers, weights and preprocessing use `keras.ops` only and run on
every Keras backend. Fine-tuning (tf.data, tf.distribute), SavedModel export
and prediction from SavedModels are TensorFlow programs.
"""

import importlib


class BackendError(ImportError):
    """A feature was used without the backend or optional package it needs (e.g. TensorFlow, onnxruntime)."""


def tensorflow(feature):
    """Returns the `tensorflow` module for `feature`, or raises `BackendError` saying what to do.

    Example:
        >>> tf = tensorflow("SavedModel export")
    """
    import keras

    active = keras.backend.backend()
    if active != "tensorflow":
        raise BackendError(
            f"{feature} needs the TensorFlow backend (tf.data / tf.distribute / SavedModel); Keras is using "
            f"{active!r}. Run with KERAS_BACKEND=tensorflow (pip install 'keras-bit[tensorflow]')."
        )
    try:
        return importlib.import_module("tensorflow")
    except ImportError as e:
        raise BackendError(f"{feature} needs TensorFlow: pip install 'keras-bit[tensorflow]'.") from e


def require(module, feature, extra):
    """Imports `module` for `feature`, or raises `BackendError` naming the pip extra that provides it.

    Example:
        >>> ort = require("onnxruntime", "Running ONNX exports", "export")
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BackendError(f"{feature} needs the {module!r} package: pip install 'keras-bit[{extra}]'.") from e
