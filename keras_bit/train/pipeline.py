"""tf.data pipelines for BiT fine-tuning: augmentation, MixUp, sharding and batching of any `Split`.

The training stream is a pure function of `(seed, step)`: the split orders
its examples as a function of `(seed, position)` (`Split.stream`, see
`keras_bit.train.sources`), every random crop/flip is seeded by the example's
position in the stream and every MixUp coefficient by the batch's. A run
resumed at step s sees exactly the batches an uninterrupted run sees from
step s on. The pipelines call the split's methods only: every source works
the same way.
"""

from keras_bit.backend import tensorflow as _tensorflow
from keras_bit.preprocessing import preprocess_input
from keras_bit.train.sources.base import seed_pair

tf = _tensorflow("Fine-tuning")

_AUTOTUNE = tf.data.AUTOTUNE


def train_augment(image, index, resize, crop, seed):
    """BiT training augmentation: resize, random crop, random horizontal flip, [-1, 1]."""
    image = tf.image.resize(image, (resize, resize))  # bilinear
    image = tf.image.stateless_random_crop(image, (crop, crop, 3), seed=seed_pair(seed, index, 1))
    image = tf.image.stateless_random_flip_left_right(image, seed=seed_pair(seed, index, 2))
    return preprocess_input(image)


def eval_transform(image, crop):
    """BiT evaluation: resize straight to the crop size (no centre crop), [-1, 1]."""
    return preprocess_input(tf.image.resize(image, (crop, crop)))


def mixup(images, labels, alpha, seed, batch_index):
    """Mixes each example with the batch reversed, images and labels with one lambda ~ Beta(alpha, alpha)."""
    g = tf.random.stateless_gamma([2], seed=seed_pair(seed, batch_index, 3), alpha=alpha)
    lam = g[0] / (g[0] + g[1])
    return lam * images + (1 - lam) * tf.reverse(images, [0]), lam * labels + (1 - lam) * tf.reverse(labels, [0])


def train_pipeline(split, num_classes, batch_size, resize, crop, seed=0, mixup_alpha=0.0, start_step=0,
                   shard=(0, 1), per_replica_batch_size=None):
    """Infinite training batches `(images, one-hot labels)` of `split`, starting at batch `start_step`.

    The stream runs through the examples pass after pass, so a batch may be
    larger than the training set (BiT's few-shot protocol: 1 example per class
    at batch 512): it then holds every example several times, each with its
    own augmentation.

    Pass p over the examples is a full permutation drawn from `(seed, p)`, and
    each augmentation is seeded by the example's position in the stream, so
    batch b is the same whatever `start_step` the pipeline was built with:
    that is what makes interrupted runs resume exactly. File-backed tfds
    splits order each pass by files and shuffled windows instead, with the
    same guarantee (see `keras_bit.train.sources.tfds`).

    Multi-worker input: with `shard=(index, count)` this pipeline produces only
    its share of every global batch of `batch_size` examples (positions
    `[index * batch_size / count, (index + 1) * batch_size / count)`), and
    decodes nothing else; the `count` shards together are exactly the global
    batch of the one-process stream. `per_replica_batch_size` then splits the
    share into consecutive per-replica batches (what
    `tf.distribute.Strategy.distribute_datasets_from_function` expects). MixUp
    uses the global batch's lambda and pairs examples within the share.
    """
    shard_index, count = shard
    if batch_size % count or not 0 <= shard_index < count:
        raise ValueError(f"Cannot take shard {shard_index} of {count} of a global batch of {batch_size} examples.")
    share = batch_size // count
    first = start_step * batch_size
    ds, fetch = split.stream(seed, first).enumerate(start=first), split.fetcher()
    if count > 1:
        ds = ds.filter(lambda position, item: (position % batch_size) // share == shard_index)

    def example(index, item):
        record, label = fetch(item)
        image = train_augment(split.decode(record), index, resize, crop, seed)
        return image, split.target(label, num_classes)

    ds = ds.map(example, num_parallel_calls=_AUTOTUNE, deterministic=True)
    ds = ds.batch(share, drop_remainder=True)
    if mixup_alpha:
        ds = ds.enumerate(start=start_step).map(
            lambda b, xy: mixup(xy[0], xy[1], mixup_alpha, seed, b), num_parallel_calls=_AUTOTUNE,
            deterministic=True,  # order kept even where a caller's tf.data options allow otherwise
        )
    if per_replica_batch_size is not None and per_replica_batch_size != share:
        if share % per_replica_batch_size:
            raise ValueError(f"A share of {share} examples cannot be split into batches of {per_replica_batch_size}.")
        ds = ds.rebatch(per_replica_batch_size, drop_remainder=True)
    return ds.prefetch(_AUTOTUNE)


def eval_pipeline(split, num_classes, batch_size, crop):
    """Evaluation batches `(images, one-hot labels)` of every example of `split`, in order, last batch kept."""
    ds = split.ordered().map(
        lambda r, y: (eval_transform(split.decode(r), crop), split.target(y, num_classes)),
        num_parallel_calls=_AUTOTUNE,
        deterministic=True,  # predictions are matched to labels by position
    )
    return ds.batch(batch_size).prefetch(_AUTOTUNE)
