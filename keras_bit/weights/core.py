"""The one strict loader: every format maps each model variable to a file key, then this checks and assigns.

A format module (npz, keras_h5, timm, hf) supplies a *reader* (keys, each
tensor's shape and dtype from the file's header, arrays) and a *key map*
(model variable -> file key + layout conversion). The core refuses the file
unless every expected key is present, no unexpected key is left over, and
every tensor's header states the expected shape and a floating dtype (both
checked before any data is read, so memory is bounded by the architecture,
not by what a file declares); then each array must have that shape and finite
values. Only then is anything assigned, so a bad file never half-loads a model.

A weights file is hostile until proven otherwise: whatever goes wrong while
reading one ends as a `ValueError` naming the file and key (`reading`), never
another exception type, and readers refuse storage outside the file itself.
"""

import contextlib
import dataclasses
import re

import numpy as np

# Dtypes a checkpoint tensor may have (NumPy names; bfloat16 as ml_dtypes names it). Anything else is refused
# from the header, before its data is read.
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
# The most classes a checkpoint's head may declare: ImageNet-21k has 21,843; this bound stops a file from making
# keras_bit build (and allocate) a head of whatever size it claims.
MAX_CLASSES = 100_000


@contextlib.contextmanager
def reading(path, key=None):
    """Turns any failure while reading `path` (at `key`) into one `ValueError` naming both.

    Readers of files from outside run their library calls inside this block:
    zipfile, h5py and safetensors raise many types for a hostile file
    (`NotImplementedError` for an unknown zip method, `OverflowError`,
    `IndexError`, ...); the caller sees one. A `ValueError` whose message
    already names the file passes unchanged.
    """
    try:
        yield
    except ValueError as e:
        if str(path) in str(e):  # already a keras_bit message naming the file
            raise
        raise ValueError(f"Could not read {'key ' + repr(key) + ' of ' if key is not None else ''}checkpoint {path} "
                         f"(truncated or corrupt?): {_one_line(e)}") from e
    except Exception as e:  # the trust boundary: every failure becomes the documented error
        where = f"key {key!r} of " if key is not None else ""
        raise ValueError(f"Could not read {where}checkpoint {path} (truncated or corrupt?): "
                         f"{type(e).__name__}: {_one_line(e)}") from e


def _one_line(error, limit=300):
    """A library's message on one line (the CLI prints one line per error), at most `limit` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + "..."


def check_dtype(path, key, dtype):
    """Raises `ValueError` unless `dtype` (a header's dtype name) is a floating type a checkpoint may hold."""
    if str(dtype) not in FLOAT_DTYPES:
        raise ValueError(f"Checkpoint {path}: key {key!r} has dtype {dtype}, expected floating point "
                         f"({', '.join(FLOAT_DTYPES)}).")


def head_size(reader, path, bias_key, kernel_key, kernel_class_axis):
    """The class count of a head from its headers (no data read), checked; None if the file has no head.

    The bias must be a vector of 1 to `MAX_CLASSES` entries and the kernel
    must exist with that many classes on `kernel_class_axis`.
    """
    keys = set(reader.keys())
    if bias_key not in keys:
        return None
    shape, _ = reader.info(bias_key)
    if len(shape) != 1 or not 1 <= shape[0] <= MAX_CLASSES:
        raise ValueError(f"Checkpoint {path}: head bias {bias_key!r} has shape {tuple(shape)}, expected (classes,) "
                         f"with 1 <= classes <= {MAX_CLASSES}.")
    kernel = tuple(reader.info(kernel_key)[0]) if kernel_key in keys else None
    if kernel is None or len(kernel) <= max(kernel_class_axis, -kernel_class_axis - 1) or (
            kernel[kernel_class_axis] != shape[0]):
        raise ValueError(f"Checkpoint {path}: head kernel {kernel_key!r} has shape {kernel}, which does not hold "
                         f"the {shape[0]} classes of its bias {bias_key!r}.")
    return int(shape[0])


class Layout:
    """How a file stores a Keras variable: the file's shape for a variable shape, and the conversion back."""

    def __init__(self, name, file_shape, to_keras):
        self.name, self.file_shape, self.to_keras = name, file_shape, to_keras

    def __repr__(self):
        return f"Layout({self.name})"


SAME = Layout("same", lambda s: tuple(s), lambda a: a)
# The authors' head: a 1x1 convolution kernel (1, 1, in, out) for Keras' Dense (in, out).
HWIO_1X1 = Layout("hwio_1x1", lambda s: (1, 1) + tuple(s), lambda a: a.reshape(a.shape[2:]))
# PyTorch convolutions (out, in, h, w) for Keras' (h, w, in, out).
OIHW = Layout("oihw", lambda s: (s[3], s[2], s[0], s[1]), lambda a: a.transpose(2, 3, 1, 0))
# timm's head: a 1x1 PyTorch convolution (out, in, 1, 1) for Dense (in, out).
OI11 = Layout("oi11", lambda s: (s[1], s[0], 1, 1), lambda a: a[:, :, 0, 0].T)
# PyTorch Linear (out, in) for Dense (in, out).
OI = Layout("oi", lambda s: (s[1], s[0]), lambda a: a.T)


@dataclasses.dataclass(frozen=True)
class LayerId:
    """A BiT layer name taken apart: kind is "root", "unit", "post_gn" or "head"."""

    kind: str
    block: int = 0  # 1..4
    unit: int = 0  # 1..N
    part: str = ""  # "a", "b", "c" or "proj"
    leaf: str = ""  # "conv" or "gn"


_UNIT = re.compile(r"block(?P<block>[1-4])_unit(?P<unit>[0-9]{2,})_(?P<part>a_proj|a|b|c)_(?P<leaf>conv|gn)")
_FIXED = {"root_block_conv": LayerId("root", leaf="conv"), "post_gn": LayerId("post_gn", leaf="gn"),
          "head": LayerId("head")}


def parse_layer_name(name):
    """The `LayerId` of a keras_bit layer name, e.g. "block1_unit01_a_proj_conv"; ValueError for others."""
    if name in _FIXED:
        return _FIXED[name]
    match = _UNIT.fullmatch(name)
    if match is None:
        raise ValueError(
            f"Layer {name!r} has no BiT checkpoint key: checkpoints load into models built by "
            "keras_bit (layers named like 'block1_unit01_a_conv')."
        )
    part = "proj" if match["part"] == "a_proj" else match["part"]
    return LayerId("unit", int(match["block"]), int(match["unit"]), part, match["leaf"])


def model_variables(model, load_head=True):
    """Yields `(LayerId, layer, variable)` for every weight of a keras_bit model (the head only if `load_head`)."""
    for layer in model.layers:
        if not layer.weights or (layer.name == "head" and not load_head):
            continue
        layer_id = parse_layer_name(layer.name)
        for variable in layer.weights:
            yield layer_id, layer, variable


def pytorch_key_map(model, load_head, module_name, head_layout):
    """File key -> (variable, Layout) for PyTorch-layout files (timm, transformers).

    Kernels are OIHW (the head: `head_layout`), GroupNorm gamma/beta are
    `weight`/`bias`, and `module_name(LayerId)` names each layer's module.
    """
    mapping = {}
    for layer_id, _, variable in model_variables(model, load_head):
        if variable.name == "kernel":
            layout = head_layout if layer_id.kind == "head" else OIHW
        else:
            layout = SAME
        leaf = "bias" if variable.name in ("bias", "beta") else "weight"
        mapping[f"{module_name(layer_id)}.{leaf}"] = (variable, layout)
    return mapping


def _few(keys, n=5):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def load_strict(model, reader, key_map, path, ignorable=(), hint=" Is it a checkpoint of another architecture?"):
    """Checks every tensor of `reader` against `key_map`, then assigns them all, or raises and assigns nothing.

    Args:
        model: the keras_bit model (for messages).
        reader: an open format reader with `keys()`, `info(key)` (shape and
            dtype name from the header) and `read(key)`.
        key_map: dict file key -> `(variable, Layout)`.
        path: the file, for messages.
        ignorable: file keys that may be present without being loaded (e.g.
            a head that is not loaded).
        hint: appended to mismatch messages (what to check).

    Raises:
        ValueError: naming the file and the first offending keys.
    """
    present = set(reader.keys())
    missing = set(key_map) - present
    unexpected = present - set(key_map) - set(ignorable)
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys: {_few(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys: {_few(unexpected)}")
        raise ValueError(f"Checkpoint {path} does not match model {model.name!r} (" + "; ".join(problems) + ")."
                         + hint)
    values = []
    for key in sorted(key_map):
        variable, layout = key_map[key]
        expected = layout.file_shape(tuple(variable.shape))
        shape, dtype = reader.info(key)
        if tuple(shape) != expected:
            raise ValueError(f"Checkpoint {path}: key {key!r} has shape {tuple(shape)}, model {model.name!r} expects "
                             f"{expected}." + hint)
        check_dtype(path, key, dtype)  # before the data: a 1-byte-per-element promise cannot become 8
        with reading(path, key):
            value = np.asarray(reader.read(key))
        if value.shape != expected or value.dtype.name != str(dtype):
            raise ValueError(f"Checkpoint {path}: key {key!r} holds {value.dtype} {value.shape}, its header says "
                             f"{dtype} {tuple(shape)} (corrupt?).")
        if value.dtype.name == "bfloat16":  # safetensors hands bf16 over as ml_dtypes' type; float32 holds it exactly
            value = value.astype(np.float32)
        if not np.all(np.isfinite(value)):
            raise ValueError(f"Checkpoint {path}: key {key!r} contains NaN or infinite values.")
        values.append((variable, layout.to_keras(value)))
    # Assign only once every key has been checked: a bad file never half-loads a model.
    for variable, value in values:
        variable.assign(value.astype(variable.dtype, copy=False))
