"""Reading `.safetensors` files (timm and transformers checkpoints) into NumPy, lazily.

`state_dict` loads them (and `pytorch_model.bin` files) through the timm and transformers key maps.
"""

from keras_bit import io
from keras_bit.weights import core

SUFFIX = ".safetensors"


# The JSON header: ~20 KB for an R50, ~100 KB for the largest BiT.
MAX_HEADER_BYTES = 8 << 20
# safetensors' dtype names as NumPy's (core.FLOAT_DTYPES says which load; F8_*, integers and bool are refused).
_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "BOOL": "bool",
           **{f"{k}{bits}": f"{n}{bits}" for k, n in (("I", "int"), ("U", "uint")) for bits in (8, 16, 32, 64)}}


class Reader:
    """Tensor names, shapes and dtypes (from the header) and arrays of a `.safetensors` file."""

    def __init__(self, path):
        from safetensors import safe_open

        self.path = path = io.check_regular_file(path, "Checkpoint")
        with core.reading(path):
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
            if size > MAX_HEADER_BYTES:  # safetensors parses up to 100 MB of JSON before any check of ours
                raise ValueError(f"Could not read {path}: its header declares {size} bytes (at most "
                                 f"{MAX_HEADER_BYTES}; an R152x4's is ~100 KB).")
            try:
                self._file = safe_open(path, framework="numpy")
                self._keys = list(self._file.keys())
            except Exception as e:  # safetensors' error types vary across versions
                raise ValueError(f"Could not read {path}: not a valid .safetensors file (truncated or corrupt?): "
                                 f"{e}") from e

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file = None

    def keys(self):
        return self._keys

    def info(self, key):
        """`(shape, dtype name)` from the header; a dtype keras_bit does not load keeps safetensors' name."""
        with core.reading(self.path, key):
            tensor = self._file.get_slice(key)
            dtype = tensor.get_dtype()
            return tuple(tensor.get_shape()), _DTYPES.get(dtype, dtype)

    def read(self, key):
        with core.reading(self.path, key):
            return self._file.get_tensor(key)

