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

from keras_bit.layers import GN_GROUPS, GroupNormalization, StandardizedConv2D
from keras_bit.validation import check_positive_int

POOLINGS = (None, "avg", "max")
MIN_SIZE = 32
BLOCK_STRIDES = (1, 2, 2, 2)
STEM_STRIDE = 4  # the 7x7/2 convolution and the 3x3/2 max-pool
OUTPUT_STRIDES = (8, 16, 32)
DEFAULT_SIZE = 224
# BiT's layers are channels-last (HWIO checkpoints), whatever the global image_data_format.
DATA_FORMAT = "channels_last"


def check_architecture(block_units, width_factor, base_width, groups, output_stride=32):
    """Raises `ValueError` unless the arguments describe a buildable BiT ResNetV2."""
    if not isinstance(block_units, (tuple, list)) or len(block_units) != len(BLOCK_STRIDES):
        raise ValueError(
            "`block_units` must be a sequence of 4 positive integers (units per block). "
            f"Received: block_units={block_units!r}"
        )
    for units in block_units:
        check_positive_int(units, "block_units")
    for value, arg in ((width_factor, "width_factor"), (base_width, "base_width"), (groups, "groups")):
        check_positive_int(value, arg)
    if (base_width * width_factor) % groups:
        raise ValueError(
            f"GroupNorm needs channel counts divisible by `groups`: base_width * width_factor "
            f"= {base_width * width_factor} is not a multiple of groups={groups}."
        )
    if type(output_stride) is not int or output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"`output_stride` must be one of {OUTPUT_STRIDES}. Received: output_stride={output_stride!r}")


def check_input_shape(input_shape, include_top, default_size, channels=None):
    """The `(height, width, channels)` to build with; `channels` (e.g. 3 for pretrained weights) is enforced."""
    if input_shape is None:
        size = default_size if include_top else None
        return (size, size, channels or 3)
    if not isinstance(input_shape, (tuple, list)) or len(input_shape) != 3:
        raise ValueError(
            "`input_shape` must be a tuple of 3 values (height, width, channels), channels "
            f"last. Received: input_shape={input_shape!r}"
        )
    height, width, got = input_shape
    if channels is not None and got != channels:
        raise ValueError(
            f"Pretrained BiT weights expect {channels} input channels (RGB). "
            f"Received: input_shape={tuple(input_shape)!r}"
        )
    if isinstance(got, bool) or not isinstance(got, int) or got <= 0:
        raise ValueError(
            f"The channel count in `input_shape` must be a positive integer. "
            f"Received: input_shape={tuple(input_shape)!r}"
        )
    for dim in (height, width):
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < MIN_SIZE):
            raise ValueError(
                f"Input height and width must be None or integers >= {MIN_SIZE}. "
                f"Received: input_shape={tuple(input_shape)!r}"
            )
    return tuple(input_shape)


def check_head(include_top, pooling, classes, classifier_activation):
    """Validates the head arguments; returns `pooling` (None when the head ignores it)."""
    if not isinstance(include_top, bool):
        raise ValueError(f"`include_top` must be True or False. Received: include_top={include_top!r}")
    if pooling not in POOLINGS:
        raise ValueError(f"`pooling` must be one of {POOLINGS}. Received: pooling={pooling!r}")
    if include_top and pooling is not None:
        # keras.applications ignores `pooling` when the head is built; so do we, but say so.
        warnings.warn(
            f"`pooling={pooling!r}` is ignored with include_top=True (the head always average-pools).",
            stacklevel=3,
        )
        pooling = None
    if classes is not None:
        check_positive_int(classes, "classes")
    if classifier_activation is not None and not callable(classifier_activation):
        try:
            keras.activations.get(classifier_activation)
        except (ValueError, TypeError) as e:
            raise ValueError(
                "`classifier_activation` must be None, a callable or the name of a Keras "
                f"activation. Received: classifier_activation={classifier_activation!r}"
            ) from e
    return pooling


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
    classes=1000,
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
    function only builds. Arguments as in `keras_bit.ResNetV2`.

    Returns:
        A Functional `keras.Model`.

    Example:
        >>> build_resnet_v2((1, 1, 1, 1), base_width=32, groups=8, input_shape=(64, 64, 3), classes=10).output_shape
        (None, 10)
    """
    check_architecture(block_units, width_factor, base_width, groups, output_stride)
    pooling = check_head(include_top, pooling, classes, classifier_activation)
    check_positive_int(classes, "classes")
    input_shape = check_input_shape(input_shape, include_top, default_size)
    if input_tensor is None:
        inputs = keras.Input(shape=input_shape, name="images")
    elif keras.backend.is_keras_tensor(input_tensor):
        inputs = input_tensor
    else:
        inputs = keras.Input(tensor=input_tensor, shape=input_shape, name="images")
    x = _backbone(inputs, tuple(block_units), width_factor, base_width, groups, output_stride)
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
