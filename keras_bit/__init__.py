"""keras_bit: Big Transfer (BiT) for Keras 3 / TensorFlow.

Reference:
    Kolesnikov et al., "Big Transfer (BiT): General Visual Representation
    Learning", https://arxiv.org/abs/1912.11370.
"""

import os as _os
import sys as _sys

# The `keras-bit` command keeps TensorFlow's C++ log lines off the console (see keras_bit.console);
# it must act before TensorFlow is imported, which the imports below do. Other programs are left alone.
if _sys.argv and _os.path.basename(_sys.argv[0]) == "keras-bit":
    from keras_bit.console import quiet_tensorflow_import

    quiet_tensorflow_import()

from keras_bit.cache import DownloadError  # noqa: E402
from keras_bit.checkpoints import convert, load_weights, save_npz  # noqa: E402
from keras_bit.configs import MODEL_NAMES  # noqa: E402
from keras_bit.export import export_saved_model, fold_standardization  # noqa: E402
from keras_bit.train import data, hyperrule, pipeline  # noqa: E402
from keras_bit.train.distribute import MultiWorkerStrategy, tpu_strategy  # noqa: E402
from keras_bit.train.finetune import FinetuneResult, finetune  # noqa: E402
from keras_bit.imagenet import decode_predictions, preprocess_input  # noqa: E402
from keras_bit.layers import GroupNormalization, StandardizedConv2D  # noqa: E402
from keras_bit.resnet_v2 import (  # noqa: E402
    BiT,
    BiTM_R50x1,
    BiTM_R50x3,
    BiTM_R101x1,
    BiTM_R101x3,
    BiTM_R152x2,
    BiTM_R152x4,
    BiTS_R50x1,
    BiTS_R50x3,
    BiTS_R101x1,
    BiTS_R101x3,
    BiTS_R152x2,
    BiTS_R152x4,
    ResNetV2,
    feature_model,
)

__version__ = "0.1.0"

__all__ = [
    "BiT",
    "BiTM_R50x1",
    "BiTM_R50x3",
    "BiTM_R101x1",
    "BiTM_R101x3",
    "BiTM_R152x2",
    "BiTM_R152x4",
    "BiTS_R50x1",
    "BiTS_R50x3",
    "BiTS_R101x1",
    "BiTS_R101x3",
    "BiTS_R152x2",
    "BiTS_R152x4",
    "DownloadError",
    "FinetuneResult",
    "MultiWorkerStrategy",
    "GroupNormalization",
    "MODEL_NAMES",
    "ResNetV2",
    "StandardizedConv2D",
    "convert",
    "data",
    "decode_predictions",
    "export_saved_model",
    "feature_model",
    "finetune",
    "fold_standardization",
    "hyperrule",
    "pipeline",
    "load_weights",
    "preprocess_input",
    "save_npz",
    "tpu_strategy",
]
