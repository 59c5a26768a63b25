"""Download-once files in the Keras cache (checkpoints, label lists), atomic and verified.

Files land in `<cache_dir>/<cache_subdir>/`, where `cache_dir` is the
argument, else `$KERAS_HOME`, else `~/.keras`, so a machine without network
works from a copied cache (read-only is fine). A download is written under a
temporary name in that folder and renamed into place only once its length
matches what the server announced and, where the preset states them, its size
and sha256: a killed or truncated download never appears in the cache.
(`keras.utils.get_file` writes straight to the final name, which later calls
then trust, so it is not used for checkpoints.)
"""

import glob
import hashlib
import http.client
import os
import time
import urllib.error
import urllib.request

from keras_bit import io

CHUNK = 1 << 20
# A partial file untouched this long belongs to a killed download, not one in progress.
STALE_PARTIAL_SECONDS = 3600


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


def sha256_of(path):
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path, size=None, sha256=None):
    """None if `path` has the stated size and digest (each optional), else what differs."""
    actual = os.path.getsize(path)
    if size is not None and actual != size:
        return f"{actual} bytes, expected {size}"
    digest = sha256_of(path) if sha256 is not None else None
    if digest != sha256:
        return f"sha256 {digest}, expected {sha256}"
    return None


def _progress(total):
    if total is None or total < 4 * CHUNK:
        return None
    import keras

    return keras.utils.Progbar(total, unit_name="B")


def _remove_stale_partials(target):
    """Removes partial downloads of `target` untouched for `STALE_PARTIAL_SECONDS` (killed, not in progress)."""
    # `<name>.part-*`: what earlier keras_bit versions named partial downloads; a cache may still hold them.
    for leftover in io.temp_paths_of(target) + glob.glob(glob.escape(target) + ".part-*"):
        try:
            if time.time() - os.path.getmtime(leftover) > STALE_PARTIAL_SECONDS:
                os.remove(leftover)
        except OSError:  # removed meanwhile by another process
            pass


def _download(url, target, size, sha256):
    """Streams `url` to a temporary file beside `target`, checks it, renames it into place (flushed to disk)."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    _remove_stale_partials(target)
    with io.atomic_path(target, durable=True) as partial:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as f:
            announced = response.headers.get("Content-Length")
            announced = int(announced) if announced and announced.isdigit() else None
            progress, written = _progress(announced), 0
            for block in iter(lambda: response.read(CHUNK), b""):
                f.write(block)
                written += len(block)
                if progress is not None:
                    progress.update(written)
        if announced is not None and written != announced:
            raise DownloadError(f"the transfer stopped after {written} of {announced} bytes")
        problem = verify(partial, size, sha256)
        if problem:
            raise DownloadError(f"the downloaded file has {problem}")
    return target


def fetch(url, filename, cache_subdir, cache_dir=None, size=None, sha256=None):
    """Returns the local path of `filename`, downloading it from `url` on first use.

    Args:
        url: where to download from (`https://`, `file://`, ...).
        filename: name of the file in the cache.
        cache_subdir: folder under the cache root.
        cache_dir: cache root; None means `$KERAS_HOME` or `~/.keras`.
        size: expected size in bytes, or None.
        sha256: expected hex digest, or None.

    Raises:
        DownloadError: the file is not cached (or the cached copy fails the
            size / digest check) and the download failed; the message names
            the URL and the exact path to place the file at.

    Example:
        >>> fetch("https://storage.googleapis.com/bit_models/BiT-S-R50x1.npz", "BiT-S-R50x1.npz", "bit_models")
    """
    target = cached_path(filename, cache_subdir, cache_dir)
    stale = None
    if os.path.isfile(target):
        stale = verify(target, size, sha256)
        if stale is None:
            return target
    try:
        return _download(url, target, size, sha256)
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError and HTTPError are OSErrors
        reason = e.reason if type(e) is urllib.error.URLError else e
        cached = f" The cached copy at {target} has {stale}: delete it." if stale else ""
        raise DownloadError(
            f"Could not download {url} ({reason}).{cached} Without network access, download that file "
            f"elsewhere and place it at {target} (or set $KERAS_HOME / `cache_dir` to a folder holding "
            f"{os.path.join(cache_subdir, filename)})."
        ) from e

