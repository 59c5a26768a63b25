"""The run folder (`RunDir`): its layout, the writable-folder check, temporary names unique per process and call,
atomic writes, run.json read as hostile input, metrics.csv written and read back, the recorded export, and the lock
that gives a folder to one run at a time (run_lock.py). `RunDir.load` (what `keras-bit report` reads) is checked
file by file in test_train_report.py.

No TensorFlow, no training here: the lock is exercised by threads and by real processes that hold it, exit
or are killed; the fine-tuning tests check that `finetune` takes it (test_train_finetune.py).
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from helpers import HeldElsewhere
from keras_bit import io
from keras_bit.train import run_lock
from keras_bit.train.run_dir import METRICS_COLUMNS, RunDir
from keras_bit.train.run_lock import RunFolderBusyError, hold

LOCK = "run.lock"


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Overrides the conftest's Keras reset: nothing here touches Keras."""
    yield


# --- The layout and the folder check. ---


def test_every_file_of_a_run_has_its_place(tmp_path, monkeypatch):
    run_dir = RunDir(tmp_path / "run")
    assert run_dir.path == str(tmp_path / "run") == os.fspath(run_dir)
    places = {"run_json": "run.json", "backup_dir": "backup", "logs_dir": "logs", "metrics_csv": "metrics.csv",
              "results_json": "results.json", "class_names_txt": "class_names.txt",
              "skipped_txt": "skipped_images.txt", "model_keras": "model.keras", "summary_png": "summary.png",
              "lock": "run.lock"}
    for attribute, name in places.items():
        assert getattr(run_dir, attribute) == str(tmp_path / "run" / name)
    monkeypatch.chdir(tmp_path)
    assert RunDir("run").path == str(tmp_path / "run")  # absolute, whatever the working folder later becomes


def test_output_dir_that_is_a_broken_link_or_below_a_file(tmp_path):
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    os.symlink(tmp_path / "missing", tmp_path / "dangling")
    for name in ("loop", "dangling"):
        with pytest.raises(ValueError, match=rf"`output_dir` is a symbolic link that leads nowhere \(a loop, or a "
                                             rf"missing target\): {tmp_path / name} -> "):
            RunDir.checked(tmp_path / name)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=rf"The parent of `output_dir` is not a folder: {tmp_path / 'file'}"):
        RunDir.checked(tmp_path / "file" / "run")
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "alias")  # a link to a folder is a folder
    assert RunDir.checked(tmp_path / "alias").path == str(tmp_path / "alias")


def test_output_dir_check_leaves_nothing_behind(tmp_path):
    for empty in (None, "", "  "):
        with pytest.raises(ValueError, match=r"`output_dir` must be a non-empty path. Received: output_dir="):
            RunDir.checked(empty)
    with pytest.raises(ValueError, match=r"The parent of `output_dir` does not exist: "):
        RunDir.checked(tmp_path / "no" / "run")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"`output_dir` is a file, not a folder: "):
        RunDir.checked(tmp_path / "file")
    assert RunDir.checked(tmp_path / "new").path == str(tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == ["file"]  # created for the write probe, then removed


# --- Temporary names and atomic writes. ---


def test_temp_paths_are_unique_per_call_and_process_and_keep_the_ending(tmp_path):
    target = tmp_path / "step-000000010.weights.h5"
    names = {io.temp_path(target) for _ in range(100)}
    assert len(names) == 100
    for name in names:
        base = os.path.basename(name)
        assert os.path.dirname(name) == str(tmp_path)
        # The pid makes it unique across processes (on one host), the random part across calls and threads.
        assert base.startswith(f"{io.TEMP_PREFIX}{os.getpid()}-") and base.endswith("-" + target.name)


def test_concurrent_writers_of_one_file_never_collide(tmp_path):
    # With one fixed temporary name (`path + ".tmp"`, as before), one writer renames the other's file away
    # and then fails (FileNotFoundError), or removes it mid-write: the "one dies" of issue 22.
    path = tmp_path / "run.json"
    errors = []

    def write(worker):
        try:
            for i in range(40):
                RunDir(tmp_path).write_settings({"worker": worker, "i": i, "pad": "x" * 2000})
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert json.loads(path.read_text())["i"] == 39  # a complete file of some writer's last value
    assert os.listdir(tmp_path) == ["run.json"]  # no temporary file left


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "class_names.txt"
    RunDir(tmp_path).write_class_names(["cat", "dog"])
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space left"):
        RunDir(tmp_path).write_class_names(["other"])
    assert path.read_text() == "cat\ndog\n" and os.listdir(tmp_path) == ["class_names.txt"]


# --- run.json and results.json read as hostile files. ---


@pytest.mark.parametrize("content,message", [
    ("[1, 2]", "must hold a JSON object, not a list"),
    ("{broken", "is not valid JSON"),
    (b"\xff\xfe{}", "is not valid JSON"),
    ('{"a": ' * 100000 + "1" + "}" * 100000, "is not valid JSON"),  # nested past Python's recursion limit
])
def test_run_json_that_is_not_an_object_names_the_file(tmp_path, content, message):
    path = tmp_path / "run.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=f"run settings file {path} {message}.*Delete it with the backup folder"):
        RunDir(tmp_path).read_settings()


def test_run_json_that_is_a_fifo_or_folder_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "run.json")  # reading it would wait forever for a writer
    with pytest.raises(ValueError, match=r"run.json is a FIFO, not a regular file"):
        RunDir(tmp_path).read_settings()
    os.remove(tmp_path / "run.json")
    (tmp_path / "run.json").mkdir()
    with pytest.raises(ValueError, match=r"run.json is a folder, not a regular file"):
        RunDir(tmp_path).read_settings()
    assert RunDir(tmp_path / "no_such_run").read_settings() is None


def test_recorded_export_is_an_existing_folder_or_none(tmp_path):
    version = tmp_path / "exports" / "bit" / "1"
    version.mkdir(parents=True)
    results = tmp_path / "results.json"
    for content in ("[1]", "{bad", '{"export_path": 3}', '{"export_path": ["x"]}', "{}",
                    json.dumps({"export_path": str(tmp_path / "gone")})):
        results.write_text(content)
        assert RunDir(tmp_path).recorded_export() is None, content
    results.write_text(json.dumps({"export_path": str(version)}))
    assert RunDir(tmp_path).recorded_export() == str(version)
    assert RunDir(tmp_path / "no_such_run").recorded_export() is None


def test_skipped_images_are_written_only_when_there_are_some(tmp_path):
    RunDir(tmp_path).write_skipped([])
    assert os.listdir(tmp_path) == []
    RunDir(tmp_path).write_skipped(["a/bad.jpg", "b/empty.png"])
    assert (tmp_path / "skipped_images.txt").read_text() == "a/bad.jpg\nb/empty.png\n"


# --- metrics.csv: one writer, one reader. ---


def test_metrics_written_are_read_back_as_written(tmp_path):
    run_dir = RunDir(tmp_path)
    rows = [{"step": 8, "loss": 0.25, "accuracy": 0.5, "learning_rate": 0.0, "val_loss": float("nan"),
             "val_accuracy": 0.125, "val_top5_accuracy": 1.0},
            {"step": 4, "loss": float("nan"), "accuracy": 1 / 3, "learning_rate": 3e-05, "val_loss": None,
             "val_accuracy": None, "val_top5_accuracy": None}]
    run_dir.write_metrics(rows)
    assert (tmp_path / "metrics.csv").read_text() == (
        ",".join(METRICS_COLUMNS) + "\n4,nan,0.333333,3e-05,,,\n8,0.25,0.5,0,nan,0.125,1\n")
    back = run_dir.read_metrics()
    assert [r["step"] for r in back] == [4, 8] and back[0]["val_loss"] is None and back[0]["accuracy"] == 0.333333
    assert math.isnan(back[1]["val_loss"]) and math.isnan(back[0]["loss"])  # logged NaN is data, not an empty cell
    run_dir.write_metrics(back)  # what a resumed run writes back: the same bytes
    assert (tmp_path / "metrics.csv").read_text().splitlines()[1:] == ["4,nan,0.333333,3e-05,,,",
                                                                       "8,0.25,0.5,0,nan,0.125,1"]


# --- The lock. ---

@pytest.mark.slow  # another process (a Python start with TensorFlow: seconds)
def test_another_process_holding_the_folder_is_named_and_refused(tmp_path):
    run_dir = tmp_path / "run"
    with HeldElsewhere(run_dir) as proc:
        with pytest.raises(RunFolderBusyError) as info:
            with hold(run_dir):
                pytest.fail("a second holder was let in")
    message = str(info.value)
    assert f"`output_dir` {run_dir} is in use by another fine-tuning run (pid {proc.pid} on host " \
           f"'{socket.gethostname()}', started 20" in message
    assert "(this process)" not in message and "choose another output directory" in message
    assert info.value.holder["pid"] == proc.pid and proc.returncode == 0
    assert not (run_dir / LOCK).exists()  # a normal end removes the file
    with hold(run_dir):  # free again
        pass


@pytest.mark.slow  # another process (a Python start with TensorFlow: seconds)
def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    run_dir = tmp_path / "run"
    with HeldElsewhere(run_dir) as proc:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    lock = run_dir / LOCK
    assert json.loads(lock.read_text())["pid"] == proc.pid  # the file stays; the OS dropped the lock
    with hold(run_dir) as path:
        assert json.loads(open(path).read())["pid"] == os.getpid()  # now naming this process
    assert not lock.exists()


def test_a_second_run_in_another_thread_of_this_process_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    outcome = {}

    def second():
        try:
            with hold(run_dir):
                outcome["let in"] = True
        except RunFolderBusyError as e:
            outcome["refused"] = str(e)

    with hold(run_dir):
        t = threading.Thread(target=second)
        t.start()
        t.join()
        with pytest.raises(RunFolderBusyError, match=rf"pid {os.getpid()} \(this process\)"):
            with hold(run_dir):  # and in the same thread, nested
                pass
    assert "let in" not in outcome and f"pid {os.getpid()} (this process)" in outcome["refused"]


def test_hold_creates_the_folder_and_removes_it_if_nothing_was_written(tmp_path):
    with hold(tmp_path / "new") as path:
        assert os.path.isfile(path)
    assert not (tmp_path / "new").exists()  # refused runs leave nothing behind
    with hold(tmp_path / "used"):
        (tmp_path / "used" / "metrics.csv").write_text("x")
    assert os.listdir(tmp_path / "used") == ["metrics.csv"]
    with pytest.raises(KeyboardInterrupt):
        with hold(tmp_path / "crashed"):
            (tmp_path / "crashed" / "run.json").write_text("{}")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path / "crashed") == ["run.json"]  # released on the way out of a crash too


def test_a_lock_file_planted_as_a_link_is_refused_and_never_followed(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("keep me")
    os.symlink(secret, run_dir / LOCK)
    with pytest.raises(ValueError, match=r"Cannot open the lock file .*run.lock \(a symbolic link: remove it\)"):
        with hold(run_dir):
            pass
    assert secret.read_text() == "keep me"  # the holder's details would have overwritten it
    os.remove(run_dir / LOCK)
    os.symlink(run_dir / LOCK, run_dir / LOCK)  # a link to itself: a loop
    with pytest.raises(ValueError, match="a symbolic link: remove it"):
        with hold(run_dir):
            pass


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_lock_file_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / LOCK
    lock.mkdir() if kind == "folder" else os.mkfifo(lock)
    with pytest.raises(ValueError, match=r"lock file .*run.lock"):
        with hold(run_dir):
            pass


def test_garbage_in_a_stale_lock_file_is_replaced_and_a_silent_holder_still_refuses(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK).write_bytes(b"\x00garbage" * 1000)  # left by anything
    with hold(run_dir) as path:
        assert json.loads(open(path).read())["pid"] == os.getpid()
    # A holder that has not yet written its details (or wrote garbage) is still a holder.
    script = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); os.write(fd, b'[1]'); "
              "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.readline()")
    proc = subprocess.Popen([sys.executable, "-c", script, str(run_dir / LOCK)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusyError, match=r"its lock file names no holder yet"):
            with hold(run_dir):
                pass
    finally:
        proc.communicate("\n", timeout=30)


def test_a_lock_file_replaced_between_open_and_lock_is_retried(tmp_path, monkeypatch):
    # The holder removes run.lock as it ends; a run that opened the old file just before then locks an
    # unlinked file, which must not count: it opens the path again.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / LOCK
    real_lock, calls = run_lock._lock, []

    def lock_after_replacement(fd, folder):
        if not calls:
            os.remove(lock)
            lock.write_text("")  # another run's new file under the same name
        calls.append(fd)
        return real_lock(fd, folder)

    monkeypatch.setattr(run_lock, "_lock", lock_after_replacement)
    with hold(run_dir) as path:
        assert len(calls) == 2 and json.loads(open(path).read())["pid"] == os.getpid()


def test_without_file_locks_the_run_goes_on_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(run_lock, "fcntl", None)
    with caplog.at_level("WARNING", logger="keras_bit"):
        with hold(tmp_path / "run"):
            pass
    assert "No file locks on this system: another run into" in caplog.text
