"""The tf.data pipelines on in-memory splits: augmentation, MixUp, the resumable stream, worker shards, eval."""

import numpy as np
import pytest
import tensorflow as tf

from keras_bit.train import pipeline, sources


def _arrays(n_per_class=6, classes=3, size=12, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    images = rng.integers(0, 256, size=(len(labels), size, size, 3), dtype=np.uint8)
    return images, labels


def test_mixup_uses_one_lambda_for_images_and_labels():
    images = tf.constant(np.arange(4 * 2 * 2 * 3, dtype="float32").reshape(4, 2, 2, 3))
    labels = tf.one_hot([0, 1, 2, 3], 4)
    mixed_x, mixed_y = pipeline.mixup(images, labels, 0.1, seed=0, batch_index=5)
    lam = float(mixed_y[0, 0])  # example 0 mixes with example 3: label row = (lam, 0, 0, 1 - lam)
    assert 0.0 <= lam <= 1.0
    np.testing.assert_allclose(mixed_y[0], [lam, 0, 0, 1 - lam], atol=1e-6)
    np.testing.assert_allclose(mixed_x, lam * images + (1 - lam) * images[::-1], rtol=1e-5)
    again_x, _ = pipeline.mixup(images, labels, 0.1, seed=0, batch_index=5)
    np.testing.assert_array_equal(mixed_x, again_x)  # deterministic per (seed, batch)
    lams = [float(pipeline.mixup(images, labels, 0.1, seed=0, batch_index=b)[1][0, 0]) for b in range(200)]
    assert np.mean([0.05 < v < 0.95 for v in lams]) < 0.35  # Beta(0.1, 0.1): mostly near 0 or 1


def test_train_pipeline_shapes_range_and_resume():
    images, labels = _arrays(n_per_class=5)
    split = sources.ArraySplit(images, labels)
    full = list(pipeline.train_pipeline(split, 3, 4, 40, 32, seed=7).take(9).as_numpy_iterator())
    x, y = full[0]
    assert x.shape == (4, 32, 32, 3) and y.shape == (4, 3) and x.dtype == np.float32
    assert -1.0 <= x.min() and x.max() <= 1.0
    # Starting at batch 5 gives exactly batches 5.. of the uninterrupted stream (several passes over 15 examples).
    resumed = list(pipeline.train_pipeline(split, 3, 4, 40, 32, seed=7, start_step=5).take(4).as_numpy_iterator())
    for (xa, ya), (xb, yb) in zip(full[5:], resumed):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    other = next(pipeline.train_pipeline(split, 3, 4, 40, 32, seed=8).as_numpy_iterator())
    assert not np.array_equal(other[0], x)


def test_train_pipeline_shards_are_the_global_batches():
    """Worker shards cut each global batch by position: together they are the one-process stream."""
    images, labels = _arrays(n_per_class=5)
    split = sources.ArraySplit(images, labels)
    full = list(pipeline.train_pipeline(split, 3, 8, 40, 32, seed=7, start_step=2).take(5).as_numpy_iterator())
    shards = [
        list(pipeline.train_pipeline(split, 3, 8, 40, 32, seed=7, start_step=2, shard=(k, 2),
                                 per_replica_batch_size=2).take(10).as_numpy_iterator())
        for k in range(2)
    ]
    for step, (x, y) in enumerate(full):
        # Worker k yields its 4 examples as two per-replica batches of 2, in order.
        pieces = [shards[k][2 * step + r] for k in range(2) for r in range(2)]
        np.testing.assert_array_equal(np.concatenate([p[0] for p in pieces]), x)
        np.testing.assert_array_equal(np.concatenate([p[1] for p in pieces]), y)
    with pytest.raises(ValueError, match="Cannot take shard 0 of 3 of a global batch of 8"):
        pipeline.train_pipeline(split, 3, 8, 40, 32, shard=(0, 3))
    with pytest.raises(ValueError, match="A share of 4 examples cannot be split into batches of 3"):
        pipeline.train_pipeline(split, 3, 8, 40, 32, shard=(1, 2), per_replica_batch_size=3)


def test_a_batch_larger_than_the_data_repeats_the_passes():
    """BiT's few-shot protocol: 1 example per class at a batch far above the set size."""
    images, labels = _arrays(n_per_class=1)  # 3 examples
    split = sources.ArraySplit(images, labels)
    x, y = next(pipeline.train_pipeline(split, 3, 10, 24, 16, seed=0).as_numpy_iterator())
    assert x.shape == (10, 16, 16, 3)
    # Passes 0..3 cover the set: in the first 9 positions, every example appears exactly 3 times.
    assert np.bincount(y[:9].argmax(axis=1), minlength=3).tolist() == [3, 3, 3]
    # The same example at two positions gets two different augmentations.
    first = y.argmax(axis=1) == 0
    assert not np.array_equal(x[first][0], x[first][1])


def test_train_pipeline_mixup_labels_are_soft():
    images, labels = _arrays(n_per_class=8)
    ds = pipeline.train_pipeline(sources.ArraySplit(images, labels), 3, 8, 16, 16, mixup_alpha=0.5)
    _, y = next(ds.as_numpy_iterator())
    np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-6)
    assert ((y > 0) & (y < 1)).any()


def test_eval_pipeline_resizes_without_crop():
    images, labels = _arrays(n_per_class=3)
    batches = list(pipeline.eval_pipeline(sources.ArraySplit(images, labels), 3, 4, 24).as_numpy_iterator())
    assert [b[0].shape for b in batches] == [(4, 24, 24, 3), (4, 24, 24, 3), (1, 24, 24, 3)]
    expected = tf.image.resize(images[:1].astype("float32"), (24, 24)) / 127.5 - 1
    np.testing.assert_allclose(batches[0][0][:1], expected, atol=1e-5)


def test_grayscale_arrays_become_rgb():
    images = np.random.default_rng(0).integers(0, 17, size=(8, 8, 8)).astype("float64") * 15
    ds = sources.from_arrays(images, np.arange(8) % 2)
    x, _ = next(pipeline.eval_pipeline(ds.eval, 2, 2, 32).as_numpy_iterator())
    assert x.shape[-1] == 3 and np.array_equal(x[..., 0], x[..., 2])
