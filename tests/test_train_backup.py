"""Training backups (keras_bit.train.backup): atomic writes, exact resume, fallback past damaged files, full disks."""

import contextlib
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_bit.train import backup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 4
# 16 examples in batches of 4: one Keras epoch is 4 model calls (micro-batches).
X = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
Y = np.random.default_rng(1).normal(size=(16, 3)).astype("float32")
CALLS_PER_EPOCH = len(X) // BATCH


def make_model(seed=0, accumulation=None, head=3, scale=1.0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(head, dtype="float32")])
    model.compile(optimizer=keras.optimizers.SGD(0.05 / scale**2, momentum=0.9,
                                                 gradient_accumulation_steps=accumulation), loss="mse")
    return model


def state(model):
    """Every weight and optimizer variable (iterations, momentum, accumulators, loss scale), as NumPy."""
    return [keras.ops.convert_to_numpy(v) for v in list(model.weights) + list(model.optimizer.variables)]


def assert_same_state(model, expected):
    actual = state(model)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_array_equal(a, e)


def train(model, backup_dir, epochs, initial_epoch=0, every=4, total=None, keep=2, scale=1.0, snapshots=None):
    """Fits on the fixed data; backs up every `every` optimizer steps; `snapshots[step]` = state at each epoch end."""
    steps_per_epoch = CALLS_PER_EPOCH // (model.optimizer.gradient_accumulation_steps or 1)
    callbacks = [backup.Backup(backup_dir, steps_per_epoch=steps_per_epoch, total_steps=total or 100 * steps_per_epoch,
                               every=every, keep=keep)]
    if snapshots is not None:
        callbacks.append(keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: snapshots.__setitem__((epoch + 1) * steps_per_epoch, state(model))))
    model.fit(X, Y * scale, batch_size=BATCH, epochs=epochs, initial_epoch=initial_epoch, shuffle=False, verbose=0,
              callbacks=callbacks)


def names(folder):
    """The folder's files but the digests, which `test_every_backup_has_its_digest` checks."""
    return sorted(n for n in os.listdir(folder) if not n.endswith(".sha256"))


@pytest.fixture
def log():
    """keras_bit's log records (a handler on its logger: the CLI may have turned propagation off)."""
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("keras_bit")
    previous_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(previous_level)


def test_round_trip_restores_weights_and_optimizer_state(tmp_path, log):
    model = make_model()
    train(model, tmp_path, epochs=2)
    assert names(tmp_path) == ["step-000000004.weights.h5", "step-000000008.weights.h5"]
    fresh = make_model(seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(state(fresh)[:4], state(model)[:4]))  # the test can fail
    assert not fresh.optimizer.built
    assert backup.restore(fresh, tmp_path) == 8
    assert int(fresh.optimizer.iterations) == 8
    assert_same_state(fresh, state(model))  # momentum bit-exactly
    assert f"Resuming from backup step 8 ({tmp_path / 'step-000000008.weights.h5'})" in log


def test_every_total_steps_and_keep(tmp_path):
    # 4 steps per epoch: steps 4 (not a multiple of 8), 8, 12 (the last step).
    train(make_model(), tmp_path, epochs=3, every=8, total=12, keep=5)
    assert names(tmp_path) == ["step-000000008.weights.h5", "step-000000012.weights.h5"]
    more = tmp_path / "more"
    train(make_model(), more, epochs=4, keep=2)
    assert names(more) == ["step-000000012.weights.h5", "step-000000016.weights.h5"]


def test_write_false_never_writes(tmp_path):
    model = make_model()
    model.fit(X, Y, batch_size=BATCH, epochs=2, verbose=0,
              callbacks=[backup.Backup(tmp_path / "b", steps_per_epoch=4, total_steps=8, every=4, write=False)])
    assert not (tmp_path / "b").exists()


def test_no_backup_returns_zero(tmp_path):
    model = make_model()
    before = state(model)
    assert backup.restore(model, tmp_path / "missing") == 0
    assert backup.restore(model, tmp_path) == 0
    assert_same_state(model, before)


def test_stale_temporary_file_is_ignored_then_removed(tmp_path):
    snapshots = {}
    train(make_model(), tmp_path, epochs=1, snapshots=snapshots)
    stale = tmp_path / ".writing-step-000000008.weights.h5"  # a write killed half-way
    stale.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    model = make_model(seed=1)
    assert backup.restore(model, tmp_path) == 4
    assert_same_state(model, snapshots[4])
    train(model, tmp_path, epochs=2, initial_epoch=1)
    assert names(tmp_path) == ["step-000000004.weights.h5", "step-000000008.weights.h5"]


def _damage(path, how, other_model):
    size = os.path.getsize(path)
    if how == "truncated":
        os.truncate(path, size // 2)
    elif how == "empty":
        os.truncate(path, 0)
    elif how == "garbage":
        path.write_bytes(np.random.default_rng(2).bytes(size))
    elif how == "step_in_file":  # the weights of step 4 under the name of step 8
        path.write_bytes(path.with_name("step-000000004.weights.h5").read_bytes())
    elif how == "nan":
        other_model.load_weights(path)
        kernel = other_model.layers[-1].kernel
        kernel.assign(np.where(np.arange(kernel.shape[1]) == 1, np.nan, keras.ops.convert_to_numpy(kernel)))
        other_model.save_weights(path)
    elif how == "architecture":  # the first layer loads, the second does not: a half-assigned model
        other_model.save_weights(path)
    elif how == "flipped_byte":  # HDF5 reads it without complaint: only the digest sees it
        data = bytearray(path.read_bytes())
        data[size - size // 3] ^= 0x01
        path.write_bytes(bytes(data))
    elif how == "no_digest":
        os.remove(f"{path}.sha256")
    if how in ("step_in_file", "nan", "architecture"):
        # A file consistent with its digest, to exercise the checks behind it.
        with open(f"{path}.sha256", "w") as f:
            f.write(hashlib.sha256(path.read_bytes()).hexdigest() + "\n")


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage", "step_in_file", "nan", "architecture",
                                 "flipped_byte", "no_digest"])
def test_damaged_newest_backup_falls_back_to_the_previous(tmp_path, how, log):
    snapshots = {}
    train(make_model(), tmp_path, epochs=2, snapshots=snapshots)
    other = make_model(seed=3, head=5 if how == "architecture" else 3)
    other.fit(X, np.zeros((16, other.output_shape[-1])), batch_size=BATCH, epochs=2, verbose=0)  # iterations = 8
    _damage(tmp_path / "step-000000008.weights.h5", how, other)
    model = make_model(seed=1)
    assert backup.restore(model, tmp_path) == 4
    # Exactly step 4's values: nothing left from the failed load of step 8 (which, for "nan" and
    # "architecture", assigned some variables before it was rejected).
    assert_same_state(model, snapshots[4])
    assert any(m.startswith(f"Cannot resume from backup {tmp_path / 'step-000000008.weights.h5'} (") for m in log)
    if how == "step_in_file":
        assert "optimizer step counter is 4, expected 8" in "".join(log)
    if how == "nan":
        assert "NaN" in "".join(log)
    if how == "flipped_byte":
        assert "does not match its sha256 digest" in "".join(log)


def test_every_backup_has_its_digest(tmp_path):
    train(make_model(), tmp_path, epochs=3)
    files = sorted(os.listdir(tmp_path))
    weights = [n for n in files if n.endswith(".weights.h5")]
    assert files == sorted(weights + [n + ".sha256" for n in weights])  # pruned together
    for name in weights:
        digest = hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        assert (tmp_path / f"{name}.sha256").read_text().strip() == digest


def test_resuming_before_damaged_backups_replaces_them(tmp_path):
    snapshots = {}
    train(make_model(), tmp_path, epochs=3, keep=3, snapshots=snapshots)
    for step in (8, 12):
        os.truncate(tmp_path / f"step-{step:09d}.weights.h5", 0)
    model = make_model(seed=1)
    assert backup.restore(model, tmp_path) == 4
    # Step 8 is written again (the damaged file is replaced); step 12, later than the run, is removed.
    train(model, tmp_path, epochs=2, initial_epoch=1, keep=3)
    assert names(tmp_path) == ["step-000000004.weights.h5", "step-000000008.weights.h5"]
    fresh = make_model(seed=2)
    assert backup.restore(fresh, tmp_path) == 8
    assert_same_state(fresh, snapshots[8])


def test_epochs_past_the_last_step_do_not_rewrite_it(tmp_path):
    snapshots = {}
    train(make_model(), tmp_path, epochs=3, total=8, snapshots=snapshots)  # the third epoch is "step 8" again
    assert names(tmp_path) == ["step-000000004.weights.h5", "step-000000008.weights.h5"]
    model = make_model(seed=1)
    assert backup.restore(model, tmp_path) == 8
    assert_same_state(model, snapshots[8])
    assert not np.array_equal(state(model)[0], snapshots[12][0])


def test_optimizer_state_must_match(tmp_path):
    # Keras only warns and skips an optimizer state of another layout (here float32 backups restored
    # under mixed_float16, whose LossScaleOptimizer has more variables): restore must not accept that.
    train(make_model(), tmp_path, epochs=1)
    keras.config.set_dtype_policy("mixed_float16")
    model = make_model(seed=1)
    with pytest.warns(UserWarning, match="Skipping variable loading for optimizer"):
        with pytest.raises(ValueError, match="step-000000004.weights.h5: it holds no optimizer state matching"):
            backup.restore(model, tmp_path)


def test_no_usable_backup_raises_naming_each_file(tmp_path):
    train(make_model(), tmp_path, epochs=2)
    for path in tmp_path.iterdir():
        os.truncate(path, 100)
    with pytest.raises(ValueError, match="None of the backups") as info:
        backup.restore(make_model(), tmp_path)
    message = str(info.value)
    assert "step-000000004.weights.h5: " in message and "step-000000008.weights.h5: " in message
    assert "Delete that folder" in message


def test_old_backup_and_restore_format_is_refused(tmp_path):
    model = make_model()
    model.fit(X, Y, batch_size=BATCH, epochs=1, verbose=0,
              callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path), delete_checkpoint=False)])
    assert "training_metadata.json" in names(tmp_path)
    with pytest.raises(ValueError, match="old format of keras.callbacks.BackupAndRestore .*Delete that folder"):
        backup.restore(make_model(), tmp_path)


def test_failed_write_keeps_previous_backup(tmp_path, monkeypatch):
    snapshots = {}
    model = make_model()
    train(model, tmp_path, epochs=1, snapshots=snapshots)

    def half_write_then_fail(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write((tmp_path / "step-000000004.weights.h5").read_bytes()[:1000])
        raise RuntimeError("Can't decrement id ref count (simulated HDF5 failure)")

    monkeypatch.setattr(model, "save_weights", half_write_then_fail)
    with pytest.raises(backup.BackupError) as info:
        train(model, tmp_path, epochs=2, initial_epoch=1)
    assert isinstance(info.value, OSError)
    assert str(info.value) == (
        f"Cannot back up step 8 to {tmp_path}: RuntimeError: Can't decrement id ref count (simulated HDF5 "
        "failure). The previous backup (step 4, step-000000004.weights.h5) is intact: fix the cause and run "
        "the same command again to resume from it."
    )
    assert names(tmp_path) == ["step-000000004.weights.h5"]  # no temporary file left
    fresh = make_model(seed=1)
    assert backup.restore(fresh, tmp_path) == 4
    assert_same_state(fresh, snapshots[4])


def test_unwritable_folder_raises_backup_error(tmp_path):
    blocker = tmp_path / "backup"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(backup.BackupError, match=(
            f"^Cannot back up step 4 to {re.escape(str(blocker))}: File exists. No earlier backup exists: fix the "
            "cause and run the same command again to start over.$")):
        train(make_model(), blocker, epochs=1)


DISK_FULL = textwrap.dedent(
    """
    import collections, json, os, shutil, sys
    import numpy as np
    import keras
    from keras_bit.train import backup

    folder, mid_write = sys.argv[1], sys.argv[2] == "mid_write"
    if mid_write:  # pretend there is room, so that HDF5 itself runs into the full disk
        usage = collections.namedtuple("usage", "total used free")
        shutil.disk_usage = lambda path: usage(10**12, 0, 10**12)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(1024), keras.layers.Dense(64)])
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="mse")
    x = np.ones((8, 64), "float32")
    snapshots = []
    keep = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: snapshots.append(model.get_weights()))
    cb = backup.Backup(folder, steps_per_epoch=1, total_steps=10, every=1)
    out = {}
    try:
        model.fit(x, x, batch_size=8, epochs=3, verbose=0, callbacks=[cb, keep])
    except backup.BackupError as e:
        out["error"] = str(e)
    out["files"] = sorted(n for n in os.listdir(folder) if not n.endswith(".sha256"))
    fresh = keras.Sequential([keras.Input((64,)), keras.layers.Dense(1024), keras.layers.Dense(64)])
    fresh.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="mse")
    out["restored"] = backup.restore(fresh, folder)
    out["exact"] = all(np.array_equal(a, b) for a, b in zip(fresh.get_weights(), snapshots[out["restored"] - 1]))
    print(json.dumps(out))
    """
)


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs that holds two backups of the DISK_FULL model (about 1.1 MB each) but not three."""
    folder = tmp_path / "disk"
    folder.mkdir()
    size = 2_700_000
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True,
                       capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root or CAP_SYS_ADMIN): {e}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.parametrize("when", ["before_write", "mid_write"])
def test_full_disk_raises_backup_error_and_keeps_previous(small_disk, when):
    # A subprocess, so that a crash inside HDF5 shows as a negative return code.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", DISK_FULL, str(small_disk), when], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["files"] == ["step-000000001.weights.h5", "step-000000002.weights.h5"]  # no temporary file
    assert out["error"].startswith(f"Cannot back up step 3 to {small_disk}: No space left on device")
    if when == "before_write":
        needed, free = map(float, re.search(r"needs about (\S+) MB, (\S+) MB free\. ", out["error"]).groups())
        assert 1.1 < needed < 1.3 and free < needed
    assert out["error"].endswith("The previous backup (step 2, step-000000002.weights.h5) is intact: fix the cause "
                                 "and run the same command again to resume from it.")
    assert out["restored"] == 2 and out["exact"]


RESUME_CASES = {
    "plain": {},
    "gradient_accumulation": {"accumulation": 2},
    "mixed_float16": {"policy": "mixed_float16", "scale": 300.0},  # the first steps overflow and are skipped
    "mirrored_strategy": {"strategy": True},
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_continues_to_the_uninterrupted_weights(tmp_path, case):
    options = RESUME_CASES[case]
    accumulation, scale = options.get("accumulation"), options.get("scale", 1.0)
    if options.get("policy"):
        keras.config.set_dtype_policy(options["policy"])
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"]) if options.get("strategy") else None

    def scope():
        return strategy.scope() if strategy else contextlib.nullcontext()

    def model(seed):
        with scope():
            return make_model(seed, accumulation=accumulation, scale=scale)

    whole = model(0)
    train(whole, tmp_path / "whole", epochs=4, scale=scale)
    interrupted = model(0)
    train(interrupted, tmp_path / "run", epochs=2, scale=scale)
    resumed = model(1)
    with scope():
        step = backup.restore(resumed, tmp_path / "run", iterations_per_step=accumulation or 1)
    assert step == 2 * CALLS_PER_EPOCH // (accumulation or 1)
    assert_same_state(resumed, state(interrupted))
    train(resumed, tmp_path / "run", epochs=4, initial_epoch=2, scale=scale)
    assert_same_state(resumed, state(whole))
    assert names(tmp_path / "run") == names(tmp_path / "whole")
    if accumulation:  # the saved counter counts micro-batches; `iterations` is in optimizer steps
        counter = next(v for v in resumed.optimizer.variables if v.name == "iteration")
        assert (int(counter), int(resumed.optimizer.iterations)) == (16, 8)
    if options.get("policy"):
        assert isinstance(resumed.optimizer, keras.optimizers.LossScaleOptimizer)
        assert 0 < int(resumed.optimizer.iterations) < 16  # Keras does not count the skipped steps


def test_backup_rejects_steps_per_epoch_in_micro_batches(tmp_path):
    model = make_model(accumulation=2)
    wrong = backup.Backup(tmp_path, steps_per_epoch=CALLS_PER_EPOCH, total_steps=16, every=1)
    with pytest.raises(ValueError, match=r"optimizer has taken 2 steps, but Backup\(steps_per_epoch=4\)"):
        model.fit(X, Y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[wrong])
    assert names(tmp_path) == []


def test_argument_checks(tmp_path):
    with pytest.raises(ValueError, match="`every` must be a positive integer. Received: every=0"):
        backup.Backup(tmp_path, steps_per_epoch=1, total_steps=1, every=0)
    with pytest.raises(ValueError, match="iterations_per_step"):
        backup.restore(make_model(), tmp_path, iterations_per_step=0)
    uncompiled = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="compile"):
        backup.restore(uncompiled, tmp_path)
