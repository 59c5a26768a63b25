"""What each published form holds: the model read off its layers, tensors in timm / transformers layout, configs.

The tensor layouts are the readers' key maps run backwards
(`keras_bit.weights.timm.key_map`, `keras_bit.weights.hf.key_map`): one
mapping per format, used for reading and for writing. The configs carry the
fields timm's `push_to_hf_hub` and transformers' `save_pretrained` write
(timm/models/_hub.py `save_config_for_hf`; transformers' BitConfig and
BitImageProcessor), with keras_bit's evaluation rule: the whole image resized
to the input size (bilinear, no crop), pixels mapped to [-1, 1].

Only NumPy and `keras.ops` are used, never TensorFlow: a model fine-tuned on
TensorFlow publishes from a PyTorch or JAX install too.
"""

import dataclasses
import os
from typing import Optional

import keras
import numpy as np

from keras_bit import presets
from keras_bit.weights import core, hf, safetensors_io, sources, timm

FORMATS = ("timm", "transformers", "keras")
SAFETENSORS = "model.safetensors"
KERAS_WEIGHTS = "model.weights.h5"
KERAS_MODEL = "model.keras"
# BiT's input: x / 127.5 - 1, which is (x / 255 - 0.5) / 0.5 in timm's and transformers' terms.
MEAN = STD = (0.5, 0.5, 0.5)
INTERPOLATION = "bilinear"
PIL_BILINEAR = 2  # PIL.Image.Resampling.BILINEAR, as transformers stores `resample`
# timm's names for keras_bit's evaluation resize (keras_bit.train.pipeline: the whole image to the crop size).
CROP_PCT, CROP_MODE = 1.0, "squash"
_ROOT = 64  # the authors' root width; a multiple of it is a BiT width factor

# Each reader Layout's conversion back, Keras array -> file array (core.Layout.to_keras inverted).
_TO_FILE = {
    core.SAME.name: lambda a: a,
    core.OIHW.name: lambda a: a.transpose(3, 2, 0, 1),
    core.OI11.name: lambda a: a.T[:, :, None, None],
    core.OI.name: lambda a: a.T,
}


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """A keras_bit model's architecture, read off its layers (see `describe`)."""

    block_units: tuple
    root: int  # base_width * width_factor: the stem's filters
    groups: int
    output_stride: int
    classes: Optional[int]  # None: no head
    activation: Optional[str]  # the head's ("softmax", "sigmoid", ...); None for logits
    input_size: Optional[tuple]  # (height, width) when fixed
    name: str
    params: int

    @property
    def width_factor(self):
        return self.root // _ROOT if self.root % _ROOT == 0 else 1

    @property
    def base_width(self):
        return self.root // self.width_factor

    @property
    def num_features(self):
        return 32 * self.root  # block 4's output: 4 * 8 * root

    @property
    def arch_name(self):
        """The BiT name ("R50x1") of a published architecture, else None."""
        for name, arch in presets.ARCHITECTURES.items():
            units, width, base, groups = arch.spec
            if (tuple(units), width * base, groups) == (self.block_units, self.root, self.groups):
                return name
        return None

    @property
    def timm_architecture(self):
        """timm's model name (`resnetv2_50x1_bit`), or None: timm names only the published architectures."""
        name = self.arch_name
        return None if name is None else "resnetv2_{}x{}_bit".format(*name[1:].split("x"))


def describe(model):
    """The `ModelInfo` of a keras_bit model; ValueError naming `model` for any other."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model built by keras_bit. Received: model={model!r:.100}")
    try:
        units, _, root, groups = sources.model_architecture(model)
        stride = 4
        for block in range(1, 5):
            stride *= model.get_layer(f"block{block}_unit01_b_conv").strides[0]
    except ValueError as e:
        raise ValueError(f"`model` must be a BiT built by keras_bit (layers named like 'block1_unit01_a_conv'): "
                         f"{e} Received: model={model.name!r}") from e
    head = next((layer for layer in model.layers if layer.name == "head"), None)
    activation = getattr(head.activation, "__name__", "custom") if head is not None else None
    last = model.layers[-1]
    if head is not None and last is not head and isinstance(last, keras.layers.Activation):
        activation = getattr(last.activation, "__name__", "custom")  # a fine-tuning run's "probabilities" layer
    size = tuple(model.input_shape[1:3])
    return ModelInfo(
        block_units=tuple(units), root=int(root), groups=int(groups), output_stride=int(stride),
        classes=None if head is None else int(head.units),
        activation=None if activation == "linear" else activation,
        input_size=size if all(isinstance(d, int) for d in size) else None,
        name=model.name, params=int(model.count_params()),
    )


def check_publishable(info, fmt):
    """Raises ValueError when `fmt` cannot describe the model (timm names only the published architectures)."""
    if fmt != "keras" and info.output_stride != 32:
        raise ValueError(f"format={fmt!r} publishes the classifier at output stride 32; this model is dilated to "
                         f"output stride {info.output_stride} (timm and transformers set it when loading). Use "
                         "format='keras', or publish the stride-32 model.")
    if fmt == "timm" and info.timm_architecture is None:
        raise ValueError(f"format='timm' needs an architecture timm names (resnetv2_<depth>x<width>_bit: "
                         f"{', '.join(presets.ARCHITECTURES)}); model {info.name!r} has block_units="
                         f"{list(info.block_units)}, root width {info.root}, {info.groups} groups. Use "
                         "format='transformers' or 'keras'.")


def _array(variable):
    value = keras.ops.convert_to_numpy(variable)
    return np.asarray(value, dtype=np.float32)  # bfloat16 and float16 variables widen exactly


def file_tensors(key_map):
    """file key -> contiguous float32 array, from a reader's key map (variable, Layout) run backwards."""
    return {key: np.ascontiguousarray(_TO_FILE[layout.name](_array(variable)))
            for key, (variable, layout) in key_map.items()}


def key_map(model, fmt, info):
    """The reader's key map of `fmt` for `model`: timm's, or transformers' (BitModel keys for a headless one)."""
    head = info.classes is not None
    if fmt == "timm":
        return timm.key_map(model, load_head=head)
    return hf.key_map(model, load_head=head, keys=None if head else {"embedder.convolution.weight"})


def write_safetensors(path, tensors):
    from safetensors.numpy import save_file

    # transformers refuses safetensors without a "format" entry; "pt" is what torch writers store.
    save_file(tensors, path, metadata={"format": "pt"})
    # safetensors (0.8) creates the file owner-only (0600); the folder's other files are the usual 0644.
    os.chmod(path, 0o644)


def verify_safetensors(path, key_map, fmt):
    """Opens the written file with keras_bit's own reader: same keys, and every tensor reads back exactly."""
    with safetensors_io.Reader(path) as reader:
        if set(reader.keys()) != set(key_map):
            raise RuntimeError(f"{path}: the written keys differ from the key map (a keras_bit bug).")
        for key, (variable, layout) in key_map.items():
            if not np.array_equal(layout.to_keras(reader.read(key)), _array(variable)):
                raise RuntimeError(f"{path}: key {key!r} does not read back as written (a keras_bit bug).")
    if sources.weights_format(path) != fmt:
        raise RuntimeError(f"{path}: keras_bit reads it as another format than {fmt!r} (a keras_bit bug).")


def timm_config(info, class_names, size):
    """config.json as timm's `push_to_hf_hub` writes it (`timm.create_model("hf-hub:<repo>", pretrained=True)`)."""
    classes = info.classes or 0
    config = {"architecture": info.timm_architecture, "num_classes": classes, "num_features": info.num_features,
              "global_pool": "avg"}
    if class_names:
        config["label_names"] = list(class_names)
    config["pretrained_cfg"] = {
        "custom_load": False,  # native timm tensors: timm's own BiT configs say True for the authors' .npz files
        "input_size": [3, *size], "fixed_input_size": False, "interpolation": INTERPOLATION,
        "crop_pct": CROP_PCT, "crop_mode": CROP_MODE, "mean": list(MEAN), "std": list(STD), "num_classes": classes,
        "pool_size": [max(1, size[0] // 32), max(1, size[1] // 32)], "first_conv": timm.STEM,
        "classifier": timm.HEAD, "license": "apache-2.0",
    }
    return config


def transformers_config(info, class_names):
    """A BitConfig (config.json of `BitForImageClassification`, or `BitModel` without a head).

    transformers scales `hidden_sizes` by `width_factor` but sizes its final
    norm by the unscaled last one, so a wide model is stated with width 1 and
    its real widths: the same network, loadable at every width.
    """
    config = {
        "architectures": ["BitForImageClassification" if info.classes else "BitModel"], "model_type": "bit",
        "num_channels": 3, "layer_type": "preactivation", "global_padding": None,
        "embedding_dynamic_padding": False, "hidden_act": "relu", "num_groups": info.groups,
        "depths": list(info.block_units), "embedding_size": info.root,
        "hidden_sizes": [4 * info.root * 2**i for i in range(4)], "width_factor": 1, "output_stride": 32,
        "drop_path_rate": 0.0,
    }
    if info.classes:
        names = class_names or [f"LABEL_{i}" for i in range(info.classes)]
        config["id2label"] = {str(i): name for i, name in enumerate(names)}
        config["label2id"] = {name: i for i, name in enumerate(names)}
        problem = {"softmax": "single_label_classification", "sigmoid": "multi_label_classification"}
        if info.activation in problem:
            config["problem_type"] = problem[info.activation]
    return config


def preprocessor_config(size):
    """preprocessor_config.json of a BitImageProcessor: the whole image resized to `size`, no crop, [-1, 1]."""
    return {
        "image_processor_type": "BitImageProcessor", "do_convert_rgb": True,
        "do_resize": True, "size": {"height": size[0], "width": size[1]}, "resample": PIL_BILINEAR,
        "do_center_crop": False, "crop_size": {"height": size[0], "width": size[1]},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(MEAN), "image_std": list(STD),
    }


def keras_config(info, class_names, size, version):
    """config.json of the Keras form: the `keras_bit.ResNetV2` arguments that rebuild the model, and its input."""
    return {
        "library_name": "keras_bit", "keras_bit_version": version, "model_class": "keras_bit.ResNetV2",
        "model_config": {
            "block_units": list(info.block_units), "width_factor": info.width_factor,
            "base_width": info.base_width, "groups": info.groups, "output_stride": info.output_stride,
            "include_top": info.classes is not None, "classes": info.classes,
            "classifier_activation": info.activation,
            "input_shape": [*info.input_size, 3] if info.input_size else [None, None, 3], "name": info.name,
        },
        "bit_model": info.arch_name,
        "weights_file": KERAS_WEIGHTS, "keras_file": KERAS_MODEL,
        "class_names": list(class_names) if class_names else None,
        "preprocessing": preprocessing(size),
    }


def preprocessing(size):
    """The input contract, stated once for every form's card and the Keras config."""
    return {"image_size": list(size), "resize": CROP_MODE, "interpolation": INTERPOLATION, "crop_pct": CROP_PCT,
            "input_range": [-1.0, 1.0], "mean": list(MEAN), "std": list(STD)}
