"""Input preprocessing for BiT: pixels in [0, 255] to [-1, 1]."""

import keras
import numpy as np
from keras import ops


def preprocess_input(x, data_format=None):
    """Maps images with pixels in [0, 255] to [-1, 1] (`x / 127.5 - 1`), as BiT does.

    Unlike `keras.applications.resnet_v2.preprocess_input`, the input is never
    modified in place, and integer (e.g. uint8) NumPy arrays and tensors are
    accepted.

    Args:
        x: NumPy array, tensor or Keras tensor of RGB images, any shape.
        data_format: accepted for keras.applications compatibility; the
            mapping is per pixel, so the layout does not matter.

    Returns:
        A float array/tensor (`keras.config.floatx()` for integer input, else
        the input's float dtype) of the same shape.

    Example:
        >>> preprocess_input(np.array([0, 127.5, 255], "float32"))
        array([-1.,  0.,  1.], dtype=float32)
    """
    del data_format
    if isinstance(x, (np.ndarray, np.generic, list, tuple, int, float)):
        x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(keras.config.floatx())
        return x / x.dtype.type(127.5) - x.dtype.type(1.0)
    if "float" not in keras.backend.standardize_dtype(x.dtype):
        x = ops.cast(x, keras.config.floatx())
    return x / 127.5 - 1.0
