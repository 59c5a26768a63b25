"""BiT's ResNetV2 architecture: units, width, output stride, head. Nothing about weights.

The network follows the authors' TF2 code (big_transfer/bit_tf2/models.py)
exactly: pre-activation bottleneck units, GroupNorm + weight-standardized
convolutions, explicit symmetric zero padding (never `padding="same"`, which
pads asymmetrically, and never `-inf` padding for the max-pool), the stride on
the 3x3 convolution, and a zero-initialised head. Layer names mirror the
authors' checkpoint scopes (`block1_unit01_a_conv`), which the weight readers
rely on.

Reference:
    Kolesnikov et al., "Big Transfer (BiT): General Visual Representation
    Learning", https://arxiv.org/abs/1912.11370.
"""

import warnings

import keras
import numpy as np

from keras_bit.layers import GN_GROUPS, GroupNormalization, StandardizedConv2D
from keras_bit.validation import as_sequence, check_name, check_positive_int, is_int

POOLINGS = (None, "avg", "max")
MIN_SIZE = 32
BLOCK_STRIDES = (1, 2, 2, 2)
STEM_STRIDE = 4  # the 7x7/2 convolution and the 3x3/2 max-pool
OUTPUT_STRIDES = (8, 16, 32)
DEFAULT_SIZE = 224
# No BiT variable comes near it (the largest, R152x4's 21843-class head, has 179M weights); 2**31 elements
# (8 GiB float32) is where int32-indexed kernels and 2 GB protobuf formats (SavedModel, ONNX) stop.
MAX_VARIABLE_ELEMENTS = 2**31 - 1
# Building is a Python loop over ~10 layers per unit: 10**9 units would run for days before failing. The deepest
# published ResNet (He et al. 2016, 1001 layers) has 333 units; BiT's R152 has 50.
MAX_UNITS = 1000
DEFAULT_CLASSES = 1000  # ImageNet-1k, keras.applications' default head
# BiT's layers are channels-last (HWIO checkpoints), whatever the global image_data_format.
DATA_FORMAT = "channels_last"


def check_architecture_args(block_units, width_factor, base_width, groups, output_stride=32):
    """Returns `(block_units, width_factor, base_width, groups, output_stride)` as plain ints, or raises `ValueError`.

    Integers may be Python or NumPy ones, `block_units` any sequence of 4
    (tuple, list, range, NumPy array), as Keras takes sizes.
    """
    units = as_sequence(block_units)
    if units is None or len(units) != len(BLOCK_STRIDES) or not all(is_int(u) and u > 0 for u in units):
        raise ValueError(
            "`block_units` must be a sequence of 4 positive integers (units per block). "
            f"Received: block_units={block_units!r}"
        )
    if sum(units) > MAX_UNITS:
        raise ValueError(f"`block_units` asks for {sum(units)} units in all, beyond {MAX_UNITS} (a typo? R152 has "
                         f"50). Received: block_units={block_units!r}")
    width_factor, base_width, groups = (
        check_positive_int(value, arg)
        for value, arg in ((width_factor, "width_factor"), (base_width, "base_width"), (groups, "groups")))
    if (base_width * width_factor) % groups:
        raise ValueError(
            f"GroupNorm needs channel counts divisible by `groups`: base_width * width_factor "
            f"= {base_width * width_factor} is not a multiple of groups={groups}."
        )
    if not is_int(output_stride) or output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"`output_stride` must be one of {OUTPUT_STRIDES}. Received: output_stride={output_stride!r}")
    return tuple(int(u) for u in units), width_factor, base_width, groups, int(output_stride)


def check_input_shape(input_shape, include_top, default_size, channels=None):
    """The `(height, width, channels)` to build with, as ints / None; `channels` (3 for pretrained) is enforced."""
    if input_shape is None:
        size = default_size if include_top else None
        return (size, size, channels or 3)
    shape = as_sequence(input_shape)
    if shape is None or len(shape) != 3:
        raise ValueError(
            "`input_shape` must be a tuple of 3 values (height, width, channels), channels "
            f"last. Received: input_shape={input_shape!r}"
        )
    height, width, got = shape
    if channels is not None and got != channels:
        raise ValueError(
            f"Pretrained BiT weights expect {channels} input channels (RGB). Received: input_shape={shape!r}"
        )
    if not is_int(got) or got <= 0:
        raise ValueError(
            f"The channel count in `input_shape` must be a positive integer. Received: input_shape={shape!r}"
        )
    for dim in (height, width):
        if dim is not None and (not is_int(dim) or dim < MIN_SIZE):
            raise ValueError(
                f"Input height and width must be None or integers >= {MIN_SIZE}. Received: input_shape={shape!r}"
            )
    return tuple(None if d is None else int(d) for d in shape)


def check_head(include_top, pooling, classes, classifier_activation):
    """Returns `(include_top, pooling, classes)` checked: pooling None when the head ignores it, classes an int or None.

    `classes` is the head size, so it needs the head; one class needs an
    activation other than softmax (which is 1.0 for a single class).
    """
    if not isinstance(include_top, (bool, np.bool_)):
        raise ValueError(f"`include_top` must be True or False. Received: include_top={include_top!r}")
    include_top = bool(include_top)
    if not (pooling is None or isinstance(pooling, str)) or pooling not in POOLINGS:  # an array cannot be `in`
        raise ValueError(f"`pooling` must be one of {POOLINGS}. Received: pooling={pooling!r}")
    if include_top and pooling is not None:
        # keras.applications ignores `pooling` when the head is built; so do we, but say so.
        warnings.warn(
            f"`pooling={pooling!r}` is ignored with include_top=True (the head always average-pools).",
            stacklevel=3,
        )
        pooling = None
    if classes is not None:
        classes = check_positive_int(classes, "classes")
        if not include_top:
            # keras.applications ignores `classes` here (its default is 1000, so it cannot tell a
            # given value from the default); ours is None, so a count is a head the user expects.
            raise ValueError(
                f"`classes` sizes the classification head, which include_top=False leaves out. Pass "
                f"include_top=True for a head of {classes} classes, or classes=None for features. "
                f"Received: classes={classes!r}, include_top=False"
            )
    if classifier_activation is not None and not callable(classifier_activation):
        try:
            keras.activations.get(classifier_activation)
        except (ValueError, TypeError) as e:
            raise ValueError(
                "`classifier_activation` must be None, a callable or the name of a Keras "
                f"activation. Received: classifier_activation={classifier_activation!r}"
            ) from e
    check_one_class_head(classes, classifier_activation)
    return include_top, (None if pooling is None else str(pooling)), classes


def check_one_class_head(classes, classifier_activation, pretrained=False):
    """Refuses a softmax over a single class: it is 1.0 for every input, so the model could say nothing."""
    if classes == 1 and keras.activations.get(classifier_activation) is keras.activations.softmax:
        advice = ("pass classifier_activation=None for its logit (a loaded head takes sigmoid, softmax or None)"
                  if pretrained else
                  "for a binary (one-score) head pass classifier_activation='sigmoid' (or None for a logit), "
                  "or use classes=2")
        raise ValueError(
            f"A softmax over one class is always 1.0: {advice}. "
            f"Received: classes=1, classifier_activation={classifier_activation!r}"
        )


def check_sizes(width_factor, base_width, channels, classes):
    """Refuses, before anything is allocated, a network whose largest variable exceeds `MAX_VARIABLE_ELEMENTS`.

    The largest are the stem convolution (7x7 x channels x root), the 3x3
    convolution of block 4 (3x3 x 8 root x 8 root) and the head (32 root x
    classes), where root = base_width * width_factor. `channels` and
    `classes` may be None (not known, no head).
    """
    root = base_width * width_factor
    sizes = {"the block-4 3x3 convolution (width)": 9 * (8 * root) ** 2}
    if channels is not None:  # unknown for an input tensor of unknown depth
        sizes["the stem convolution (input channels)"] = 49 * channels * root
    if classes is not None:
        sizes["the head (classes)"] = 32 * root * classes
    for what, elements in sizes.items():
        if elements > MAX_VARIABLE_ELEMENTS:
            raise ValueError(
                f"{what} would hold {elements:,} weights ({4 * elements / 2**30:.0f} GiB in float32), beyond "
                f"{MAX_VARIABLE_ELEMENTS:,} per variable. Received: width_factor={width_factor}, "
                f"base_width={base_width}, input channels={channels}, classes={classes}"
            )


def block_plan(output_stride=32):
    """`(stride, first_dilation, dilation)` of each of the 4 blocks for an output stride.

    Once the network reaches `output_stride`, a block's stride becomes a
    dilation of its 3x3 convolutions; the first unit of a dilated block keeps
    the dilation its input was computed with (1 for rate 2, 2 for rate 4), as
    in HF's BitEncoder and timm's ResNetStage, so the same checkpoints serve
    dense prediction.

    Example:
        >>> block_plan(8)
        ((1, 1, 1), (2, 1, 1), (1, 1, 2), (1, 2, 4))
    """
    plan, stride, dilation = [], STEM_STRIDE, 1
    for block_stride in BLOCK_STRIDES:
        if stride >= output_stride:
            dilation *= block_stride
            block_stride = 1
        first = 1 if dilation in (1, 2) else 2
        plan.append((block_stride, first, dilation))
        stride *= block_stride
    return tuple(plan)


def _unit(x, mid_channels, stride, dilation, prefix, groups):
    """One pre-activation bottleneck unit; layer names mirror the checkpoint scopes."""
    out_channels = 4 * mid_channels
    # Each GroupNorm carries the ReLU that follows it (one fused op on CPU; see keras_bit.kernels).
    preact = GroupNormalization(groups, activation="relu", name=f"{prefix}_a_gn")(x)
    shortcut = x
    if stride != 1 or x.shape[-1] != out_channels:
        # BiT projects the *pre-activated* input, not the raw one.
        shortcut = StandardizedConv2D(
            out_channels, 1, strides=stride, data_format=DATA_FORMAT, name=f"{prefix}_a_proj_conv"
        )(preact)
    y = StandardizedConv2D(mid_channels, 1, data_format=DATA_FORMAT, name=f"{prefix}_a_conv")(preact)
    y = GroupNormalization(groups, activation="relu", name=f"{prefix}_b_gn")(y)
    y = keras.layers.ZeroPadding2D(dilation, data_format=DATA_FORMAT, name=f"{prefix}_b_pad")(y)
    y = StandardizedConv2D(
        mid_channels, 3, strides=stride, dilation_rate=dilation, data_format=DATA_FORMAT, name=f"{prefix}_b_conv"
    )(y)
    y = GroupNormalization(groups, activation="relu", name=f"{prefix}_c_gn")(y)
    y = StandardizedConv2D(out_channels, 1, data_format=DATA_FORMAT, name=f"{prefix}_c_conv")(y)
    return y, shortcut


def _backbone(x, block_units, width_factor, base_width, groups, output_stride):
    root = base_width * width_factor
    x = keras.layers.ZeroPadding2D(3, data_format=DATA_FORMAT, name="root_block_pad")(x)
    x = StandardizedConv2D(root, 7, strides=2, data_format=DATA_FORMAT, name="root_block_conv")(x)
    # Zero padding, not -inf: the authors pad the pool input with zeros (PaddingFromKernelSize).
    x = keras.layers.ZeroPadding2D(1, data_format=DATA_FORMAT, name="root_block_pool_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, data_format=DATA_FORMAT, name="root_block_pool")(x)
    for b, (units, (stride, first_dilation, dilation)) in enumerate(
            zip(block_units, block_plan(output_stride)), start=1):
        mid = root * 2 ** (b - 1)
        for u in range(1, units + 1):
            prefix = f"block{b}_unit{u:02d}"
            y, shortcut = _unit(x, mid, stride if u == 1 else 1, first_dilation if u == 1 else dilation,
                                prefix, groups)
            add_name = f"block{b}_out" if u == units else f"{prefix}_add"
            x = keras.layers.Add(name=add_name)([y, shortcut])
    # Kept as two layers: "post_relu" is the backbone's final feature map, a public layer name.
    x = GroupNormalization(groups, name="post_gn")(x)
    return keras.layers.ReLU(name="post_relu")(x)


def build_resnet_v2(
    block_units=(3, 4, 6, 3),
    width_factor=1,
    include_top=True,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=None,
    classifier_activation="softmax",
    name="bit_resnetv2",
    *,
    base_width=64,
    groups=GN_GROUPS,
    output_stride=32,
    default_size=DEFAULT_SIZE,
):
    """Builds a randomly initialised BiT ResNetV2 of any depth, width and output stride.

    Use `keras_bit.ResNetV2` / `keras_bit.BiT` for pretrained weights; this
    function only builds. Arguments as in `keras_bit.ResNetV2` (`classes`:
    None means 1000 with the head; it must be None without).

    Returns:
        A Functional `keras.Model`.

    Example:
        >>> build_resnet_v2((1, 1, 1, 1), base_width=32, groups=8, input_shape=(64, 64, 3), classes=10).output_shape
        (None, 10)
    """
    block_units, width_factor, base_width, groups, output_stride = check_architecture_args(
        block_units, width_factor, base_width, groups, output_stride)
    include_top, pooling, classes = check_head(include_top, pooling, classes, classifier_activation)
    if include_top and classes is None:
        classes = DEFAULT_CLASSES
    input_shape = check_input_shape(input_shape, include_top, check_positive_int(default_size, "default_size"))
    name = check_name(name)
    if input_tensor is None:
        inputs = keras.Input(shape=input_shape, name="images")
    elif keras.backend.is_keras_tensor(input_tensor):
        inputs = input_tensor
    else:
        inputs = keras.Input(tensor=input_tensor, shape=input_shape, name="images")
    check_sizes(width_factor, base_width, inputs.shape[-1], classes)  # an Input allocates nothing
    x = _backbone(inputs, block_units, width_factor, base_width, groups, output_stride)
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(data_format=DATA_FORMAT, name="avg_pool")(x)
        policy = keras.config.dtype_policy()
        # Keep class scores in float32 under mixed precision (Keras' mixed-precision guidance).
        head_dtype = "float32" if policy.compute_dtype != policy.variable_dtype else None
        x = keras.layers.Dense(
            classes,
            activation=classifier_activation,
            kernel_initializer="zeros",  # BiT's zero head: fine-tuning starts from constant outputs.
            dtype=head_dtype,
            name="head",
        )(x)
    elif pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(data_format=DATA_FORMAT, name="avg_pool")(x)
    elif pooling == "max":
        x = keras.layers.GlobalMaxPooling2D(data_format=DATA_FORMAT, name="max_pool")(x)
    model_inputs = inputs if input_tensor is None else keras.utils.get_source_inputs(input_tensor)
    return keras.Model(model_inputs, x, name=name)


def feature_info(model):
    """`[{"index", "name", "channels", "stride"}, ...]` for index 0 (stem) to 4 (block 4) of a keras_bit model.

    Index 0 is the stem convolution (stride 2, as timm's `features_only`);
    1-4 are the block outputs, the raw residual sums (pre-activation networks
    normalise at the start of the next unit), at strides 4, 8, 16, 32 unless
    the model was built with a smaller `output_stride`.
    """
    names = ["root_block_conv"] + [f"block{b}_out" for b in range(1, 5)]
    missing = [n for n in names if n not in {layer.name for layer in model.layers}]
    if missing:
        raise ValueError(f"`model` has no layer named {missing}; expected a keras_bit model. "
                         f"Received: model={model.name!r}")
    info, stride = [], STEM_STRIDE // 2
    for index, layer_name in enumerate(names):
        if index:
            stride *= (2 if index == 1 else 1) * model.get_layer(f"block{index}_unit01_b_conv").strides[0]
        info.append({"index": index, "name": layer_name, "stride": stride,
                     "channels": int(model.get_layer(layer_name).output.shape[-1])})
    return info


def feature_model(model, out_indices=(1, 2, 3, 4)):
    """Returns a model emitting multi-scale features (like timm's `features_only`, HF's `BitBackbone`).

    Args:
        model: a keras_bit model (any `include_top`, any `output_stride`).
        out_indices: which features, in order: 0 the stem convolution
            (stride 2), 1-4 the outputs of blocks 1-4 (strides 4, 8, 16, 32
            at output stride 32); any sequence (tuple, list, range, array).

    Returns:
        A `keras.Model` sharing `model`'s weights, one output per index; its
        `feature_info` attribute lists each output's index, layer name,
        channels and stride.

    Example:
        >>> feats = feature_model(keras_bit.BiTM_R50x1(weights=None, include_top=False), out_indices=(0, 4))
        >>> [(f["channels"], f["stride"]) for f in feats.feature_info]
        [(64, 2), (2048, 32)]
    """
    info = feature_info(model)
    indices = as_sequence(out_indices)
    if not indices or not all(is_int(i) and 0 <= i < len(info) for i in indices):
        raise ValueError(f"`out_indices` must be a non-empty sequence of indices in 0..{len(info) - 1} "
                         f"(0: stem, 1-4: blocks). Received: out_indices={out_indices!r}")
    chosen = [info[int(i)] for i in indices]
    features = keras.Model(model.input, [model.get_layer(f["name"]).output for f in chosen],
                           name=f"{model.name}_features")
    features.feature_info = chosen
    return features
