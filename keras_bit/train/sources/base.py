"""The one data interface of fine-tuning: a `Split` of examples and a `Dataset` of two splits.

Every source (NumPy arrays, encoded images, image folders, tfds) presents its
examples as a `Split`; `keras_bit.train.pipeline`, `keras_bit.train.plan` and
`keras_bit.train.finetune` use only the members below and never ask which
source a split comes from. A new source (a `tf.data.Dataset`, multi-label
data, a VTAB task) is a new `Split` subclass and a loader returning a `Dataset`.
"""

import abc
import dataclasses

from keras_bit.backend import tensorflow as _tensorflow

tf = _tensorflow("Fine-tuning")


def seed_pair(seed, index, salt):
    """The stateless seed `(2,)` int64 of one random draw: the run's `seed`, a stream `index`, a `salt`.

    One formula for every draw of the training stream, so each is a pure
    function of `(seed, index)`: salt 0 orders the passes of in-memory splits,
    1 and 2 seed each example's crop and flip, 3 each batch's MixUp lambda.
    """
    return tf.stack([tf.cast(seed, tf.int64) * 1_000_003 + salt, tf.cast(index, tf.int64)])


def decode_encoded(record):
    """uint8 `(H, W, 3)` from encoded image bytes (JPEG, PNG, BMP, GIF's first frame, WebP)."""
    image = tf.io.decode_image(record, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


class Split(abc.ABC):
    """One split of a classification data set: its examples, labels, identity and two streams.

    The training stream is endless and a pure function of `(seed, position)`:
    position `k` holds the same example whatever position the stream was
    started at (`stream(seed, first)`), which is what makes a resumed run see
    the batches of an uninterrupted one. Its items are cheap (an index, a
    serialized record); `fetcher()` turns one into `(record, label)` and
    `decode` a record into pixels, so a worker that keeps every n-th position
    reads and decodes only those.

    Attributes:
        kind: str, constant per class: the tag a fingerprint digest starts
            with (so the digests of old runs stay the same). Never dispatched on.
    """

    kind = None

    @abc.abstractmethod
    def __len__(self):
        """The number of examples."""

    @property
    @abc.abstractmethod
    def labels(self):
        """int64 `(N,)` class indices in split order."""

    @abc.abstractmethod
    def fingerprint(self):
        """A short hex digest of the examples and labels: what a resumed run must find unchanged."""

    @abc.abstractmethod
    def subset(self, indices):
        """The examples at `indices` (split order) as an in-memory `Split`: a holdout or few-shot draw."""

    @abc.abstractmethod
    def stream(self, seed, first):
        """A `tf.data.Dataset` of the training stream's items from position `first` on (endless)."""

    @abc.abstractmethod
    def fetcher(self):
        """A function (traced in a `tf.data` map) from one `stream` item to its `(record, label)` tensors."""

    @abc.abstractmethod
    def ordered(self):
        """A `tf.data.Dataset` of `(record, label)`, every example once, in split order (evaluation)."""

    @abc.abstractmethod
    def decode(self, record):
        """uint8 `(H, W, 3)` pixels of one record of `fetcher()` or `ordered()`."""

    def target(self, label, num_classes):
        """The training target of `label`: one-hot over `num_classes` (a multi-label split overrides it)."""
        return tf.one_hot(label, num_classes)


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
