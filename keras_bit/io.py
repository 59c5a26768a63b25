"""The lowest layer for files (TF-free): what may be opened, how much of it may be read, and atomic writes.

A weights file, a Hub config or a labels file is hostile until proven
otherwise: a FIFO or a device never delivers a file's end (the reader would
hang), and a text file may be any size. Readers call these before opening.
"""

import contextlib
import glob
import json
import os
import re
import shutil
import stat
import uuid

# Largest image (height x width) decoded by default, everywhere an image is decoded (fine-tuning folders,
# `keras-bit predict`, serving): about 0.5 GB of working memory per image.
DEFAULT_MAX_PIXELS = 40_000_000


def check_regular_file(path, what="file"):
    """Returns `path` (a str) if it names a regular file (a link to one is fine), else raises ValueError.

    A FIFO, socket, device or folder is refused before it is opened: reading a
    FIFO that never delivers data would block forever, and `/dev/zero` never ends.

    Args:
        path: str, bytes or path-like.
        what: what the file is, for the message (e.g. "`weights` file").

    Raises:
        ValueError: missing, or not a regular file.
    """
    path = os.fsdecode(os.fspath(path))
    try:
        mode = os.stat(path).st_mode  # follows links: a Hugging Face snapshot entry links to a blob
    except OSError as e:
        raise ValueError(f"Cannot open {what} {path}: {e.strerror or e}") from e
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise ValueError(f"{what} {path} is {kind}, not a regular file.")
    return path


def read_bounded(path, limit, what="file"):
    """The bytes of the regular file `path`, refused (ValueError) if it is larger than `limit` bytes."""
    path = check_regular_file(path, what)
    size = os.path.getsize(path)
    if size > limit:
        raise ValueError(f"{what} {path} is {size} bytes; at most {limit} are expected.")
    with open(path, "rb") as f:
        data = f.read(limit + 1)  # the file may have grown since the size was read
    if len(data) > limit:
        raise ValueError(f"{what} {path} is larger than the {limit} bytes expected.")
    return data


def read_json_object(path, limit, what="JSON file"):
    """The JSON object (dict) stored in `path`, at most `limit` bytes; ValueError for anything else."""
    data = read_bounded(path, limit, what)
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{what} {path} must hold a JSON object, not a {type(value).__name__}.")
    return value


# --- Writing: every file keras_bit writes goes through here (temp name beside it, then one rename). ---

TEMP_PREFIX = ".writing-"


def temp_path(path):
    """Where to write `path` before renaming it into place: `.writing-<pid>-<random>-<name>` beside it.

    Unique per process and per call, so two writers never share (or remove)
    each other's partial file; the name keeps `path`'s ending, which Keras
    needs (`.keras`, `.weights.h5`). Same folder, so the rename stays on one
    file system and is atomic.
    """
    folder, name = os.path.split(os.fspath(path))
    return os.path.join(folder, f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}-{name}")


def temp_paths_of(path):
    """The temporary paths of `path` (see `temp_path`) that exist now: partial files, in progress or left by a kill."""
    folder, name = os.path.split(os.fspath(path))
    pattern = re.compile(re.escape(TEMP_PREFIX) + r"[0-9]+-[0-9a-f]{12}-" + re.escape(name))
    candidates = glob.glob(os.path.join(glob.escape(folder), glob.escape(TEMP_PREFIX) + "*-" + glob.escape(name)))
    return sorted(c for c in candidates if pattern.fullmatch(os.path.basename(c)))


def fsync_path(path):
    """Flushes a file, or a folder's names, to disk. A file's failure (EIO) raises; a folder's is ignored.

    Some file systems refuse fsync on folders (EINVAL), and a folder cannot be
    opened for reading everywhere; the file's own data is what must not be lost
    silently.
    """
    folder = os.path.isdir(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if folder:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not folder:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path, durable=False):
    """Yields a temporary path beside `path`; when the block ends without error it is renamed to `path`.

    A kill or an error leaves the old `path` or the new one, never half a file,
    and no temporary file behind (a file or a folder, whichever the block
    wrote). `durable=True` also flushes the file and its folder to disk (a
    backup that must survive a power cut).

    Example:
        >>> with atomic_path("model.keras") as tmp:
        ...     model.save(tmp)
    """
    path = os.fspath(path)
    tmp = temp_path(path)
    try:
        yield tmp
        if not os.path.lexists(tmp):
            raise FileNotFoundError(f"Nothing was written for {path}")
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
        if durable:
            fsync_path(os.path.dirname(os.path.abspath(path)))
    finally:
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.remove(tmp)


def write_bytes(path, data, durable=False):
    """Writes `data` to `path` atomically (see `atomic_path`)."""
    with atomic_path(path, durable=durable) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path, text, durable=False):
    """Writes `text` (UTF-8, newlines as given) to `path` atomically (see `atomic_path`)."""
    write_bytes(path, text.encode("utf-8"), durable=durable)


def write_json(path, value, indent=2):
    """Writes `value` as JSON to `path` atomically (see `atomic_path`)."""
    write_text(path, json.dumps(value, indent=indent))
