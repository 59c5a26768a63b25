"""Input preprocessing for BiT: pixels in [0, 255] to [-1, 1]."""

import warnings

import keras
import numpy as np
from keras import ops

PIXEL_RANGE = (0, 255)


def preprocess_input(x, data_format=None):
    """Maps images with pixels in [0, 255] to [-1, 1] (`x / 127.5 - 1`), as BiT does.

    Unlike `keras.applications.resnet_v2.preprocess_input`, the input is never
    modified in place, and integer (e.g. uint8) NumPy arrays and tensors are
    accepted.

    The contract is uint8, or integers or floats in [0, 255]. Booleans,
    strings, objects and complex numbers are refused (`TypeError`) for arrays
    and tensors alike. NumPy input (and anything NumPy converts: lists, PIL
    images) is also checked by value, which costs one min/max pass:
    integers outside [0, 255] (16-bit images, negative values) and NaN or
    infinite floats raise `ValueError`; finite floats outside [0, 255] (e.g.
    data already in [-1, 1], or a resampler's overshoot) give a warning.
    Tensors are not checked by value: symbolic ones cannot be, and reading
    an eager one back would stall the device on every call.

    Args:
        x: NumPy array, tensor or Keras tensor of RGB images, any shape.
        data_format: accepted for keras.applications compatibility; the
            mapping is per pixel, so the layout does not matter.

    Returns:
        A float array/tensor (`keras.config.floatx()` for integer input, else
        the input's float dtype) of the same shape.

    Raises:
        TypeError: `x` does not hold real numbers.
        ValueError: NumPy integers outside [0, 255], or NaN / infinite floats.

    Example:
        >>> preprocess_input(np.array([0, 127.5, 255], "float32"))
        array([-1.,  0.,  1.], dtype=float32)
    """
    del data_format
    if ops.is_tensor(x) or keras.backend.is_keras_tensor(x):
        _check_dtype(keras.backend.standardize_dtype(x.dtype), x)
        if "float" not in keras.backend.standardize_dtype(x.dtype):
            x = ops.cast(x, keras.config.floatx())
        return x / 127.5 - 1.0
    try:
        x = np.asarray(x)
    except (ValueError, TypeError) as e:  # e.g. a ragged list
        raise ValueError(f"`preprocess_input` could not make an array of `x` ({e})") from e
    _check_dtype(x.dtype.name, x)
    _check_values(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(keras.config.floatx())
    return x / x.dtype.type(127.5) - x.dtype.type(1.0)


def _check_dtype(dtype, x):
    if not any(dtype.startswith(kind) for kind in ("uint", "int", "float", "bfloat")):
        raise TypeError(
            "`preprocess_input` expects images of real pixel values (uint8, or integers / floats in [0, 255]). "
            f"Received: x of dtype {dtype} (shape {tuple(x.shape)}); convert it, e.g. np.asarray(x, 'float32')."
        )


def _check_values(x):
    if x.size == 0 or x.dtype == np.uint8:
        return
    low, high = x.min(), x.max()  # NaN propagates into both
    if np.issubdtype(x.dtype, np.integer):
        if low < PIXEL_RANGE[0] or high > PIXEL_RANGE[1]:
            raise ValueError(
                f"`preprocess_input` maps pixels in [0, 255] to [-1, 1]; this {x.dtype} input holds values in "
                f"[{low}, {high}]: "
                + ("negative values are not pixels." if low < 0 else "convert 16-bit images to 8 bits first "
                   "(x // 257) or to floats in [0, 255] (x / 257).")
            )
    elif not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError(
            f"`preprocess_input` received non-finite pixels (NaN or infinity) in a {x.dtype} input: one would "
            "make the whole image's output NaN."
        )
    elif low < PIXEL_RANGE[0] or high > PIXEL_RANGE[1]:
        warnings.warn(
            f"`preprocess_input` maps pixels in [0, 255] to [-1, 1]; this input holds values in [{low:g}, "
            f"{high:g}]: is it already preprocessed (e.g. in [-1, 1]) or 16-bit? Small overshoots from a "
            "bicubic resize are harmless.",
            stacklevel=3,
        )
