"""Reading `.safetensors` files (timm and transformers checkpoints) into NumPy, lazily."""

from keras_bit.weights import core

SUFFIX = ".safetensors"


class Reader:
    """Tensor names, shapes (from the header) and arrays of a `.safetensors` file."""

    def __init__(self, path):
        from safetensors import SafetensorError, safe_open

        self.path = path
        self._errors = (SafetensorError, OSError, ValueError, TypeError)
        try:
            self._file = safe_open(path, framework="numpy")
            self._keys = list(self._file.keys())
        except self._errors as e:
            raise ValueError(f"Could not read {path}: not a valid .safetensors file (truncated or corrupt?): {e}") from e

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file = None

    def keys(self):
        return self._keys

    def shape(self, key):
        return tuple(self._file.get_slice(key).get_shape())

    def read(self, key):
        try:
            return self._file.get_tensor(key)
        except self._errors as e:
            raise ValueError(f"Could not read tensor {key!r} of {self.path}: {e}") from e


def head_classes(path, head_module):
    """Class count of the head `<head_module>.bias` in a `.safetensors` file, or None if it has none."""
    with Reader(path) as reader:
        key = f"{head_module}.bias"
        return reader.shape(key)[0] if key in reader.keys() else None


def load(model, path, key_map_fn, head_module, load_head=True):
    """Strictly loads a `.safetensors` file; `key_map_fn(model, load_head, keys)` maps its tensors."""
    with Reader(path) as reader:
        ignorable = [k for k in reader.keys() if k.startswith(head_module + ".")] if not load_head else ()
        core.load_strict(model, reader, key_map_fn(model, load_head, reader.keys()), path, ignorable)
