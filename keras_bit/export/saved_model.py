"""SavedModel export for TF Serving: preprocessing inside the graph, weights stored once.

`export_saved_model(model)` writes `saved_models/<name>/<version>/` with two
signatures that take raw pixels, so that clients never normalise anything:

- `serving_default(images)`: uint8 `[batch, height, width, 3]`, any size;
- `serving_bytes(image_bytes)`: string `[batch]` of encoded JPEG/PNG/GIF/BMP/WebP.

Both compute `serving.serving_model` (resize, [-1, 1], network, head
activation) and return `probabilities`, `top_k_indices`, `top_k_scores` and,
when class names are known, `top_k_labels`; a feature export
(`outputs="features"`) returns `features` only: the pooled pre-logits
embedding, float32 `[batch, channels]`.

The archive is written with `tf.saved_model.save` from a `tf.Module` that holds
the model's `tf.Variable`s themselves: `keras.export.ExportArchive` stores every
weight twice (once per Keras variable wrapper, once per captured `tf.Variable`;
keras-team/keras#23553), doubling the file and the memory of every server.
"""

import logging
import os

from keras_bit import kernels
from keras_bit.backend import tensorflow as _tensorflow
from keras_bit.export import artifact, image_decode, labels, runtimes, serving
from keras_bit.validation import check_positive_int

SAVED_MODEL_QUANTIZATIONS = (None, "bfloat16")

tf = _tensorflow("SavedModel export")

logger = logging.getLogger("keras_bit")

DEFAULT_EXPORT_DIR = "saved_models"
DEFAULT_MAX_PIXELS = image_decode.DEFAULT_MAX_PIXELS


def decode_batch(image_bytes, size, max_pixels=DEFAULT_MAX_PIXELS, jpeg_dct_scaling=False):
    """Decodes and resizes a batch of encoded images; a bad one fails the batch with a message naming its index.

    Images are decoded one at a time (memory: one image of at most
    `max_pixels` in flight); `tf.data`'s `ignore_errors` tells which ones failed.
    """
    count = tf.shape(image_bytes, out_type=tf.int64)[0]
    fit = size if jpeg_dct_scaling else None

    def decode(index, data):
        return index, tf.image.resize(image_decode.decode(data, max_pixels, dct_fit=fit), size)

    dataset = tf.data.Dataset.from_tensor_slices((tf.range(count), image_bytes)).map(decode).ignore_errors()
    # When every image fails (or there are none) the batched dataset is empty: the appended empty batch keeps
    # `get_single_element` well defined, so the check below names the failed indices.
    nothing = tf.data.Dataset.from_tensors((tf.zeros([0], tf.int64), tf.zeros([0, size[0], size[1], 3], tf.float32)))
    indices, pixels = dataset.batch(tf.maximum(count, 1)).concatenate(nothing).take(1).get_single_element()
    failed = tf.sparse.to_dense(tf.sets.difference(tf.range(count)[None], indices[None]))[0]
    checked = tf.debugging.Assert(tf.equal(tf.size(failed), 0), [
        (f"image_bytes: could not decode the images at these batch indices (each must be a complete JPEG, PNG, "
         f"GIF, BMP or still WebP file of at most max_pixels={max_pixels} pixels):"), failed], summarize=16)
    with tf.control_dependencies([checked]):
        return tf.identity(pixels)


def export_saved_model(model, export_dir=DEFAULT_EXPORT_DIR, *, name=None, version=None, class_names=None,
                       top_k=5, image_size=None, fold=True, max_pixels=DEFAULT_MAX_PIXELS, activation="auto",
                       jpeg_dct_scaling=False, quantization=None, outputs="probabilities"):
    """Exports `model` as a TF-Serving SavedModel with raw-pixel and encoded-bytes signatures.

    Args:
        model: a keras_bit classifier (any head: logits get a softmax, a
            softmax / sigmoid head keeps its own activation); with
            `outputs="features"` also an include_top=False model.
        export_dir: root folder; the model goes to `<export_dir>/<name>/<version>/`.
        name: folder name, a plain name without path separators (default
            `model.name`).
        version: positive integer version (default: the next free one). An
            existing version is never overwritten.
        class_names: list of names in label order for `top_k_labels`; default
            ImageNet names for 1000/21843-class heads when available.
        top_k: how many classes the `top_k_*` outputs hold.
        image_size: `(height, width)` to resize to; required when the model's
            input size is not fixed.
        fold: fold weight standardization into the kernels (recommended).
        max_pixels: largest image `serving_bytes` decodes (height x width,
            read from the file header before decoding; a GIF's first frame).
            Larger images fail the request with a message naming their index.
        activation: "auto", "softmax" or "none" (see `serving.needs_softmax`).
        jpeg_dct_scaling: decode JPEGs much larger than the input at 1/2-1/8
            scale inside the decoder (faster, less memory, but different
            pixels from a full decode; see benchmarks/RESULTS.md).
        quantization: None (float32), or "bfloat16": weights stored and run
            in bfloat16 (half the size; faster on CPUs with bfloat16 units;
            probabilities within ~1e-2, see benchmarks/RESULTS.md).
        outputs: "probabilities" (classes, top-k, labels) or "features": the
            pooled pre-logits embedding (`serving.feature_network`), for
            retrieval, clustering or few-shot probes; no class names.

    Returns:
        The path of the written version folder (class names, when known, also
        in its `assets.extra/class_names.txt`).

    Raises:
        ExportError: TensorFlow cannot load and run the written SavedModel
            (it is loaded and run once on two small images before it is
            moved into place); nothing is written.

    Example:
        >>> path = export_saved_model(result.model, class_names=result.class_names)
        >>> served = tf.saved_model.load(path).signatures["serving_bytes"]
    """
    max_pixels = check_positive_int(max_pixels, "max_pixels")
    name = artifact.check_plain_name(model.name if name is None else name, "name")
    if version is not None:
        version = check_positive_int(version, "version")
    if quantization not in SAVED_MODEL_QUANTIZATIONS:
        raise ValueError(f"`quantization` must be one of {SAVED_MODEL_QUANTIZATIONS} for a SavedModel. "
                         f"Received: quantization={quantization!r}")
    served = serving.serving_model(model, image_size, top_k, activation, fold, dtype=quantization, outputs=outputs)
    class_names = labels.class_names_for(model, class_names, outputs)
    base = os.path.join(os.fspath(export_dir), name)
    path = os.path.join(base, str(artifact.next_version(base) if version is None else version))
    if os.path.exists(path):
        raise ValueError(f"Export version {path} already exists; versions are never overwritten.")

    def write(tmp):
        save(served, tmp, class_names, max_pixels, jpeg_dct_scaling)
        runtimes.check_runs(tmp, "tf_saved_model", runtimes.sample_images(*serving.input_size(model, image_size)),
                            shown=path, expected=serving.OUTPUT_NAMES[outputs])
        labels.write_labels(tmp, "tf_saved_model", class_names)

    artifact.write_atomically(path, write)
    logger.info("Exported %s to %s", model.name, path)
    return path


def _check_images(images):
    """`images` with its static shape set, after an assertion that it is `[batch, height, width, 3]`."""
    shape = tf.shape(images)
    valid = tf.cond(tf.equal(tf.size(shape), 4),
                    lambda: tf.logical_and(tf.equal(shape[-1], 3), tf.reduce_all(shape[1:3] > 0)),
                    lambda: tf.constant(False))
    checked = tf.debugging.Assert(valid, [
        ("images: expected uint8 RGB pixels of shape [batch, height, width, 3] (height, width > 0); received "
         "shape"), shape], summarize=8)
    with tf.control_dependencies([checked]):
        return tf.ensure_shape(images, [None, None, None, 3])


def save(served, path, class_names=None, max_pixels=DEFAULT_MAX_PIXELS, jpeg_dct_scaling=False):
    """Writes the serving model `served` (see `serving.serving_model`) as a SavedModel folder at `path`."""
    classify = served.get_layer("classify")
    size = tuple(served.get_layer("resize").get_config()[k] for k in ("height", "width"))
    label_table = tf.constant(class_names) if class_names is not None else None
    shapes = {name: (tuple(tensor.shape[1:]), tensor.dtype) for name, tensor in served.output.items()}

    def outputs(call, pixels):
        # An empty batch skips the network: TF's oneDNN convolutions mis-shape empty inputs.
        empty = {name: tf.zeros([0, *shape], dtype) for name, (shape, dtype) in shapes.items()}
        result = tf.cond(tf.shape(pixels)[0] > 0, lambda: call(pixels, training=False), lambda: empty)
        if label_table is not None:
            result["top_k_labels"] = tf.gather(label_table, result["top_k_indices"])
        return result

    # Any rank is accepted at the signature so that a wrong one reaches `_check_images` and its message
    # (TF Serving does not compare request shapes with the signature's).
    @tf.function(input_signature=[tf.TensorSpec(None, tf.uint8, name="images")])
    def serving_default(images):
        return outputs(served, _check_images(images))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serving_bytes(image_bytes):
        return outputs(classify, decode_batch(image_bytes, size, max_pixels, jpeg_dct_scaling))

    module = tf.Module(name="keras_bit_served")
    # The tf.Variables the functions capture, and not the Keras model: tracking its Keras variable
    # wrappers too would store every weight twice.
    module.weights = [v.value for v in served.weights]
    module.serving_default, module.serving_bytes = serving_default, serving_bytes
    with kernels.portable():  # standard ops only: TF Serving has no keras_bit kernel
        tf.saved_model.save(module, path, signatures={"serving_default": serving_default,
                                                      "serving_bytes": serving_bytes})
