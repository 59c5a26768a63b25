"""Where an export is written and how: plain names, TF Serving's version numbers, all-or-nothing moves.

Nothing is half-written: an exporter writes into a temporary folder beside
the destination (named as `keras_bit.io.temp_path` names every partial file),
its artifact is test-run there, and only then is it moved into place.
"""

import os
import re
import shutil

from keras_bit import io

_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_plain_name(value, argument):
    """`value` when it is a plain file or folder name (no separators, not `.`/`..`), else ValueError."""
    if not isinstance(value, str) or not _PLAIN_NAME.fullmatch(value):
        raise ValueError(f"`{argument}` must be a plain name (letters, digits, '.', '_', '-'; no path separators). "
                         f"Received: {argument}={value!r}")
    return value


def next_version(base_dir):
    """The next free integer version under `base_dir` (1 when there is none)."""
    if not os.path.isdir(base_dir):
        return 1
    versions = [int(d) for d in os.listdir(base_dir) if d.isascii() and d.isdigit()]
    return max(versions, default=0) + 1


def check_replaceable(path, folder):
    """FileExistsError unless an export (a `folder` or a file) may replace what is at `path` (when anything is).

    A folder is only ever replaced by a SavedModel folder, and only when it is
    a SavedModel; a file only by a file (`--output model.keras --overwrite`
    must not turn a model into a SavedModel folder). A link is replaced
    itself, never what it points to, and is judged by what it points to.
    """
    if not os.path.lexists(path):
        return
    is_dir = os.path.isdir(path)
    if is_dir and not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise FileExistsError(f"{path} is a folder that is not a SavedModel; it is never replaced")
    if is_dir != folder:
        have, new = ("a SavedModel folder", "file") if is_dir else ("a file", "SavedModel folder")
        raise FileExistsError(f"{path} is {have}; a {new} export never replaces it")


def write_atomically(path, write, overwrite=False, replaces=()):
    """Calls `write(temporary_path)`, then moves what it wrote to `path`: never a half-written export.

    `write` gets a path with `path`'s name inside a temporary folder beside
    `path` and may write siblings there too (OpenVINO's `.bin`, a labels
    file); each is moved next to `path`. Existing files are refused unless
    `overwrite`; then they, and the paths in `replaces` that this export no
    longer has (an old labels file), are removed (see `check_replaceable`).
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    # Not `io.atomic_path` (one path, one rename): an export is several files (OpenVINO's .xml and .bin, a labels
    # file), each renamed beside `path` after what they replace is moved aside. The folder holding them is named
    # as every partial file is (`io.temp_path`): unique per process and call.
    tmp = io.temp_path(path)
    os.mkdir(tmp, 0o700)
    try:
        write(os.path.join(tmp, os.path.basename(path)))
        produced = sorted(os.listdir(tmp))
        if os.path.basename(path) not in produced:
            raise RuntimeError(f"The exporter wrote nothing at {path}")
        targets = {os.path.join(parent, n) for n in produced} | {os.path.abspath(os.fspath(r)) for r in replaces}
        existing = sorted(t for t in targets if os.path.lexists(t))
        if existing and not overwrite:
            raise FileExistsError(f"{', '.join(existing)} already exist(s); pass overwrite=True (--overwrite) "
                                  "to replace")
        for target in existing:
            new = os.path.join(tmp, os.path.basename(target))
            check_replaceable(target, folder=os.path.isdir(new) and not os.path.islink(new))
        aside = os.path.join(tmp, ".replaced")
        os.mkdir(aside)
        for i, target in enumerate(existing):  # moved aside (same file system), deleted with `tmp`
            os.replace(target, os.path.join(aside, str(i)))
        for name in produced:
            os.replace(os.path.join(tmp, name), os.path.join(parent, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
