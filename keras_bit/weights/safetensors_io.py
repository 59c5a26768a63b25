"""Reading `.safetensors` files (timm and transformers checkpoints) into NumPy, lazily."""

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
        except self._errors as e:  # e.g. bfloat16, which NumPy cannot hold
            raise ValueError(f"Could not read tensor {key!r} of {self.path}: {e}") from e
