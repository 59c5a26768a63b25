"""keras_bit: Big Transfer (BiT) for Keras 3, on every Keras backend.

Attributes are imported on first use (PEP 562), so `import keras_bit` imports
neither TensorFlow nor any module it does not need: the models, weights and
preprocessing run on TensorFlow, JAX and PyTorch; fine-tuning and SavedModel
export need TensorFlow and say so when it is missing.

Reference:
    Kolesnikov et al., "Big Transfer (BiT): General Visual Representation
    Learning", https://arxiv.org/abs/1912.11370.
"""

import importlib
import os as _os
import sys as _sys

_COMMAND = bool(_sys.argv) and _os.path.basename(_sys.argv[0]) == "keras-bit"  # run as the `keras-bit` command
# The command keeps TensorFlow's C++ log lines off the console (see keras_bit.console);
# it must act before Keras imports TensorFlow, which registering the layers below does.
if _COMMAND:
    from keras_bit.console import quiet_tensorflow_import

    quiet_tensorflow_import()

__version__ = "0.2.0"

_MODEL_CONSTRUCTORS = tuple(
    f"BiT{family}_R{arch}" for family in "SM" for arch in ("50x1", "50x3", "101x1", "101x3", "152x2", "152x4")
)
# public name -> module defining it
_EXPORTS = {
    **{name: "keras_bit.models.bit" for name in _MODEL_CONSTRUCTORS},
    "BiT": "keras_bit.models.bit",
    "ResNetV2": "keras_bit.models.bit",
    "convert": "keras_bit.models.bit",
    "feature_model": "keras_bit.models.resnet_v2",
    "feature_info": "keras_bit.models.resnet_v2",
    "MODEL_NAMES": "keras_bit.presets",
    "Preset": "keras_bit.presets",
    "DownloadError": "keras_bit.weights.download",
    "load_weights": "keras_bit.weights.sources",
    "save_npz": "keras_bit.weights.npz",
    "GroupNormalization": "keras_bit.layers",
    "StandardizedConv2D": "keras_bit.layers",
    "preprocess_input": "keras_bit.preprocessing",
    "decode_predictions": "keras_bit.imagenet",
    "BackendError": "keras_bit.backend",
    "save_pretrained": "keras_bit.publish",
    "push_to_hub": "keras_bit.publish",
}
# TensorFlow only: on another backend, using them raises BackendError, and they are left out of __all__ / dir().
_TENSORFLOW_EXPORTS = {
    "finetune": "keras_bit.train.finetune",
    "FinetuneResult": "keras_bit.train.finetune",
    "FinetuneConfig": "keras_bit.train.config",
    "fewshot": "keras_bit.train.fewshot",
    "fewshot_report": "keras_bit.train.fewshot",
    "RunMismatchError": "keras_bit.train.resume",
    "MultiWorkerStrategy": "keras_bit.train.distribute",
    "tpu_strategy": "keras_bit.train.distribute",
    "export_model": "keras_bit.export",
    "export_saved_model": "keras_bit.export",
    "fold_standardization": "keras_bit.export",
    "load_exported": "keras_bit.export",
}
# Modules reachable as attributes (`keras_bit.hyperrule.BiTSchedule`).
_MODULES = {
    "data": "keras_bit.train.sources",
    "hyperrule": "keras_bit.train.hyperrule",
    "pipeline": "keras_bit.train.pipeline",
    "presets": "keras_bit.presets",  # callable: keras_bit.presets() lists every published checkpoint
}

_TENSORFLOW_MODULES = {"data", "pipeline"}


def __getattr__(name):
    if name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    elif name in _EXPORTS or name in _TENSORFLOW_EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS.get(name) or _TENSORFLOW_EXPORTS[name]), name)
    else:
        raise AttributeError(f"module 'keras_bit' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted([*globals(), *__all__])


def _import_keras():
    """Keras, or one line naming the pip extra that installs its backend (exit status 2 under `keras-bit`)."""
    from keras_bit.backend import BackendError, import_keras

    try:
        return import_keras()
    except BackendError as e:
        if _COMMAND:  # a user's error there is one line and exit status 2, never a traceback
            print(f"keras-bit: error: {e}", file=_sys.stderr)
            raise SystemExit(2) from None
        raise


# `.keras` files name the layers as "keras_bit>StandardizedConv2D": registering them needs only Keras.
_keras_backend = _import_keras().backend.backend()
importlib.import_module("keras_bit.layers")

if _keras_backend == "tensorflow":
    __all__ = sorted([*_EXPORTS, *_TENSORFLOW_EXPORTS, *_MODULES])  # noqa: PLE0605 (a list: sorted's)
else:
    __all__ = sorted([*_EXPORTS, *(m for m in _MODULES if m not in _TENSORFLOW_MODULES)])  # noqa: PLE0605
