"""The kernel library cache: build once, record what was built, load only bytes the record vouches for.

The library is compiled under a unique temporary name in
`$KERAS_HOME/keras_bit_kernels/` and renamed into place as
`group_norm_<key>.so`, where the key digests what it is built from (source,
TensorFlow version, compile command, compiler version, CPU). Beside it,
`group_norm_<key>.json`, also written under a temporary name and renamed,
records the library's size and sha256, the full key and, for a reader, what the
key is made of.

Before `tf.load_op_library`, the cached library is read once (bounded) and
checked against its record, and the bytes checked are the bytes loaded: on
Linux they are copied into a sealed in-memory file (memfd) and the loader opens
that, so a library truncated or replaced on disk after the check never reaches
it. (A truncated ELF is what killed processes with SIGBUS: the loader maps
pages the file no longer has. `read()` of a truncated file just returns fewer
bytes.) A library that loads but lacks the op symbols is refused too.

Anything wrong with the cached copy (no record, a record that is garbage, too
large, for another key or not a regular file; a library of another size or
digest, not a regular file, that does not load or lacks the ops) means one
rebuild, logged at INFO with the reason. If the rebuild or its load fails too,
`load` raises RuntimeError naming both reasons; the caller then falls back.

Links: the cache folder may be a link (people move `~/.keras`); a link in place
of the library or the record is followed for reading (what is checked is the
content) and replaced, never written through, by a rebuild (`io.atomic_path` renames).
Concurrent builders each rename their own complete files; the build is
deterministic for a key, so their libraries and records agree. Were a compiler
not deterministic, a record and library from two builders could disagree: the
next process then rebuilds once, it never loads a mismatch.

Residual, accepted: where no executable memfd can be made (macOS; Linux with
`vm.memfd_noexec=2`) the verified file is loaded by its path, so a change made
in place between the check and the load is not caught. The folder holds native
code and must be trusted in any case: whoever can write the library there can
also write a record that matches it; the record guards against accidents
(truncation, a full disk, a copied cache from another machine), not attackers.
"""

import collections
import errno
import hashlib
import json
import logging
import os
import platform
import subprocess

from keras_bit import io

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "group_norm.cc")
SUBDIR = "keras_bit_kernels"
OPS = ("keras_bit_group_norm", "keras_bit_group_norm_grad")
RECORD_LIMIT = 1 << 16  # a record is ~1 KB
LIBRARY_LIMIT = 64 << 20  # the library is ~200 KB
MFD_EXEC = getattr(os, "MFD_EXEC", 0x10)  # Linux >= 6.3; older kernels refuse the flag (EINVAL) and need none
# Open for the process's lifetime: the dynamic loader and TensorFlow remember a loaded library by its path, and
# a closed descriptor's number, hence its /proc/self/fd path, would be reused by the next library loaded.
_memfds = []
logger = logging.getLogger("keras_bit")

Cached = collections.namedtuple("Cached", ["path", "record", "key", "built_from"])


class Unusable(Exception):
    """The cached library cannot be used; the message says why. Answered by one rebuild."""


def locate(tf, cache_dir=None):
    """Where the library for this source / TensorFlow / compiler / CPU is cached, and what it is built from.

    Raises:
        RuntimeError: no C++ compiler (`$CXX`, else `c++`).
    """
    command = compile_command(tf, "OUTPUT")
    try:
        compiler = subprocess.run([command[0], "--version"], capture_output=True, check=False, text=True,
                                  errors="replace",
                                  timeout=60).stdout
    except FileNotFoundError as e:
        raise RuntimeError(f"no C++ compiler {command[0]!r} (set $CXX)") from e
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(source)
    for part in (tf.__version__, " ".join(command), compiler, _cpu_identity()):
        key.update(part.encode())
    from keras_bit.weights.download import resolve_cache_dir  # lazily: building a model imports no weights code

    stem = os.path.join(resolve_cache_dir(cache_dir), SUBDIR, f"group_norm_{key.hexdigest()[:16]}")
    built_from = {"source_sha256": hashlib.sha256(source).hexdigest(), "tensorflow": tf.__version__,
                  "command": command, "compiler": (compiler.strip().splitlines() or [""])[0]}
    return Cached(stem + ".so", stem + ".json", key.hexdigest(), built_from)


def load(tf, cached):
    """The loaded op module: the cached library if its record vouches for it, else rebuilt once.

    Raises:
        RuntimeError: neither the cached library nor a rebuild can be loaded; the message says why.
    """
    problem = None
    if os.path.lexists(cached.path):
        try:
            return load_verified(tf, read_verified(cached), cached)
        except Unusable as e:
            problem = str(e)
            logger.info("Rebuilding keras_bit's fused GroupNorm kernel: %s", problem)
    try:
        return load_verified(tf, build(tf, cached), cached)
    except (Unusable, RuntimeError, OSError, ValueError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"{problem}; the rebuild failed: {e}" if problem else str(e)) from e


def read_verified(cached):
    """The cached library's bytes, read once, if they match its record; else raises `Unusable`."""
    try:
        record = io.read_json_object(cached.record, RECORD_LIMIT, "kernel record")
        data = io.read_bounded(cached.path, LIBRARY_LIMIT, "kernel library")
    except (ValueError, OSError) as e:  # OSError: e.g. unreadable, or replaced between the check and the read
        raise Unusable(str(e)) from e
    actual = {"key": cached.key, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    for field, value in actual.items():
        if record.get(field) != value:
            raise Unusable(f"{cached.path} does not match its record {cached.record}: {field} is {value!r:.80}, "
                           f"recorded {record.get(field)!r:.80}")
    return data


def load_verified(tf, data, cached):
    """`tf.load_op_library` of exactly `data` (see the module docstring); raises `Unusable` if it fails."""
    fd = _sealed_memfd(data)
    try:
        if fd is None:
            module = tf.load_op_library(cached.path)  # the residual: see the module docstring
        else:
            _memfds.append(fd)
            module = tf.load_op_library(f"/proc/self/fd/{fd}")
    except Exception as e:  # whatever the loader says, the answer is a rebuild or the fallback
        message = getattr(e, "message", None) or str(e) or type(e).__name__
        raise Unusable(f"{cached.path} does not load: {message.splitlines()[0]}") from e
    missing = [op for op in OPS if not hasattr(module, op)]
    if missing:
        raise Unusable(f"{cached.path} loads but lacks the ops {', '.join(missing)}")
    return module


def _sealed_memfd(data):
    """A read-only, fixed-size, executable in-memory file holding `data`, or None where there is none."""
    if not hasattr(os, "memfd_create") or not os.path.isdir("/proc/self/fd"):
        return None
    import fcntl  # POSIX only, like memfd_create
    flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    try:
        try:
            fd = os.memfd_create("keras_bit_group_norm", flags | MFD_EXEC)
        except OSError as e:
            if e.errno != errno.EINVAL:  # EACCES: vm.memfd_noexec=2 forbids executable memfds
                return None
            fd = os.memfd_create("keras_bit_group_norm", flags)
    except OSError:
        return None
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
    except OSError:
        os.close(fd)
        return None
    return fd


def build(tf, cached):
    """Compiles the library into the cache (atomically), records it, and returns the bytes it built."""
    folder = os.path.dirname(cached.path)
    os.makedirs(folder, exist_ok=True)
    logger.info("Building keras_bit's fused GroupNorm kernel into %s (once per machine and TensorFlow)", cached.path)
    with io.atomic_path(cached.path) as tmp:  # another process sees the whole library or none
        command = compile_command(tf, tmp)
        done = subprocess.run(command, capture_output=True, check=False, text=True, errors="replace", timeout=600)
        if done.returncode:
            errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines()
            raise RuntimeError(f"{command[0]} failed: {errors[0] if errors else done.returncode}")
        data = io.read_bounded(tmp, LIBRARY_LIMIT, "built kernel library") if os.path.lexists(tmp) else b""
        if not data:
            raise RuntimeError(f"{command[0]} wrote an empty library")
        os.chmod(tmp, 0o755)  # whatever the umask, other users of a shared $KERAS_HOME may load it
    record = {"key": cached.key, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
              "built_from": cached.built_from}
    with io.atomic_path(cached.record) as tmp:
        with open(tmp, "wb") as f:
            f.write(json.dumps(record, indent=1).encode())
        os.chmod(tmp, 0o644)  # readable by every user of a shared $KERAS_HOME, whatever the umask
    return data


def compile_command(tf, output):
    compiler = os.environ.get("CXX", "c++")
    return [compiler, "-shared", "-fPIC", "-O3", "-march=native", "-ffp-contract=off", "-w", SOURCE, "-o", output,
            *tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags()]


def _cpu_identity():
    """The CPU's model and instruction-set flags: a library built with -march=native only runs where they match."""
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(sorted({line for line in f if line.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.machine() + platform.processor()
