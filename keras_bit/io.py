"""The lowest layer for files from outside (TF-free): what may be opened, and how much of it may be read.

A weights file, a Hub config or a labels file is hostile until proven
otherwise: a FIFO or a device never delivers a file's end (the reader would
hang), and a text file may be any size. Readers call these before opening.
"""

import json
import os
import stat


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
