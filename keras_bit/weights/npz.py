"""The BiT authors' `.npz` checkpoints: key map, reader and writer.

Layer names mirror the checkpoint scopes with `_` for `/`, so the map is one
rule (`checkpoint_scope`) plus three fixed names:

    block1_unit01_a_proj_conv  <->  resnet/block1/unit01/a/proj/standardized_conv2d
    block3_unit07_b_gn         <->  resnet/block3/unit07/b/group_norm
    root_block_conv            <->  resnet/root_block/standardized_conv2d
    post_gn                    <->  resnet/group_norm
    head                       <->  resnet/head/conv2d   (1x1 conv kernel == Dense kernel)
"""

import collections
import math
import os
import zipfile

import numpy as np

from keras_bit import io
from keras_bit.weights import core

SUFFIX = ".npz"
HEAD_SCOPE = "resnet/head/conv2d"
# A float array's .npy header is ~100 bytes; NumPy itself refuses more than 10,000.
MAX_HEADER_BYTES = 1 << 16
_FIXED_SCOPES = {"root": "resnet/root_block/standardized_conv2d", "post_gn": "resnet/group_norm", "head": HEAD_SCOPE}
_LEAF_SCOPES = {"conv": "standardized_conv2d", "gn": "group_norm"}


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


class _Prefixed:
    """A file object whose first bytes are `prefix`, then `f`'s: hands NumPy the length field already read."""

    def __init__(self, prefix, f):
        self._prefix, self._f = prefix, f

    def read(self, n=-1):
        head, self._prefix = self._prefix[:n] if n >= 0 else self._prefix, self._prefix[n:] if n >= 0 else b""
        return head + self._f.read(n - len(head) if n >= 0 else -1)


class Reader:
    """Lazy reader of an `.npz` file: keys and headers first, arrays only on `read`; errors name file and key."""

    def __init__(self, path):
        self.path = path = io.check_regular_file(path, "Checkpoint")
        with core.reading(path):
            if not zipfile.is_zipfile(path):
                with open(path, "rb") as f:
                    kind = "an HDF5 file (a .weights.h5?)" if f.read(8) == b"\x89HDF\r\n\x1a\n" else "not a zip archive"
                raise ValueError(
                    f"Could not read checkpoint {path}: it is {kind}, not an .npz (truncated or corrupt?).")
            self._zip = zipfile.ZipFile(path)
            names = self._zip.namelist()
        # Two members of one name (or "k" and "k.npy", one key): zipfile would read the last, another reader the
        # first. Counted, not searched: a file may hold very many members.
        keys = collections.Counter(n.removesuffix(".npy") for n in names)
        repeated = [k for k, count in keys.items() if count > 1]
        if repeated:
            self._zip.close()
            raise ValueError(f"Checkpoint {path} is not a valid .npz: it holds key {repeated[0]!r} more than once.")
        self._members = {n.removesuffix(".npy"): n for n in names}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._zip.close()

    def keys(self):
        return list(self._members)

    def _open(self, key):
        """The member `key` opened just after its .npy header, and the header's `(shape, fortran_order, dtype)`."""
        f = self._zip.open(self._members[key])
        try:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):  # 3.0 exists only for non-latin-1 field names: never floats
                raise ValueError(f"unsupported .npy format version {version}")
            # NumPy reads a header's declared length (up to 4 GB) before it checks it: bound it first.
            size = f.read(2 if version == (1, 0) else 4)
            length = int.from_bytes(size, "little")
            if len(size) not in (2, 4) or length > MAX_HEADER_BYTES:
                raise ValueError(f".npy header of {length} bytes (at most {MAX_HEADER_BYTES} are expected)")
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            header = read_header(_Prefixed(size, f))
            if any(dim < 0 for dim in header[0]):
                raise ValueError(f"negative dimension in shape {header[0]}")
            return f, header
        except BaseException:
            f.close()
            raise

    def info(self, key):
        """`(shape, dtype name)` from the member's .npy header alone."""
        with core.reading(self.path, key):
            f, (shape, _, dtype) = self._open(key)
            f.close()
        return tuple(shape), dtype.name if dtype.names is None and dtype.subdtype is None else str(dtype)

    def read(self, key):
        """The array of `key`: exactly the bytes its header declares (the caller checked that header)."""
        with core.reading(self.path, key):
            f, (shape, fortran_order, dtype) = self._open(key)
            with f:
                if dtype.hasobject:
                    raise ValueError("an object array (pickled data is never loaded)")
                count = math.prod(shape)
                data = f.read(count * dtype.itemsize)  # the zip layer checks the CRC once the member is read
                if len(data) != count * dtype.itemsize:
                    raise ValueError(f"{len(data)} data bytes, its header declares {count * dtype.itemsize}")
                if f.read(1):
                    raise ValueError(f"bytes after the {count * dtype.itemsize} data bytes its header declares")
        array = np.frombuffer(data, dtype=dtype, count=count)
        return array.reshape(shape[::-1]).T if fortran_order else array.reshape(shape)


def head_classes(path):
    """Class count of the head stored in an `.npz` checkpoint (from its headers), or None if it has no head."""
    with Reader(path) as reader:
        return core.head_size(reader, path, f"{HEAD_SCOPE}/bias", f"{HEAD_SCOPE}/kernel", -1)


def load(model, path, load_head=True):
    """Strictly loads an official-layout `.npz` into a keras_bit model (head keys skipped unless `load_head`)."""
    with Reader(path) as reader:
        head = [k for k in reader.keys() if k.startswith(HEAD_SCOPE + "/")]  # noqa: SIM118 (a Reader, not a dict)
        ignorable = head if not load_head else ()
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
