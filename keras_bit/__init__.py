"""keras_bit: Big Transfer (BiT) for Keras 3 / TensorFlow.

Reference:
    Kolesnikov et al., "Big Transfer (BiT): General Visual Representation
    Learning", https://arxiv.org/abs/1912.11370.
"""

from keras_bit.cache import DownloadError
from keras_bit.checkpoints import convert, load_weights, save_npz
from keras_bit.configs import MODEL_NAMES
from keras_bit.export import export_saved_model, fold_standardization
from keras_bit.train import data, hyperrule, pipeline
from keras_bit.train.distribute import MultiWorkerStrategy, tpu_strategy
from keras_bit.train.finetune import FinetuneResult, finetune
from keras_bit.imagenet import decode_predictions, preprocess_input
from keras_bit.layers import GroupNormalization, StandardizedConv2D
from keras_bit.resnet_v2 import (
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
