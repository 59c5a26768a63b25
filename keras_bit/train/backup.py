"""Training backups: model and optimizer state every few steps, written atomically, restored with fallback.

A *backup* (not a published *checkpoint*) is one file per optimizer step,
`backup_dir/step-000000120.weights.h5`, written by `model.save_weights`, which in
Keras 3 also stores the optimizer's variables (its step counter, momentum,
gradient accumulators, a loss-scale optimizer's scale). The step is the file
name, and the file is renamed into place only once it is complete and on disk,
so weights can never be paired with another step's bookkeeping, and a run
killed at any instant leaves only complete backups under final names.

Keras 3.15's optimizer counters, checked in its source and by the tests:

- the saved counter is the optimizer's `iteration` variable. With
  `gradient_accumulation_steps=k` it counts micro-batches (k per optimizer
  step) while the `iterations` property returns it floor-divided by k; hence
  `restore(..., iterations_per_step=k)`;
- `LossScaleOptimizer` (the `mixed_float16` policy) skips the update, counter
  included, on a step whose gradients overflow, so under it the counter may
  lag the step: it is checked to be at most the expected value, not equal.

Typical use: `step = restore(model, backup_dir, iterations_per_step=k)` inside
`strategy.scope()` after `model.compile(...)`, then `model.fit(...,
initial_epoch=step // steps_per_epoch, callbacks=[Backup(backup_dir, ...)])`.
"""

import errno
import logging
import math
import os
import re
import shutil

import keras
import numpy as np

from keras_bit.io import TEMP_PREFIX, atomic_path, write_text
from keras_bit.validation import check_positive_int
from keras_bit.weights.download import sha256_of

logger = logging.getLogger("keras_bit")

_NAME = re.compile(r"^step-(\d{9})\.weights\.h5$")
# A file being written is named by `keras_bit.io.temp_path` (`.writing-<pid>-<random>-<final name>`, the
# `.weights.h5` ending Keras needs): the leading dot keeps it out of `ls` and of `_NAME`, so `restore` never sees it.
# Each backup's sha256, in `step-N.weights.h5.sha256` beside it.
_DIGEST_SUFFIX = ".sha256"
# keras.callbacks.BackupAndRestore's files (the format used before this module).
_OLD_FORMAT = ("latest.weights.h5", "latest.weights.h5.bkp", "training_metadata.json",
               "training_metadata.json.bkp")
# HDF5 overhead measured on Keras 3.15 `.weights.h5` files: 0.9-2.5 KB per variable
# (a tiny BiT with 110 variables: 187 KB), plus a few KB per file.
_H5_BYTES_PER_VARIABLE = 2048
_H5_BYTES_PER_FILE = 16384
_SPACE_MARGIN = 0.05
_SPACE_MARGIN_BYTES = 1 << 16


class BackupError(OSError):
    """A backup could not be written; the previous complete backup is untouched.

    A subclass of `OSError`, so the command line reports it as one line.
    """


def backup_path(backup_dir, step):
    """The file of the backup at optimizer step `step`: `backup_dir/step-000000120.weights.h5`."""
    return os.path.join(os.fspath(backup_dir), f"step-{step:09d}.weights.h5")


def list_backups(backup_dir):
    """`[(step, path), ...]` of the complete backups in `backup_dir`, newest first ([] if it does not exist)."""
    backup_dir = os.fspath(backup_dir)
    try:
        names = os.listdir(backup_dir)
    except (FileNotFoundError, NotADirectoryError):  # the writer reports a file in the way
        return []
    found = [(int(m.group(1)), os.path.join(backup_dir, n)) for n in names if (m := _NAME.match(n))]
    return sorted(found, reverse=True)


def _mb(n):
    return f"{n / 1e6:.1f} MB" if n < 1e7 else f"{n / 1e6:.0f} MB"


def _one_line(error, limit=300):
    text = " ".join(str(error).split()) or type(error).__name__  # Keras' load errors span several lines
    return text if len(text) <= limit else text[:limit] + "..."


def _nbytes(variable):
    bits = re.search(r"\d+", keras.backend.standardize_dtype(variable.dtype))
    return math.prod(variable.shape) * (max(1, int(bits.group()) // 8) if bits else 1)  # bool: 1 byte


def _estimated_size(model):
    """Bytes `model.save_weights` will write: every variable, plus HDF5's own bookkeeping."""
    variables = list(model.weights) + list(model.optimizer.variables)
    return sum(_nbytes(v) for v in variables) + _H5_BYTES_PER_VARIABLE * len(variables) + _H5_BYTES_PER_FILE


def _check_free_space(model, folder, newest):
    # Checked before HDF5 writes anything: HDF5 cannot recover from a full disk in mid-file
    # (h5py/h5py#914), see `_discard`.
    needed = max(_estimated_size(model), os.path.getsize(newest) if newest else 0)
    needed = int(needed * (1 + _SPACE_MARGIN)) + _SPACE_MARGIN_BYTES
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"No space left on device: needs about {_mb(needed)}, {_mb(free)} free")


def _close_hdf5_file(path):
    """Closes the HDF5 handle a failed `save_weights` left open on `path`, if any.

    Keras 3.15 does not close its HDF5 store when a write fails, and once a
    write has hit a full disk HDF5 crashes the interpreter (segfault) when it
    later tries to flush that handle, at the latest at exit (h5py/h5py#914).
    Closing it here, after `path` was emptied, lets that last flush succeed.
    """
    import h5py

    target = os.path.realpath(path)
    for file_id in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE):
        if os.path.realpath(os.fsdecode(file_id.name)) == target:
            h5py.File(file_id).close()


def _discard(temp):
    """Removes a partly written backup, and any HDF5 handle still open on it."""
    try:
        if os.path.exists(temp):
            os.truncate(temp, 0)  # frees the disk space HDF5's final flush may need
        _close_hdf5_file(temp)
    except Exception as e:  # still remove the file; the caller reports the first error
        logger.warning("Could not close %s cleanly: %s", temp, _one_line(e))
    try:
        _remove(temp)
    except OSError as e:
        logger.warning("Could not remove %s: %s", temp, _one_line(e))


def _remove_temp_files(folder):
    # One process writes backups (a fine-tuning run holds its output_dir: keras_bit.train.run_lock), so
    # any temporary file is left by a killed write; so is a digest whose backup never got its final name.
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.startswith(TEMP_PREFIX):
            _remove(path)
        elif name.endswith(_DIGEST_SUFFIX) and not os.path.exists(path[: -len(_DIGEST_SUFFIX)]):
            _remove(path)


def _check_digest(path):
    try:
        with open(path + _DIGEST_SUFFIX) as f:
            expected = f.read().strip()
    except OSError as e:
        raise ValueError(f"its digest {os.path.basename(path)}{_DIGEST_SUFFIX} cannot be read ({_one_line(e)})") from e
    if sha256_of(path) != expected:
        raise ValueError("its content does not match its sha256 digest (the file changed after it was written)")


def _prune(folder, step, keep):
    """Keeps the newest `keep` backups up to `step`; removes later ones and temporary files.

    A backup later than the step just written was left by an earlier run and
    `restore` did not resume from it (it resumes from the newest loadable
    one), so it is unusable.
    """
    backups = list_backups(folder)
    kept = [b for b in backups if b[0] <= step][:keep]
    for s, path in backups:
        if s > step:
            logger.warning("Removing %s: it is later than step %d, so it could not be restored.", path, step)
        if (s, path) not in kept:
            _remove(path)
            _remove(path + _DIGEST_SUFFIX)
    _remove_temp_files(folder)


def _remove(path):
    try:
        os.remove(path)
    except (FileNotFoundError, NotADirectoryError):  # already gone, or never written
        pass


def _write_backup(model, backup_dir, step, keep):
    """Writes the backup of `model` at `step` (see `Backup`); returns its path or raises `BackupError`."""
    folder = os.fspath(backup_dir)
    final = backup_path(folder, step)
    previous = next(((s, p) for s, p in list_backups(folder) if s < step), None)
    try:
        os.makedirs(folder, exist_ok=True)
        _remove_temp_files(folder)  # they hold disk space the new file needs
        _check_free_space(model, folder, previous and previous[1])
        with atomic_path(final, durable=True) as temp:  # fsync'ed, renamed, the folder fsync'ed
            try:
                model.save_weights(temp)
                # HDF5 cannot see a flipped byte in its data: a sha256 beside each backup does. It goes
                # in place first, so every backup under a final name has one.
                write_text(final + _DIGEST_SUFFIX, sha256_of(temp) + "\n", durable=True)
            except BaseException:
                _discard(temp)  # before atomic_path removes it: HDF5's handle must go first
                raise
    except BaseException as e:
        if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: cleaned up, not disguised
            raise
        raise BackupError(_failure_message(step, folder, e, previous)) from e
    logger.debug("Backed up step %d to %s", step, final)
    try:
        _prune(folder, step, keep)
    except OSError as e:  # the new backup is complete: report, do not stop training
        logger.warning("Could not remove old backups in %s: %s", folder, _one_line(e))
    return final


def _failure_message(step, folder, error, previous):
    if isinstance(error, OSError) and error.errno:
        # The system's words ("No space left on device"), with the details only when they are ours:
        # HDF5's own messages run over several lines.
        reason = os.strerror(error.errno)
        cause = error.strerror if str(error.strerror).startswith(reason) else reason
    else:
        cause = f"{type(error).__name__}: {_one_line(error)}"
    if previous:
        after = (f"The previous backup (step {previous[0]}, {os.path.basename(previous[1])}) is intact: "
                 "fix the cause and run the same command again to resume from it.")
    else:
        after = "No earlier backup exists: fix the cause and run the same command again to start over."
    return f"Cannot back up step {step} to {folder}: {cause}. {after}"


def _counter_agrees(optimizer, counted, expected):
    """Whether a step counter agrees with the step: a LossScaleOptimizer does not count the steps it skipped."""
    skips = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    return counted == expected or (skips and 0 <= counted <= expected)


class Backup(keras.callbacks.Callback):
    """Backs up the model and optimizer state at the end of some Keras epochs.

    `fit`'s epochs are chunks of `steps_per_epoch` optimizer steps: after epoch
    `e` (0-based, counting from `initial_epoch`) the run is at step
    `min((e + 1) * steps_per_epoch, total_steps)`, backed up when it is a
    multiple of `every` or the last step. The file is written under a
    temporary name in the same folder, fsync'ed and renamed, so the folder
    holds either the previous backups or the new one too, never a partial file
    under a final name; then only the newest `keep` are kept. Free space is
    checked first. Resume with `restore`.

    Args:
        backup_dir: `str` or path-like folder of the backups.
        steps_per_epoch: `int`, optimizer steps per Keras epoch (with gradient
            accumulation, `fit`'s `steps_per_epoch` divided by the number of
            micro-batches per step).
        total_steps: `int`, optimizer steps of the whole run.
        every: `int`, back up at the steps that are multiples of `every`.
        keep: `int`, how many backups to keep (default 2).
        write: `bool`, False on the processes that must not write (the
            non-chief workers of a multi-worker run).

    Raises:
        BackupError: from `fit`, when a backup cannot be written.
        ValueError: from `fit`, when the optimizer's step count shows that
            `steps_per_epoch` is not in optimizer steps.

    Example:
        >>> cb = Backup("out/backup", steps_per_epoch=10, total_steps=500, every=50)  # doctest: +SKIP
        >>> model.fit(ds, epochs=50, steps_per_epoch=10, callbacks=[cb])  # doctest: +SKIP
    """

    def __init__(self, backup_dir, steps_per_epoch, total_steps, every, keep=2, write=True):
        super().__init__()
        for name, value in (("steps_per_epoch", steps_per_epoch), ("total_steps", total_steps),
                            ("every", every), ("keep", keep)):
            check_positive_int(value, name)
        self.backup_dir = os.fspath(backup_dir)
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.every = every
        self.keep = keep
        self.write = bool(write)
        self._written = set()

    def on_epoch_end(self, epoch, logs=None):
        step = min((epoch + 1) * self.steps_per_epoch, self.total_steps)
        # Epochs past the last step repeat it. A file of this step left by an earlier
        # process is replaced: restore did not resume from it, so it did not load.
        if not self.write or step in self._written or (step % self.every and step != self.total_steps):
            return
        self._check_step(epoch, step)
        _write_backup(self.model, self.backup_dir, step, keep=self.keep)
        self._written.add(step)

    def _check_step(self, epoch, step):
        taken = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))  # micro-batches // accumulation
        if _counter_agrees(self.model.optimizer, taken, step):
            return
        raise ValueError(
            f"After epoch {epoch} the optimizer has taken {taken} steps, but Backup(steps_per_epoch="
            f"{self.steps_per_epoch}) puts the run at step {step}. Pass `steps_per_epoch` in optimizer "
            "steps (fit's steps_per_epoch divided by gradient_accumulation_steps)."
        )


def _step_counter(optimizer):
    """The variable the optimizer saves as its step count (micro-batches under gradient accumulation)."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer  # it counts; the wrapper's own counter stays 0
    if not getattr(optimizer, "gradient_accumulation_steps", None):
        return optimizer.iterations
    # `iterations` is then a floor-divided tensor, not the variable.
    counter = next((v for v in optimizer.variables if v.name == "iteration"), None)
    if counter is None:
        raise ValueError(f"Cannot find the step counter (variable 'iteration') of optimizer {optimizer.name!r}.")
    return counter


def _load(model, path, step, iterations_per_step, counter):
    """Loads one backup into `model`; raises if it cannot be used."""
    _check_digest(path)
    optimizer = model.optimizer
    # Keras only warns when it skips the optimizer state of a file that does not match, so a
    # counter left at -1 shows it; so does one left by a previous, failed attempt.
    counter.assign(-1)
    model.load_weights(path)
    saved = int(keras.ops.convert_to_numpy(counter))
    expected = step * iterations_per_step
    if saved == -1:
        raise ValueError("it holds no optimizer state matching this optimizer")
    if not _counter_agrees(optimizer, saved, expected):
        raise ValueError(f"its optimizer step counter is {saved}, expected {expected} "
                         f"(step {step} x iterations_per_step {iterations_per_step})")
    for v in list(model.weights) + list(optimizer.variables):
        value = keras.ops.convert_to_numpy(v)
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise ValueError(f"{getattr(v, 'path', v.name)} holds NaN or infinite values")


def _check_old_format(backup_dir):
    old = [n for n in _OLD_FORMAT if os.path.exists(os.path.join(backup_dir, n))]
    if old:
        raise ValueError(
            f"{backup_dir} holds a backup in the old format of keras.callbacks.BackupAndRestore "
            f"({', '.join(old)}), which cannot be resumed: its weights and its step are separate files that "
            "can disagree. Delete that folder to start the run over, or use a new output directory."
        )


def restore(model, backup_dir, iterations_per_step=1):
    """Loads the newest usable backup into `model` (weights and optimizer state); returns its step.

    Backups are tried newest first. One that cannot be used (unreadable,
    truncated, another architecture, NaN or infinite values, an optimizer step
    counter that disagrees with its file name) is reported in a warning and
    the previous one is tried; a successful load assigns every variable, so
    nothing from a failed attempt remains. Call it inside the strategy scope,
    after `model.compile`.

    Args:
        model: a compiled `keras.Model`, built. Its optimizer is built if it
            is not, so that its state is restored too.
        backup_dir: `str` or path-like folder written by `Backup`.
        iterations_per_step: `int`, optimizer counter increments per step:
            the `gradient_accumulation_steps` of the optimizer, else 1.

    Returns:
        The step of the restored backup, 0 when `backup_dir` holds none (or
        does not exist).

    Raises:
        ValueError: backups exist but none can be used (each file and why is
            listed), or `backup_dir` holds a backup in the old format.

    Example:
        >>> step = restore(model, "out/backup", iterations_per_step=1)  # doctest: +SKIP
        >>> model.fit(ds, initial_epoch=step // steps_per_epoch, epochs=50)  # doctest: +SKIP
    """
    check_positive_int(iterations_per_step, "iterations_per_step")
    if getattr(model, "optimizer", None) is None:
        raise ValueError("`restore` needs a compiled model (its optimizer state is restored). "
                         "Call `model.compile(...)` first.")
    backup_dir = os.fspath(backup_dir)
    backups = list_backups(backup_dir)
    if not backups:
        _check_old_format(backup_dir)
        return 0
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    counter = _step_counter(model.optimizer)
    failures = []
    for step, path in backups:
        try:
            _load(model, path, step, iterations_per_step, counter)
        except Exception as e:
            reason = _one_line(e)
            logger.warning("Cannot resume from backup %s (%s); trying the previous one.", path, reason)
            failures.append(f"{os.path.basename(path)}: {reason}")
            continue
        logger.info("Resuming from backup step %d (%s)", step, path)
        return step
    raise ValueError(
        f"None of the backups in {backup_dir} can be loaded: {'; '.join(failures)}. Delete that folder "
        "to start the run over (or use a new output directory)."
    )
