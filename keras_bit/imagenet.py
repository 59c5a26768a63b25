"""ImageNet (1k and 21k) class names and prediction decoding for BiT."""

import keras
import numpy as np

from keras_bit import presets
from keras_bit.weights import download
from keras_bit.validation import check_positive_int

LABELS_SUBDIR = "bit_models"
IMAGENET21K_FILES = ("imagenet21k_wordnet_ids.txt", "imagenet21k_wordnet_lemmas.txt")


def imagenet21k_labels(cache_dir=None):
    """`(wordnet_ids, lemmas)` of BiT's 21843 ImageNet-21k classes, downloaded once into the cache."""
    ids_file, lemmas_file = IMAGENET21K_FILES
    paths = [download.fetch(presets.base_url() + f, f, LABELS_SUBDIR, cache_dir) for f in (ids_file, lemmas_file)]
    with open(paths[0], encoding="utf-8") as f:
        ids = [line.strip() for line in f if line.strip()]
    with open(paths[1], encoding="utf-8") as f:
        lemmas = [line.strip() for line in f if line.strip()]
    if len(ids) != presets.IMAGENET21K_CLASSES or len(lemmas) != presets.IMAGENET21K_CLASSES:
        raise ValueError(
            f"Expected {presets.IMAGENET21K_CLASSES} lines in {paths[0]} and {paths[1]}, found "
            f"{len(ids)} and {len(lemmas)}: delete them to download them again."
        )
    return ids, lemmas


def decode_predictions(preds, top=5, cache_dir=None):
    """Decodes ImageNet-1k or ImageNet-21k predictions into `(wnid, name, score)` lists.

    1000 columns decode with Keras' own ImageNet decoder. 21843 columns
    (BiT-M upstream heads) decode with the WordNet ids and lemmas the BiT
    authors published, downloaded once into `<cache>/bit_models/`.

    Args:
        preds: array of shape `(batch, 1000)` or `(batch, 21843)`.
        top: int (Python or NumPy), how many classes to return per row
            (all of them when `top` exceeds the class count, as in Keras).
        cache_dir: cache root for the 21k label files (default `$KERAS_HOME`
            or `~/.keras`).

    Returns:
        One list per row of `(wordnet_id, name, score)` tuples, best first.

    Raises:
        ValueError: `preds` is not 2D with 1000 or 21843 columns, holds NaN
            or infinite scores, or `top` is not a positive integer.
        TypeError: `preds` is not real-valued (e.g. strings, booleans).
        keras_bit.DownloadError: label files neither cached nor downloadable.

    Example:
        >>> decode_predictions(model.predict(x), top=3)[0]
        [('n02123045', 'tabby', 0.83), ...]
    """
    preds = keras.ops.convert_to_numpy(preds) if keras.ops.is_tensor(preds) else np.asarray(preds)
    if preds.ndim != 2 or preds.shape[1] not in (presets.IMAGENET_CLASSES, presets.IMAGENET21K_CLASSES):
        raise ValueError(
            "`decode_predictions` expects a batch of predictions of shape (samples, 1000) or "
            f"(samples, {presets.IMAGENET21K_CLASSES}). Received array of shape: {preds.shape}"
        )
    if preds.dtype == bool or not np.issubdtype(preds.dtype, np.number) or np.iscomplexobj(preds):
        raise TypeError(f"`decode_predictions` expects real-valued scores. Received: preds of dtype {preds.dtype}")
    bad = ~np.isfinite(preds)
    if bad.any():  # argsort puts NaN last, so NaN would rank first
        rows = np.flatnonzero(bad.any(axis=1))
        raise ValueError(
            f"`decode_predictions` got non-finite scores (NaN or infinity) in {len(rows)} of {len(preds)} rows "
            f"(first: row {rows[0]}): the model's output is broken, there is no ranking to decode."
        )
    top = check_positive_int(top, "top")
    if preds.shape[1] == presets.IMAGENET_CLASSES:
        target = download.cached_path("imagenet_class_index.json", "models")
        try:
            return keras.applications.imagenet_utils.decode_predictions(preds, top=top)
        except Exception as e:  # Keras' get_file raises bare Exception when offline
            raise download.DownloadError(
                f"Keras could not fetch its ImageNet class index ({e}). Without network access, "
                f"place imagenet_class_index.json at {target}."
            ) from e
    ids, lemmas = imagenet21k_labels(cache_dir)
    results = []
    for row in preds:
        best = np.argsort(row)[::-1][:top]
        results.append([(ids[i], lemmas[i], float(row[i])) for i in best])
    return results
