"""Publishing a fine-tuned BiT on the Hugging Face Hub, in the forms timm, transformers and Keras load.

`save_pretrained` writes a folder; `push_to_hub` writes one to a temporary
place and uploads it (`huggingface_hub`: create_repo, then upload_folder).
Every form holds the same weights and a model card (README.md):

- "timm": `model.safetensors` in timm's resnetv2 layout and timm's
  `config.json` (`timm.create_model("hf-hub:<repo>", pretrained=True)`);
- "transformers": `model.safetensors` in BitForImageClassification's layout,
  its `config.json` and a BitImageProcessor `preprocessor_config.json`
  (`BitForImageClassification.from_pretrained("<repo>")`);
- "keras": `model.keras` (`keras.saving.load_model`), `model.weights.h5` and
  a `config.json` holding the `keras_bit.ResNetV2` arguments that rebuild it.

TensorFlow is never imported: publishing runs on every Keras backend.

Reference:
    timm/models/_hub.py (`push_to_hf_hub`); transformers' models/bit.
"""

import os
import shutil
import tempfile

from keras_bit import io, presets
from keras_bit.publish import card, formats
from keras_bit.validation import check_class_names, check_positive_int, is_int

FORMATS = formats.FORMATS


def _check_format(format):
    if not isinstance(format, str) or format not in FORMATS:
        raise ValueError(f"`format` must be one of {', '.join(map(repr, FORMATS))}. Received: format={format!r}")
    return format


def _image_size(image_size, info, settings):
    """(height, width): `image_size`, else the run's crop, else the model's fixed input, else BiT's 224."""
    if image_size is not None:
        if is_int(image_size):
            image_size = (image_size, image_size)
        if not isinstance(image_size, (tuple, list)) or len(image_size) != 2:
            raise ValueError(f"`image_size` must be a positive integer or (height, width). "
                             f"Received: image_size={image_size!r}")
        return tuple(check_positive_int(v, "image_size") for v in image_size)
    resolution = (settings or {}).get("resolution")
    if isinstance(resolution, list) and len(resolution) == 2 and is_int(resolution[1]) and resolution[1] > 0:
        return (resolution[1], resolution[1])  # the run evaluated at its crop size
    if info.input_size:
        return info.input_size
    return (presets.UPSTREAM_RESOLUTION,) * 2


def _read_run(run_dir):
    """`(settings, results, class_names)` of a fine-tuning run folder (each None where absent)."""
    if run_dir is None:
        return None, None, None
    from keras_bit.train.run_dir import RunDir  # NumPy only: no TensorFlow

    run = RunDir(run_dir)
    if not os.path.isdir(run.path):
        raise ValueError(f"`run_dir` is not a folder. Received: run_dir={os.fspath(run_dir)!r}")
    settings = run.read_settings()
    results = run.load().results if os.path.isfile(run.metrics_csv) else None
    names = results.class_names if results is not None else (settings or {}).get("class_names")
    return settings, results, names


def _check_folder(folder, overwrite):
    if not isinstance(folder, (str, os.PathLike)) or not os.fspath(folder):
        raise ValueError(f"`folder` must be a path. Received: folder={folder!r}")
    folder = os.path.abspath(os.fspath(folder))
    if not isinstance(overwrite, bool):
        raise ValueError(f"`overwrite` must be True or False. Received: overwrite={overwrite!r}")
    if os.path.islink(folder) or (os.path.lexists(folder) and not os.path.isdir(folder)):
        raise ValueError(f"`folder` must be a folder (not a file or a link). Received: folder={folder!r}")
    if not os.path.isdir(os.path.dirname(folder)):
        raise ValueError(f"The parent of `folder` does not exist: {os.path.dirname(folder)}")
    if os.path.isdir(folder) and os.listdir(folder) and not overwrite:
        raise FileExistsError(f"`folder` {folder} is not empty; pass overwrite=True (--overwrite) to replace it.")
    return folder


def _write_form(model, tmp, fmt, info, class_names, size):
    """The weights and configs of `fmt` into the folder `tmp`."""
    import keras_bit

    if fmt == "keras":
        model.save(os.path.join(tmp, formats.KERAS_MODEL))
        model.save_weights(os.path.join(tmp, formats.KERAS_WEIGHTS))
        io.write_json(os.path.join(tmp, "config.json"),
                      formats.keras_config(info, class_names, size, keras_bit.__version__))
        return
    key_map = formats.key_map(model, fmt, info)
    path = os.path.join(tmp, formats.SAFETENSORS)
    formats.write_safetensors(path, formats.file_tensors(key_map))
    formats.verify_safetensors(path, key_map, fmt)  # opened by keras_bit's own reader before it counts
    if fmt == "timm":
        io.write_json(os.path.join(tmp, "config.json"), formats.timm_config(info, class_names, size))
    else:
        io.write_json(os.path.join(tmp, "config.json"), formats.transformers_config(info, class_names))
        io.write_json(os.path.join(tmp, "preprocessor_config.json"), formats.preprocessor_config(size))


def _replace_folder(folder, write):
    """Calls `write(tmp)` on a new folder beside `folder`, then swaps it in: `folder` is old or new, never half."""
    aside = None
    try:
        with io.atomic_path(folder) as tmp:
            os.mkdir(tmp)
            write(tmp)
            if os.path.isdir(folder) and os.listdir(folder):  # overwrite: a non-empty folder cannot be renamed over
                aside = io.temp_path(folder)
                os.replace(folder, aside)
    except BaseException:
        if aside is not None and not os.path.lexists(folder):
            os.replace(aside, folder)
            aside = None
        raise
    finally:
        if aside is not None and os.path.isdir(aside):
            shutil.rmtree(aside, ignore_errors=True)


def save_pretrained(model, folder, format="keras", class_names=None, run_dir=None, *, repo_id=None,
                    image_size=None, overwrite=False):
    """Writes a keras_bit model into `folder` in the form timm, transformers or Keras loads, with a model card.

    Args:
        model: a BiT built by keras_bit (e.g. a fine-tuning run's model.keras).
        folder: the folder to write (created; an existing non-empty one only
            with `overwrite=True`). Written beside it first, then renamed.
        format: "timm", "transformers" or "keras" (see the module docstring).
            "timm" needs one of the published architectures (R50x1, ...).
        class_names: one name per class; default: the run's, else none
            (transformers then names them LABEL_0, ...).
        run_dir: a fine-tuning run folder: its settings, final evaluation and
            class names go into the model card.
        repo_id: "owner/name" the card's usage examples load from.
        image_size: int or (height, width) the model expects; default: the
            run's crop size, else the model's fixed input size, else 224.
        overwrite: replace a non-empty `folder`.

    Returns:
        The folder, an absolute path.

    Raises:
        ValueError / TypeError: an argument is invalid (named in the message).
        FileExistsError: `folder` is not empty and `overwrite` is False.

    Example:
        >>> keras_bit.save_pretrained(model, "flowers-bit", format="timm", run_dir="runs/flowers")
        >>> timm.create_model("local-dir:flowers-bit", pretrained=True)
    """
    fmt = _check_format(format)
    info = formats.describe(model)
    formats.check_publishable(info, fmt)
    folder = _check_folder(folder, overwrite)
    settings, results, run_names = _read_run(run_dir)
    names = class_names if class_names is not None else run_names
    if names is not None:
        if info.classes is None:
            raise ValueError(f"`class_names` names classes, but model {info.name!r} has no head.")
        names = check_class_names(list(names) if isinstance(names, tuple) else names, info.classes, "`class_names`")
    size = _image_size(image_size, info, settings)
    text = card.model_card(info, fmt, size, names, settings, results, repo_id)

    def write(tmp):
        _write_form(model, tmp, fmt, info, names, size)
        io.write_text(os.path.join(tmp, "README.md"), text)

    _replace_folder(folder, write)
    return folder


def check_repo_id(repo_id):
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if not isinstance(repo_id, str) or repo_id.count("/") != 1:
            raise HFValidationError("not owner/name")
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"`repo_id` must be a Hugging Face repository 'owner/name' (letters, digits, '-', '_', "
                         f"'.'). Received: repo_id={repo_id!r}") from e
    return repo_id


def push_to_hub(model, repo_id, format="keras", class_names=None, run_dir=None, *, private=None, token=None,
                image_size=None, commit_message=None, revision=None, create_pr=False):
    """Publishes `model` as the Hugging Face model repository `repo_id` (created if missing).

    The files are those `save_pretrained` writes (into a temporary folder,
    before anything is created on the Hub), uploaded as one commit.

    Args:
        model, format, class_names, run_dir, image_size: as `save_pretrained`.
        repo_id: "owner/name".
        private: create the repository private (None: the Hub's default).
        token: a Hugging Face token (default: `HF_TOKEN` or `hf auth login`'s).
        commit_message: default "Add <format> model (keras_bit <version>)".
        revision, create_pr: the branch to commit to, or open a pull request.

    Returns:
        huggingface_hub's `CommitInfo` (its `commit_url`, ...).

    Raises:
        ValueError / TypeError: an argument is invalid. OSError: the Hub
            refused the request (the message says why).

    Example:
        >>> keras_bit.push_to_hub(model, "me/flowers-bit", format="transformers", run_dir="runs/flowers")
    """
    import huggingface_hub
    from huggingface_hub import errors

    import keras_bit

    check_repo_id(repo_id)
    fmt = _check_format(format)
    if private is not None and not isinstance(private, bool):
        raise ValueError(f"`private` must be None, True or False. Received: private={private!r}")
    with tempfile.TemporaryDirectory(prefix="keras_bit_push_") as tmp:
        folder = save_pretrained(model, os.path.join(tmp, "model"), fmt, class_names, run_dir, repo_id=repo_id,
                                 image_size=image_size)
        api = huggingface_hub.HfApi(token=token, library_name="keras_bit", library_version=keras_bit.__version__)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            return api.upload_folder(
                repo_id=getattr(url, "repo_id", repo_id), folder_path=folder, revision=revision, create_pr=create_pr,
                commit_message=commit_message or f"Add {fmt} model (keras_bit {keras_bit.__version__})")
        except errors.HfHubHTTPError as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise OSError(f"The Hugging Face Hub refused the upload to {repo_id}: {first}") from e
