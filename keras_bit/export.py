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

import logging
import os

import keras
import numpy as np
import tensorflow as tf

from keras_bit import cache, configs
from keras_bit.layers import StandardizedConv2D, standardize_kernel

logger = logging.getLogger("keras_bit")

DEFAULT_EXPORT_DIR = "saved_models"


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
    from keras_bit import imagenet

    try:
        if classes == configs.IMAGENET21K_CLASSES:
            return imagenet.imagenet21k_labels(cache_dir)[1]
        if classes == configs.IMAGENET_CLASSES:
            decoded = imagenet.decode_predictions(np.eye(classes, dtype="float32"), top=1)
            return [row[0][1] for row in decoded]
    except (cache.DownloadError, ValueError) as e:
        logger.warning("Exporting without top_k_labels: ImageNet class names unavailable (%s).", e)
    return None


def next_version(base_dir):
    """The next free integer version under `base_dir` (1 when there is none)."""
    if not os.path.isdir(base_dir):
        return 1
    versions = [int(d) for d in os.listdir(base_dir) if d.isdigit()]
    return max(versions, default=0) + 1


def export_saved_model(model, export_dir=DEFAULT_EXPORT_DIR, *, name=None, version=None, class_names=None,
                       top_k=5, image_size=None, fold=True):
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

    Returns:
        The path of the written version folder.

    Example:
        >>> path = export_saved_model(result.model, class_names=result.class_names)
        >>> served = tf.saved_model.load(path).signatures["serving_bytes"]
    """
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

    def head(pixels):
        x = pixels / 127.5 - 1.0  # keras_bit.preprocess_input, inlined so the graph needs no keras_bit
        scores = tf.cast(served(x, training=False), tf.float32)
        probabilities = tf.nn.softmax(scores) if softmax else scores
        top = tf.math.top_k(probabilities, k=top_k)
        outputs = {"probabilities": probabilities, "top_k_indices": top.indices, "top_k_scores": top.values}
        if labels is not None:
            outputs["top_k_labels"] = tf.gather(labels, top.indices)
        return outputs

    def from_images(images):
        return head(tf.image.resize(tf.cast(images, tf.float32), (height, width)))

    def decode_one(data):
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
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
