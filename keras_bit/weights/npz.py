"""The BiT authors' `.npz` checkpoints: key map, reader and writer.

Layer names mirror the checkpoint scopes with `_` for `/`, so the map is one
rule (`checkpoint_scope`) plus three fixed names:

    block1_unit01_a_proj_conv  <->  resnet/block1/unit01/a/proj/standardized_conv2d
    block3_unit07_b_gn         <->  resnet/block3/unit07/b/group_norm
    root_block_conv            <->  resnet/root_block/standardized_conv2d
    post_gn                    <->  resnet/group_norm
    head                       <->  resnet/head/conv2d   (1x1 conv kernel == Dense kernel)
"""

import os
import zipfile
import zlib

import numpy as np

from keras_bit.weights import core

SUFFIX = ".npz"
HEAD_SCOPE = "resnet/head/conv2d"
_FIXED_SCOPES = {"root": "resnet/root_block/standardized_conv2d", "post_gn": "resnet/group_norm", "head": HEAD_SCOPE}
_LEAF_SCOPES = {"conv": "standardized_conv2d", "gn": "group_norm"}
READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def checkpoint_scope(layer_name):
    """Returns the official checkpoint scope of a keras_bit layer name.

    Example:
        >>> checkpoint_scope("block1_unit01_a_proj_conv")
        'resnet/block1/unit01/a/proj/standardized_conv2d'
    """
    layer = core.parse_layer_name(layer_name)
    if layer.kind in _FIXED_SCOPES:
        return _FIXED_SCOPES[layer.kind]
    part = "a/proj" if layer.part == "proj" else layer.part
    return f"resnet/block{layer.block}/unit{layer.unit:02d}/{part}/{_LEAF_SCOPES[layer.leaf]}"


def key_map(model, load_head=True):
    """File key -> (variable, Layout) for every weight of `model`."""
    mapping = {}
    for layer_id, layer, variable in core.model_variables(model, load_head):
        layout = core.HWIO_1X1 if layer_id.kind == "head" and variable.name == "kernel" else core.SAME
        mapping[f"{checkpoint_scope(layer.name)}/{variable.name}"] = (variable, layout)
    return mapping


class Reader:
    """Lazy reader of an `.npz` file; errors name the file and say it may be truncated or corrupt."""

    def __init__(self, path):
        self.path = path
        if os.path.isfile(path) and not zipfile.is_zipfile(path):
            with open(path, "rb") as f:
                kind = "an HDF5 file (a .weights.h5?)" if f.read(8) == b"\x89HDF\r\n\x1a\n" else "not a zip archive"
            raise ValueError(f"Could not read checkpoint {path}: it is {kind}, not an .npz (truncated or corrupt?).")
        try:
            self._npz = np.load(path, allow_pickle=False)
            if not isinstance(self._npz, np.lib.npyio.NpzFile):
                raise ValueError("a single .npy array, not an .npz archive")
        except READ_ERRORS as e:
            raise ValueError(f"Could not read checkpoint {path}: not a valid .npz file (truncated or corrupt?): {e}") from e

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._npz.close()

    def keys(self):
        return self._npz.files

    def read(self, key):
        try:
            return self._npz[key]
        except READ_ERRORS as e:
            raise ValueError(f"Could not read key {key!r} of checkpoint {self.path} (truncated or corrupt?): {e}") from e

    def shape(self, key):
        """The array's shape from its .npy header alone (the data is read once, by `read`)."""
        try:
            with self._npz.zip.open(key + ".npy") as f:
                version = np.lib.format.read_magic(f)
                header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                return header(f)[0]
        except READ_ERRORS as e:
            raise ValueError(f"Could not read key {key!r} of checkpoint {self.path} (truncated or corrupt?): {e}") from e


def head_classes(path):
    """Class count of the head stored in an `.npz` checkpoint, or None if it has no head."""
    with Reader(path) as reader:
        bias = f"{HEAD_SCOPE}/bias"
        return int(reader.read(bias).shape[0]) if bias in reader.keys() else None


def load(model, path, load_head=True):
    """Strictly loads an official-layout `.npz` into a keras_bit model (head keys skipped unless `load_head`)."""
    with Reader(path) as reader:
        ignorable = [k for k in reader.keys() if k.startswith(HEAD_SCOPE + "/")] if not load_head else ()
        core.load_strict(model, reader, key_map(model, load_head), path, ignorable)


def save_npz(model, path):
    """Writes a keras_bit model in the official `.npz` key layout (the inverse of loading).

    Example:
        >>> save_npz(keras_bit.BiTM_R50x1(weights=None), "r50x1.npz")
    """
    arrays = {}
    for key, (variable, layout) in key_map(model).items():
        arrays[key] = np.asarray(variable.numpy(), dtype=np.float32).reshape(layout.file_shape(variable.shape))
    np.savez(os.fspath(path), **arrays)
