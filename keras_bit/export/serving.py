"""The inference model every export format holds: uint8 pixels in, probabilities and top-k (or features) out.

`serving_model(model)` wraps a (folded) keras_bit model in a Functional model
that takes uint8 `[batch, height, width, 3]` pixels of any size, resizes them
to the model's input size (bilinear, BiT's evaluation rule: no centre crop),
maps them to [-1, 1], runs the network and returns

- `probabilities`: the head's own activation (softmax / sigmoid ...); a linear
  head (logits) gets a softmax;
- `top_k_indices`, `top_k_scores`: the `top_k` best classes;

or, with `outputs="features"`, only `features`: the pooled pre-logits
embedding (the final GroupNorm + ReLU, average-pooled: what the head of a
classifier reads, and TF Hub's BiT "feature_vector").

Keras exports this one model to LiteRT, ONNX and OpenVINO, and the SavedModel
signatures call it too, so every format computes the same function.
"""

import keras
import numpy as np

from keras_bit.export import runners
from keras_bit.export.folding import fold_standardization
from keras_bit.preprocessing import preprocess_input
from keras_bit.validation import check_positive_int, is_int

ACTIVATIONS = ("auto", "softmax", "none")
OUTPUT_KINDS = ("probabilities", "features")
# The names each kind of export returns, in the order its files list them (runners.py: read without Keras).
OUTPUT_NAMES = {"probabilities": runners.OUTPUTS, "features": runners.FEATURE_OUTPUTS}
_POOLING = (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D)


def check_outputs(outputs):
    """`outputs` when it is one of `OUTPUT_KINDS`, else ValueError naming the value and the choices."""
    if not isinstance(outputs, str) or outputs not in OUTPUT_KINDS:
        raise ValueError(f"`outputs` must be one of {OUTPUT_KINDS}. Received: outputs={outputs!r}")
    return outputs


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
            "a model built with include_top=False). Export its features with outputs='features' (`keras-bit "
            "export --features`), or for classes fine-tune a classifier (`keras-bit finetune`, `keras_bit.finetune`) "
            "or build it with include_top=True.")
    last = getattr(layer, "activation", None)
    if last is None:
        raise ValueError(
            f"Cannot tell whether {model.name!r} outputs logits or probabilities: its last layer "
            f"({type(layer).__name__ if layer else 'none'}) has no `activation`. Pass activation='softmax' "
            "(logits) or activation='none' (already probabilities); `keras-bit export` / `predict`: "
            "--activation softmax / none.")
    return last is keras.activations.linear


def _check_one_input_output(model):
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model (a keras_bit classifier). Received: {type(model).__name__}")
    if len(model.outputs) != 1 or len(model.inputs) != 1:
        raise ValueError(
            f"{model.name!r} has {len(model.inputs)} inputs and {len(model.outputs)} outputs; exports and "
            "predictions take one image input and one `(batch, classes)` output. Pass the output you want as a "
            "model of its own: keras.Model(model.inputs[0], model.outputs[i]) (saved with `.save(...)` for the CLI).")


def _check_finite(model):
    for variable in model.weights:
        if not np.isfinite(keras.ops.convert_to_numpy(keras.ops.cast(variable, "float32"))).all():
            raise ValueError(f"{model.name!r}: weight {variable.path} holds NaN or infinite values; such a model "
                             "returns NaN for every image and is not exported.")


def check_classifier(model):
    """The number of classes of `model`: one image input, one `(batch, classes)` output, finite weights.

    A feature model (include_top=False without pooling), a multi-output
    model and NaN weights are refused (ValueError) before anything is built.
    """
    _check_one_input_output(model)
    shape = tuple(model.outputs[0].shape)
    if len(shape) != 2 or not shape[-1]:
        raise ValueError(
            f"{model.name!r} outputs shape {shape}, not (batch, classes): a feature model (include_top=False) has "
            "no classes. Export its features with outputs='features' (`keras-bit export --features`), or for "
            "classes fine-tune a classifier (`keras-bit finetune`, `keras_bit.finetune`) or build it with "
            "include_top=True.")
    _check_finite(model)
    return int(shape[-1])


def is_feature_model(model):
    """Whether `model` (one output) has no classifier head: a feature map, or features after global pooling."""
    shape = tuple(model.outputs[0].shape) if len(model.outputs) == 1 else ()
    return len(shape) == 4 or len(shape) == 2 and bool(model.layers) and isinstance(model.layers[-1], _POOLING)


def _head(model):
    """The Dense head of a classifier: the last layer, or the one an activation layer after it reads
    (a fine-tuning run's model ends with an Activation named "probabilities"); else None."""
    layer = model.layers[-1] if model.layers else None
    if isinstance(layer, (keras.layers.Activation, keras.layers.Softmax)):
        layer = next((candidate for candidate in model.layers if candidate.output is layer.input), None)
    if isinstance(layer, keras.layers.Dense) and len(tuple(layer.input.shape)) == 2:
        return layer
    return None


def feature_network(model):
    """`model` cut (or completed) to output its pooled pre-logits features `(batch, channels)`.

    - a classifier (a Dense head, optionally followed by an activation
      layer): the head's input, i.e. the average-pooled final GroupNorm + ReLU;
    - an include_top=False model with pooling: the model itself;
    - an include_top=False model without pooling (a `(batch, h, w, c)` map):
      average pooling is added, as BiT's classifiers pool.

    Weights are shared with `model`. A multi-output model, another last layer,
    or NaN weights: ValueError.

    Example:
        >>> embed = feature_network(keras_bit.BiTM_R50x1(weights=None))  # (batch, 2048)
    """
    _check_one_input_output(model)
    shape, last = tuple(model.outputs[0].shape), model.layers[-1] if model.layers else None
    head = _head(model) if len(shape) == 2 else None
    if len(shape) == 4:
        pooled = keras.layers.GlobalAveragePooling2D(name="feature_pool")(model.outputs[0])
        network = keras.Model(model.inputs[0], pooled, name=f"{model.name}_features")
    elif is_feature_model(model):
        network = model
    elif head is not None:
        network = keras.Model(model.inputs[0], head.input, name=f"{model.name}_features")
    else:
        raise ValueError(
            f"Cannot find the pooled features of {model.name!r} (output shape {shape}, last layer "
            f"{type(last).__name__ if last else 'none'}): outputs='features' takes a classifier ending in its Dense "
            "head (and an activation layer), or a model built with include_top=False (with or without pooling).")
    _check_finite(network)
    return network


def input_size(model, image_size=None):
    """`(height, width)` the export resizes to: `image_size`, else the model's fixed input size."""
    if image_size is not None:
        if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2
                or not all(is_int(s) and s > 0 for s in image_size)):
            raise ValueError(f"`image_size` must be (height, width), two positive integers. "
                             f"Received: image_size={image_size!r}")
        return tuple(int(s) for s in image_size)
    shape = model.input_shape
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"Only image models with an (height, width, 3) input can be exported. "
                         f"Received a model with input shape {shape}.")
    if not shape[1] or not shape[2]:
        raise ValueError(f"The model's input size is not fixed ({shape}): pass `image_size=(height, width)`.")
    return int(shape[1]), int(shape[2])


def serving_model(model, image_size=None, top_k=5, activation="auto", fold=True, dtype=None, outputs="probabilities"):
    """The exported function as a Keras model: uint8 pixels of any size -> probabilities and top-k (or features).

    Args:
        model: a keras_bit classifier (any head); with `outputs="features"`
            also an include_top=False model (see `feature_network`).
        image_size: `(height, width)` to resize to (default: the model's input size).
        top_k: how many classes `top_k_*` hold (at most the number of classes).
        activation: see `needs_softmax` ("auto" only, with features).
        fold: fold weight standardization into the kernels (same function, faster).
        dtype: None (the model's dtype policy), "bfloat16" or "float32":
            the folded network stored and run in that dtype (see
            `fold_standardization`; needs `fold=True`).
        outputs: "probabilities" (classes) or "features" (the pooled
            pre-logits embedding, float32 `(batch, channels)`).

    Returns:
        A Functional model with input `images` (uint8 `[batch, None, None, 3]`)
        and outputs `{"probabilities", "top_k_indices", "top_k_scores"}`, or
        `{"features"}`; its inner model "classify" takes resized float pixels.
    """
    check_outputs(outputs)
    top_k = check_positive_int(top_k, "top_k")
    if outputs == "features":
        if activation != "auto":
            raise ValueError(f"`activation` is for outputs='probabilities'; features have no activation to choose. "
                             f"Received: activation={activation!r} with outputs='features'")
        model = feature_network(model)
    else:
        classes = check_classifier(model)
        softmax = needs_softmax(model, activation)
    height, width = input_size(model, image_size)
    if dtype is not None and not fold:
        raise ValueError(f"dtype={dtype!r} needs fold=True (the folded network is the one stored in {dtype}).")
    network = fold_standardization(model, dtype) if fold else model
    # The network from resized float pixels in [0, 255]: the SavedModel's bytes signature decodes and resizes
    # each image on its own, then calls this part directly.
    pixels = keras.Input((height, width, 3), name="pixels")
    scores = keras.ops.cast(network(preprocess_input(pixels)), "float32")
    if outputs == "features":
        result = {"features": scores}
    else:
        probabilities = keras.ops.softmax(scores) if softmax else scores
        top_scores, top_indices = keras.ops.top_k(probabilities, min(top_k, classes))
        result = {"probabilities": probabilities, "top_k_indices": keras.ops.cast(top_indices, "int32"),
                  "top_k_scores": top_scores}
    classify = keras.Model(pixels, result, name="classify")
    images = keras.Input((None, None, 3), dtype="uint8", name="images")
    # Resized as float32 (whatever the global dtype policy): rounding to uint8 would change the pixels.
    resized = keras.layers.Resizing(height, width, interpolation="bilinear", name="resize", dtype="float32")(
        keras.ops.cast(images, "float32"))
    return keras.Model(images, classify(resized), name=f"{model.name}_serving")


def output_kind(served):
    """"probabilities" or "features": what the serving model `served` (see `serving_model`) returns."""
    return "features" if "features" in served.output else "probabilities"
