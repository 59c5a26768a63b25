"""Fine-tuning data sources behind one interface (`keras_bit.data`): arrays, image folders, tfds, scikit-learn's digits.

Every source gives a `Dataset` of two `Split`s (`base.py`, the interface the
pipelines use): in-memory arrays, encoded images and image files
(`memory.py`; built by `arrays.py` and `folder.py`) and tfds record files
(`tfds.py`, imported only when a tfds name is loaded). `load` (`load.py`)
picks the source from `data=` and checks the data set before any training
step: every folder image decodes within `max_pixels`, array pixels are finite
and in [0, 255], labels are 0..C-1, at least 2 classes, class names non-empty,
distinct, single-line. `few_shot` (`draws.py`) draws K examples per class
from any split.

Example:
    >>> ds = keras_bit.data.load("sklearn:digits")
    >>> draw = keras_bit.data.few_shot(ds.train, 5, ds.num_classes, seed=0)
    >>> len(draw), draw.fingerprint() == keras_bit.data.few_shot(ds.train, 5, 10, seed=0).fingerprint()
    (50, True)
"""

import importlib

from keras_bit.train.sources.arrays import from_arrays, from_sklearn
from keras_bit.train.sources.base import Dataset, Split
from keras_bit.train.sources.draws import few_shot
from keras_bit.train.sources.folder import IMAGE_EXTENSIONS, check_outside, folder_source, from_folder
from keras_bit.train.sources.load import check_dataset, load
from keras_bit.train.sources.memory import ArraySplit, EncodedSplit, FileSplit, MemorySplit

__all__ = ["IMAGE_EXTENSIONS", "ArraySplit", "Dataset", "EncodedSplit", "FileSplit", "MemorySplit", "Split",
           "TfdsSplit", "check_dataset", "check_outside", "few_shot", "folder_source", "from_arrays",
           "from_folder", "from_sklearn", "from_tfds", "load"]

_TFDS = {"from_tfds", "TfdsSplit"}  # importing them imports tensorflow_datasets: on first use only


def __getattr__(name):
    if name in _TFDS:
        return getattr(importlib.import_module("keras_bit.train.sources.tfds"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
