"""Fine-tuning data sources: image folders, arrays, tfds, scikit-learn's digits; checks; few-shot draws.

A folder or array source is held in memory *undecoded* (file paths, encoded
bytes or uint8 arrays) and decoded after shuffling (see
`keras_bit.train.pipeline`), so shuffling and resuming are cheap; a tfds
source stays in tfds' files (`keras_bit.train.tfds_data`). `load` checks a
data set before any training step: every folder image decodes within
`max_pixels`, array pixels are finite and in [0, 255], labels are
0..C-1, at least 2 classes, class names non-empty, distinct, single-line.
"""

import dataclasses
import hashlib
import logging
import os

import numpy as np

from keras_bit.train import image_check
from keras_bit.validation import check_class_names, check_positive_int
from keras_bit.backend import tensorflow as _tensorflow

tf = _tensorflow("Fine-tuning")

logger = logging.getLogger("keras_bit")

# What tf.io.decode_image reads (the first frame of a GIF).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


@dataclasses.dataclass
class Split:
    """Undecoded examples of one split.

    Attributes:
        records: 1D array of file paths (`kind="files"`), encoded image bytes
            (`kind="encoded"`) or images (`kind="arrays"`, `(N, H, W[, C])` uint8).
        labels: int64 array `(N,)`.
        kind: "files", "encoded" or "arrays".
    """

    records: object
    labels: np.ndarray
    kind: str

    def __len__(self):
        return len(self.labels)

    def subset(self, indices):
        return Split(self.records[indices], self.labels[indices], self.kind)

    def fingerprint(self):
        """A digest of the examples and labels: what a resumed run must find unchanged.

        Files count by path (relative to their common folder, so the data set
        may move) and size; encoded records and arrays by their bytes.
        """
        digest = hashlib.sha256(self.kind.encode())
        digest.update(np.ascontiguousarray(self.labels, np.int64).tobytes())
        if self.kind == "files":
            paths = [os.fspath(p) for p in self.records]
            root = os.path.dirname(os.path.commonpath(paths)) if paths else ""
            for path in paths:
                digest.update(f"{os.path.relpath(path, root)}\0{os.path.getsize(path)}\0".encode())
        elif self.kind == "encoded":
            for record in self.records:
                digest.update(len(record).to_bytes(8, "little") + bytes(record))
        else:
            digest.update(str(self.records.shape).encode() + np.ascontiguousarray(self.records).tobytes())
        return digest.hexdigest()[:20]


@dataclasses.dataclass
class Dataset:
    """A classification data set: train and eval splits plus what the hyper-rule needs."""

    train: Split
    eval: Split
    num_classes: int
    class_names: list
    image_size: tuple  # typical (height, width) of the raw images, for BiT-HyperRule
    name: str = ""
    skipped: list = dataclasses.field(default_factory=list)  # undecodable files left out


def _check_labels(labels, num_classes, where):
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
    _check_labels(labels, np.iinfo(np.int64).max, "`labels`")
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


def _holdout(n, fraction, seed):
    """Deterministic train/eval index split (eval = `fraction` of n, at least 1)."""
    if not 0 < fraction < 1:
        raise ValueError(f"`eval_fraction` must be in (0, 1). Received: eval_fraction={fraction!r}")
    order = np.random.default_rng(seed).permutation(n)
    n_eval = max(1, int(round(n * fraction)))
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def from_arrays(images, labels, eval_data=None, eval_fraction=0.2, seed=0, class_names=None, num_classes=None):
    """A `Dataset` from NumPy images `(N, H, W[, C])` (uint8, [0, 255]) and integer labels."""
    images = np.asarray(images)
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise ValueError(
            "`images` must have shape (N, H, W), (N, H, W, 1) or (N, H, W, 3). "
            f"Received shape: {images.shape}"
        )
    if len(images) != len(labels):
        raise ValueError(
            f"`images` and `labels` have different lengths: {len(images)} images, {len(labels)} labels."
        )
    if len(images) == 0:
        raise ValueError("The data set is empty: `images` has no examples.")
    labels = np.asarray(labels)
    if num_classes is None:
        num_classes = len(class_names) if class_names is not None else _infer_num_classes(labels)
    labels = _check_labels(labels, num_classes, "`labels`")
    full = Split(_as_uint8(images, "`images`"), labels, "arrays")
    if eval_data is not None:
        eval_images, eval_labels = (np.asarray(a) for a in eval_data)
        if len(eval_images) != len(eval_labels):
            raise ValueError(
                f"`eval_data` images and labels have different lengths: {len(eval_images)} and {len(eval_labels)}."
            )
        eval_split = Split(
            _as_uint8(eval_images, "`eval_data` images"),
            _check_labels(eval_labels, num_classes, "`eval_data` labels"),
            "arrays",
        )
        train = full
    else:
        train_idx, eval_idx = _holdout(len(full), eval_fraction, seed)
        train, eval_split = full.subset(train_idx), full.subset(eval_idx)
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    return Dataset(train, eval_split, num_classes, names, tuple(images.shape[1:3]), "arrays")


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


def _drop_bad(split, bad):
    keep = ~np.isin(split.records, bad)
    return split.subset(np.flatnonzero(keep))


def from_folder(root, eval_fraction=0.2, seed=0, skip_bad_images=False, max_pixels=None):
    """A `Dataset` from `root/<class>/<image>` (or `root/train/...` and `root/test|val|validation/...`).

    Every image is decoded once here, within `max_pixels` (height x width;
    None: `keras_bit.export.DEFAULT_MAX_PIXELS`, 40 million, as for predict
    and serving; see `keras_bit.train.image_check`): a file that does not
    decode, is larger or is not a regular file raises a `ValueError` naming
    it, or with `skip_bad_images=True` is left out (listed in `Dataset.skipped`).
    """
    root = os.fspath(root)
    splits = [d for d in ("test", "validation", "val") if os.path.isdir(os.path.join(root, d))]
    if os.path.isdir(os.path.join(root, "train")) and splits:
        paths, labels, classes = _list_image_folder(os.path.join(root, "train"))
        eval_paths, eval_labels, eval_classes = _list_image_folder(os.path.join(root, splits[0]))
        if eval_classes != classes:
            raise ValueError(
                f"Class folders differ between {root}/train ({classes}) and {root}/{splits[0]} ({eval_classes})."
            )
        train, eval_split = Split(paths, labels, "files"), Split(eval_paths, eval_labels, "files")
    else:
        paths, labels, classes = _list_image_folder(root)
        train, eval_split = Split(paths, labels, "files"), None
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
        train_idx, eval_idx = _holdout(len(train), eval_fraction, seed)
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


def load(data, eval_data=None, split="train", eval_split=None, eval_fraction=0.2, seed=0, data_dir=None,
         skip_bad_images=False, max_pixels=None):
    """A checked `Dataset` from a tfds name, `"sklearn:digits"`, an image-folder path, `(images, labels)`
    arrays or a `Dataset`.

    Raises:
        ValueError: naming the problem: an unknown source, undecodable images
            or images over `max_pixels` (image folders; see `from_folder` for
            `skip_bad_images`), NaN or infinite pixels in arrays, labels
            that are not 0..C-1, fewer than 2 classes, class names that are
            empty, repeated or span lines, an empty split.
    """
    dataset = _load(data, eval_data, split, eval_split, eval_fraction, seed, data_dir, skip_bad_images, max_pixels)
    return check_dataset(dataset)


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


def _load(data, eval_data, split, eval_split, eval_fraction, seed, data_dir, skip_bad_images, max_pixels):
    if isinstance(data, Dataset):
        return data
    if isinstance(data, str) and data.startswith("sklearn:"):
        return from_sklearn(data.split(":", 1)[1], eval_fraction=eval_fraction, seed=seed)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return from_arrays(data[0], data[1], eval_data=eval_data, eval_fraction=eval_fraction, seed=seed)
    if isinstance(data, (str, os.PathLike)):
        if os.path.isfile(data):
            raise ValueError(
                f"`data` is a file: {os.fspath(data)!r}. Pass an image folder (root/<class>/<image>), a tfds "
                "name or \"sklearn:digits\"."
            )
        if folder_source(data) is not None:
            return from_folder(data, eval_fraction=eval_fraction, seed=seed, skip_bad_images=skip_bad_images,
                               max_pixels=max_pixels)
        from keras_bit.train import tfds_data  # imports tensorflow_datasets: only when a tfds name is given

        return tfds_data.from_tfds(os.fspath(data), split=split, eval_split=eval_split, data_dir=data_dir)
    raise ValueError(
        "`data` must be a tfds name, an image-folder path or an (images, labels) tuple. "
        f"Received: data of type {type(data).__name__}"
    )


def few_shot(split, examples_per_class, num_classes, seed=0):
    """Exactly `examples_per_class` examples of every class, drawn with `seed` (same seed, same draw)."""
    check_positive_int(examples_per_class, "examples_per_class")
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(split.labels == c)
        if len(members) < examples_per_class:
            raise ValueError(
                f"Class {c} has {len(members)} training examples, fewer than "
                f"examples_per_class={examples_per_class}."
            )
        chosen.append(rng.choice(members, examples_per_class, replace=False))
    return split.subset(np.sort(np.concatenate(chosen)))
