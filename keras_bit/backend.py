"""Which parts of keras_bit need TensorFlow, and the errors when it, or any Keras backend, is missing.

The models, layers, weights and preprocessing use `keras.ops` only and run on
every Keras backend. Fine-tuning (tf.data, tf.distribute), SavedModel export
and prediction from SavedModels are TensorFlow programs.
"""

import importlib
import os
import sys

# The Keras backends a keras-bit extra installs, and the packages each one imports.
BACKEND_PACKAGES = {"tensorflow": ("tensorflow",), "jax": ("jax", "jaxlib"), "torch": ("torch",)}


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


def import_keras():
    """Imports Keras, or raises `BackendError` naming the backend Keras is set to and the extra that installs it.

    `pip install keras-bit` alone installs Keras without a backend; Keras then
    fails on its first import with `No module named 'tensorflow'`.

    Example:
        >>> keras = import_keras()
    """
    try:
        return importlib.import_module("keras")
    except ImportError as e:
        raise BackendError(_no_backend_message(e)) from e
    except ValueError as e:
        if not str(e).startswith("Unable to import backend"):  # Keras' words for a name it does not know
            raise
        active, chosen = _chosen_backend()
        raise BackendError(f"Keras is set to use {active!r} ({chosen}), which is not a Keras backend: use "
                           f"{', '.join(BACKEND_PACKAGES)} (keras-bit's extras) or another Keras supports.") from e


def _chosen_backend():
    """`(backend name, where it was chosen)`; Keras reads its settings before it imports the backend."""
    config = sys.modules.get("keras.src.backend.config")
    active = config.backend() if config is not None else os.environ.get("KERAS_BACKEND", "tensorflow")
    if "KERAS_BACKEND" in os.environ:
        chosen = f"KERAS_BACKEND={os.environ['KERAS_BACKEND']}"
    elif config is not None and os.path.exists(os.path.join(config.keras_home(), "keras.json")):
        chosen = f"\"backend\" in {os.path.join(config.keras_home(), 'keras.json')}"
    else:
        chosen = "Keras' default; set KERAS_BACKEND to choose"
    return active, chosen


def _no_backend_message(error):
    active, chosen = _chosen_backend()
    missing = (getattr(error, "name", None) or "").split(".")[0]
    why = ("is not installed" if missing in BACKEND_PACKAGES.get(active, (active,))
           else f"failed to import ({type(error).__name__}: {error})")
    extras = sorted(BACKEND_PACKAGES, key=lambda extra: extra != active)  # the chosen backend first
    others = ", ".join(f'"keras-bit[{extra}]"' for extra in extras[1:])
    return (f"keras_bit needs a Keras backend: Keras is set to use {active!r} ({chosen}), which {why}. "
            f'Install it with pip install "keras-bit[{extras[0]}]" (or {others} with KERAS_BACKEND='
            f"{' / '.join(extras[1:])}).")
