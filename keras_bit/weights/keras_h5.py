"""Keras `.weights.h5` files (`model.save_weights`), read strictly.

Keras 3 stores a Functional model's variables as `layers/<name>/vars/<i>`,
where `<name>` is the layer *class* in snake case with a per-class counter in
`model.layers` order (`standardized_conv2d`, `standardized_conv2d_1`, ...),
not the layer's own name. The key map reproduces that rule so that the file
goes through the same strict checks as every other format; a round-trip test
against `model.save_weights` guards the rule across Keras versions.
"""

import re

from keras_bit.weights import core

SUFFIX = ".weights.h5"
_HEAD_BIAS = "layers/dense/vars/1"


def _snake_case(class_name):
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", class_name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def key_map(model, load_head=True):
    """File key -> (variable, Layout) for every weight of `model` (keyed by Keras' saving names)."""
    counts, mapping = {}, {}
    for layer in model.layers:
        base = _snake_case(type(layer).__name__)
        group = base if base not in counts else f"{base}_{counts[base]}"
        counts[base] = counts.get(base, 0) + 1
        if not layer.weights or (layer.name == "head" and not load_head):
            continue
        core.parse_layer_name(layer.name)  # a keras_bit layer
        for i, variable in enumerate(layer.weights):
            mapping[f"layers/{group}/vars/{i}"] = (variable, core.SAME)
    return mapping


class Reader:
    """The datasets of an HDF5 weights file, by path."""

    def __init__(self, path):
        import h5py

        self.path = path
        try:
            self._file = h5py.File(path, "r")
            self._datasets = {}

            def collect(name, obj):  # visititems stops at the first non-None return value
                if isinstance(obj, h5py.Dataset):
                    self._datasets[name] = obj

            self._file.visititems(collect)
        except (OSError, RuntimeError, KeyError, ValueError) as e:
            raise ValueError(f"Could not read Keras weights file {path} (truncated or corrupt?): {e}") from e

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()

    def keys(self):
        return list(self._datasets)

    def shape(self, key):
        return self._datasets[key].shape

    def read(self, key):
        try:
            return self._datasets[key][()]
        except (OSError, RuntimeError, ValueError) as e:
            raise ValueError(f"Could not read {key!r} of Keras weights file {self.path} (truncated or corrupt?): {e}") from e


def head_classes(path):
    """Class count of the head stored in a `.weights.h5` file, or None if it has no head."""
    with Reader(path) as reader:
        return int(reader.shape(_HEAD_BIAS)[0]) if _HEAD_BIAS in reader.keys() else None


def load(model, path, load_head=True):
    """Strictly loads a keras_bit `.weights.h5` (head datasets skipped unless `load_head`)."""
    with Reader(path) as reader:
        # Files saved after compile() also hold the optimizer state (outside layers/): not model weights.
        ignorable = [k for k in reader.keys() if not k.startswith("layers/") or (
            not load_head and k.startswith("layers/dense/"))]
        core.load_strict(model, reader, key_map(model, load_head), path, ignorable,
                         hint=" Was it saved from a keras_bit model of this architecture?")
