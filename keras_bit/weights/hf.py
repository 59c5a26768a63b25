"""Hugging Face transformers' BiT checkpoints (`BitForImageClassification`, e.g. google/bit-50).

transformers' Bit (models/bit/modeling_bit.py) uses timm's weights renamed:
`bit.embedder.convolution`, `bit.encoder.stages.<block-1>.layers.<unit-1>.
{norm1..3, conv1..3, downsample.conv}`, `bit.norm`, and a Linear head
`classifier.1` (out, in). A `BitModel` file has the same keys without `bit.`.
Only preactivation configs with symmetric padding (`global_padding` null) are
BiT; "SAME" padding (ViT-hybrid backbones) computes another function.
"""

from keras_bit.weights import core, hub_config, state_dict
from keras_bit.weights.timm import unit_module

HEAD = "classifier.1"
PREFIX = "bit."
# Bounds on what a config may state (BiT-R152 has 36 units in block 3; the widest BiT is x4).
_MAX_UNITS, _MAX_WIDTH = 256, 64


def _hf_module(layer_id, prefix):
    fixed = {"root": prefix + "embedder.convolution", "post_gn": prefix + "norm", "head": HEAD}
    if layer_id.kind in fixed:
        return fixed[layer_id.kind]
    return f"{prefix}encoder.stages.{layer_id.block - 1}.layers.{layer_id.unit - 1}.{unit_module(layer_id)}"


def key_map(model, load_head=True, keys=None):
    """transformers key -> (variable, Layout) for every weight of `model` (the head a Linear).

    `keys`, the file's tensor names, tell a BitForImageClassification file ("bit." prefix) from a BitModel one.
    """
    prefix = PREFIX if keys is None or prefix_of(keys) is None else prefix_of(keys)
    return core.pytorch_key_map(model, load_head, lambda layer_id: _hf_module(layer_id, prefix), core.OI)


def prefix_of(keys):
    """`"bit."` for BitForImageClassification files, `""` for BitModel files, None for neither."""
    for prefix in (PREFIX, ""):
        if f"{prefix}embedder.convolution.weight" in keys:
            return prefix
    return None


def architecture(config, source):
    """`(block_units, width_factor, base_width, groups)` from a transformers BitConfig; ValueError if not BiT."""
    problems = []
    model_type = hub_config.string(config, "model_type", source, default=None)
    if model_type != "bit":
        problems.append(f"model_type={model_type!r} (expected 'bit')")
    layer_type = hub_config.string(config, "layer_type", source, default="preactivation")
    if layer_type != "preactivation":
        problems.append(f"layer_type={layer_type!r} (expected 'preactivation')")
    padding = hub_config.string(config, "global_padding", source, default=None)
    if padding not in (None, "", "valid_symmetric") or hub_config.boolean(config, "embedding_dynamic_padding", source):
        problems.append(f"global_padding={padding!r} (BiT pads symmetrically: null)")
    if problems:
        raise ValueError(f"{source} is not a BiT checkpoint keras_bit can load: " + "; ".join(problems) + ".")
    depths = hub_config.integers(config, "depths", source, 4, 1, _MAX_UNITS, default=(3, 4, 6, 3))
    width = hub_config.integer(config, "width_factor", source, 1, _MAX_WIDTH, default=1)
    # transformers scales hidden_sizes by width_factor but not embedding_size: wide models state 64 * width.
    embedding = hub_config.integer(config, "embedding_size", source, 1, 1024 * width, default=64 * width)
    base = embedding // width
    hidden = hub_config.integers(config, "hidden_sizes", source, 4, 1, 1 << 20, default=None)
    if embedding % width or (hidden is not None and list(hidden) != [4 * base * 2**i for i in range(4)]):
        raise ValueError(f"{source} is not a BiT checkpoint keras_bit can load: embedding_size={embedding}, "
                         f"hidden_sizes={hidden!r} (BiT: {[4 * base * 2**i for i in range(4)]} for width {width}).")
    return depths, width, base, hub_config.integer(config, "num_groups", source, 1, 1024, default=32)


def classes(config, source):
    labels = hub_config.mapping(config, "id2label", source, default=None)
    if labels:
        if len(labels) > core.MAX_CLASSES:
            raise ValueError(f"{source}: config.json field 'id2label' has {len(labels)} labels; at most "
                             f"{core.MAX_CLASSES} are expected.")
        return len(labels)
    return hub_config.integer(config, "num_labels", source, 0, core.MAX_CLASSES, default=None)


def resolution(config, source):
    return None  # the image size lives in preprocessor_config.json, not the model config


def head_classes(path):
    return state_dict.head_classes(path, HEAD)


def load(model, path, load_head=True):
    """Strictly loads a transformers BiT `.safetensors` or `.bin` state dict (head skipped unless `load_head`)."""
    state_dict.load(model, path, key_map, HEAD, load_head)
