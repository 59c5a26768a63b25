"""Hugging Face transformers' BiT checkpoints (`BitForImageClassification`, e.g. google/bit-50).

transformers' Bit (models/bit/modeling_bit.py) uses timm's weights renamed:
`bit.embedder.convolution`, `bit.encoder.stages.<block-1>.layers.<unit-1>.
{norm1..3, conv1..3, downsample.conv}`, `bit.norm`, and a Linear head
`classifier.1` (out, in). A `BitModel` file has the same keys without `bit.`.
Only preactivation configs with symmetric padding (`global_padding` null) are
BiT; "SAME" padding (ViT-hybrid backbones) computes another function.
"""

from keras_bit.weights import core, safetensors_io
from keras_bit.weights.timm import unit_module

HEAD = "classifier.1"
PREFIX = "bit."


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
    if config.get("model_type") != "bit":
        problems.append(f"model_type={config.get('model_type')!r} (expected 'bit')")
    if config.get("layer_type", "preactivation") != "preactivation":
        problems.append(f"layer_type={config.get('layer_type')!r} (expected 'preactivation')")
    if config.get("global_padding") not in (None, "", "valid_symmetric") or config.get("embedding_dynamic_padding"):
        problems.append(f"global_padding={config.get('global_padding')!r} (BiT pads symmetrically: null)")
    depths, width = config.get("depths", [3, 4, 6, 3]), config.get("width_factor", 1)
    if not isinstance(depths, list) or len(depths) != 4 or not isinstance(width, int) or width < 1:
        problems.append(f"depths={depths!r}, width_factor={width!r}")
    if problems:
        raise ValueError(f"{source} is not a BiT checkpoint keras_bit can load: " + "; ".join(problems) + ".")
    # transformers scales hidden_sizes by width_factor but not embedding_size: wide models state 64 * width.
    base = config.get("embedding_size", 64 * width) // width
    hidden = config.get("hidden_sizes")
    if hidden is not None and list(hidden) != [4 * base * 2**i for i in range(4)]:
        problems.append(f"hidden_sizes={hidden!r} (BiT: {[4 * base * 2**i for i in range(4)]})")
    if problems:
        raise ValueError(f"{source} is not a BiT checkpoint keras_bit can load: " + "; ".join(problems) + ".")
    return tuple(depths), width, base, config.get("num_groups", 32)


def classes(config):
    labels = config.get("id2label")
    return len(labels) if labels else config.get("num_labels")


def resolution(config):
    return None  # the image size lives in preprocessor_config.json, not the model config


def head_classes(path):
    return safetensors_io.head_classes(path, HEAD)


def load(model, path, load_head=True):
    """Strictly loads a transformers BiT `.safetensors` file (head tensors skipped unless `load_head`)."""
    safetensors_io.load(model, path, key_map, HEAD, load_head)
