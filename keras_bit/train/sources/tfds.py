"""TensorFlow Datasets sources read from tfds' record files: memory bounded at any data set size.

`from_tfds` resolves a tfds name, prepares the data when it is not (failing
within seconds when the machine is offline) and returns a `Dataset` whose
splits are `TfdsSplit`s. A `TfdsSplit` holds tfds metadata only (its files
and their example counts); examples are read from the files while a pipeline
runs, and images are decoded only after shuffling and sharding.

The training stream stays a pure function of `(seed, position)`, as the
`Split` interface (`keras_bit.train.sources.base`) promises:

* pass p reads the split's files whole, in an order drawn from `(seed, p)`,
  so the metadata alone says where every file starts in the pass;
* the pass is cut into windows of `shuffle_window` consecutive records, and
  window j is shuffled with a seed drawn from `(seed, p, j)`.

Resuming at position k of pass p skips the files before k's window without
opening them, reads (without parsing) less than one file up to that window,
and drops less than one window: the cost depends on the file and window
sizes, not on the data set size. Memory holds about two windows of encoded
records (the window being served and the next one, read ahead).
"""

import difflib
import hashlib
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np

from keras_bit.backend import tensorflow as _tensorflow
from keras_bit.train.sources.base import Dataset, Split, decode_encoded
from keras_bit.train.sources.memory import EncodedSplit
from keras_bit.validation import check_positive_int

tf = _tensorflow("Fine-tuning on tfds data")
import tensorflow_datasets as tfds  # noqa: E402  (after the backend check: it imports TensorFlow)

logger = logging.getLogger("keras_bit")

# Records shuffled together in the training stream. tfds already shuffles
# examples across files when it prepares a data set, so a window of a few
# thousand records is a random sample of the set; the window reorders it anew
# every pass. Memory: about two windows of encoded records.
SHUFFLE_WINDOW = 4096
# Seconds a download host has to answer before the machine is called offline:
# tfds' own downloader retries 10 times with backoff (204 s measured).
PROBE_TIMEOUT = 3.0
_STREAM_SALT = 0x7FD5  # keeps these seeds apart from the in-memory stream's
_NO_END = np.iinfo(np.int64).max


class TfdsSplit(Split):
    """One split of a prepared tfds data set, left in its record files.

    Reference: https://www.tensorflow.org/datasets/splits (split strings)
    and https://www.tensorflow.org/datasets/determinism (tfds' file order).

    Attributes:
        kind: `"tfds"`, the tag its fingerprint digest starts with.
        split: the tfds split string (slices such as `"train[:10%]"` work).
        shuffle_window: records shuffled together in the training stream.

    Example:

    >>> ds = from_tfds("cifar10", data_dir="/data/tfds")
    >>> len(ds.train), ds.train.kind
    (50000, 'tfds')
    """

    kind = "tfds"

    def __init__(self, builder, split, keys, shuffle_window=SHUFFLE_WINDOW):
        instructions = builder.info.splits[split].file_instructions
        self._builder = builder
        self.split = split
        self.shuffle_window = shuffle_window
        self._image, self._label = keys
        self._paths = np.array([os.fspath(i.filename) for i in instructions])
        self._skips = np.array([i.skip for i in instructions], np.int64)
        self._takes = np.array([i.take for i in instructions], np.int64)
        file_format = builder.info.file_format or tfds.core.FileFormat.TFRECORD
        self._adapter = tfds.core.file_adapters.ADAPTER_FOR_FORMAT[file_format]
        self._features = tfds.decode.PartialDecoding({self._image: True, self._label: True}).extract_features(
            builder.info.features)
        self._labels = None

    def __len__(self):
        return int(self._takes.sum())

    @property
    def labels(self):
        """int64 `(N,)` labels in split order, read from the label column on first use (images unread)."""
        if self._labels is None:
            ds = self._as_dataset(tfds.decode.PartialDecoding({self._label: True}))
            ds = ds.map(lambda example: example[self._label]).batch(1 << 16)
            self._labels = np.concatenate(list(ds.as_numpy_iterator())).astype(np.int64)
        return self._labels

    def subset(self, indices):
        """The examples at `indices` (split order) as an in-memory `Split` of encoded images.

        One pass over the files; only the chosen records are kept, so a
        few-shot draw of K examples per class holds K * C records.
        """
        indices = np.asarray(indices, np.int64)
        wanted = np.zeros(len(self), bool)
        wanted[indices] = True
        ds = self.ordered().enumerate().filter(lambda i, example: tf.gather(wanted, i))
        found = {int(i): (image, label) for i, (image, label) in ds.as_numpy_iterator()}
        records = np.empty(len(indices), dtype=object)
        records[:] = [found[i][0] for i in indices.tolist()]
        labels = np.array([found[i][1] for i in indices.tolist()], np.int64)
        return EncodedSplit(records, labels)

    def fingerprint(self):
        """A digest of what the split reads: data set version, split, files, their ranges, the window.

        From tfds metadata alone (no file is opened: thousands of shards on
        `gs://` would take long to stat); a prepared tfds version never
        changes its files.
        """
        info = self._builder.info
        digest = hashlib.sha256(f"tfds\0{info.full_name}\0{self.split}\0{self.shuffle_window}\0"
                                f"{info.splits[self.split].num_bytes}\0".encode())
        for path, skip, take in zip(self._paths, self._skips, self._takes):
            digest.update(f"{os.path.basename(path)}\0{skip}\0{take}\0".encode())
        return digest.hexdigest()[:20]

    def ordered(self):
        """`(encoded image, label)` pairs in the split's fixed order (tfds' own reader, one file at a time)."""
        decoders = tfds.decode.PartialDecoding(
            {self._image: True, self._label: True}, decoders={self._image: tfds.decode.SkipDecoding()})
        return self._as_dataset(decoders).map(lambda example: (example[self._image], example[self._label]))

    def _as_dataset(self, decoders):
        # One file at a time keeps the split order; no auto-cache keeps small sets out of memory too.
        read_config = tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False)
        return self._builder.as_dataset(self.split, decoders=decoders, read_config=read_config,
                                        shuffle_files=False)

    def decode(self, record):
        return decode_encoded(record)

    def fetcher(self):
        return self.parse

    def parse(self, record):
        """`(encoded image, label)` from one serialized record of `stream` (the image stays encoded)."""
        example = self._features.deserialize_example(record, decoders={self._image: tfds.decode.SkipDecoding()})
        return example[self._image], example[self._label]

    def stream(self, seed, first):
        """Serialized records of the endless training stream, from stream position `first` on."""
        start_pass, offset = divmod(first, len(self))
        head = self._pass(seed, tf.constant(start_pass, tf.int64), offset)
        rest = tf.data.Dataset.range(start_pass + 1, _NO_END).flat_map(lambda p: self._pass(seed, p, 0))
        return head.concatenate(rest)

    def _pass(self, seed, p, start):
        """Records `start`.. of pass `p`: files in an order drawn from (seed, p), windows shuffled."""
        pass_seed = tf.random.experimental.stateless_fold_in(tf.constant([seed, _STREAM_SALT], tf.int64), p)
        order = tf.random.experimental.stateless_shuffle(
            tf.range(len(self._paths), dtype=tf.int64), seed=tf.random.experimental.stateless_fold_in(pass_seed, 0))
        window = start // self.shuffle_window
        window_start = window * self.shuffle_window
        takes = tf.gather(self._takes, order)
        ends = tf.cumsum(takes)
        # The file holding the window's first record, and how far into it that record is.
        f0 = tf.searchsorted(ends, tf.constant([window_start], tf.int64), side="right", out_type=tf.int64)[0]
        into_first = window_start - (ends[f0] - takes[f0])
        order = order[f0:]
        into = tf.concat([[into_first], tf.zeros_like(order[1:])], 0)  # only the first file starts part-way
        files = tf.data.Dataset.from_tensor_slices(
            (tf.gather(self._paths, order), tf.gather(self._skips, order) + into, takes[f0:] - into))
        records = files.flat_map(lambda path, skip, take: self._adapter.make_tf_data(path).skip(skip).take(take))
        # The next window is read while this one is served; serving by shuffled index copies no window.
        windows = records.batch(self.shuffle_window).enumerate(start=window).prefetch(1)

        def shuffled(j, w):
            seed_j = tf.random.experimental.stateless_fold_in(pass_seed, j + 1)
            index = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(w, out_type=tf.int64)[0]), seed=seed_j)
            return tf.data.Dataset.from_tensor_slices(index).map(lambda i: w[i])

        return windows.flat_map(shuffled).skip(start - window_start)


def from_tfds(name, split="train", eval_split=None, data_dir=None, shuffle_window=SHUFFLE_WINDOW):
    """A `Dataset` from a TensorFlow Datasets image classification set, read from tfds' files.

    Prepared data is used as it is; data that is not prepared is downloaded
    and prepared in `data_dir` when the machine can reach the download hosts.

    Args:
        name: tfds name, optionally with config and version (`"cifar10"`,
            `"oxford_flowers102:2.1.1"`).
        split: training split; slices work (`"train[:90%]"`).
        eval_split: evaluation split; default "test", else "validation".
        data_dir: tfds data folder (default: tfds' own, `~/tensorflow_datasets`).
        shuffle_window: records shuffled together in the training stream
            (memory holds about two windows of encoded records).

    Returns:
        A `Dataset` whose `train` and `eval` are `TfdsSplit`s.

    Raises:
        ValueError: an unknown name (with close matches), data that is
            neither prepared nor downloadable (within seconds when offline),
            an unknown split, a set without an image and a class label.

    Example:

    >>> ds = from_tfds("cifar10", data_dir="/data/tfds")
    >>> ds.num_classes, ds.image_size
    (10, (32, 32))
    """
    shuffle_window = check_positive_int(shuffle_window, "shuffle_window")
    builder = _builder(name, data_dir)
    _prepare(builder, name)
    info = builder.info
    keys = _keys(info, name)
    file_format = info.file_format or tfds.core.FileFormat.TFRECORD
    if file_format not in tfds.core.FileFormat.with_tf_data():
        raise ValueError(
            f"tfds data set {name!r} in {os.fspath(builder.data_dir)} is stored as {file_format.value}, which "
            "tf.data cannot read: prepare it again with the default format (`tfds build --file_format tfrecord`)."
        )
    if eval_split is None:
        eval_split = next((s for s in ("test", "validation") if s in info.splits), None)
        if eval_split is None:
            raise ValueError(f"tfds data set {name!r} has no 'test' or 'validation' split: pass `eval_split` "
                             f"(its splits: {sorted(info.splits)}).")
    if info.disable_shuffling:
        logger.warning("tfds data set %r is stored in generation order: the training stream shuffles only its "
                       "files and windows of %d records.", name, shuffle_window)
    train, evaluation = (_split(builder, name, s, keys, shuffle_window) for s in (split, eval_split))
    label = info.features[keys[1]]
    return Dataset(train, evaluation, label.num_classes, list(label.names),
                   _image_size(info.features[keys[0]], train), name)


def _builder(name, data_dir):
    """tfds' builder for `name`; a `ValueError` naming close matches when tfds does not know it."""
    try:
        return tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except tfds.core.DatasetNotFoundError:
        base = name.split("/")[0].split(":")[0]
        close = difflib.get_close_matches(base, tfds.list_builders(with_community_datasets=False), n=3)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"Could not load tfds data set {name!r}: tfds has no data set of that name.{hint}") from None
    except Exception as e:  # an unknown config or version: tfds raises ValueError, AssertionError, ...
        raise ValueError(f"Could not load tfds data set {name!r}: {e}") from e


def _prepare(builder, name):
    """Downloads and prepares the data unless it is ready; fails within seconds when no host answers."""
    if builder.is_prepared():
        return
    root = os.fspath(builder.data_dir_root)
    # Data sets downloaded by hand (ImageNet) are prepared from local files: nothing to probe.
    urls = [] if builder.MANUAL_DOWNLOAD_INSTRUCTIONS else _one_url_per_host(builder.url_infos or {})
    if urls and not _reachable(urls, PROBE_TIMEOUT):
        raise ValueError(
            f"tfds data set {name!r} is not prepared in {root} and could not be downloaded (no network?): "
            f"prepare it on a machine with network (`tfds build {name} --data_dir {root}`), copy that folder "
            "here and pass it with --data-dir (Python: data_dir=...)."
        )
    logger.info("Preparing tfds data set %r in %s (download, then conversion: once).", name, root)
    try:
        builder.download_and_prepare()
    except Exception as e:  # download, checksum and manual-download errors come in many types
        raise ValueError(f"tfds data set {name!r} is not prepared in {root} and preparing it failed: {e}") from e


def _one_url_per_host(urls):
    by_host = {}
    for url in sorted(urls):
        by_host.setdefault(urllib.parse.urlsplit(url).netloc, url)
    return list(by_host.values())


def _reachable(urls, timeout):
    """True when any of `urls` answers a HEAD request (any HTTP status) within `timeout` seconds.

    A full request, not a bare TCP connect: some networks accept every
    connection and only fail at TLS or HTTP. urllib follows the `*_proxy`
    environment variables as tfds' downloader (requests) does.
    """
    answered = threading.Event()

    def head(url):
        try:
            # A new opener reads the proxy variables now (urlopen's shared one keeps the first call's).
            opener = urllib.request.build_opener()
            opener.open(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            answered.set()
        except urllib.error.HTTPError:  # the server answered, with an error status: the network works
            answered.set()
        except Exception:  # no name, no route, TLS failure, timeout, not HTTP: all mean "cannot download"
            pass

    # Daemon threads: a name lookup that hangs (no resolver reachable) must not hold up the caller or exit.
    threads = [threading.Thread(target=head, args=(url,), daemon=True) for url in urls]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    while not answered.is_set() and any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        answered.wait(0.05)
    return answered.is_set()


def _keys(info, name):
    """The image and label feature names (the supervised keys when tfds gives them)."""
    keys = info.supervised_keys
    if not (isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys)):
        keys = ("image", "label")
    image, label = keys
    features = info.features
    if not (image in features and isinstance(features[image], tfds.features.Image)
            and label in features and isinstance(features[label], tfds.features.ClassLabel)):
        raise ValueError(
            f"tfds data set {name!r} is not an image classification set: fine-tuning needs an Image feature "
            f"{image!r} and a ClassLabel feature {label!r}. Its features: {list(features.keys())}"
        )
    return keys


def _split(builder, name, split, keys, shuffle_window):
    try:
        result = TfdsSplit(builder, split, keys, shuffle_window)
    except (KeyError, ValueError) as e:  # tfds: "Unknown split 'trian'. Should be one of [...]"
        raise ValueError(f"tfds data set {name!r} has no split {split!r}: {e}") from e
    if not len(result):
        raise ValueError(f"The data set is empty: tfds {name!r} split {split!r} has no examples.")
    return result


def _image_size(feature, train):
    """(height, width) from the feature metadata, else from decoding the first training image."""
    height, width = feature.shape[:2]
    if height is None or width is None:
        image, _ = next(iter(train.ordered().take(1)))
        height, width = tf.io.decode_image(image, channels=3, expand_animations=False).shape[:2]
    return int(height), int(width)
