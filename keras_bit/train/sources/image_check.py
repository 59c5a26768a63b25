"""Every file of an image folder checked once before training: a regular file, within `max_pixels`, decodable.

PIL's `verify()` reads headers only, so a truncated JPEG passes it and then
fails training at the same step on every run; here each file is decoded in
full, once, by TensorFlow. The decoder is the bounded one of `keras-bit
predict` and serving (`keras_bit.export.image_decode`): the size is read from
the header first, so an image over `max_pixels` (a 20000 x 20000 PNG is a few
MB on disk and 1.2 GB decoded) is refused before the decoder allocates
anything, and a FIFO or device (which `tf.io.read_file` would read forever) is
refused before it is opened. A file that fails is reported in the words of
`keras-bit predict` (`keras_bit.predict.decode_file`).
"""

import os
import re
import stat

import numpy as np

from keras_bit.backend import tensorflow as _tensorflow
from keras_bit.console import native_stderr_silenced
from keras_bit.export import image_decode

tf = _tensorflow("Fine-tuning")

DEFAULT_MAX_PIXELS = image_decode.DEFAULT_MAX_PIXELS


def check_images(paths, max_pixels=DEFAULT_MAX_PIXELS):
    """Decodes every image file once, fully, within `max_pixels`.

    Args:
        paths: sequence of file paths.
        max_pixels: int, the largest `height * width` decoded.

    Returns:
        `(sizes, problems)`: `(N, 2)` int64 array of the decoded (height,
        width), -1 where the file cannot be used, and a dict `path -> reason`
        for those files, in the order of `paths`.
    """
    paths = [str(p) for p in paths]
    sizes = np.full((len(paths), 2), -1, np.int64)
    readable = [i for i, path in enumerate(paths) if _may_read(path, max_pixels)]
    if readable:
        index = np.array(readable, np.int64)
        ds = tf.data.Dataset.from_tensor_slices((index, tf.constant(np.asarray(paths)[index])))
        # The decoder is plain graph code (tf.cond, tf.while_loop): AutoGraph would only triple the tracing time.
        decoded = tf.autograph.experimental.do_not_convert(
            lambda i, path: (i, tf.shape(image_decode.decode(tf.io.read_file(path), max_pixels), tf.int64)[:2]))
        ds = ds.map(decoded, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
        with native_stderr_silenced():  # libjpeg prints its own line for a broken JPEG; the file is named instead
            for i, hw in ds.ignore_errors().batch(1024).as_numpy_iterator():
                sizes[i] = hw
    return sizes, {path: _reason(path, max_pixels) for path, hw in zip(paths, sizes) if hw[0] < 0}


def _may_read(path, max_pixels):
    """Whether `path` is a regular file small enough to be read whole (links are followed)."""
    try:
        info = os.stat(path)
    except OSError:
        return False
    # As `keras-bit predict`: no image of max_pixels needs more than 8 bytes a pixel (16-bit RGBA, stored).
    return stat.S_ISREG(info.st_mode) and info.st_size <= 8 * max_pixels + 2**20


def _reason(path, max_pixels):
    """Why `path` failed, as `keras-bit predict` says it (it refuses before reading what may not be read)."""
    from keras_bit.predict import decode_file

    try:
        with native_stderr_silenced():
            decode_file(path, max_pixels)
    except (ValueError, OSError) as e:
        text = str(e.strerror if isinstance(e, OSError) and e.strerror else e)
        return re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)  # TensorFlow's name of the traced function
    return "cannot be decoded by TensorFlow"
