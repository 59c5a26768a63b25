"""Fine-tuning data sources: image folders, arrays, tfds, scikit-learn's digits; few-shot draws.

A source is held in memory *undecoded* (file paths, encoded bytes or uint8
arrays) and decoded after shuffling (see `keras_bit.train.pipeline`), so
shuffling and resuming are cheap.
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf

from keras_bit.validation import check_positive_int

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


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


@dataclasses.dataclass
class Dataset:
    """A classification data set: train and eval splits plus what the hyper-rule needs."""

    train: Split
    eval: Split
    num_classes: int
    class_names: list
    image_size: tuple  # typical (height, width) of the raw images, for BiT-HyperRule
    name: str = ""


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


def _as_uint8(images, where):
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.number) or images.size == 0:
        raise ValueError(f"{where} must be a numeric array of pixels in [0, 255]. Received dtype {images.dtype}")
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
    num_classes = num_classes or int(labels.max()) + 1
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
    paths, labels, bad = [], [], []
    for label, name in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, name))):
            for f in sorted(files):
                if f.startswith("."):
                    continue
                path = os.path.join(dirpath, f)
                if not f.lower().endswith(IMAGE_EXTENSIONS):
                    bad.append(f"{path} (not an image file: expected {', '.join(IMAGE_EXTENSIONS)})")
                    continue
                paths.append(path)
                labels.append(label)
    if bad:
        raise ValueError(f"Image folder {root!r} holds files that are not images: " + "; ".join(bad[:5]))
    if not paths:
        raise ValueError(f"Image folder {root!r} is empty: no images under its class sub-folders {classes}.")
    return np.array(paths), np.array(labels, np.int64), classes


def _check_images(paths):
    """Opens every image header with PIL (fast) and returns the median (height, width)."""
    from PIL import Image

    sizes = []
    for path in paths:
        try:
            with Image.open(path) as im:
                im.verify()
                sizes.append(im.size[::-1])
        except Exception as e:  # PIL raises many types for bad files
            raise ValueError(f"Unreadable image file {path}: {e}") from e
    return tuple(int(v) for v in np.median(np.array(sizes), axis=0))


def from_folder(root, eval_fraction=0.2, seed=0):
    """A `Dataset` from `root/<class>/<image>` (or `root/train/...` and `root/test|val|validation/...`)."""
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
        full = Split(paths, labels, "files")
        train_idx, eval_idx = _holdout(len(full), eval_fraction, seed)
        train, eval_split = full.subset(train_idx), full.subset(eval_idx)
    size = _check_images(np.concatenate([train.records, eval_split.records]))
    return Dataset(train, eval_split, len(classes), classes, size, os.path.basename(os.path.normpath(root)))


def _tfds_split(name, split, data_dir):
    import tensorflow_datasets as tfds

    try:
        ds, info = tfds.load(
            name, split=split, as_supervised=True, with_info=True, data_dir=data_dir,
            decoders={"image": tfds.decode.SkipDecoding()},
        )
    except Exception as e:  # tfds raises several types for unknown names and missing data
        raise ValueError(f"Could not load tfds data set {name!r} split {split!r}: {e}") from e
    records, labels = [], []
    for image, label in ds.as_numpy_iterator():
        records.append(image)
        labels.append(label)
    return Split(np.array(records, dtype=object), np.array(labels, np.int64), "encoded"), info


def from_tfds(name, split="train", eval_split=None, data_dir=None):
    """A `Dataset` from a TensorFlow Datasets name (images kept encoded until after shuffling)."""
    train, info = _tfds_split(name, split, data_dir)
    if len(train) == 0:
        raise ValueError(f"The data set is empty: tfds {name!r} split {split!r} has no examples.")
    if eval_split is None:
        available = set(info.splits.keys()) or {"test"}
        eval_split = next((s for s in ("test", "validation") if s in available), None)
        if eval_split is None:
            raise ValueError(f"tfds data set {name!r} has no 'test' or 'validation' split: pass `eval_split`.")
    evaluation, _ = _tfds_split(name, eval_split, data_dir)
    label = info.features["label"]
    shape = info.features["image"].shape
    if shape[0] is None or shape[1] is None:
        shape = tf.io.decode_image(train.records[0], channels=3, expand_animations=False).shape
    return Dataset(train, evaluation, label.num_classes, list(label.names), (int(shape[0]), int(shape[1])), name)


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


def load(data, eval_data=None, split="train", eval_split=None, eval_fraction=0.2, seed=0, data_dir=None):
    """A `Dataset` from a tfds name, `"sklearn:digits"`, an image-folder path, `(images, labels)` arrays
    or a `Dataset`."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, str) and data.startswith("sklearn:"):
        return from_sklearn(data.split(":", 1)[1], eval_fraction=eval_fraction, seed=seed)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return from_arrays(data[0], data[1], eval_data=eval_data, eval_fraction=eval_fraction, seed=seed)
    if isinstance(data, (str, os.PathLike)):
        if os.path.isdir(data) or os.sep in os.fspath(data):
            return from_folder(data, eval_fraction=eval_fraction, seed=seed)
        return from_tfds(os.fspath(data), split=split, eval_split=eval_split, data_dir=data_dir)
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
