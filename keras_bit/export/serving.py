"""The inference model every export format holds: uint8 pixels in, probabilities and top-k out.

`serving_model(model)` wraps a (folded) keras_bit model in a Functional model
that takes uint8 `[batch, height, width, 3]` pixels of any size, resizes them
to the model's input size (bilinear, BiT's evaluation rule: no centre crop),
maps them to [-1, 1], runs the network and returns

- `probabilities`: the head's own activation (softmax / sigmoid ...); a linear
  head (logits) gets a softmax;
- `top_k_indices`, `top_k_scores`: the `top_k` best classes.

Keras exports this one model to LiteRT, ONNX and OpenVINO, and the SavedModel
signatures call it too, so every format computes the same function.
"""

import logging
import os
import re
import shutil
import tempfile
import unicodedata

import keras
import numpy as np

from keras_bit import imagenet, presets
from keras_bit.io import read_bounded
from keras_bit.layers import StandardizedConv2D, standardize_kernel
from keras_bit.preprocessing import preprocess_input
from keras_bit import validation
from keras_bit.validation import check_positive_int
from keras_bit.weights.download import DownloadError

logger = logging.getLogger("keras_bit")

ACTIVATIONS = ("auto", "softmax", "none")
_POOLING = (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D)
FOLD_DTYPES = (None, "bfloat16", "float32")
MAX_LABELS_BYTES = 64 * 2**20  # ImageNet-21k's 21843 names take 0.3 MB
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


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


def needs_softmax(model, activation="auto"):
    """Whether `model`'s outputs are logits that need a softmax to become probabilities.

    `activation="auto"` reads the last layer: a linear head
    (`classifier_activation=None`) needs one; a softmax (keras_bit's
    default), sigmoid or any other activation is the head's own and is kept. `"softmax"` / `"none"` force the choice.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"`activation` must be one of {ACTIVATIONS}. Received: activation={activation!r}")
    if activation != "auto":
        return activation == "softmax"
    layer = model.layers[-1] if model.layers else None
    if isinstance(layer, _POOLING):
        raise ValueError(
            f"{model.name!r} outputs pooled features, not classes (its last layer is a {type(layer).__name__}: "
            "a model built with include_top=False). Exports and predictions need a classifier: fine-tune one on "
            "your classes (`keras-bit finetune`, `keras_bit.finetune`) or build it with include_top=True.")
    last = getattr(layer, "activation", None)
    if last is None:
        raise ValueError(
            f"Cannot tell whether {model.name!r} outputs logits or probabilities: its last layer "
            f"({type(layer).__name__ if layer else 'none'}) has no `activation`. Pass activation='softmax' "
            "(logits) or activation='none' (already probabilities); `keras-bit export` / `predict`: "
            "--activation softmax / none.")
    return last is keras.activations.linear


def check_classifier(model):
    """The number of classes of `model`: one image input, one `(batch, classes)` output, finite weights.

    A feature model (include_top=False without pooling), a multi-output
    model and NaN weights are refused (ValueError) before anything is built.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model (a keras_bit classifier). Received: {type(model).__name__}")
    if len(model.outputs) != 1 or len(model.inputs) != 1:
        raise ValueError(
            f"{model.name!r} has {len(model.inputs)} inputs and {len(model.outputs)} outputs; exports and "
            "predictions take one image input and one `(batch, classes)` output. Pass the output you want as a "
            "model of its own: keras.Model(model.inputs[0], model.outputs[i]) (saved with `.save(...)` for the CLI).")
    shape = tuple(model.outputs[0].shape)
    if len(shape) != 2 or not shape[-1]:
        raise ValueError(
            f"{model.name!r} outputs shape {shape}, not (batch, classes): a feature model (include_top=False) has "
            "no classes. Fine-tune one on your classes (`keras-bit finetune`, `keras_bit.finetune`) or build it with "
            "include_top=True.")
    for variable in model.weights:
        if not np.isfinite(keras.ops.convert_to_numpy(keras.ops.cast(variable, "float32"))).all():
            raise ValueError(f"{model.name!r}: weight {variable.path} holds NaN or infinite values; such a model "
                             "returns NaN for every image and is not exported.")
    return int(shape[-1])


def input_size(model, image_size=None):
    """`(height, width)` the export resizes to: `image_size`, else the model's fixed input size."""
    if image_size is not None:
        if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2
                or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in image_size)):
            raise ValueError(f"`image_size` must be (height, width), two positive integers. "
                             f"Received: image_size={image_size!r}")
        return tuple(image_size)
    shape = model.input_shape
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"Only image models with an (height, width, 3) input can be exported. "
                         f"Received a model with input shape {shape}.")
    if not shape[1] or not shape[2]:
        raise ValueError(f"The model's input size is not fixed ({shape}): pass `image_size=(height, width)`.")
    return int(shape[1]), int(shape[2])


def check_class_names(class_names, classes):
    """`class_names` as a list of `classes` distinct one-line strings (None stays None)."""
    return None if class_names is None else validation.check_class_names(class_names, classes, "`class_names`")


def check_plain_name(value, argument):
    """`value` when it is a plain file or folder name (no separators, not `.`/`..`), else ValueError."""
    if not isinstance(value, str) or not _PLAIN_NAME.fullmatch(value):
        raise ValueError(f"`{argument}` must be a plain name (letters, digits, '.', '_', '-'; no path separators). "
                         f"Received: {argument}={value!r}")
    return value


def imagenet_class_names(classes, cache_dir=None):
    """Human-readable ImageNet names for 1000 or 21843 classes (label files cached, or downloaded), else None."""
    try:
        if classes == presets.IMAGENET21K_CLASSES:
            return imagenet.imagenet21k_labels(cache_dir)[1]
        if classes == presets.IMAGENET_CLASSES:
            decoded = imagenet.decode_predictions(np.eye(classes, dtype="float32"), top=1)
            return [row[0][1] for row in decoded]
    except (DownloadError, ValueError) as e:
        logger.warning("Exporting without class names: ImageNet class names unavailable (%s).", e)
    return None


def serving_model(model, image_size=None, top_k=5, activation="auto", fold=True, dtype=None):
    """The exported function as a Keras model: uint8 pixels of any size -> probabilities and top-k.

    Args:
        model: a keras_bit classifier (any head).
        image_size: `(height, width)` to resize to (default: the model's input size).
        top_k: how many classes `top_k_*` hold (at most the number of classes).
        activation: see `needs_softmax`.
        fold: fold weight standardization into the kernels (same function, faster).
        dtype: None (the model's dtype policy), "bfloat16" or "float32":
            the folded network stored and run in that dtype (see
            `fold_standardization`; needs `fold=True`).

    Returns:
        A Functional model with input `images` (uint8 `[batch, None, None, 3]`)
        and outputs `{"probabilities", "top_k_indices", "top_k_scores"}`.
    """
    check_positive_int(top_k, "top_k")
    classes = check_classifier(model)
    height, width = input_size(model, image_size)
    softmax = needs_softmax(model, activation)
    if dtype is not None and not fold:
        raise ValueError(f"dtype={dtype!r} needs fold=True (the folded network is the one stored in {dtype}).")
    network = fold_standardization(model, dtype) if fold else model
    # The network from resized float pixels in [0, 255]: the SavedModel's bytes signature decodes and resizes
    # each image on its own, then calls this part directly.
    pixels = keras.Input((height, width, 3), name="pixels")
    scores = keras.ops.cast(network(preprocess_input(pixels)), "float32")
    probabilities = keras.ops.softmax(scores) if softmax else scores
    top_scores, top_indices = keras.ops.top_k(probabilities, min(top_k, classes))
    outputs = {"probabilities": probabilities, "top_k_indices": keras.ops.cast(top_indices, "int32"),
               "top_k_scores": top_scores}
    classify = keras.Model(pixels, outputs, name="classify")
    images = keras.Input((None, None, 3), dtype="uint8", name="images")
    # Resized as float32 (whatever the global dtype policy): rounding to uint8 would change the pixels.
    resized = keras.layers.Resizing(height, width, interpolation="bilinear", name="resize", dtype="float32")(
        keras.ops.cast(images, "float32"))
    return keras.Model(images, classify(resized), name=f"{model.name}_serving")


def next_version(base_dir):
    """The next free integer version under `base_dir` (1 when there is none)."""
    if not os.path.isdir(base_dir):
        return 1
    versions = [int(d) for d in os.listdir(base_dir) if d.isascii() and d.isdigit()]
    return max(versions, default=0) + 1


def labels_path(path, format):
    """Where the class names of the `format` export at `path` live."""
    if format == "tf_saved_model":
        return os.path.join(os.fspath(path), "assets.extra", "class_names.txt")
    return os.fspath(path) + ".labels.txt"


def write_labels(path, format, class_names):
    """Writes `class_names` (one per line) where `labels_path` says; nothing when None."""
    if class_names is None:
        return
    target = labels_path(path, format)
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    with open(target, "w", encoding="utf-8") as f:
        f.write("".join(f"{name}\n" for name in class_names))


def read_labels(path):
    """Class names from a UTF-8 text file, line k naming class k - 1 (`class_names.txt`, an export's labels).

    Names are stripped of surrounding spaces; CRLF line ends, a byte-order
    mark and blank lines after the last name are fine. A blank line before the
    last name would shift every later label, so it is refused, as are binary
    content (not UTF-8, control characters), files that are not regular files
    (a FIFO would never end) and files over `MAX_LABELS_BYTES`: ValueError
    naming the file and line.
    """
    data = read_bounded(path, MAX_LABELS_BYTES, "class names file")
    path = os.fsdecode(os.fspath(path))
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"class names file {path}, line {line}: not UTF-8 text "
                         f"(byte {e.start} is {data[e.start:e.start + 1]!r}); expected one class name per line"
                         ) from None
    lines = [line.rstrip("\r") for line in text.split("\n")]  # not splitlines: it also splits at \x0b, \x1c ...
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError(f"class names file {path} is empty; expected one class name per line")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise ValueError(f"class names file {path}, line {number}: blank; line k names class k - 1, so a blank "
                             "line would shift every later name (remove it)")
        control = next((c for c in line if unicodedata.category(c) == "Cc" and c != "\t"), None)
        if control is not None:
            raise ValueError(f"class names file {path}, line {number}: control character {control!r} (binary "
                             "content?); expected one class name per line")
    return [line.strip() for line in lines]


def check_replaceable(path, folder):
    """FileExistsError unless an export (a `folder` or a file) may replace what is at `path` (when anything is).

    A folder is only ever replaced by a SavedModel folder, and only when it is
    a SavedModel; a file only by a file (`--output model.keras --overwrite`
    must not turn a model into a SavedModel folder). A link is replaced
    itself, never what it points to, and is judged by what it points to.
    """
    if not os.path.lexists(path):
        return
    is_dir = os.path.isdir(path)
    if is_dir and not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise FileExistsError(f"{path} is a folder that is not a SavedModel; it is never replaced")
    if is_dir != folder:
        have, new = ("a SavedModel folder", "file") if is_dir else ("a file", "SavedModel folder")
        raise FileExistsError(f"{path} is {have}; a {new} export never replaces it")


def write_atomically(path, write, overwrite=False, replaces=()):
    """Calls `write(temporary_path)`, then moves what it wrote to `path`: never a half-written export.

    `write` gets a path with `path`'s name inside a temporary folder beside
    `path` and may write siblings there too (OpenVINO's `.bin`, a labels
    file); each is moved next to `path`. Existing files are refused unless
    `overwrite`; then they, and the paths in `replaces` that this export no
    longer has (an old labels file), are removed (see `check_replaceable`).
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.partial-", dir=parent)
    try:
        write(os.path.join(tmp, os.path.basename(path)))
        produced = sorted(os.listdir(tmp))
        if os.path.basename(path) not in produced:
            raise RuntimeError(f"The exporter wrote nothing at {path}")
        targets = {os.path.join(parent, n) for n in produced} | {os.path.abspath(os.fspath(r)) for r in replaces}
        existing = sorted(t for t in targets if os.path.lexists(t))
        if existing and not overwrite:
            raise FileExistsError(f"{', '.join(existing)} already exist(s); pass overwrite=True (--overwrite) "
                                  "to replace")
        for target in existing:
            new = os.path.join(tmp, os.path.basename(target))
            check_replaceable(target, folder=os.path.isdir(new) and not os.path.islink(new))
        aside = os.path.join(tmp, ".replaced")
        os.mkdir(aside)
        for i, target in enumerate(existing):  # moved aside (same file system), deleted with `tmp`
            os.replace(target, os.path.join(aside, str(i)))
        for name in produced:
            os.replace(os.path.join(tmp, name), os.path.join(parent, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
