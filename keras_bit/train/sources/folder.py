"""Image-folder sources: `root/<class>/<image>` or `root/train|test|validation|val/<class>/<image>`.

Every image is listed, then decoded once in full before any training step
(`keras_bit.train.sources.image_check`); the splits hold the file paths
(`FileSplit`) and the pipeline reads and decodes each file again where it is used.
"""

import logging
import os

import numpy as np

from keras_bit.train.sources import image_check
from keras_bit.train.sources.base import Dataset
from keras_bit.train.sources.draws import holdout
from keras_bit.train.sources.memory import FileSplit
from keras_bit.validation import check_class_names

logger = logging.getLogger("keras_bit")

# What tf.io.decode_image reads (the first frame of a GIF).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
_EVAL_FOLDERS = ("test", "validation", "val")


def _list_image_folder(root):
    if not os.path.isdir(root):
        raise ValueError(f"Image folder not found: {root!r}")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not classes:
        raise ValueError(f"Image folder {root!r} has no class sub-folders (expected {root}/<class>/<image>).")
    check_class_names(classes, len(classes), f"Class folders of {root!r}")
    paths, labels, bad = [], [], []
    for label, name in enumerate(classes):
        count = len(paths)
        for dirpath, _, files in sorted(os.walk(os.path.join(root, name))):
            for f in sorted(files):
                if f.startswith("."):
                    continue
                path = os.path.join(dirpath, f)
                if "\n" in f or "\r" in f:
                    bad.append(f"{path!r} (a file name spanning lines: rename it)")
                    continue
                if not f.lower().endswith(IMAGE_EXTENSIONS):
                    bad.append(f"{path} (not an image file: expected {', '.join(IMAGE_EXTENSIONS)})")
                    continue
                paths.append(path)
                labels.append(label)
        if len(paths) == count and not bad:
            raise ValueError(f"Class folder {os.path.join(root, name)!r} holds no images: add some or remove it.")
    if bad:
        raise ValueError(f"Image folder {root!r} holds files that are not images: " + "; ".join(bad[:5]))
    return np.array(paths), np.array(labels, np.int64), classes


def _listed_splits(root):
    """`(train, eval or None, class names)`: the train/eval sub-folders when both exist, else the whole folder."""
    splits = [d for d in _EVAL_FOLDERS if os.path.isdir(os.path.join(root, d))]
    if not (os.path.isdir(os.path.join(root, "train")) and splits):
        paths, labels, classes = _list_image_folder(root)
        return FileSplit(paths, labels), None, classes
    paths, labels, classes = _list_image_folder(os.path.join(root, "train"))
    eval_paths, eval_labels, eval_classes = _list_image_folder(os.path.join(root, splits[0]))
    if eval_classes != classes:
        raise ValueError(
            f"Class folders differ between {root}/train ({classes}) and {root}/{splits[0]} ({eval_classes})."
        )
    return FileSplit(paths, labels), FileSplit(eval_paths, eval_labels), classes


def _drop_bad(split, bad):
    keep = ~np.isin(split.records, bad)
    return split.subset(np.flatnonzero(keep))


def from_folder(root, eval_fraction=0.2, seed=0, skip_bad_images=False, max_pixels=None):
    """A `Dataset` from `root/<class>/<image>` (or `root/train/...` and `root/test|val|validation/...`).

    Every image is decoded once here, within `max_pixels` (height x width;
    None: `keras_bit.export.DEFAULT_MAX_PIXELS`, 40 million, as for predict
    and serving; see `keras_bit.train.sources.image_check`): a file that does
    not decode, is larger or is not a regular file raises a `ValueError`
    naming it, or with `skip_bad_images=True` is left out (listed in
    `Dataset.skipped`).
    """
    root = os.fspath(root)
    train, eval_split, classes = _listed_splits(root)
    all_paths = train.records if eval_split is None else np.concatenate([train.records, eval_split.records])
    max_pixels = image_check.DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    sizes, problems = image_check.check_images(all_paths, max_pixels)
    bad = list(problems)
    if bad and not skip_bad_images:
        raise ValueError(_bad_images_message(root, len(all_paths), problems, max_pixels)
                         + " Repair or remove them (or raise max_pixels=, --max-pixels, for larger images), or "
                           "skip them (skip_bad_images=True, --skip-bad-images).")
    if bad:
        logger.warning("Skipping %d image(s) of %d: %s", len(bad), len(all_paths),
                       _bad_images_message(root, len(all_paths), problems, max_pixels))
        train = _drop_bad(train, bad)
        eval_split = None if eval_split is None else _drop_bad(eval_split, bad)
    if eval_split is None:
        train_idx, eval_idx = holdout(len(train), eval_fraction, seed)
        train, eval_split = train.subset(train_idx), train.subset(eval_idx)
    if not len(train) or not len(eval_split):
        reason = "once undecodable files are skipped" if bad else f"with eval_fraction={eval_fraction}"
        raise ValueError(f"Image folder {root!r} leaves no {'training' if not len(train) else 'evaluation'} "
                         f"images {reason}.")
    size = tuple(int(v) for v in np.median(sizes[sizes[:, 0] >= 0], axis=0))
    return Dataset(train, eval_split, len(classes), classes, size, os.path.basename(os.path.normpath(root)),
                   skipped=bad)


def _bad_images_message(root, total, problems, max_pixels):
    found = [f"{path} ({reason})" for path, reason in problems.items()]
    return (f"{len(found)} of {total} images under {root!r} cannot be decoded by TensorFlow within "
            f"max_pixels={max_pixels}: " + ", ".join(found[:5]) + (", ..." if len(found) > 5 else "") + ".")


def folder_source(data):
    """The image folder `data` names (its absolute, resolved path), or None when `data` is another source.

    A path-like or a str naming an existing folder or holding a path separator
    is a folder; "sklearn:..." and other plain names are not (tfds names).
    """
    if not isinstance(data, (str, os.PathLike)) or isinstance(data, str) and data.startswith("sklearn:"):
        return None
    path = os.fspath(data)
    if os.path.isfile(path) or not (os.path.isdir(path) or os.sep in path):
        return None
    return os.path.realpath(path)


def check_outside(data, **paths):
    """Refuses an output folder (`output_dir=...`, `export_dir=...`) inside the image folder `data`.

    Refused rather than ignored when the folder is listed: the run would write
    its backups, logs and summary.png among the images (a new class folder,
    or PNGs read as examples), and the next run would find other data.
    """
    root = folder_source(data)
    if root is None:
        return
    for name, path in paths.items():
        if path is None:
            continue
        resolved = os.path.realpath(os.fspath(path))
        if os.path.commonpath([root, resolved]) == root:
            raise ValueError(
                f"`{name}` {os.fspath(path)} is inside the image folder {os.fspath(data)}: the run's files would "
                f"be read as images (or a class) by the next run. Choose an `{name}` outside it."
            )
