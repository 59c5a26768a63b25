"""Download-once files in the Keras cache (checkpoints, label lists).

Files go through `keras.utils.get_file` (progress bar, atomic download) into
`<cache_dir>/<cache_subdir>/`, where `cache_dir` is the argument, else
`$KERAS_HOME`, else `~/.keras`. A file already there is used as it is, so a
machine without network works from a copied cache (read-only is fine).
"""

import os

import keras


class DownloadError(OSError):
    """A file was neither in the cache nor downloadable; the message says where to put it."""


def resolve_cache_dir(cache_dir=None):
    """Returns the cache root: `cache_dir`, else `$KERAS_HOME`, else `~/.keras`."""
    if cache_dir is None:
        cache_dir = os.environ.get("KERAS_HOME") or os.path.join("~", ".keras")
    return os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))


def cached_path(filename, cache_subdir, cache_dir=None):
    """The path where `filename` is (or would be) cached."""
    return os.path.join(resolve_cache_dir(cache_dir), cache_subdir, filename)


def fetch(url, filename, cache_subdir, cache_dir=None, file_hash=None):
    """Returns the local path of `filename`, downloading it from `url` on first use.

    Args:
        url: where to download from (`https://`, `file://`, ...).
        filename: name of the file in the cache.
        cache_subdir: folder under the cache root.
        cache_dir: cache root; None means `$KERAS_HOME` or `~/.keras`.
        file_hash: optional sha256 checked by `get_file`.

    Raises:
        DownloadError: the file is not cached and the download failed; the
            message names the URL and the exact path to place the file at.
    """
    target = cached_path(filename, cache_subdir, cache_dir)
    if os.path.isfile(target) and file_hash is None:
        return target
    try:
        # get_file silently falls back to /tmp/.keras when the root does not exist yet.
        os.makedirs(os.path.dirname(target), exist_ok=True)
    except OSError:
        pass  # read-only cache: get_file will use its own fallback
    try:
        return keras.utils.get_file(
            fname=filename,
            origin=url,
            cache_subdir=cache_subdir,
            cache_dir=resolve_cache_dir(cache_dir),
            file_hash=file_hash,
        )
    except Exception as e:  # get_file raises bare Exception for URL errors
        raise DownloadError(
            f"Could not download {url} ({e}). Without network access, download that file "
            f"elsewhere and place it at {target} (or set $KERAS_HOME / `cache_dir` to a "
            f"folder holding {os.path.join(cache_subdir, filename)})."
        ) from e
