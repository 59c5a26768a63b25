"""What a `weights=` value names, where its files are, and which reader loads them.

`resolve_source` checks a value without downloading anything; `fetch` makes its
files local (the authors' bucket through `download`, the Hugging Face Hub
through `hub_files`: huggingface_hub and its cache); `load_weights` hands a local file to
the reader of its format. Every reader goes through `core.load_strict`.
"""

import contextlib
import dataclasses
import os

from keras_bit import io, presets
from keras_bit.backend import BackendError
from keras_bit.weights import (
    core, download, hf, hub_config, hub_files, keras_archive, keras_h5, npz, safetensors_io, state_dict, tfhub, timm,
)
from keras_bit.weights.hub_files import parse_hub_handle

CACHE_SUBDIR = "bit_models"
HUB_SCHEME = hub_files.SCHEME
FORMATS = {"npz": npz, "keras": keras_h5, "keras_archive": keras_archive, "timm": timm, "transformers": hf,
           tfhub.FORMAT: tfhub}
FILE_HELP = ("the path to an official-layout .npz, a Keras .weights.h5 or a timm / transformers .safetensors file "
             "(or a TF Hub / Kaggle SavedModel folder)")


@dataclasses.dataclass(frozen=True)
class Source:
    """A resolved `weights=` value.

    Attributes:
        spec: the value as given.
        preset: the `presets.Preset`, for a published name.
        path: the local file, once known.
        format: a key of `FORMATS` ("npz", "keras", "keras_archive", "timm" or "transformers"), once known.
        classes: head size, once known (None: no head).
        resolution: the input size it was made for, where known.
        architecture: `(block_units, width_factor, base_width, groups)` stated
            by a Hub config, checked against the model before building.
        hub: `(repo_id, revision)` of an `hf://` handle.
        kaggle: the kagglehub handle of a `kaggle://` value or of a preset
            published only on Kaggle Models (a TF2 SavedModel).
    """

    spec: object
    preset: object = None
    path: str = None
    format: str = None
    classes: int = None
    resolution: int = None
    architecture: tuple = None
    hub: tuple = None
    kaggle: str = None


def weights_format(path):
    """The format of a local weights file, from its suffix (and tensor names for .safetensors)."""
    if path.endswith(npz.SUFFIX):
        return "npz"
    if path.endswith(keras_h5.SUFFIX):
        return "keras"
    if path.endswith(keras_archive.SUFFIX):
        return "keras_archive"
    if path.endswith(state_dict.SUFFIXES):
        with state_dict.open_reader(path) as reader:
            keys = set(reader.keys())
        if timm.is_timm(keys):
            return "timm"
        if hf.prefix_of(keys) is not None:
            return "transformers"
        raise ValueError(f"{path} holds neither timm nor transformers BiT tensors (no 'stem.conv.weight' or "
                         "'bit.embedder.convolution.weight').")
    raise ValueError(f"`weights` must be {FILE_HELP}. Received: weights={path!r}")


def check_file(weights, known_names=None):
    """Validates a `weights=` path; returns it as a string.

    Args:
        weights: the path (str, bytes or path-like).
        known_names: text listing the valid weights names, for the error
            raised when `weights` is neither a file nor a known name.

    Raises:
        ValueError: unknown name, missing file or unsupported suffix.
    """
    path = os.fspath(weights)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    suffixes = (npz.SUFFIX, keras_h5.SUFFIX, safetensors_io.SUFFIX)
    if not os.path.exists(path):
        names_a_file = path.endswith(suffixes) or (os.sep in path and not path.startswith("vtab/"))
        if names_a_file or known_names is None:
            raise ValueError(f"`weights` file not found. Received: weights={path!r}")
        raise ValueError(f"Unknown `weights` name. Expected one of {known_names}, an 'hf://<owner>/<repo>' or "
                         f"'kaggle://<owner>/<model>/<framework>/<variation>' handle, or {FILE_HELP}. "
                         f"Received: weights={path!r}")
    if not path.endswith(suffixes):
        raise ValueError(f"`weights` must be {FILE_HELP}. Received: weights={path!r}")
    return io.check_regular_file(path, "`weights` file")


def head_classes(path, fmt=None):
    """Class count of the head stored in a local weights file, or None if it has no head."""
    return FORMATS[fmt or weights_format(path)].head_classes(path)


def resolve_source(weights, model_name=None):
    """The `Source` named by `weights` for `model_name` (or a custom architecture); downloads nothing.

    Raises:
        ValueError: an unknown name, a malformed handle, or a missing or unreadable file.
    """
    if weights is None:
        return None
    preset = (weights if isinstance(weights, presets.Preset)
              else presets.find(model_name, weights) if model_name else None)
    if preset is not None:
        if model_name and preset.model != model_name:
            raise ValueError(f"`weights` is a checkpoint of {preset.model}, not of {model_name}. "
                             f"Received: weights={preset!r}")
        architecture = preset.architecture.spec if preset.model in presets.MODEL_NAMES else None
        kaggle = None if preset.bucket_path else presets.kaggle_handle(preset)  # e.g. the experts: Kaggle only
        return Source(weights, preset=preset, format=tfhub.FORMAT if kaggle else "npz", classes=preset.classes,
                      resolution=preset.resolution, architecture=architecture, kaggle=kaggle)
    if isinstance(weights, str) and weights.startswith(HUB_SCHEME):
        return Source(weights, hub=parse_hub_handle(weights))
    if tfhub.kaggle_handle(weights) is not None:
        return Source(weights, kaggle=tfhub.kaggle_handle(weights))
    if tfhub.is_saved_model(weights):  # a TF Hub / Kaggle SavedModel folder
        path = os.fsdecode(os.fspath(weights))
        return Source(weights, path=path, format=tfhub.FORMAT, classes=tfhub.head_classes(path))
    known = presets.weights_names_text(model_name) if model_name else "None"
    if not isinstance(weights, (str, bytes)) and not hasattr(weights, "__fspath__"):
        raise ValueError(f"`weights` must be one of {known}, an 'hf://<owner>/<repo>' or 'kaggle://...' handle, or "
                         f"{FILE_HELP}. "
                         f"Received: weights={weights!r}")
    path = check_file(weights, known)
    fmt = weights_format(path)
    return Source(weights, path=path, format=fmt, classes=head_classes(path, fmt))


def check_checkpoint_architecture(source, architecture):
    """Raises `ValueError` unless the architecture a Hub config states is `architecture`.

    Widths compare as `base_width * width_factor` (what the convolutions see).
    """
    def shape(spec):
        units, width, base, groups = spec
        return tuple(units), width * base, groups

    if source.architecture is not None and shape(source.architecture) != shape(architecture):
        units, width, base, groups = source.architecture
        raise ValueError(
            f"{source.spec} holds a BiT with block_units={units}, width_factor={width}, base_width={base}, "
            f"groups={groups}; the model asks for block_units={architecture[0]}, width_factor={architecture[1]}, "
            f"base_width={architecture[2]}, groups={architecture[3]}."
        )


def model_architecture(model):
    """`(block_units, width_factor, base_width, groups)` of a keras_bit model, from its layers.

    Only `base_width * width_factor` (the root's filters) is visible in a model, so it is reported as width 1.
    """
    units, groups = [0, 0, 0, 0], None
    for layer_id, layer, _ in core.model_variables(model):
        if layer_id.kind == "unit":
            units[layer_id.block - 1] = max(units[layer_id.block - 1], layer_id.unit)
        if layer_id.kind == "post_gn":
            groups = layer.groups
    root = model.get_layer("root_block_conv").filters
    return tuple(units), 1, root, groups


def _fetch_hub(source, architecture=None):
    repo, revision = source.hub
    name = f"hf://{repo}"
    config = hub_config.read(hub_files.download_file(repo, revision, "config.json"), name)
    kind = hub_files.config_kind(config)
    if kind == "keras":  # keras_bit's config states the architecture; Keras' own states layers (the load checks)
        stated, resolution = hub_config.keras_bit_model(config, name)
        source = dataclasses.replace(source, resolution=resolution, architecture=stated)
    else:
        reader = FORMATS[kind]
        source = dataclasses.replace(source, classes=reader.classes(config, name),
                                     resolution=reader.resolution(config, name),
                                     architecture=reader.architecture(config, name))
    if architecture is not None:
        check_checkpoint_architecture(source, architecture)  # before the weights are downloaded
    filename, path = hub_files.weights_file(repo, revision)
    with _delete_hint(path, cached=True):
        fmt = _hub_format(name, filename, path, kind)
        # The head size from the tensors: a transformers config always has labels, even for a BitModel file.
        classes = head_classes(path, fmt)
    return dataclasses.replace(source, path=path, format=fmt, classes=classes)


def _hub_format(name, filename, path, kind):
    """The `FORMATS` key of a Hub weights file, checked against the config's `kind`."""
    try:
        found = weights_format(path)
    except BackendError as e:  # torch is installed but does not import
        raise BackendError(f"{hub_files.needs_torch(name, filename)} ({e})") from e
    if kind != "keras" and found in ("timm", "transformers") and found != kind:
        raise ValueError(f"{name}: config.json describes a {kind} model but {filename} holds {found} keys.")
    return found


def fetch(source, cache_dir=None, architecture=None):
    """`source` with its files local: presets from the bucket (or its mirror), `hf://` handles from the Hub.

    Args:
        source: a `Source` from `resolve_source`.
        cache_dir: cache root of bucket downloads (default `$KERAS_HOME` or `~/.keras`).
        architecture: `(block_units, width_factor, base_width, groups)` of
            the model to load into; a Hub config stating another is refused
            before its weights are downloaded.

    Raises:
        keras_bit.DownloadError: not cached and not downloadable.
        ValueError: the Hub repository is not a loadable BiT.
    """
    if source.hub is not None:
        return _fetch_hub(source, architecture)
    if source.kaggle is not None and source.path is None:  # no config states the architecture: the load checks
        path = tfhub.fetch(source.kaggle)
        with _delete_hint(path, cached=True):
            return dataclasses.replace(source, path=path, format=tfhub.FORMAT, classes=tfhub.head_classes(path))
    if architecture is not None:
        check_checkpoint_architecture(source, architecture)  # before any download
    if source.preset is not None and source.path is None:
        preset = source.preset
        path = download.fetch(preset.url, preset.filename, CACHE_SUBDIR, cache_dir, preset.size, preset.sha256)
        classes = source.classes
        if classes is None:  # e.g. VTAB releases: the head size is in the file
            with _delete_hint(path, cached=True):
                classes = head_classes(path, "npz")
        return dataclasses.replace(source, path=path, classes=classes)
    return source


@contextlib.contextmanager
def _delete_hint(path, cached):
    """Adds "delete it" to a corrupt-file error when the file is a download keras_bit or huggingface_hub cached."""
    try:
        yield
    except ValueError as e:
        if cached and "corrupt" in str(e):
            # The real file: a Hugging Face snapshot entry is a link to a blob, which must go.
            real = os.path.realpath(path)
            raise ValueError(f"{e} It is a cached download: delete {real} to download it again.") from e
        raise


def load_source(model, source, load_head=True):
    """Loads a fetched `Source` into `model` (a corrupt cached download names the file to delete)."""
    with _delete_hint(source.path, cached=source.preset is not None or source.hub is not None or source.kaggle):
        FORMATS[source.format or weights_format(source.path)].load(model, source.path, load_head)


def load_weights(model, weights, load_head=True, fmt=None):
    """Loads a weights file (any supported format) into a keras_bit model, strictly.

    Args:
        model: a model built by keras_bit (any `include_top`, any output stride).
        weights: a local `.npz` (official layout), `.weights.h5` (Keras) or
            `.safetensors` (timm or transformers layout) file, or an
            `hf://<owner>/<repo>[@revision]` handle (the repository's first of
            `hub_files.WEIGHTS`: model.safetensors, pytorch_model.bin (needs
            PyTorch), model.weights.h5, model.keras).
        load_head: whether to load the head (the file's class count must then
            match); otherwise head tensors are skipped.
        fmt: the format (a key of `FORMATS`), when the file name does not
            tell it; e.g. "transformers" for a local pytorch_model.bin.

    Raises:
        ValueError: unreadable file, or any missing, unexpected, mis-shaped,
            non-float or non-finite tensor (named with the file). Nothing is
            assigned in that case.
        keras_bit.BackendError: a pytorch_model.bin, without PyTorch.

    Example:
        >>> model = keras_bit.BiTM_R50x1(weights=None, classes=21843)
        >>> keras_bit.load_weights(model, "hf://timm/resnetv2_50x1_bit.goog_in21k")
    """
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"`fmt` must be None or one of {sorted(FORMATS)}. Received: fmt={fmt!r}")
    if isinstance(weights, str) and weights.startswith(HUB_SCHEME):
        source = _fetch_hub(resolve_source(weights), model_architecture(model))
    elif tfhub.kaggle_handle(weights) is not None or tfhub.is_saved_model(weights):
        source = fetch(resolve_source(weights))
    elif isinstance(weights, (str, bytes)) or hasattr(weights, "__fspath__"):
        path = os.fsdecode(os.fspath(weights))
        if fmt is None or not os.path.isfile(path):
            path = check_file(path)
        source = Source(weights, path=path, format=fmt)
    else:
        raise ValueError(f"`weights` must be {FILE_HELP} or an 'hf://<owner>/<repo>' handle. "
                         f"Received: weights={weights!r}")
    # A headless model loads the backbone of a file that has a head.
    load_head = load_head and any(layer.name == "head" for layer in model.layers)
    load_source(model, source, load_head)
