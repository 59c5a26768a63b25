"""SavedModel export for serving: preprocessing inside the graph, TF Serving layout.

`export_saved_model(model)` writes `saved_models/<name>/<version>/` with two
signatures that take raw pixels, so that clients never normalise anything:

- `serving_default(images)`: uint8 `[batch, height, width, 3]`, any size;
- `serving_bytes(image_bytes)`: string `[batch]` of encoded JPEG/PNG/BMP/GIF.

Both resize to the model's input size (bilinear, BiT's evaluation rule: no
centre crop), map pixels to [-1, 1] and return `probabilities`,
`top_k_indices`, `top_k_scores` and, when class names are known,
`top_k_labels`. The weight standardization is folded into the exported kernels:
the graph holds plain convolutions and no per-call kernel moments.
"""

import functools
import logging
import os

import keras
import numpy as np

from keras_bit import imagenet, presets
from keras_bit.preprocessing import preprocess_input
from keras_bit.weights.download import DownloadError
from keras_bit.layers import StandardizedConv2D, standardize_kernel
from keras_bit.validation import check_positive_int
from keras_bit.backend import tensorflow as _tensorflow

tf = _tensorflow("SavedModel export")

logger = logging.getLogger("keras_bit")

DEFAULT_EXPORT_DIR = "saved_models"
# Largest image (after JPEG DCT down-scaling) the bytes signature decodes: about 0.6 GB
# of working memory per image. Larger images are refused before they are decoded.
DEFAULT_MAX_PIXELS = 40_000_000
_JPEG_RATIOS = (1, 2, 4, 8)


def _header_uint(data, offset, size, big_endian):
    raw = tf.cast(tf.io.decode_raw(tf.strings.substr(data, offset, size), tf.uint8), tf.int64)
    weights = tf.constant([256**i for i in range(size)], tf.int64)
    return tf.reduce_sum(raw * (weights[::-1] if big_endian else weights))


def _abs_int32(value):
    return tf.where(value >= 2**31, 2**32 - value, value)


def _header_size(data):
    """`(height, width)` from a PNG, GIF or BMP header without decoding (0, 0 when unknown or too short)."""
    length = tf.strings.length(data)

    def when(condition, size_fn):
        return tf.cond(condition, size_fn, lambda: tf.zeros([2], tf.int64))

    png = tf.logical_and(length >= 24, tf.strings.substr(data, 0, 4, unit="BYTE") == b"\x89PNG")
    gif = tf.logical_and(length >= 10, tf.strings.substr(data, 0, 4, unit="BYTE") == b"GIF8")
    bmp = tf.logical_and(length >= 26, tf.strings.substr(data, 0, 2, unit="BYTE") == b"BM")
    size = when(png, lambda: tf.stack([_header_uint(data, 20, 4, True), _header_uint(data, 16, 4, True)]))
    size += when(gif, lambda: tf.stack([_header_uint(data, 8, 2, False), _header_uint(data, 6, 2, False)]))
    # BMP heights are signed 32-bit (negative for top-down rows).
    size += when(bmp, lambda: tf.stack([_abs_int32(_header_uint(data, 22, 4, False)),
                                        _header_uint(data, 18, 4, False)]))
    return size


def fold_standardization(model):
    """A copy of `model` whose StandardizedConv2D layers are plain Conv2D with standardized kernels.

    The copy computes the same function (up to float rounding) without
    recomputing kernel moments on every call: the inference graph of BiT.
    """

    def clone(layer):
        if isinstance(layer, StandardizedConv2D):
            config = layer.get_config()
            config.pop("epsilon")
            return keras.layers.Conv2D.from_config(config)
        return layer.__class__.from_config(layer.get_config())

    folded = keras.models.clone_model(model, clone_function=clone)
    for source, target in zip(model.layers, folded.layers):
        weights = source.get_weights()
        if isinstance(source, StandardizedConv2D):
            weights[0] = keras.ops.convert_to_numpy(standardize_kernel(weights[0], source.epsilon))
        target.set_weights(weights)
    return folded


def _outputs_probabilities(model):
    """Whether the model already ends in a softmax (keras_bit heads, or fine-tuned models)."""
    last = model.layers[-1]
    activation = getattr(last, "activation", None)
    return activation is keras.activations.softmax


def imagenet_class_names(classes, cache_dir=None):
    """Human-readable ImageNet names for 1000 or 21843 classes from the cached label files, else None."""
    try:
        if classes == presets.IMAGENET21K_CLASSES:
            return imagenet.imagenet21k_labels(cache_dir)[1]
        if classes == presets.IMAGENET_CLASSES:
            decoded = imagenet.decode_predictions(np.eye(classes, dtype="float32"), top=1)
            return [row[0][1] for row in decoded]
    except (DownloadError, ValueError) as e:
        logger.warning("Exporting without top_k_labels: ImageNet class names unavailable (%s).", e)
    return None


def next_version(base_dir):
    """The next free integer version under `base_dir` (1 when there is none)."""
    if not os.path.isdir(base_dir):
        return 1
    versions = [int(d) for d in os.listdir(base_dir) if d.isdigit()]
    return max(versions, default=0) + 1


def export_saved_model(model, export_dir=DEFAULT_EXPORT_DIR, *, name=None, version=None, class_names=None,
                       top_k=5, image_size=None, fold=True, max_pixels=DEFAULT_MAX_PIXELS):
    """Exports `model` as a TF-Serving SavedModel with raw-pixel and encoded-bytes signatures.

    Args:
        model: a keras_bit model (any head; logits get a softmax in the graph).
        export_dir: root folder; the model goes to `<export_dir>/<name>/<version>/`.
        name: folder name (default `model.name`).
        version: integer version (default: the next free one). An existing
            version is never overwritten.
        class_names: names in label order for `top_k_labels`; default
            ImageNet names for 1000/21843-class heads when available.
        top_k: how many classes the `top_k_*` outputs hold.
        image_size: `(height, width)` to resize to; required when the model's
            input size is not fixed.
        fold: fold weight standardization into the kernels (recommended).
        max_pixels: largest image `serving_bytes` decodes (height x width,
            read from the file header before decoding; JPEGs count after the
            1/2-1/8 DCT down-scaling used for images much larger than the
            model's input). Larger images fail that request with an
            InvalidArgumentError that says so; memory per image stays bounded.

    Returns:
        The path of the written version folder.

    Example:
        >>> path = export_saved_model(result.model, class_names=result.class_names)
        >>> served = tf.saved_model.load(path).signatures["serving_bytes"]
    """
    check_positive_int(max_pixels, "max_pixels")
    height, width = image_size or model.input_shape[1:3]
    if not height or not width:
        raise ValueError(
            f"The model's input size is not fixed ({model.input_shape}): pass `image_size=(height, width)`."
        )
    classes = int(model.output_shape[-1])
    top_k = min(int(top_k), classes)
    if top_k <= 0:
        raise ValueError(f"`top_k` must be a positive integer. Received: top_k={top_k!r}")
    if class_names is None:
        class_names = imagenet_class_names(classes)
    elif len(class_names) != classes:
        raise ValueError(f"`class_names` has {len(class_names)} names for a model with {classes} classes.")
    name = name or model.name
    base = os.path.join(os.fspath(export_dir), name)
    if version is None:
        version = next_version(base)
    path = os.path.join(base, str(int(version)))
    if os.path.exists(path):
        raise ValueError(f"Export version {path} already exists; versions are never overwritten.")

    served = fold_standardization(model) if fold else model
    softmax = not _outputs_probabilities(model)
    labels = tf.constant(list(class_names)) if class_names is not None else None

    def run_model(x):
        return tf.cast(served(x, training=False), tf.float32)

    def head(pixels):
        x = preprocess_input(pixels)
        # An empty batch skips the network: TF's oneDNN convolutions mis-shape empty inputs.
        scores = tf.cond(tf.shape(x)[0] > 0, lambda: run_model(x), lambda: tf.zeros([0, classes], tf.float32))
        probabilities = tf.nn.softmax(scores) if softmax else scores
        top = tf.math.top_k(probabilities, k=top_k)
        outputs = {"probabilities": probabilities, "top_k_indices": top.indices, "top_k_scores": top.values}
        if labels is not None:
            outputs["top_k_labels"] = tf.gather(labels, top.indices)
        return outputs

    def from_images(images):
        return head(tf.image.resize(tf.cast(images, tf.float32), (height, width)))

    def check_size(size):
        # Returned so that decoding can depend on it: the check must run before, not beside, the decoder.
        return tf.debugging.assert_less_equal(
            size[0] * size[1], tf.constant(max_pixels, tf.int64),
            message=f"image_bytes: image too large to decode (height*width over the export's "
                    f"max_pixels={max_pixels}); resize it before sending")

    def decode_jpeg(data):
        # Large JPEGs are decoded at 1/2, 1/4 or 1/8 scale (in the DCT, so memory stays
        # bounded) when that still leaves at least the model's input size.
        shape = tf.cast(tf.image.extract_jpeg_shape(data), tf.int64)
        fits = [tf.logical_and(shape[0] >= r * height, shape[1] >= r * width) for r in _JPEG_RATIOS]
        branch = tf.reduce_max(tf.where(tf.stack(fits), tf.range(len(_JPEG_RATIOS)), 0))
        ratio = tf.gather(tf.constant(_JPEG_RATIOS, tf.int64), branch)
        with tf.control_dependencies([check_size((shape[:2] + ratio - 1) // ratio)]):
            return tf.switch_case(branch, [
                functools.partial(tf.io.decode_jpeg, data, channels=3, ratio=r) for r in _JPEG_RATIOS])

    def decode_other(data):
        with tf.control_dependencies([check_size(_header_size(data))]):
            return tf.io.decode_image(data, channels=3, expand_animations=False)

    def decode_one(data):
        is_jpeg = tf.strings.substr(data, 0, 3, unit="BYTE") == b"\xff\xd8\xff"
        image = tf.cond(is_jpeg, lambda: decode_jpeg(data), lambda: decode_other(data))
        return tf.image.resize(tf.cast(image, tf.float32), (height, width))

    def from_bytes(image_bytes):
        pixels = tf.map_fn(decode_one, image_bytes, fn_output_signature=tf.TensorSpec([height, width, 3], tf.float32))
        return head(pixels)

    archive = keras.export.ExportArchive()
    archive.track(served)
    archive.add_endpoint("serving_default", from_images,
                         input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    archive.add_endpoint("serving_bytes", from_bytes,
                         input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    os.makedirs(base, exist_ok=True)
    archive.write_out(path, verbose=False)
    logger.info("Exported %s to %s", model.name, path)
    return path
