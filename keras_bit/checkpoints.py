"""Official BiT `.npz` checkpoints: key map, download + cache, strict loading, conversion.

Layer names mirror the checkpoint scopes with `_` for `/`, so the map is one
rule (`checkpoint_scope`) plus three fixed names:

    block1_unit01_a_proj_conv  <->  resnet/block1/unit01/a/proj/standardized_conv2d
    block3_unit07_b_gn         <->  resnet/block3/unit07/b/group_norm
    root_block_conv            <->  resnet/root_block/standardized_conv2d
    post_gn                    <->  resnet/group_norm
    head                       <->  resnet/head/conv2d   (1x1 conv kernel == Dense kernel)

Loading is strict: every key must be used and every shape must match, else a
`ValueError` names the key (or file) and nothing is assigned.
"""

import logging
import os
import zipfile
import zlib

import numpy as np

from keras_bit import cache, configs

logger = logging.getLogger("keras_bit")

CACHE_SUBDIR = "bit_models"
HEAD_SCOPE = "resnet/head/conv2d"
KERAS_SUFFIX = ".weights.h5"
NPZ_SUFFIX = ".npz"
_FIXED_SCOPES = {
    "root_block_conv": "resnet/root_block/standardized_conv2d",
    "post_gn": "resnet/group_norm",
    "head": HEAD_SCOPE,
}
_LEAF_SCOPES = {"conv": "standardized_conv2d", "gn": "group_norm"}
# Keras .weights.h5 files name layers by class; the head is the model's only Dense.
_KERAS_HEAD_BIAS = "layers/dense/vars/1"
_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def checkpoint_scope(layer_name):
    """Returns the official checkpoint scope of a keras_bit layer name.

    Example:
        >>> checkpoint_scope("block1_unit01_a_proj_conv")
        'resnet/block1/unit01/a/proj/standardized_conv2d'
    """
    if layer_name in _FIXED_SCOPES:
        return _FIXED_SCOPES[layer_name]
    path, _, leaf = layer_name.rpartition("_")
    if not path.startswith("block") or leaf not in _LEAF_SCOPES:
        raise ValueError(
            f"Layer {layer_name!r} has no BiT checkpoint key: checkpoints load into models "
            "built by keras_bit (layers named like 'block1_unit01_a_conv')."
        )
    return f"resnet/{path.replace('_', '/')}/{_LEAF_SCOPES[leaf]}"


def check_weights_path(weights, known_names=None):
    """Validates a `weights=` path; returns it as a string.

    Args:
        weights: the path (str or path-like).
        known_names: text listing the valid weights names, for the error
            raised when `weights` is neither a file nor a known name.

    Raises:
        ValueError: unknown name, missing file or unsupported suffix.
    """
    path = os.fspath(weights)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    is_file_like = path.endswith((NPZ_SUFFIX, KERAS_SUFFIX)) or os.sep in path
    if not os.path.exists(path):
        if is_file_like or known_names is None:
            raise ValueError(f"`weights` file not found. Received: weights={path!r}")
        raise ValueError(
            f"Unknown `weights` name. Expected one of {known_names}, or the path to an "
            f"official-layout .npz or a Keras .weights.h5 file. Received: weights={path!r}"
        )
    if not path.endswith((NPZ_SUFFIX, KERAS_SUFFIX)):
        raise ValueError(
            "`weights` must be an official-layout .npz or a Keras .weights.h5 file. "
            f"Received: weights={path!r}"
        )
    return path


def _open_npz(path):
    try:
        return np.load(path, allow_pickle=False)
    except _READ_ERRORS as e:
        raise ValueError(
            f"Could not read checkpoint {path}: not a valid .npz file (truncated or corrupt?): {e}"
        ) from e


def _read_npz(npz, path, key):
    try:
        return npz[key]
    except _READ_ERRORS as e:
        raise ValueError(
            f"Could not read key {key!r} of checkpoint {path} (truncated or corrupt?): {e}"
        ) from e


def head_classes(path):
    """Class count of the head stored in a checkpoint file, or None if it has no head."""
    if path.endswith(KERAS_SUFFIX):
        import h5py

        try:
            with h5py.File(path, "r") as f:
                return int(f[_KERAS_HEAD_BIAS].shape[0]) if _KERAS_HEAD_BIAS in f else None
        except OSError as e:
            raise ValueError(f"Could not read Keras weights file {path}: {e}") from e
    with _open_npz(path) as npz:
        bias_key = f"{HEAD_SCOPE}/bias"
        return int(_read_npz(npz, path, bias_key).shape[0]) if bias_key in npz.files else None


def fetch(checkpoint, cache_dir=None):
    """Returns the local path of a published checkpoint, downloading it once.

    Args:
        checkpoint: a `configs.Checkpoint`.
        cache_dir: cache root (default `$KERAS_HOME` or `~/.keras`); the file
            lives in `<cache_dir>/bit_models/`.

    Raises:
        keras_bit.DownloadError: no cached copy and no network.
    """
    return cache.fetch(checkpoint.url, checkpoint.filename, CACHE_SUBDIR, cache_dir)


def _expected_arrays(model, load_head):
    """Maps checkpoint key -> (variable, shape in the file)."""
    expected = {}
    for layer in model.layers:
        if not layer.weights or (layer.name == "head" and not load_head):
            continue
        scope = checkpoint_scope(layer.name)
        for variable in layer.weights:
            shape = tuple(variable.shape)
            if layer.name == "head" and variable.name == "kernel":
                shape = (1, 1) + shape  # stored as a 1x1 convolution
            expected[f"{scope}/{variable.name}"] = (variable, shape)
    return expected


def _few(keys, n=5):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def _load_npz(model, path, load_head):
    expected = _expected_arrays(model, load_head)
    with _open_npz(path) as npz:
        present = set(npz.files)
        ignorable = {k for k in present if k.startswith(HEAD_SCOPE + "/")} if not load_head else set()
        missing = set(expected) - present
        unexpected = present - set(expected) - ignorable
        if missing or unexpected:
            problems = []
            if missing:
                problems.append(f"{len(missing)} missing keys: {_few(missing)}")
            if unexpected:
                problems.append(f"{len(unexpected)} unexpected keys: {_few(unexpected)}")
            raise ValueError(
                f"Checkpoint {path} does not match model {model.name!r} ("
                + "; ".join(problems)
                + "). Is it a checkpoint of another architecture?"
            )
        values = []
        for key in sorted(expected):
            variable, shape = expected[key]
            value = _read_npz(npz, path, key)
            if value.shape != shape:
                raise ValueError(
                    f"Checkpoint {path}: key {key!r} has shape {value.shape}, model "
                    f"{model.name!r} expects {shape}. Is it a checkpoint of another architecture?"
                )
            if not np.issubdtype(value.dtype, np.floating):
                raise ValueError(
                    f"Checkpoint {path}: key {key!r} has dtype {value.dtype}, expected floating point."
                )
            if not np.all(np.isfinite(value)):
                raise ValueError(f"Checkpoint {path}: key {key!r} contains NaN or infinite values.")
            values.append((variable, value.reshape(variable.shape)))
    # Assign only once every key has been checked: a bad file never half-loads a model.
    for variable, value in values:
        variable.assign(value.astype(variable.dtype, copy=False))


def _load_keras(model, path, load_head):
    import keras

    target = model
    if not load_head and "head" in {layer.name for layer in model.layers}:
        # The backbone sub-model shares the layers; the file's head (any size) is then skipped.
        target = keras.Model(model.input, model.get_layer("post_relu").output)
    try:
        target.load_weights(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"Keras weights file {path} does not match model {model.name!r}: {e}") from e


def load_weights(model, path, load_head=True):
    """Loads an official-layout `.npz` or a Keras `.weights.h5` into a keras_bit model.

    Args:
        model: a model built by keras_bit (any `include_top`).
        path: the checkpoint file.
        load_head: whether to load the head (`include_top=True` with the
            checkpoint's class count); otherwise head keys are skipped.

    Raises:
        ValueError: unreadable file, or any missing, unexpected, mis-shaped,
            non-float or non-finite key. Nothing is assigned in that case.
    """
    path = os.fspath(path)
    if path.endswith(KERAS_SUFFIX):
        _load_keras(model, path, load_head)
    else:
        _load_npz(model, path, load_head)


def save_npz(model, path):
    """Writes a keras_bit model in the official `.npz` key layout (the inverse of loading)."""
    arrays = {}
    for key, (variable, shape) in _expected_arrays(model, load_head=True).items():
        arrays[key] = np.asarray(variable.numpy(), dtype=np.float32).reshape(shape)
    np.savez(path, **arrays)


def convert(npz_path, output_path, model_name):
    """Converts an official `.npz` checkpoint to a Keras `.weights.h5` file.

    Args:
        npz_path: path of the official-layout checkpoint.
        output_path: destination, ending in `.weights.h5`.
        model_name: the checkpoint's architecture, e.g. "BiT-M-R50x1".

    Returns:
        The built `keras.Model` holding the converted weights.

    Example:
        >>> convert("BiT-M-R50x1.npz", "bit_m_r50x1.weights.h5", "BiT-M-R50x1")
    """
    from keras_bit.resnet_v2 import BiT

    output_path = os.fspath(output_path)
    if not output_path.endswith(KERAS_SUFFIX):
        raise ValueError(f"`output_path` must end with {KERAS_SUFFIX!r}. Received: {output_path!r}")
    configs.split_model_name(model_name)
    npz_path = check_weights_path(npz_path)
    classes = head_classes(npz_path)
    model = BiT(model_name, include_top=classes is not None, weights=npz_path, input_shape=(None, None, 3))
    model.save_weights(output_path)
    logger.info("Wrote %s (%s, %s classes).", output_path, model_name, classes or "no head")
    return model
