"""BiT ResNetV2: one generic builder and the twelve named constructors.

The network follows the authors' TF2 code (big_transfer/bit_tf2/models.py)
exactly: pre-activation bottleneck units, GroupNorm + weight-standardized
convolutions, explicit symmetric zero padding (never `padding="same"`, which
pads asymmetrically, and never `-inf` padding for the max-pool), the stride on
the 3x3 convolution, and a zero-initialised head.

Reference:
    Kolesnikov et al., "Big Transfer (BiT): General Visual Representation
    Learning", https://arxiv.org/abs/1912.11370.
"""

import logging

import keras

from keras_bit import checkpoints, configs
from keras_bit.layers import GN_GROUPS, GroupNormalization, StandardizedConv2D
from keras_bit.validation import check_positive_int

logger = logging.getLogger("keras_bit")

POOLINGS = (None, "avg", "max")
MIN_SIZE = 32
BLOCK_STRIDES = (1, 2, 2, 2)
# BiT's layers are channels-last (HWIO checkpoints), whatever the global image_data_format.
DATA_FORMAT = "channels_last"
_DEFAULT = object()  # "the default weights of this family"


def _check_architecture(block_units, width_factor, base_width, groups):
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


def _check_activation(classifier_activation):
    if classifier_activation is not None and not callable(classifier_activation):
        try:
            keras.activations.get(classifier_activation)
        except (ValueError, TypeError) as e:
            raise ValueError(
                "`classifier_activation` must be None, a callable or the name of a Keras "
                f"activation. Received: classifier_activation={classifier_activation!r}"
            ) from e


def _check_pretrained_head_activation(classifier_activation):
    if keras.activations.get(classifier_activation) not in (
        keras.activations.get("softmax"),
        keras.activations.get(None),
    ):
        raise ValueError(
            "Only `None` and `softmax` activations are allowed for `classifier_activation` "
            "when the pretrained head is loaded (include_top=True with the checkpoint's "
            f"classes). Received: classifier_activation={classifier_activation!r}"
        )


def _resolve_input_shape(input_shape, include_top, default_size, pretrained):
    if input_shape is None:
        size = default_size if include_top else None
        return (size, size, 3)
    if not isinstance(input_shape, (tuple, list)) or len(input_shape) != 3:
        raise ValueError(
            "`input_shape` must be a tuple of 3 values (height, width, channels), channels "
            f"last. Received: input_shape={input_shape!r}"
        )
    height, width, channels = input_shape
    if pretrained and channels != 3:
        raise ValueError(
            "Pretrained BiT weights expect 3 input channels (RGB). "
            f"Received: input_shape={tuple(input_shape)!r}"
        )
    if isinstance(channels, bool) or not isinstance(channels, int) or channels <= 0:
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


def _unit(x, mid_channels, stride, prefix, groups):
    """One pre-activation bottleneck unit; layer names mirror the checkpoint scopes."""
    out_channels = 4 * mid_channels
    preact = GroupNormalization(groups, name=f"{prefix}_a_gn")(x)
    preact = keras.layers.ReLU(name=f"{prefix}_a_relu")(preact)
    shortcut = x
    if stride != 1 or x.shape[-1] != out_channels:
        # BiT projects the *pre-activated* input, not the raw one.
        shortcut = StandardizedConv2D(
            out_channels, 1, strides=stride, data_format=DATA_FORMAT, name=f"{prefix}_a_proj_conv"
        )(preact)
    y = StandardizedConv2D(mid_channels, 1, data_format=DATA_FORMAT, name=f"{prefix}_a_conv")(preact)
    y = GroupNormalization(groups, name=f"{prefix}_b_gn")(y)
    y = keras.layers.ReLU(name=f"{prefix}_b_relu")(y)
    y = keras.layers.ZeroPadding2D(1, data_format=DATA_FORMAT, name=f"{prefix}_b_pad")(y)
    y = StandardizedConv2D(
        mid_channels, 3, strides=stride, data_format=DATA_FORMAT, name=f"{prefix}_b_conv"
    )(y)
    y = GroupNormalization(groups, name=f"{prefix}_c_gn")(y)
    y = keras.layers.ReLU(name=f"{prefix}_c_relu")(y)
    y = StandardizedConv2D(out_channels, 1, data_format=DATA_FORMAT, name=f"{prefix}_c_conv")(y)
    return y, shortcut


def _backbone(x, block_units, width_factor, base_width, groups):
    root = base_width * width_factor
    x = keras.layers.ZeroPadding2D(3, data_format=DATA_FORMAT, name="root_block_pad")(x)
    x = StandardizedConv2D(root, 7, strides=2, data_format=DATA_FORMAT, name="root_block_conv")(x)
    # Zero padding, not -inf: the authors pad the pool input with zeros (PaddingFromKernelSize).
    x = keras.layers.ZeroPadding2D(1, data_format=DATA_FORMAT, name="root_block_pool_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, data_format=DATA_FORMAT, name="root_block_pool")(x)
    for b, (units, block_stride) in enumerate(zip(block_units, BLOCK_STRIDES), start=1):
        mid = root * 2 ** (b - 1)
        for u in range(1, units + 1):
            prefix = f"block{b}_unit{u:02d}"
            y, shortcut = _unit(x, mid, block_stride if u == 1 else 1, prefix, groups)
            add_name = f"block{b}_out" if u == units else f"{prefix}_add"
            x = keras.layers.Add(name=add_name)([y, shortcut])
    x = GroupNormalization(groups, name="post_gn")(x)
    return keras.layers.ReLU(name="post_relu")(x)


def _resolve_weights(weights, weights_table):
    """Returns `(source, checkpoint_classes, resolution)` without downloading anything."""
    if weights is None:
        return None, None, None
    if isinstance(weights, str) and weights in weights_table:
        weights = weights_table[weights]
    if isinstance(weights, configs.Checkpoint):
        return weights, weights.classes, weights.resolution
    known = ", ".join(repr(name) for name in (None, *weights_table))
    if weights_table:
        known += f", {configs.VTAB_HELP}"
    if not isinstance(weights, (str, bytes)) and not hasattr(weights, "__fspath__"):
        raise ValueError(
            f"`weights` must be one of {known}, a `keras_bit.configs.Checkpoint`, or the path to an "
            f"official-layout .npz or a Keras .weights.h5 file. Received: weights={weights!r}"
        )
    path = checkpoints.check_weights_path(weights, known)
    return path, checkpoints.head_classes(path), None


def check_weights(model_name, weights):
    """Raises `ValueError` unless `weights` is valid for the named model; downloads nothing.

    Example:
        >>> check_weights("BiT-M-R50x1", "imagenet21k")
    """
    configs.split_model_name(model_name)
    if weights is not None:
        _resolve_weights(configs.vtab_checkpoint(model_name, weights) or weights, configs.CHECKPOINTS[model_name])


def ResNetV2(
    block_units=(3, 4, 6, 3),
    width_factor=1,
    include_top=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=None,
    classifier_activation="softmax",
    name="bit_resnetv2",
    *,
    base_width=64,
    groups=GN_GROUPS,
    default_size=configs.UPSTREAM_RESOLUTION,
    weights_table=None,
    cache_dir=None,
):
    """Builds a BiT ResNetV2 of any depth and width (the generic builder).

    The named constructors (`BiTM_R50x1`, ...) call this with a row of
    `configs.ARCHITECTURES`; call it directly for custom (e.g. tiny) networks.
    All arguments are validated before anything is built or downloaded.

    Args:
        block_units: 4 ints, units per block: (3, 4, 6, 3) is R50.
        width_factor: int, the "x1"/"x3" multiplier of every width.
        include_top: bool, whether to add GN-ReLU-pool-Dense classification head.
        weights: None (random init), a name from `weights_table`, a
            `configs.Checkpoint`, or the path to an official-layout `.npz` or
            a Keras `.weights.h5` file.
        input_tensor: optional Keras tensor to use as the input.
        input_shape: optional `(height, width, channels)`; height/width may
            be None (any size >= 32). Defaults to the checkpoint's resolution
            (square) with the head, and `(None, None, 3)` without.
        pooling: with `include_top=False`, None (4D feature map), "avg" or "max".
        classes: int, head size. None means the checkpoint's class count
            (1000 without weights). A count different from the checkpoint's
            loads the backbone and builds a new zero-initialised head (the BiT
            fine-tuning recipe).
        classifier_activation: activation of the head (str, callable or None).
        name: model name.
        base_width: int, root width before `width_factor` (64 in BiT).
        groups: int, GroupNorm groups (32 in BiT).
        default_size: int, input size when the head is used and neither
            `input_shape` nor the checkpoint gives one.
        weights_table: dict of weights name -> `configs.Checkpoint`.
        cache_dir: where downloaded checkpoints are cached (default: the
            Keras cache, `$KERAS_HOME` or `~/.keras`).

    Returns:
        A `keras.Model`.

    Reference:
        BiT, https://arxiv.org/abs/1912.11370.

    Example:
        >>> tiny = ResNetV2((1, 1, 1, 1), base_width=32, groups=8, weights=None,
        ...                 input_shape=(64, 64, 3), classes=10)
        >>> tiny.output_shape
        (None, 10)
    """
    weights_table = weights_table or {}
    _check_architecture(block_units, width_factor, base_width, groups)
    if not isinstance(include_top, bool):
        raise ValueError(f"`include_top` must be True or False. Received: include_top={include_top!r}")
    if pooling not in POOLINGS:
        raise ValueError(
            f"`pooling` must be one of {POOLINGS}. Received: pooling={pooling!r}"
        )
    if include_top and pooling is not None:
        raise ValueError(
            "`pooling` is only used with include_top=False (the head always average-pools). "
            f"Received: pooling={pooling!r} with include_top=True"
        )
    if classes is not None:
        check_positive_int(classes, "classes")
    _check_activation(classifier_activation)
    source, checkpoint_classes, resolution = _resolve_weights(weights, weights_table)
    input_shape = _resolve_input_shape(
        input_shape, include_top, resolution or default_size, pretrained=source is not None
    )

    def plan_head(checkpoint_classes):
        head_classes = classes or checkpoint_classes or configs.IMAGENET_CLASSES
        load_head = include_top and checkpoint_classes is not None and head_classes == checkpoint_classes
        if load_head:
            _check_pretrained_head_activation(classifier_activation)
        return head_classes, load_head

    head_classes, load_head = plan_head(checkpoint_classes)  # checked before any download
    if isinstance(source, configs.Checkpoint):
        source = checkpoints.fetch(source, cache_dir)  # before building: fail fast when offline
        if checkpoint_classes is None:  # e.g. VTAB releases: the head size is in the file
            checkpoint_classes = checkpoints.head_classes(source)
            head_classes, load_head = plan_head(checkpoint_classes)

    if input_tensor is None:
        inputs = keras.Input(shape=input_shape, name="images")
    elif keras.backend.is_keras_tensor(input_tensor):
        inputs = input_tensor
    else:
        inputs = keras.Input(tensor=input_tensor, shape=input_shape, name="images")
    x = _backbone(inputs, tuple(block_units), width_factor, base_width, groups)
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(data_format=DATA_FORMAT, name="avg_pool")(x)
        policy = keras.config.dtype_policy()
        # Keep class scores in float32 under mixed precision (Keras' mixed-precision guidance).
        head_dtype = "float32" if policy.compute_dtype != policy.variable_dtype else None
        x = keras.layers.Dense(
            head_classes,
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
    model = keras.Model(model_inputs, x, name=name)

    if source is not None:
        checkpoints.load_weights(model, source, load_head=load_head)
        if include_top and not load_head:
            logger.warning(
                "Loaded the backbone of %s; the head is new and zero-initialised with %d classes "
                "(the checkpoint has %s).", source, head_classes, checkpoint_classes or "no head",
            )
    return model


def BiT(
    model_name,
    include_top=True,
    weights=_DEFAULT,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=None,
    classifier_activation="softmax",
    name=None,
    *,
    cache_dir=None,
):
    """Builds a named BiT model, e.g. `BiT("BiT-M-R50x1", weights="imagenet21k")`.

    Takes the arguments of the named constructors (see `BiTM_R50x1`) after
    `model_name`, one of `configs.MODEL_NAMES`; `weights` defaults to the
    family's upstream checkpoint ("imagenet" for BiT-S, "imagenet21k" for BiT-M).
    """
    family, arch_name = configs.split_model_name(model_name)
    arch = configs.ARCHITECTURES[arch_name]
    if weights is _DEFAULT:
        weights = configs.FAMILIES[family]
    weights = configs.vtab_checkpoint(model_name, weights) or weights
    return ResNetV2(
        arch.block_units,
        arch.width_factor,
        include_top=include_top,
        weights=weights,
        input_tensor=input_tensor,
        input_shape=input_shape,
        pooling=pooling,
        classes=classes,
        classifier_activation=classifier_activation,
        name=name or model_name.lower().replace("-", "_"),
        weights_table=configs.CHECKPOINTS[model_name],
        cache_dir=cache_dir,
    )


BASE_DOCSTRING = """Instantiates the {model_name} architecture ({upstream}).

    ResNetV2 ({depth} layers, width x{width}) with GroupNorm and weight-
    standardized convolutions, as in Big Transfer.

    Reference:
        Kolesnikov et al., "Big Transfer (BiT): General Visual Representation
        Learning", https://arxiv.org/abs/1912.11370.

    Inputs are RGB images preprocessed with `keras_bit.preprocess_input`
    (pixels in [0, 255] -> [-1, 1]).

    Args:
        include_top: whether to include the GN-ReLU-avg-pool-Dense head.
        weights: None (random initialisation), {weights_names}, a VTAB-1k
            fine-tuned release as "vtab/<task>" or "vtab/<task>/run<k>", or
            the path to an official-layout `.npz` or a Keras `.weights.h5`
            file. Defaults to "{default}".
        input_tensor: optional Keras tensor (output of `keras.Input()`).
        input_shape: optional `(height, width, 3)`; height and width may be
            None, else >= 32. Defaults to the checkpoint's resolution with the
            head and `(None, None, 3)` without.
        pooling: with `include_top=False`: None (4D block-4 features), "avg"
            or "max" (2D features).
        classes: head size. None means the checkpoint's class count (1000
            without weights). Any other count loads the backbone and builds a
            zero-initialised head, as BiT fine-tuning does.
        classifier_activation: head activation (str or callable, or None for
            logits). Only None or "softmax" with the pretrained head.
        name: model name.

    Returns:
        A Functional `keras.Model`.

    Example:
        >>> model = keras_bit.{function}(weights=None, classes=10)
        >>> model.output_shape
        (None, 10)
"""


def _named_constructor(model_name):
    family, arch_name = configs.split_model_name(model_name)
    default = configs.FAMILIES[family]

    def constructor(
        include_top=True,
        weights=default,
        input_tensor=None,
        input_shape=None,
        pooling=None,
        classes=None,
        classifier_activation="softmax",
        name=None,
    ):
        return BiT(
            model_name,
            include_top=include_top,
            weights=weights,
            input_tensor=input_tensor,
            input_shape=input_shape,
            pooling=pooling,
            classes=classes,
            classifier_activation=classifier_activation,
            name=name,
        )

    arch = configs.ARCHITECTURES[arch_name]
    constructor.__name__ = constructor.__qualname__ = model_name.replace("-", "", 1).replace("-", "_")
    constructor.__doc__ = BASE_DOCSTRING.format(
        model_name=model_name,
        upstream="ImageNet-21k" if family == "BiT-M" else "ILSVRC-2012",
        depth=arch_name[1:].split("x")[0],
        width=arch.width_factor,
        weights_names=", ".join(f'"{w}"' for w in configs.CHECKPOINTS[model_name]),
        default=default,
        function=constructor.__name__,
    )
    constructor.__module__ = __name__
    return constructor


BiTS_R50x1 = _named_constructor("BiT-S-R50x1")
BiTS_R50x3 = _named_constructor("BiT-S-R50x3")
BiTS_R101x1 = _named_constructor("BiT-S-R101x1")
BiTS_R101x3 = _named_constructor("BiT-S-R101x3")
BiTS_R152x2 = _named_constructor("BiT-S-R152x2")
BiTS_R152x4 = _named_constructor("BiT-S-R152x4")
BiTM_R50x1 = _named_constructor("BiT-M-R50x1")
BiTM_R50x3 = _named_constructor("BiT-M-R50x3")
BiTM_R101x1 = _named_constructor("BiT-M-R101x1")
BiTM_R101x3 = _named_constructor("BiT-M-R101x3")
BiTM_R152x2 = _named_constructor("BiT-M-R152x2")
BiTM_R152x4 = _named_constructor("BiT-M-R152x4")


def feature_model(model, block_names=("block1_out", "block2_out", "block3_out", "block4_out")):
    """Returns a model that emits the outputs of BiT's four blocks (multi-scale features).

    Like Hugging Face's `BitBackbone`: for detection or segmentation necks.
    Block outputs are the raw residual sums (pre-activation networks normalise
    at the start of the next unit), at strides 4, 8, 16 and 32.

    Args:
        model: a keras_bit model (any `include_top`).
        block_names: names of the layers to emit, in order.

    Returns:
        A `keras.Model` sharing `model`'s weights, with one output per name.

    Example:
        >>> feats = feature_model(keras_bit.BiTM_R50x1(weights=None, include_top=False))
        >>> [tuple(o.shape) for o in feats.outputs][0]
        (None, None, None, 256)
    """
    names = {layer.name for layer in model.layers}
    missing = [n for n in block_names if n not in names]
    if missing:
        raise ValueError(
            f"`model` has no layer named {missing}; expected a keras_bit model with layers "
            f"{list(block_names)}. Received: model={model.name!r}"
        )
    outputs = [model.get_layer(n).output for n in block_names]
    return keras.Model(model.input, outputs, name=f"{model.name}_features")
