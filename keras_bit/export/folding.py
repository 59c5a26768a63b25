"""Folding weight standardization into plain convolutions: BiT's inference graph, for every export.

A StandardizedConv2D recomputes its kernel's moments on every call; the
exported network stores the standardized kernels instead (same function up
to float rounding), optionally in another dtype.
"""

import keras

from keras_bit.layers import StandardizedConv2D, standardize_kernel

FOLD_DTYPES = (None, "bfloat16", "float32")


def fold_standardization(model, dtype=None):
    """A copy of `model` whose StandardizedConv2D layers are plain Conv2D with standardized kernels.

    The copy computes the same function (up to float rounding) without
    recomputing kernel moments on every call: the inference graph of BiT.

    Args:
        model: a keras_bit model (any dtype policy).
        dtype: None keeps each layer's dtype policy. "bfloat16" stores every
            weight as bfloat16 and computes in it (GroupNorm statistics still
            in float32), except a layer named "head", kept float32 as under
            mixed precision: no float32 -> bfloat16 cast of every kernel on
            every call, as `mixed_bfloat16` does, and half the memory.
            "float32": every layer stores and computes in float32 (a model
            built or fine-tuned under a mixed-precision policy, for runtimes
            without bfloat16 / float16 kernels).

    Example:
        >>> fast = fold_standardization(keras_bit.BiTS_R50x1(weights=None), dtype="bfloat16")
    """
    if dtype not in FOLD_DTYPES:
        raise ValueError(f"`dtype` must be one of {FOLD_DTYPES}. Received: dtype={dtype!r}")

    def clone(layer):
        config = layer.get_config()
        if (dtype == "float32" or dtype is not None and layer.name != "head") and not isinstance(
                layer, keras.layers.InputLayer):
            config["dtype"] = dtype
        if isinstance(layer, StandardizedConv2D):
            config.pop("epsilon")
            return keras.layers.Conv2D.from_config(config)
        return layer.__class__.from_config(config)

    folded = keras.models.clone_model(model, clone_function=clone)
    for source, target in zip(model.layers, folded.layers):
        weights = source.get_weights()
        if isinstance(source, StandardizedConv2D):
            weights[0] = keras.ops.convert_to_numpy(standardize_kernel(weights[0], source.epsilon))
        target.set_weights(weights)
    return folded
