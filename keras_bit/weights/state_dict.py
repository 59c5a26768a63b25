"""A PyTorch state dict (timm or transformers key layout) from either file it is published in.

Hub repositories hold the same `{name: tensor}` mapping as `model.safetensors`
or, in older uploads, as `pytorch_model.bin` (a `torch.save` pickle). Both
readers offer the interface `core.load_strict` reads (`keys()`, `info(key)`,
`read(key)` as NumPy), so the timm and transformers key maps apply unchanged
to either file; the container is told by the file name.
"""

from keras_bit.weights import core, safetensors_io, torch_bin

SUFFIXES = (safetensors_io.SUFFIX, torch_bin.SUFFIX)


def open_reader(path):
    """A reader of the `.safetensors` or `.bin` file `path` (use it in a `with` block)."""
    if str(path).endswith(torch_bin.SUFFIX):
        return torch_bin.Reader(path)
    return safetensors_io.Reader(path)


def head_classes(path, head_module):
    """Class count of the head `<head_module>.bias` (from the metadata, no data read), or None if it has none."""
    with open_reader(path) as reader:
        # timm's head is a 1x1 convolution (classes, in, 1, 1), transformers' a Linear (classes, in).
        return core.head_size(reader, path, f"{head_module}.bias", f"{head_module}.weight", 0)


def load(model, path, key_map_fn, head_module, load_head=True):
    """Strictly loads a state dict file; `key_map_fn(model, load_head, keys)` maps its tensors to the model."""
    with open_reader(path) as reader:
        head = [k for k in reader.keys() if k.startswith(head_module + ".")]  # noqa: SIM118 (a reader, not a dict)
        ignorable = head if not load_head else ()
        core.load_strict(model, reader, key_map_fn(model, load_head, reader.keys()), path, ignorable)
