"""The weights of a `.keras` archive (`model.save("x.keras")`): its `model.weights.h5` member, read strictly.

A `.keras` file is a zip of `config.json`, `metadata.json` and
`model.weights.h5` (Keras writes it uncompressed). keras_bit never loads the
config (a config names classes to build, i.e. code); it copies the one member
`model.weights.h5` into a private temporary folder, under a name of its own
(nothing in the archive chooses a path), bounded in size, and reads it with
`keras_h5`'s strict reader. Every failure names the archive.
"""

import contextlib
import shutil
import tempfile
import zipfile

from keras_bit import io
from keras_bit.weights import core, keras_h5

SUFFIX = ".keras"
MEMBER = "model.weights.h5"
# An R152x4's weights are ~3.7 GB in float32; a .keras file holds a few small members besides.
MAX_MEMBER_BYTES, MAX_MEMBERS = 16 << 30, 1000
_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)


@contextlib.contextmanager
def weights_file(path):
    """Yields the path of a temporary copy of the archive's `model.weights.h5` (deleted when the block ends)."""
    path = io.check_regular_file(path, "Keras archive")
    with contextlib.ExitStack() as stack:
        with core.reading(path):
            archive = stack.enter_context(zipfile.ZipFile(path))
            members = archive.infolist()
        if len(members) > MAX_MEMBERS:
            raise ValueError(f"Keras archive {path} has {len(members)} members; at most {MAX_MEMBERS} are expected.")
        found = [m for m in members if m.filename == MEMBER]
        if len(found) != 1:
            raise ValueError(f"Keras archive {path} has {len(found)} {MEMBER} members; a .keras file has one.")
        member = found[0]
        if member.file_size > MAX_MEMBER_BYTES or member.compress_type not in _METHODS or member.flag_bits & 1:
            raise ValueError(f"Keras archive {path}: {MEMBER} is {member.file_size} bytes, compression method "
                             f"{member.compress_type}; expected at most {MAX_MEMBER_BYTES} bytes, stored or "
                             "deflated, not encrypted.")
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="keras_bit-"))
        copy = f"{folder}/{MEMBER}"
        with core.reading(path, MEMBER), archive.open(member) as source, open(copy, "wb") as target:
            # zipfile stops at the declared size and checks the CRC at the end: the copy is bounded and whole.
            shutil.copyfileobj(source, target, 1 << 20)
        try:
            yield copy
        except ValueError as e:  # keras_h5 names the copy; the user knows the archive
            raise ValueError(str(e).replace(copy, f"{path} ({MEMBER})")) from e


def head_classes(path):
    """Class count of the archive's head (from the weights' metadata), or None if it has none."""
    with weights_file(path) as copy:
        return keras_h5.head_classes(copy)


def load(model, path, load_head=True):
    """Strictly loads the weights of a `.keras` archive saved from a keras_bit model of this architecture."""
    with weights_file(path) as copy:
        keras_h5.load(model, copy, load_head)
