"""BiT models with weights: resolve the weights, build the architecture (`resnet_v2`), load.

`ResNetV2` (any depth and width) and `BiT(model_name)` with its twelve named
constructors (`BiTM_R50x1`, ...) take the `keras.applications` arguments and
`weights=`: a published name (`keras_bit.presets()`), an `hf://` Hub handle,
or a local file. Every argument is checked before anything is downloaded or
built.

Reference:
    Kolesnikov et al., "Big Transfer (BiT): General Visual Representation
    Learning", https://arxiv.org/abs/1912.11370.
"""

import logging
import os

import keras

from keras_bit import io, presets
from keras_bit.layers import GN_GROUPS
from keras_bit.models import resnet_v2
from keras_bit.validation import check_name, check_positive_int
from keras_bit.weights import keras_h5, sources

logger = logging.getLogger("keras_bit")

_DEFAULT = object()  # "the default weights of this family"


AUTO = "auto"  # `classifier_activation`'s default: the checkpoint's own
_LOADED_HEAD_ACTIVATIONS = ("softmax", "sigmoid", None)


def checkpoint_activation(source):
    """The activation a checkpoint's head was trained with, which is what its scores mean.

    A preset records it ("sigmoid" for the ImageNet-21k upstream heads, the
    labels being multi-label; "softmax" for ILSVRC-2012 and VTAB). For a file
    or Hub handle that is no preset, a 21,843-class head is an ImageNet-21k
    upstream head (sigmoid); any other is taken as single-label (softmax).
    """
    if source.preset is not None:
        return source.preset.head_activation
    return "sigmoid" if source.classes == presets.IMAGENET21K_CLASSES else "softmax"


def _is_auto(classifier_activation):
    return isinstance(classifier_activation, str) and classifier_activation == AUTO


def _same_activation(a, b):
    return keras.activations.get(a) is keras.activations.get(b)


def _head_activation(classifier_activation, source, load_head, explain):
    """The head's activation: `"auto"` resolved, a loaded head's choice checked (and explained when it differs)."""
    own = checkpoint_activation(source) if load_head else "softmax"
    if _is_auto(classifier_activation):
        return own
    if not load_head:
        return classifier_activation
    if not any(_same_activation(classifier_activation, a) for a in _LOADED_HEAD_ACTIVATIONS):
        raise ValueError(
            f"With the pretrained head loaded (include_top=True with the checkpoint's classes), "
            f"`classifier_activation` must be 'auto' (the checkpoint's own: {own!r}), 'softmax', 'sigmoid' or "
            f"None (logits). Received: classifier_activation={classifier_activation!r}")
    if explain and classifier_activation is not None and not _same_activation(classifier_activation, own):
        logger.warning(
            "The head of %s was trained with %s (%s); classifier_activation=%r gives scores of another kind "
            "(the ranking is the same). Pass classifier_activation='auto' for the checkpoint's own.",
            source.spec, own, "one binary classifier per label" if own == "sigmoid" else "one label per image",
            classifier_activation)
    return classifier_activation


def _plan_head(include_top, classes, source, classifier_activation, explain=False):
    """`(head size, whether the file's head is loaded, the head's activation)`.

    A class count different from the checkpoint's means a new zero head,
    softmax under "auto" (fine-tuning is single-label).
    """
    source_classes = source.classes if source is not None else None
    head_classes = classes or source_classes or presets.IMAGENET_CLASSES
    load_head = include_top and source_classes is not None and head_classes == source_classes
    activation = _head_activation(classifier_activation, source, load_head, explain)
    if include_top:
        resnet_v2.check_one_class_head(head_classes, activation, load_head)  # a one-class checkpoint
    return head_classes, load_head, activation


def ResNetV2(
    block_units=(3, 4, 6, 3),
    width_factor=1,
    include_top=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=None,
    classifier_activation=AUTO,
    name="bit_resnetv2",
    *,
    base_width=64,
    groups=GN_GROUPS,
    output_stride=32,
    default_size=presets.UPSTREAM_RESOLUTION,
    cache_dir=None,
    model_name=None,
):
    """Builds a BiT ResNetV2 of any depth, width and output stride, with weights.

    The named constructors (`BiTM_R50x1`, ...) call this with a row of
    `presets.ARCHITECTURES`; call it directly for custom (e.g. tiny) networks.
    All arguments are validated before anything is built or downloaded.
    Integers may be Python or NumPy ones (never bools), sequences any
    ordered kind (tuple, list, range, 1-D array), as Keras takes them.

    Args:
        block_units: 4 ints, units per block: (3, 4, 6, 3) is R50 (at most
            1000 units in all).
        width_factor: int, the "x1"/"x3" multiplier of every width.
        include_top: bool, whether to add the GN-ReLU-pool-Dense head.
        weights: None (random init), a published name for `model_name`
            (see `keras_bit.presets()`), an `hf://<owner>/<repo>[@revision]`
            Hub handle (timm or transformers BiT), or the path to an
            official-layout `.npz`, a Keras `.weights.h5` or a timm /
            transformers `.safetensors` file.
        input_tensor: optional Keras tensor to use as the input.
        input_shape: optional `(height, width, channels)`; height/width may
            be None (any size >= 32). Defaults to the checkpoint's resolution
            (square) with the head, and `(None, None, 3)` without.
        pooling: with `include_top=False`, None (4D feature map), "avg" or
            "max"; ignored with a warning when `include_top=True`.
        classes: int, head size. None means the checkpoint's class count
            (1000 without weights). A count different from the checkpoint's
            loads the backbone and builds a new zero-initialised head (the BiT
            fine-tuning recipe). Refused with `include_top=False` (there is
            no head to size) and, with softmax, for 1 class (always 1.0).
            A variable beyond 2**31 weights is refused before allocation.
        classifier_activation: activation of the head (str, callable or
            None for logits). "auto" (the default) is the checkpoint's own
            with its head loaded (see `checkpoint_activation`: sigmoid for
            the ImageNet-21k heads, softmax for ILSVRC-2012 and VTAB) and
            softmax for a new head. A loaded head takes "auto", "softmax",
            "sigmoid" or None; one that differs from the checkpoint's is
            logged.
        name: model name (a non-empty string without "/").
        base_width: int, root width before `width_factor` (64 in BiT).
        groups: int, GroupNorm groups (32 in BiT).
        output_stride: 32 (classification), 16 or 8: the later blocks trade
            stride for dilation (dense prediction); same weights.
        default_size: int, input size when the head is used and neither
            `input_shape` nor the checkpoint gives one.
        cache_dir: where bucket downloads are cached (default: `$KERAS_HOME`
            or `~/.keras`); Hub files use the Hugging Face cache.
        model_name: the BiT name whose published weights names apply.

    Returns:
        A `keras.Model`.

    Reference:
        BiT, https://arxiv.org/abs/1912.11370.

    Example:
        >>> tiny = ResNetV2((1, 1, 1, 1), base_width=32, groups=8, input_shape=(64, 64, 3), classes=10)
        >>> tiny.output_shape
        (None, 10)
    """
    *architecture, output_stride = resnet_v2.check_architecture_args(
        block_units, width_factor, base_width, groups, output_stride)  # plain ints from here on
    units, width_factor, base_width, groups = architecture
    include_top, pooling, classes = resnet_v2.check_head(  # "auto" is resolved once the checkpoint is known
        include_top, pooling, classes, None if _is_auto(classifier_activation) else classifier_activation)
    name = check_name(name)
    default_size = check_positive_int(default_size, "default_size")
    source = sources.resolve_source(weights, model_name)  # names, handles and files checked; nothing downloaded
    channels = 3 if source is not None else None
    shape = resnet_v2.check_input_shape(input_shape, include_top, default_size, channels)
    resnet_v2.check_sizes(width_factor, base_width, shape[-1], classes)
    if source is not None and source.hub is None and (source.classes is not None or source.preset is None):
        _plan_head(include_top, classes, source, classifier_activation)  # before any download
    if source is not None:
        source = sources.fetch(source, cache_dir, tuple(architecture))  # before building: fail fast when offline
    head_classes, load_head, classifier_activation = _plan_head(
        include_top, classes, source, classifier_activation, explain=True)
    size = (source and source.resolution) or default_size
    model = resnet_v2.build_resnet_v2(
        units, width_factor, include_top=include_top, input_tensor=input_tensor,
        input_shape=resnet_v2.check_input_shape(input_shape, include_top, size, channels),
        pooling=pooling, classes=head_classes if include_top else None, classifier_activation=classifier_activation,
        name=name, base_width=base_width, groups=groups, output_stride=output_stride,
    )
    if source is not None:
        sources.load_source(model, source, load_head)
        if include_top and not load_head:
            logger.warning(
                "Loaded the backbone of %s; the head is new and zero-initialised with %d classes "
                "(the checkpoint has %s).", source.spec, head_classes, source.classes or "no head",
            )
    return model


def check_weights(model_name, weights):
    """Raises `ValueError` unless `weights` is valid for the named model; downloads nothing.

    Example:
        >>> check_weights("BiT-M-R50x1", "imagenet21k")
    """
    presets.split_model_name(model_name)
    sources.resolve_source(weights, model_name)


def BiT(
    model_name,
    include_top=True,
    weights=_DEFAULT,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=None,
    classifier_activation=AUTO,
    name=None,
    *,
    output_stride=32,
    cache_dir=None,
):
    """Builds a named BiT model, e.g. `BiT("BiT-M-R50x1", weights="imagenet21k")`.

    Takes the arguments of the named constructors (see `BiTM_R50x1`) after
    `model_name`, one of `presets.MODEL_NAMES`; `weights` defaults to the
    family's upstream checkpoint ("imagenet" for BiT-S, "imagenet21k" for BiT-M).
    """
    family, arch_name = presets.split_model_name(model_name)
    arch = presets.ARCHITECTURES[arch_name]
    if weights is _DEFAULT:
        weights = presets.FAMILIES[family]
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
        output_stride=output_stride,
        cache_dir=cache_dir,
        model_name=model_name,
    )


def convert(weights, output_path, model_name, overwrite=False):
    """Converts any loadable weights (a published name, `hf://` handle or file) to a Keras `.weights.h5`.

    Args:
        weights: what `BiT(model_name, weights=...)` accepts, e.g.
            "BiT-M-R50x1.npz" or "hf://timm/resnetv2_50x1_bit.goog_in21k".
        output_path: destination, ending in `.weights.h5`.
        model_name: the architecture, e.g. "BiT-M-R50x1".
        overwrite: replace an existing `output_path` (otherwise refused
            before anything is fetched).

    Returns:
        The built `keras.Model` holding the converted weights.

    Example:
        >>> convert("BiT-M-R50x1.npz", "bit_m_r50x1.weights.h5", "BiT-M-R50x1")
    """
    output_path = os.fspath(output_path)
    if not output_path.endswith(keras_h5.SUFFIX):
        raise ValueError(f"`output_path` must end with {keras_h5.SUFFIX!r}. Received: output_path={output_path!r}")
    folder = os.path.dirname(os.path.abspath(output_path))
    if not os.path.isdir(folder):
        raise ValueError(f"The folder of `output_path` does not exist: {folder}")
    if os.path.lexists(output_path) and not overwrite:
        raise FileExistsError(f"{output_path} already exists; pass overwrite=True (--overwrite) to replace it")
    _, arch_name = presets.split_model_name(model_name)
    source = sources.resolve_source(weights, model_name)
    if source is None:
        raise ValueError("`weights` must name the weights to convert. Received: weights=None")
    # The files first: whether there is a head to convert is known only from them.
    source = sources.fetch(source, architecture=presets.ARCHITECTURES[arch_name].spec)
    model = BiT(model_name, include_top=source.classes is not None, weights=source.path, input_shape=(None, None, 3))
    with io.atomic_path(output_path) as tmp:  # an interrupted conversion leaves no half file
        model.save_weights(tmp)
    return model


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
        weights: None (random initialisation), {weights_names}{vtab}, an
            `hf://<owner>/<repo>[@revision]` Hub handle (timm or transformers
            BiT safetensors), or the path to an official-layout `.npz`, a
            Keras `.weights.h5` or a timm / transformers `.safetensors` file.
            `keras_bit.presets()` lists every published name. Defaults to
            "{default}".
        input_tensor: optional Keras tensor (output of `keras.Input()`).
        input_shape: optional `(height, width, 3)`; height and width may be
            None, else >= 32. Defaults to the checkpoint's resolution with the
            head and `(None, None, 3)` without.
        pooling: with `include_top=False`: None (4D block-4 features), "avg"
            or "max" (2D features).
        classes: head size. None means the checkpoint's class count (1000
            without weights). Any other count loads the backbone and builds a
            zero-initialised head, as BiT fine-tuning does. Needs the head
            (include_top=True); 1 class needs "sigmoid" or None, not softmax.
        classifier_activation: head activation (str or callable, or None for
            logits). "auto" (default): the checkpoint's own with its head
            loaded ({default_activation} for "{default}": {default_meaning}),
            softmax for a new head. A loaded head takes "auto", "softmax",
            "sigmoid" or None.
        name: model name.
        output_stride: 32, 16 or 8 (keyword only): dilate the later blocks
            instead of striding them, for dense prediction.

    Returns:
        A Functional `keras.Model`.

    Example:
        >>> model = keras_bit.{function}(weights=None, classes=10)
        >>> model.output_shape
        (None, 10)
"""


def _named_constructor(model_name):
    family, arch_name = presets.split_model_name(model_name)
    default = presets.FAMILIES[family]

    def constructor(
        include_top=True,
        weights=default,
        input_tensor=None,
        input_shape=None,
        pooling=None,
        classes=None,
        classifier_activation=AUTO,
        name=None,
        *,
        output_stride=32,
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
            output_stride=output_stride,
        )

    arch = presets.ARCHITECTURES[arch_name]
    constructor.__name__ = constructor.__qualname__ = model_name.replace("-", "", 1).replace("-", "_")
    constructor.__doc__ = BASE_DOCSTRING.format(
        model_name=model_name,
        upstream="ImageNet-21k" if family == "BiT-M" else "ILSVRC-2012",
        depth=arch_name[1:].split("x")[0],
        width=arch.width_factor,
        weights_names=", ".join(f'"{w}"' for w in presets.weights_names(model_name, fold=True)
                               if not w.startswith("vtab/")),
        default=default,
        default_activation=presets.PRESETS[(model_name, default)].head_activation,
        default_meaning=("one binary classifier per label, ImageNet-21k being multi-label"
                         if presets.PRESETS[(model_name, default)].head_activation == "sigmoid"
                         else "one label per image"),
        vtab=', a VTAB-1k release "vtab/<task>" or "vtab/<task>/run<k>"' if model_name in presets.VTAB_MODELS else "",
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
