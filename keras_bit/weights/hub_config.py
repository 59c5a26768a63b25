"""A Hub repository's `config.json`, read as hostile: bounded in size, each field type-checked and bounded.

timm and transformers configs are JSON written by anyone who can push to a
repository. keras_bit reads a handful of fields (the architecture, the class
count, the input size); each is checked for its type and range here, and any
other value raises one `ValueError` naming the repository and the field, never
a `TypeError` or `AttributeError` from deep inside a reader.
"""

from keras_bit import io
from keras_bit.validation import is_int

# ImageNet-21k's id2label is ~1 MB; a config is never near this.
MAX_CONFIG_BYTES = 4 << 20
# The largest input size a config may state (BiT fine-tunes at 480 px, its largest release at 384 / 480).
MAX_RESOLUTION = 4096
_MISSING = object()


def read(path, source):
    """The config at `path` as a dict (a JSON object of at most `MAX_CONFIG_BYTES`); ValueError otherwise."""
    try:
        return io.read_json_object(path, MAX_CONFIG_BYTES, f"{source}: config.json")
    except ValueError as e:
        raise ValueError(f"{e} It is a cached download: delete {path} to download it again.") from e


def _problem(source, name, value, expected):
    return ValueError(f"{source}: config.json field {name!r} must be {expected}. Received: {value!r:.100}")


def integer(config, name, source, low, high, default=_MISSING):
    """`config[name]` as an int in `[low, high]` (bools and strings refused); `default` when absent or null."""
    value = config.get(name)
    if value is None and default is not _MISSING:
        return default
    if not is_int(value) or not low <= value <= high:
        raise _problem(source, name, value, f"an integer from {low} to {high}")
    return value


def integers(config, name, source, length, low, high, default=_MISSING):
    """`config[name]` as a tuple of `length` ints, each in `[low, high]` (`length` None: any length >= 1)."""
    value = config.get(name)
    if value is None and default is not _MISSING:
        return default
    expected = f"a list of {length or 'one or more'} integers from {low} to {high}"
    if not isinstance(value, list) or not value or (length is not None and len(value) != length):
        raise _problem(source, name, value, expected)
    if not all(is_int(v) and low <= v <= high for v in value):
        raise _problem(source, name, value, expected)
    return tuple(value)


def string(config, name, source, default=_MISSING):
    """`config[name]` as a str; `default` when absent or null."""
    value = config.get(name)
    if value is None and default is not _MISSING:
        return default
    if not isinstance(value, str):
        raise _problem(source, name, value, "a string")
    return value


def boolean(config, name, source, default=False):
    """`config[name]` as a bool; `default` when absent or null."""
    value = config.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _problem(source, name, value, "true or false")
    return value


def mapping(config, name, source, default=_MISSING):
    """`config[name]` as a dict; `default` when absent or null."""
    value = config.get(name)
    if value is None and default is not _MISSING:
        return default
    if not isinstance(value, dict):
        raise _problem(source, name, value, "a JSON object")
    return value


def keras_bit_model(config, source):
    """`(architecture, resolution)` stated by the config.json of keras_bit's own Keras form (`keras_bit.publish`).

    `architecture` is `(block_units, width_factor, base_width, groups)` from its `model_config` (the
    `keras_bit.ResNetV2` arguments), None when the config has none; `resolution` the square
    `preprocessing.image_size`, else None.
    """
    model = mapping(config, "model_config", source, default=None)
    architecture = None
    if model is not None:
        where = f"{source} model_config"
        architecture = (integers(model, "block_units", where, 4, 1, 256), integer(model, "width_factor", where, 1, 64),
                        integer(model, "base_width", where, 1, 1024), integer(model, "groups", where, 1, 1024))
    preprocessing = mapping(config, "preprocessing", source, default={})
    size = integers(preprocessing, "image_size", f"{source} preprocessing", 2, 1, MAX_RESOLUTION, default=None)
    return architecture, (size[0] if size and size[0] == size[1] else None)
