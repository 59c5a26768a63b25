"""Weights: every published source and file format, loaded by one strict core.

Modules: `core` (checks, then assigns all or nothing), one reader per format
(`npz`, `keras_h5`, `timm`, `hf`, with `safetensors_io`), `download` (atomic,
verified downloads into the Keras cache) and `sources` (what a `weights=`
value names and where its files are).
"""

from keras_bit.weights.download import DownloadError
from keras_bit.weights.npz import save_npz
from keras_bit.weights.sources import load_weights

__all__ = ["DownloadError", "load_weights", "save_npz"]
