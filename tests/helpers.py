"""Small builders shared by the test modules."""

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
