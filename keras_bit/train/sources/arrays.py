"""Array sources: NumPy images and integer labels (`from_arrays`), scikit-learn's bundled digits (`from_sklearn`).

Pixels are checked here, once, before any training step: finite, in
[0, 255] (not [0, 1] floats), stored as uint8; labels are 0..C-1.
"""

import numpy as np

from keras_bit.train.sources.base import Dataset
from keras_bit.train.sources.draws import holdout
from keras_bit.train.sources.memory import ArraySplit


def check_labels(labels, num_classes, where):
    """int64 labels, or a `ValueError` naming `where` unless they are a 1D integer array in [0, num_classes)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{where}: labels must be a 1D integer array. Received shape {labels.shape}, dtype {labels.dtype}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{where}: labels must be in [0, {num_classes - 1}]. Received labels in "
            f"[{labels.min()}, {labels.max()}]"
        )
    return labels.astype(np.int64)


def _infer_num_classes(labels):
    """C when the labels are exactly 0..C-1 (each present); else a ValueError saying how to remap."""
    check_labels(labels, np.iinfo(np.int64).max, "`labels`")
    distinct = np.unique(labels)
    if distinct[0] != 0 or distinct[-1] != len(distinct) - 1:
        raise ValueError(
            f"`labels` must be the class indices 0..C-1, each present (C is inferred from them). Received "
            f"{len(distinct)} distinct values between {distinct[0]} and {distinct[-1]}. Remap them first: "
            "`classes, labels = np.unique(labels, return_inverse=True)`, and build the data set with "
            "`keras_bit.data.from_arrays(images, labels, class_names=classes)`."
        )
    return len(distinct)


def _as_uint8(images, where):
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.number) or images.size == 0:
        raise ValueError(f"{where} must be a numeric array of pixels in [0, 255]. Received dtype {images.dtype}")
    if np.issubdtype(images.dtype, np.inexact) and not np.isfinite(images).all():
        bad = np.argwhere(~np.isfinite(images))[0]
        raise ValueError(f"{where} must hold finite pixels in [0, 255]. Received NaN or infinite values "
                         f"(the first at index {tuple(int(i) for i in bad)})")
    low, high = float(images.min()), float(images.max())
    if low < 0 or high > 255:
        raise ValueError(f"{where} must hold pixels in [0, 255]. Received values in [{low}, {high}]")
    if np.issubdtype(images.dtype, np.floating) and high <= 1.0:
        raise ValueError(f"{where} look like [0, 1] floats; BiT expects pixels in [0, 255] (multiply by 255).")
    return np.round(images).astype(np.uint8)


def _check_images(images):
    images = np.asarray(images)
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise ValueError(
            "`images` must have shape (N, H, W), (N, H, W, 1) or (N, H, W, 3). "
            f"Received shape: {images.shape}"
        )
    return images


def _eval_split(eval_data, num_classes):
    eval_images, eval_labels = (np.asarray(a) for a in eval_data)
    if len(eval_images) != len(eval_labels):
        raise ValueError(
            f"`eval_data` images and labels have different lengths: {len(eval_images)} and {len(eval_labels)}."
        )
    return ArraySplit(_as_uint8(eval_images, "`eval_data` images"),
                      check_labels(eval_labels, num_classes, "`eval_data` labels"))


def from_arrays(images, labels, eval_data=None, eval_fraction=0.2, seed=0, class_names=None, num_classes=None):
    """A `Dataset` from NumPy images `(N, H, W[, C])` (uint8, [0, 255]) and integer labels.

    Args:
        images: `(N, H, W)`, `(N, H, W, 1)` or `(N, H, W, 3)` pixels in [0, 255].
        labels: `(N,)` class indices 0..C-1.
        eval_data: optional `(images, labels)` evaluation split; otherwise
            `eval_fraction` of the examples is held out with `seed`.
        class_names, num_classes: default "0".."C-1" and C inferred from the labels.

    Example:
        >>> ds = from_arrays(np.zeros((10, 8, 8), np.uint8), np.arange(10) % 2)
        >>> len(ds.train), len(ds.eval), ds.num_classes
        (8, 2, 2)
    """
    images = _check_images(images)
    if len(images) != len(labels):
        raise ValueError(
            f"`images` and `labels` have different lengths: {len(images)} images, {len(labels)} labels."
        )
    if len(images) == 0:
        raise ValueError("The data set is empty: `images` has no examples.")
    labels = np.asarray(labels)
    if num_classes is None:
        num_classes = len(class_names) if class_names is not None else _infer_num_classes(labels)
    labels = check_labels(labels, num_classes, "`labels`")
    full = ArraySplit(_as_uint8(images, "`images`"), labels)
    if eval_data is not None:
        train, eval_split = full, _eval_split(eval_data, num_classes)
    else:
        train_idx, eval_idx = holdout(len(full), eval_fraction, seed)
        train, eval_split = full.subset(train_idx), full.subset(eval_idx)
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    return Dataset(train, eval_split, num_classes, names, tuple(images.shape[1:3]), "arrays")


def from_sklearn(name, eval_fraction=0.2, seed=0):
    """A `Dataset` from an image set bundled with scikit-learn (no download): "digits".

    The 1797 8x8 handwritten digits (UCI) ship inside scikit-learn; their 17
    grey levels (0-16) are scaled to [0, 255].
    """
    if name != "digits":
        raise ValueError(f"Unknown scikit-learn image set {name!r}: only 'sklearn:digits' is bundled offline.")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ValueError("'sklearn:digits' needs scikit-learn: pip install 'keras-bit[demo]'") from e
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    ds = from_arrays(images, digits.target, eval_fraction=eval_fraction, seed=seed,
                     class_names=[str(i) for i in range(10)])
    ds.name = "sklearn:digits"
    return ds
