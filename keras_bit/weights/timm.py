"""timm's BiT checkpoints (`timm/resnetv2_<depth>x<width>_bit.<tag>` on the Hub): key map and config.

timm's ResNetV2 (timm/models/resnetv2.py) holds the same weights as the
authors' files in PyTorch layout (convolutions OIHW, the head a 1x1
convolution): `stem.conv`, `stages.<block-1>.blocks.<unit-1>.{norm1..3,
conv1..3, downsample.conv}`, `norm`, `head.fc`. timm standardizes kernels with
eps 1e-8; the weights are the same, and keras_bit keeps the authors' 1e-10.
"""

import re

from keras_bit import presets
from keras_bit.weights import core, hub_config, state_dict

STEM, HEAD = "stem.conv", "head.fc"
_ARCH = re.compile(r"resnetv2_(?P<depth>50|101|152)x(?P<width>[1-4])_bit")
_PART = {"a": "1", "b": "2", "c": "3"}


def unit_module(layer_id):
    """A unit's module as timm and transformers name it inside the unit: conv1..3, norm1..3, downsample.conv."""
    if layer_id.part == "proj":
        return "downsample.conv"
    return f"{'conv' if layer_id.leaf == 'conv' else 'norm'}{_PART[layer_id.part]}"


def _module(layer_id):
    fixed = {"root": STEM, "post_gn": "norm", "head": HEAD}
    if layer_id.kind in fixed:
        return fixed[layer_id.kind]
    return f"stages.{layer_id.block - 1}.blocks.{layer_id.unit - 1}.{unit_module(layer_id)}"


def key_map(model, load_head=True, keys=None):
    """timm key -> (variable, Layout) for every weight of `model` (the head a 1x1 convolution)."""
    return core.pytorch_key_map(model, load_head, _module, core.OI11)


def is_timm(keys):
    return f"{STEM}.weight" in keys


def architecture(config, source):
    """`(block_units, width_factor, base_width, groups)` from a timm config.json; ValueError if not a BiT."""
    name = config.get("architecture")
    match = _ARCH.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"{source} is not a timm BiT model: its config.json names architecture={name!r}, "
                         "expected resnetv2_<50|101|152>x<1-4>_bit.")
    return presets.Architecture(presets.DEPTHS[int(match["depth"])], int(match["width"])).spec


def classes(config, source):
    return hub_config.integer(config, "num_classes", source, 0, core.MAX_CLASSES, default=None)


def resolution(config, source):
    """The square input size of timm's `pretrained_cfg.input_size` (channels, height, width), else None."""
    pretrained = hub_config.mapping(config, "pretrained_cfg", source, default={})
    size = hub_config.integers(pretrained, "input_size", f"{source} pretrained_cfg", 3, 1, hub_config.MAX_RESOLUTION,
                               default=None)
    return size[-1] if size and size[-1] == size[-2] else None


def head_classes(path):
    return state_dict.head_classes(path, HEAD)


def load(model, path, load_head=True):
    """Strictly loads a timm BiT `.safetensors` or `.bin` state dict (head tensors skipped unless `load_head`)."""
    state_dict.load(model, path, key_map, HEAD, load_head)
