"""Classify image files with an exported SavedModel, a `.keras` model or a BiT model name."""

import os

import numpy as np


def _is_saved_model(path):
    return os.path.isfile(os.path.join(path, "saved_model.pb"))


def load_model(spec):
    """A Keras model from a `.keras` file, or a named BiT model (`keras_bit.BiT(spec)`)."""
    import keras

    import keras_bit  # registers the layers that .keras files refer to

    if spec.endswith(".keras"):
        return keras.saving.load_model(spec)
    return keras_bit.BiT(spec)


def read_class_names(path):
    """Class names from a text file, one per line (the `class_names.txt` that fine-tuning writes)."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def predict_files(paths, model, top=5):
    """Top-`top` classes of each image file.

    Args:
        paths: image files (JPEG/PNG/BMP/GIF).
        model: a SavedModel folder written by `export_saved_model`, a `.keras`
            file (class names from a `class_names.txt` beside it), or a model
            name accepted by `keras_bit.BiT` (e.g. "BiT-M-R50x1").
        top: how many classes to report.

    Returns:
        A list of `{"image": path, "top": [{"index", "score", "label"}, ...]}`.
    """
    from keras_bit.backend import tensorflow

    tf = tensorflow("Prediction from image files")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"Image file(s) not found: {', '.join(missing)}")
    blobs = []
    for p in paths:
        with open(p, "rb") as f:
            blobs.append(f.read())
    if os.path.isdir(model) and _is_saved_model(model):
        serve = tf.saved_model.load(model).signatures["serving_bytes"]
        out = serve(image_bytes=tf.constant(blobs))
        probs = out["probabilities"].numpy()
        names = None
        if "top_k_labels" in out:
            index = out["top_k_indices"].numpy()
            labels = out["top_k_labels"].numpy()
            names = {int(i): lab.decode() for row_i, row_l in zip(index, labels) for i, lab in zip(row_i, row_l)}
    else:
        from keras_bit.train.pipeline import decode
        from keras_bit.export import fold_standardization, imagenet_class_names
        from keras_bit.preprocessing import preprocess_input

        net = fold_standardization(load_model(model))  # weight standardization precomputed once
        height, width = net.input_shape[1:3]
        images = [tf.image.resize(decode(tf.constant(b), "encoded"), (height, width)) for b in blobs]
        probs = np.asarray(net.predict(preprocess_input(tf.stack(images)), verbose=0))
        beside = os.path.join(os.path.dirname(os.path.abspath(model)), "class_names.txt")
        if model.endswith(".keras") and os.path.isfile(beside):  # a fine-tuning run's output folder
            class_list = read_class_names(beside)
        else:
            class_list = imagenet_class_names(probs.shape[1])
        names = dict(enumerate(class_list)) if class_list else None
    results = []
    for path, row in zip(paths, probs):
        best = np.argsort(-row)[:top]
        results.append({
            "image": path,
            "top": [{"index": int(i), "score": float(row[i]), "label": names.get(int(i)) if names else None}
                    for i in best],
        })
    return results
