"""Exporting keras_bit models for deployment (TensorFlow only).

- `export_model(model, path, format=...)`: TF SavedModel, LiteRT, ONNX or OpenVINO;
  uint8 pixels in, probabilities out, preprocessing inside (formats.py); `outputs="features"`:
  the pooled pre-logits embedding instead (serving.py: `feature_network`).
- `export_saved_model(model, export_dir)`: TF Serving's `<name>/<version>/` layout
  with raw-pixel and encoded-bytes signatures (saved_model.py).
- `load_exported(path)`: run any export with its own runtime (runtimes.py).
- Bounded decoding of untrusted image bytes (image_decode.py).
"""

from keras_bit.backend import tensorflow as _tensorflow

_tensorflow("Model export")  # BackendError (not ModuleNotFoundError) without TensorFlow or on another backend

from keras_bit.export.artifact import next_version  # noqa: E402
from keras_bit.export.folding import fold_standardization  # noqa: E402
from keras_bit.export.formats import EXTENSIONS, FORMATS, QUANTIZATIONS, ExportError, export_model  # noqa: E402
from keras_bit.export.labels import imagenet_class_names, labels_path, read_labels  # noqa: E402
from keras_bit.export.runtimes import Exported, load_exported  # noqa: E402
from keras_bit.export.saved_model import DEFAULT_EXPORT_DIR, DEFAULT_MAX_PIXELS, export_saved_model  # noqa: E402
from keras_bit.export.serving import feature_network, serving_model  # noqa: E402

__all__ = ["DEFAULT_EXPORT_DIR", "DEFAULT_MAX_PIXELS", "EXTENSIONS", "FORMATS", "QUANTIZATIONS", "ExportError",
           "Exported", "export_model", "export_saved_model", "feature_network", "fold_standardization",
           "imagenet_class_names", "labels_path", "load_exported", "next_version", "read_labels", "serving_model"]
