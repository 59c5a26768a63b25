"""A run folder belongs to one run at a time: an OS file lock on `output_dir/run.lock`, held for the whole run.

`fcntl.flock` is released by the OS when the process ends, however it ends
(exit, exception, SIGKILL, a crash), so a lock file left by a killed run never
blocks the next one: only a live holder does. The file names its holder (pid,
host, start time) for the message that refuses a second run. flock conflicts
between separate opens of one file, so a second run in another thread of the
same process is refused as well. Standard library only (no TensorFlow).
"""

import contextlib
import datetime
import errno
import json
import logging
import os
import socket
import stat

from keras_bit.train.run_dir import RunDir

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are then not protected from each other (a warning says so)
    fcntl = None

logger = logging.getLogger("keras_bit")

# O_NOFOLLOW: a link planted as run.lock is refused, never followed (the holder's details overwrite the file).
_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | \
    getattr(os, "O_CLOEXEC", 0)


class RunFolderBusyError(ValueError):
    """The run folder is held by another run, in this process or another.

    Attributes:
        run_dir: str, the folder.
        holder: dict written by the holder (`pid`, `host`, `started`), empty if unreadable.
    """

    def __init__(self, run_dir, holder):
        self.run_dir, self.holder = run_dir, holder
        super().__init__(
            f"`output_dir` {run_dir} is in use by another fine-tuning run ({_describe(holder)}): two runs in one "
            "folder would overwrite each other's backups and outputs. Wait for that run to end, or choose "
            "another output directory."
        )


def _describe(holder):
    if not holder.get("pid"):
        return "its lock file names no holder yet"
    this = holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()
    return (f"pid {holder['pid']}{' (this process)' if this else ''} on host {holder.get('host')!r}, "
            f"started {holder.get('started')}")


@contextlib.contextmanager
def hold(run_dir):
    """Holds `run_dir` (a `RunDir` or path) for one run: refuses it (RunFolderBusyError) while another run holds it.

    `run_dir` is created if missing, and removed again on the way out if it
    is still empty (a run refused later, e.g. for its data, leaves nothing).
    A normal end removes the lock file.

    Yields:
        The lock file's path.

    Raises:
        RunFolderBusyError: another run holds the folder.
        ValueError: `run.lock` is not a regular file (a link, a folder...) or cannot be opened.

    Example:
        >>> with hold("runs/flowers"):  # doctest: +SKIP
        ...     train()
    """
    run_dir = RunDir(run_dir)
    path, run_dir = run_dir.lock, run_dir.path
    created = not os.path.isdir(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    fd = None
    try:
        fd = _acquire(run_dir, path)
        yield path
    finally:
        if fd is not None:
            _release(fd, path)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(run_dir)  # only if empty


def _acquire(run_dir, path):
    # The holder removes the file as it ends: a file opened just before is then no longer `path`; retry.
    for _ in range(100):
        try:
            fd = os.open(path, _OPEN_FLAGS, 0o644)
        except OSError as e:
            link = " (a symbolic link: remove it)" if e.errno == errno.ELOOP else ""
            raise ValueError(f"Cannot open the lock file {path}{link}: {e.strerror or e}") from e
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError(f"The lock file {path} is not a regular file: remove it.")
            if not _lock(fd, run_dir) or _same_file(fd, path):
                _write_holder(fd)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise ValueError(f"Cannot lock {path}: it keeps being replaced.")


def _lock(fd, run_dir):
    """Takes the lock on `fd`: True, or False on a file system without locks (warned); busy raises."""
    if fcntl is None:
        logger.warning("No file locks on this system: another run into %s would not be detected.", run_dir)
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunFolderBusyError(run_dir, _read_holder(fd)) from None
    except OSError as e:  # ENOLCK, EOPNOTSUPP: some network file systems
        logger.warning("Cannot lock %s (%s): another run into it would not be detected.", run_dir, e.strerror or e)
        return False
    return True


def _same_file(fd, path):
    try:
        here, there = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _write_holder(fd):
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started})
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (holder + "\n").encode())


def _read_holder(fd):
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 4096).decode("utf-8", "replace"))
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _release(fd, path):
    try:
        if _same_file(fd, path):
            os.remove(path)  # while still locked: a run that opened it meanwhile sees it replaced and retries
    except OSError as e:
        logger.warning("Could not remove the lock file %s: %s", path, e.strerror or e)
    finally:
        os.close(fd)
