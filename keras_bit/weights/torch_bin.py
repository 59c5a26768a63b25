"""`pytorch_model.bin` files (a `torch.save`d state dict), read without running anything the file carries.

Older Hub repositories (google/bit-50's main branch, many 2021-2022 uploads)
publish their weights only as a pickle. A pickle is a program: unrestricted,
`torch.load` runs any function it names. keras_bit only ever calls
`torch.load(weights_only=True)`, whose unpickler builds tensors, containers
and plain values and refuses every other global (`UnpicklingError`, before
anything runs), with `mmap=True` so tensor data stays in the file until read.
What comes back is then checked like a safetensors header: a flat mapping of
names to dense CPU tensors of a float dtype with bounded shapes; the strict
core then checks each tensor's shape and finiteness as it reads it. Every
failure is one `ValueError` naming the file (and key).
"""

import importlib.util
import os

from keras_bit import io
from keras_bit.backend import BackendError
from keras_bit.weights import core

SUFFIX = ".bin"
FILENAME = "pytorch_model.bin"
# An R152x4 (the largest BiT, 936 M parameters) is ~3.7 GB in float32.
MAX_BYTES = 16 << 30
# An R152x4 has ~460 tensors; 4-D convolution kernels are the most dimensions a BiT tensor has.
MAX_TENSORS, MAX_DIMS = 10_000, 4
_FLOATS = {f"torch.{name}": name for name in core.FLOAT_DTYPES}
INSTALL = "reading it needs PyTorch: pip install torch (or pip install 'keras-bit[torch]')"


def available():
    """Whether PyTorch can be imported (checked before downloading a .bin that could not be read)."""
    return importlib.util.find_spec("torch") is not None


def require_torch(path):
    """The `torch` module, or `BackendError` saying how to read `path` (pip install torch, or safetensors)."""
    try:
        import torch
    except ImportError as e:
        raise BackendError(f"{path} is a PyTorch pickle (pytorch_model.bin); {INSTALL}. A .safetensors file of the "
                           "same weights needs nothing more.") from e
    return torch


class Reader:
    """Tensor names, shapes and dtypes and NumPy arrays of a `pytorch_model.bin` file (same interface as
    `safetensors_io.Reader`)."""

    def __init__(self, path):
        self.path = path = io.check_regular_file(path, "Checkpoint")
        torch = require_torch(path)
        size = os.path.getsize(path)
        if size > MAX_BYTES:
            raise ValueError(f"Checkpoint {path} is {size} bytes; at most {MAX_BYTES} are expected (an R152x4 "
                             "is ~3.7 GB).")
        with core.reading(path):
            try:  # only ever weights_only: an unrestricted load runs whatever code the pickle names
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                raise ValueError(f"Could not read {path}: not a zip-format torch.save file (files written by "
                                 f"PyTorch before 1.6 are not read): {e}") from e
        self._torch = torch
        self._tensors = _check_state(torch, state, path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._tensors = {}

    def keys(self):
        return list(self._tensors)

    def info(self, key):
        """`(shape, dtype name)`; float dtypes by NumPy's name (`core.FLOAT_DTYPES`)."""
        tensor = self._tensors[key]
        return tuple(tensor.shape), _FLOATS[str(tensor.dtype)]

    def read(self, key):
        with core.reading(self.path, key):
            tensor = self._tensors[key]
            if tensor.dtype == self._torch.bfloat16:  # NumPy has no bfloat16: the same bits as ml_dtypes' type
                import ml_dtypes

                return tensor.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
            return tensor.numpy()


def _check_state(torch, state, path):
    """`state` as a dict of names to plain tensors, after checking each (no tensor data read)."""
    if not isinstance(state, dict):
        raise ValueError(f"Checkpoint {path} holds a {type(state).__name__}, not a state dict (names -> tensors).")
    if len(state) > MAX_TENSORS:
        raise ValueError(f"Checkpoint {path} holds {len(state)} entries; a BiT has at most ~500 tensors.")
    tensors = {}
    for key, tensor in state.items():
        if not isinstance(key, str):
            raise ValueError(f"Checkpoint {path}: key {key!r:.100} is a {type(key).__name__}, not a tensor name.")
        # A Parameter is a tensor too (a saved module's attribute); any other type is not a weight.
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            raise ValueError(f"Checkpoint {path}: key {key!r} holds a {type(tensor).__name__}, not a tensor.")
        if tensor.layout != torch.strided or tensor.device.type != "cpu" or tensor.is_quantized:
            raise ValueError(f"Checkpoint {path}: key {key!r} is a {tensor.layout} {tensor.device.type} tensor; "
                             "weights are dense CPU tensors.")
        core.check_dtype(path, key, _FLOATS.get(str(tensor.dtype), str(tensor.dtype).removeprefix("torch.")))
        if tensor.dim() > MAX_DIMS:
            raise ValueError(f"Checkpoint {path}: key {key!r} has shape {tuple(tensor.shape)}; a BiT tensor has "
                             f"at most {MAX_DIMS} dimensions.")
        tensors[key] = tensor.detach()
    return tensors
