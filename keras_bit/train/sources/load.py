"""`load`: the `data=` argument of fine-tuning turned into a checked `Dataset`, whatever its source.

`data` picks the source: a `Dataset` as it is, `"sklearn:<name>"`, an
`(images, labels)` pair, an image-folder path, else a tfds name. A new source
is one more loader here returning a `Dataset` of its own `Split`s.
"""

import os

import numpy as np

from keras_bit.train.sources.arrays import from_arrays, from_sklearn
from keras_bit.train.sources.base import Dataset
from keras_bit.train.sources.folder import folder_source, from_folder
from keras_bit.validation import check_class_names


def load(data, eval_data=None, split="train", eval_split=None, eval_fraction=0.2, seed=0, data_dir=None,
         skip_bad_images=False, max_pixels=None):
    """A checked `Dataset` from a tfds name, `"sklearn:digits"`, an image-folder path, `(images, labels)`
    arrays or a `Dataset`.

    Args:
        data: the source (see above).
        eval_data: `(images, labels)` evaluation arrays (array sources).
        split, eval_split, data_dir: the tfds splits and data folder (tfds names).
        eval_fraction, seed: the held-out share and its draw, where the source has no eval split.
        skip_bad_images, max_pixels: image folders (see `from_folder`).

    Raises:
        ValueError: naming the problem: an unknown source, undecodable images
            or images over `max_pixels` (image folders; see `from_folder` for
            `skip_bad_images`), NaN or infinite pixels in arrays, labels
            that are not 0..C-1, fewer than 2 classes, class names that are
            empty, repeated or span lines, an empty split.

    Example:
        >>> ds = load("sklearn:digits")
        >>> ds.num_classes, len(ds.train) + len(ds.eval)
        (10, 1797)
    """
    if isinstance(data, Dataset):
        dataset = data
    elif isinstance(data, str) and data.startswith("sklearn:"):
        dataset = from_sklearn(data.split(":", 1)[1], eval_fraction=eval_fraction, seed=seed)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        dataset = from_arrays(data[0], data[1], eval_data=eval_data, eval_fraction=eval_fraction, seed=seed)
    elif isinstance(data, (str, os.PathLike)):
        dataset = _load_path_or_name(data, split, eval_split, eval_fraction, seed, data_dir, skip_bad_images,
                                     max_pixels)
    else:
        raise ValueError(
            "`data` must be a tfds name, an image-folder path or an (images, labels) tuple. "
            f"Received: data of type {type(data).__name__}"
        )
    return check_dataset(dataset)


def _load_path_or_name(data, split, eval_split, eval_fraction, seed, data_dir, skip_bad_images, max_pixels):
    if os.path.isfile(data):
        raise ValueError(
            f"`data` is a file: {os.fspath(data)!r}. Pass an image folder (root/<class>/<image>), a tfds "
            "name or \"sklearn:digits\"."
        )
    if folder_source(data) is not None:
        return from_folder(data, eval_fraction=eval_fraction, seed=seed, skip_bad_images=skip_bad_images,
                           max_pixels=max_pixels)
    from keras_bit.train.sources import tfds  # imports tensorflow_datasets: only when a tfds name is given

    return tfds.from_tfds(os.fspath(data), split=split, eval_split=eval_split, data_dir=data_dir)


def check_dataset(dataset):
    """Raises `ValueError` unless `dataset` can be fine-tuned on (>= 2 classes, valid names, non-empty splits)."""
    if isinstance(dataset.num_classes, bool) or not isinstance(dataset.num_classes, (int, np.integer)) \
            or dataset.num_classes < 2:
        raise ValueError(
            f"Fine-tuning needs at least 2 classes; the data set {dataset.name!r} has {dataset.num_classes}: "
            "a one-class classifier is always right and learns nothing."
        )
    dataset.class_names = check_class_names(dataset.class_names, dataset.num_classes,
                                            f"Class names of {dataset.name!r}")
    for which, split in (("training", dataset.train), ("evaluation", dataset.eval)):
        if not len(split):
            raise ValueError(f"The {which} split of {dataset.name!r} is empty.")
    return dataset
