"""Keras `.weights.h5` files (`model.save_weights`), read strictly.

Keras 3 stores a Functional model's variables as `layers/<name>/vars/<i>`,
where `<name>` is the layer *class* in snake case with a per-class counter in
`model.layers` order (`standardized_conv2d`, `standardized_conv2d_1`, ...),
not the layer's own name. The key map reproduces that rule so that the file
goes through the same strict checks as every other format; a round-trip test
against `model.save_weights` guards the rule across Keras versions.
"""

import math
import re

from keras_bit import io
from keras_bit.weights import core

SUFFIX = ".weights.h5"
_HEAD_KERNEL, _HEAD_BIAS = "layers/dense/vars/0", "layers/dense/vars/1"


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


# Chunks up to this size are fine whatever the data size (h5py picks ~1 MB chunks by itself).
MAX_SMALL_CHUNK_BYTES = 1 << 20
_LINK_KINDS = {1: "a soft link", 64: "an external link"}  # h5py.h5l.TYPE_SOFT, TYPE_EXTERNAL


class Reader:
    """The datasets of an HDF5 weights file, by path; storage outside the file is refused when it is opened.

    An HDF5 dataset may keep its bytes in another file (external storage), be
    assembled from other files (virtual), or be reached through soft and
    external links: a downloaded weights file could then copy any local file
    into the model. Only datasets stored in the file itself are read.
    """

    def __init__(self, path):
        import h5py

        self.path = path = io.check_regular_file(path, "Keras weights file")
        with core.reading(path):
            try:
                self._file = h5py.File(path, "r")
            except OSError as e:
                raise ValueError(f"Could not read Keras weights file {path} (truncated or corrupt?): {e}") from e
        try:
            with core.reading(path):
                self._datasets = self._check_storage(h5py)
        except BaseException:
            self._file.close()
            raise

    def _check_storage(self, h5py):
        links = []

        def note(name, info):  # every link once, without following soft or external ones (H5Lvisit)
            links.append((name, info.type))

        self._file.id.links.visit(note, info=True)
        for name, kind in links:
            if kind != h5py.h5l.TYPE_HARD:
                raise ValueError(f"Keras weights file {self.path}: {name.decode(errors='replace')!r} is "
                                 f"{_LINK_KINDS.get(kind, 'a user-defined link')}; weights files hold their data.")
        datasets = {}

        def collect(name, obj):  # visititems stops at the first non-None return value
            if isinstance(obj, h5py.Dataset):
                datasets[name] = obj

        self._file.visititems(collect)
        for name, dataset in datasets.items():
            if dataset.external or dataset.is_virtual:
                where = "another file (external storage)" if dataset.external else "other files (a virtual dataset)"
                raise ValueError(f"Keras weights file {self.path}: dataset {name!r} keeps its data in {where}; "
                                 "weights files hold their data.")
            # HDF5 decompresses whole chunks: a 10-value dataset in one 2**28-value gzip chunk costs 1 GB to read.
            chunk = math.prod(dataset.chunks) * dataset.dtype.itemsize if dataset.chunks else 0
            if chunk > max(dataset.nbytes, MAX_SMALL_CHUNK_BYTES):
                raise ValueError(f"Keras weights file {self.path}: dataset {name!r} of {dataset.nbytes} bytes is "
                                 f"stored in chunks of {chunk} bytes; a chunk is never larger than its data.")
        return datasets

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()

    def keys(self):
        return list(self._datasets)

    def info(self, key):
        """`(shape, dtype name)` from the dataset's metadata."""
        with core.reading(self.path, key):
            dataset = self._datasets[key]
            return tuple(dataset.shape or ()), dataset.dtype.name

    def read(self, key):
        with core.reading(self.path, key):
            return self._datasets[key][()]


def head_classes(path):
    """Class count of the head stored in a `.weights.h5` file (from its metadata), or None if it has no head."""
    with Reader(path) as reader:
        return core.head_size(reader, path, _HEAD_BIAS, _HEAD_KERNEL, -1)


def load(model, path, load_head=True):
    """Strictly loads a keras_bit `.weights.h5` (head datasets skipped unless `load_head`)."""
    with Reader(path) as reader:
        # Files saved after compile() also hold the optimizer state (outside layers/): not model weights.
        ignorable = [k for k in reader.keys() if not k.startswith("layers/") or (  # noqa: SIM118 (a Reader, no dict)
            not load_head and k.startswith("layers/dense/"))]
        core.load_strict(model, reader, key_map(model, load_head), path, ignorable,
                         hint=" Was it saved from a keras_bit model of this architecture?")
