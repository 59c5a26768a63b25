"""A Hugging Face Hub repository's files: its handle, cached downloads that work offline, and which weights file
it holds.

`hf://<owner>/<repo>[@revision]` names a repository. Its files are fetched
with `huggingface_hub.hf_hub_download` one name at a time, which reads the
cache when HF_HUB_OFFLINE=1 (a listing of the repository would need the
network). The weights are the first of `WEIGHTS` the repository holds;
`sources` hands that file to the reader of its format.
"""

import os
import re

from keras_bit.backend import BackendError
from keras_bit.weights import download, torch_bin

SCHEME = "hf://"
# A branch, tag or commit ("main", "v1.0", "refs/pr/3", a sha): huggingface_hub keeps a branch's commit in a file
# named after it under the cache, so "." / ".." parts or other characters could point outside it.
_REVISION = re.compile(r"(?!\.{1,2}(/|$))[A-Za-z0-9_.-]{1,128}(/(?!\.{1,2}(/|$))[A-Za-z0-9_.-]{1,128}){0,7}")


def parse_hub_handle(handle):
    """`("owner/name", revision or None)` of "hf://owner/name[@revision]"; ValueError naming the handle."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo, at, revision = handle[len(SCHEME):].partition("@")
    parts = repo.split("/")
    problem = len(parts) != 2 or not all(parts) or (at and not _REVISION.fullmatch(revision))
    if not problem:
        try:
            validate_repo_id(repo)
        except HFValidationError:
            problem = True
    if problem:
        raise ValueError(f"A Hugging Face handle is 'hf://<owner>/<repo>' or 'hf://<owner>/<repo>@<revision>' "
                         f"(letters, digits, '-', '_', '.'; a revision is a branch, tag or commit, with '/' "
                         f"between parts, never '.' or '..' parts). Received: weights={handle!r}")
    return repo, revision or None


def config_kind(config):
    """Who wrote a Hub config.json: "timm", "keras" (a serialized Keras model, or keras_bit's own Keras form) or,
    otherwise, "transformers"."""
    if "architecture" in config:
        return "timm"
    if config.get("library_name") == "keras_bit" or (isinstance(config.get("class_name"), str) and "config" in config):
        return "keras"
    return "transformers"


# The weights files of a Hub repository, in the order they are looked for: safetensors (no code, read lazily), a
# PyTorch pickle (older uploads, e.g. google/bit-50's main branch), then Keras' own: `keras.saving.save_model(model,
# "hf://...")` uploads model.weights.h5 beside a Keras config.json; a `.keras` archive is uploaded as one file.
WEIGHTS = ("model.safetensors", torch_bin.FILENAME, "model.weights.h5", "model.keras")
_OFFLINE_HINT = ("Without network access, fill the Hugging Face cache on a connected machine (`hf download ...`) "
                 "and copy it ($HF_HOME); HF_HUB_OFFLINE=1 then reads it from there.")


class _Absent(Exception):
    """An optional Hub file the repository lacks (`not_cached` False), or that is not cached while offline."""

    def __init__(self, not_cached):
        super().__init__(not_cached)
        self.not_cached = not_cached


def download_file(repo, revision, filename, optional=False):
    """The cached path of `filename` (downloaded unless offline); `optional`: `_Absent` when it cannot be had."""
    import huggingface_hub
    from huggingface_hub import errors

    try:
        path = huggingface_hub.hf_hub_download(repo, filename, revision=revision)
    except errors.LocalEntryNotFoundError as e:  # first: since huggingface_hub 1.0 it is an EntryNotFoundError too
        if optional:
            raise _Absent(not_cached=True) from e
        raise download.DownloadError(f"Could not get {filename} of hf://{repo} ({e}). {_OFFLINE_HINT}") from e
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as e:
        raise ValueError(f"hf://{repo}: no such Hugging Face repository or revision ({type(e).__name__}).") from e
    except errors.EntryNotFoundError as e:
        if optional:
            raise _Absent(not_cached=False) from e
        raise ValueError(f"hf://{repo} has no {filename} (timm, transformers and Keras model repositories have "
                         f"one; another revision may, 'hf://{repo}@<revision>').") from e
    except OSError as e:
        raise download.DownloadError(f"Could not get {filename} of hf://{repo}: {e}") from e
    # <cache>/models--owner--name/snapshots/<commit>/<file>, a link to ../../blobs/<digest>. A cache copied from
    # elsewhere could link anywhere: only the repository's own folder is read.
    folder = os.path.realpath(os.path.dirname(os.path.dirname(os.path.dirname(path))))
    real = os.path.realpath(path)
    if os.path.commonpath([folder, real]) != folder:
        raise ValueError(f"hf://{repo}: the cached {filename} at {path} leads outside the repository's cache folder "
                         f"{folder} (to {real}); delete it to download it again.")
    return path


def weights_file(repo, revision):
    """`(file name, cached path)` of the first of `WEIGHTS` the repository holds (offline: the cache holds)."""
    not_cached, unreadable = [], None
    for filename in WEIGHTS:
        if filename == torch_bin.FILENAME and not torch_bin.available():  # a Keras file may load; else say so
            unreadable = filename if has_file(repo, revision, filename) else None
            continue
        try:
            return filename, download_file(repo, revision, filename, optional=True)
        except _Absent as e:
            if e.not_cached:
                not_cached.append(filename)
    if unreadable:
        raise BackendError(needs_torch(f"hf://{repo}", unreadable))
    if not_cached:
        raise download.DownloadError(f"Could not get a weights file of hf://{repo} ({', '.join(not_cached)} not "
                                     f"in the cache, and no network). {_OFFLINE_HINT}")
    raise ValueError(f"hf://{repo} holds no weights file keras_bit reads (looked for {', '.join(WEIGHTS)}); "
                     f"another revision may, 'hf://{repo}@<revision>'.")


def has_file(repo, revision, filename):
    """Whether the repository (offline: the cache) holds `filename`, without downloading it."""
    import huggingface_hub
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return isinstance(huggingface_hub.try_to_load_from_cache(repo, filename, revision=revision), str)
    try:
        return huggingface_hub.file_exists(repo, filename, revision=revision)
    except Exception:  # unknown (no network, ...): the other files' errors say what happened
        return False


def needs_torch(name, filename):
    """What to do about a repository whose only weights file is a pickle and PyTorch is missing."""
    return (f"{name} has no model.safetensors, only {filename}; {torch_bin.INSTALL}. A revision holding safetensors "
            f"loads without PyTorch, e.g. the Hub's conversion pull request '{name}@refs/pr/<N>' (see the "
            "repository's Community tab).")
