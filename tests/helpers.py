"""Small builders shared by the test modules."""

import functools

import keras
import numpy as np

import keras_bit
import reference

TINY = dict(block_units=(2, 1, 1, 1), base_width=32, groups=8)  # unit02: an identity shortcut
TINY_SIZE = 64


def tiny_checkpoint(path, classes=10, seed=0, **kwargs):
    """Writes a random tiny official-layout .npz; returns its dict."""
    d = reference.random_checkpoint(TINY["block_units"], base=TINY["base_width"], classes=classes, seed=seed, **kwargs)
    np.savez(path, **d)
    return d


def tiny_model(weights=None, **kwargs):
    kwargs.setdefault("input_shape", (TINY_SIZE, TINY_SIZE, 3))
    return keras_bit.ResNetV2(weights=weights, **TINY, **kwargs)


def images(rng, n=2, size=TINY_SIZE):
    """Preprocessed-range inputs in [-1, 1]."""
    return rng.uniform(-1.0, 1.0, size=(n, size, size, 3)).astype("float32")


TINY_BUILDER = functools.partial(keras_bit.ResNetV2, **TINY)


def learnable(n_per_class=24, size=16, seed=0):
    """Three classes told apart by colour: a task a tiny BiT learns in a few dozen steps."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), n_per_class)
    base = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]])[labels]
    pixels = base[:, None, None, :] + rng.integers(-30, 30, size=(len(labels), size, size, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8), labels


def run_finetune(tmp_path, name="run", data=None, **kwargs):
    """A tiny fine-tuning run (batch 8, 20 steps at 36/32 px, quiet) in `tmp_path / name`."""
    kwargs.setdefault("batch_size", 8)
    kwargs.setdefault("steps", 20)
    kwargs.setdefault("resolution", (36, 32))
    kwargs.setdefault("base_lr", 0.5)
    kwargs.setdefault("verbose", 0)
    return keras_bit.finetune(TINY_BUILDER, learnable() if data is None else data, output_dir=tmp_path / name,
                              **kwargs)


class Crash(keras.callbacks.Callback):
    """Raises KeyboardInterrupt after `after_batches` training batches: a killed run."""

    def __init__(self, after_batches):
        super().__init__()
        self.after = after_batches
        self.seen = 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.after:
            raise KeyboardInterrupt("simulated crash")
