"""In-memory splits: examples held *undecoded* (uint8 arrays, encoded bytes or file paths), decoded in the pipeline.

Shuffling and resuming are then cheap: pass p of the training stream is a
permutation of the example indices drawn from `(seed, p)`, and an example is
gathered and decoded only at the positions a pipeline keeps.
"""

import abc
import hashlib
import os

import numpy as np

from keras_bit.train.sources.base import Split, decode_encoded, seed_pair, tf

_NO_END = np.iinfo(np.int64).max


class MemorySplit(Split):
    """Examples held in memory: `records` (1D, one per example) and int64 `labels` `(N,)`.

    Subclasses say what a record is (`decode`, how it becomes a tensor) and
    how its bytes enter the fingerprint (`_digest_records`).
    """

    def __init__(self, records, labels):
        self.records = records
        self._labels = labels

    def __len__(self):
        return len(self._labels)

    @property
    def labels(self):
        return self._labels

    def subset(self, indices):
        return type(self)(self.records[indices], self._labels[indices])

    def fingerprint(self):
        """A digest of the examples and labels (see `_digest_records` for what counts of a record)."""
        digest = hashlib.sha256(self.kind.encode())
        digest.update(np.ascontiguousarray(self._labels, np.int64).tobytes())
        self._digest_records(digest)
        return digest.hexdigest()[:20]

    def stream(self, seed, first):
        """Example indices from stream position `first` on; pass p is a permutation drawn from (seed, p)."""
        n = len(self)
        start_pass, offset = divmod(first, n)

        def one_pass(p):
            order = tf.argsort(tf.random.stateless_uniform([n], seed=seed_pair(seed, p, 0)))
            return tf.data.Dataset.from_tensor_slices(order)

        return tf.data.Dataset.range(start_pass, _NO_END).flat_map(one_pass).skip(offset)

    def fetcher(self):
        records, labels = self._tensors()  # once per pipeline, captured by the map (not embedded in its graph)
        return lambda i: (tf.gather(records, i), tf.gather(labels, i))

    def ordered(self):
        return tf.data.Dataset.from_tensor_slices(self._tensors())

    def _tensors(self):
        return tf.constant(self._records_for_tf()), tf.constant(self._labels)

    def _records_for_tf(self):
        return self.records

    @abc.abstractmethod
    def _digest_records(self, digest):
        """Adds the records' bytes (or what identifies them) to `digest`."""


class ArraySplit(MemorySplit):
    """Images as one uint8 array `(N, H, W)`, `(N, H, W, 1)` or `(N, H, W, 3)`; grey images become RGB."""

    kind = "arrays"

    def decode(self, record):
        image = record if record.shape.rank == 3 else record[..., None]
        if image.shape[-1] == 1:
            image = tf.image.grayscale_to_rgb(image)
        image.set_shape([None, None, 3])
        return image

    def _digest_records(self, digest):
        digest.update(str(self.records.shape).encode() + np.ascontiguousarray(self.records).tobytes())


class EncodedSplit(MemorySplit):
    """Encoded images (a 1D object array of bytes), e.g. a few-shot draw from a tfds split."""

    kind = "encoded"

    def decode(self, record):
        return decode_encoded(record)

    def _records_for_tf(self):
        return list(self.records)

    def _digest_records(self, digest):
        for record in self.records:
            digest.update(len(record).to_bytes(8, "little") + bytes(record))


class FileSplit(MemorySplit):
    """Image files (a 1D array of paths), read and decoded in the pipeline."""

    kind = "files"

    def decode(self, record):
        return decode_encoded(tf.io.read_file(record))

    def _records_for_tf(self):
        return self.records.astype(str)

    def _digest_records(self, digest):
        """Files count by path (relative to their common folder, so the data set may move) and size."""
        paths = [os.fspath(p) for p in self.records]
        root = os.path.dirname(os.path.commonpath(paths)) if paths else ""
        for path in paths:
            digest.update(f"{os.path.relpath(path, root)}\0{os.path.getsize(path)}\0".encode())
