"""The run folder's own files: temporary names unique per process and call, atomic writes, run.json read as
hostile input, the recorded export, and the lock that gives a folder to one run at a time (run_lock.py).

No TensorFlow, no training here: the lock is exercised by threads and by real processes that hold it, exit
or are killed; the fine-tuning tests check that `finetune` takes it (test_train_finetune.py).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from helpers import HeldElsewhere
from keras_bit.train import run_lock, run_record
from keras_bit.train.run_lock import RunFolderBusyError, hold


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Overrides the conftest's Keras reset: nothing here touches Keras."""
    yield


# --- Temporary names and atomic writes. ---


def test_temp_paths_are_unique_per_call_and_process_and_keep_the_ending(tmp_path):
    target = tmp_path / "step-000000010.weights.h5"
    names = {run_record.temp_path(target) for _ in range(100)}
    assert len(names) == 100
    for name in names:
        base = os.path.basename(name)
        assert os.path.dirname(name) == str(tmp_path)
        # The pid makes it unique across processes (on one host), the random part across calls and threads.
        assert base.startswith(f"{run_record.TEMP_PREFIX}{os.getpid()}-") and base.endswith("-" + target.name)


def test_concurrent_writers_of_one_file_never_collide(tmp_path):
    # With one fixed temporary name (`path + ".tmp"`, as before), one writer renames the other's file away
    # and then fails (FileNotFoundError), or removes it mid-write: the "one dies" of issue 22.
    path = tmp_path / "run.json"
    errors = []

    def write(worker):
        try:
            for i in range(40):
                run_record.write_json(path, {"worker": worker, "i": i, "pad": "x" * 2000})
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


def test_write_text_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "class_names.txt"
    run_record.write_text(path, "cat\ndog\n")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space left"):
        run_record.write_text(path, "other\n")
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
        run_record.read_run_json(tmp_path)


def test_run_json_that_is_a_fifo_or_folder_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "run.json")  # reading it would wait forever for a writer
    with pytest.raises(ValueError, match=r"run.json is a FIFO, not a regular file"):
        run_record.read_run_json(tmp_path)
    os.remove(tmp_path / "run.json")
    (tmp_path / "run.json").mkdir()
    with pytest.raises(ValueError, match=r"run.json is a folder, not a regular file"):
        run_record.read_run_json(tmp_path)
    assert run_record.read_run_json(tmp_path / "no_such_run") is None


def test_recorded_export_is_an_existing_folder_or_none(tmp_path):
    version = tmp_path / "exports" / "bit" / "1"
    version.mkdir(parents=True)
    results = tmp_path / "results.json"
    for content in ("[1]", "{bad", '{"export_path": 3}', '{"export_path": ["x"]}', "{}",
                    json.dumps({"export_path": str(tmp_path / "gone")})):
        results.write_text(content)
        assert run_record.recorded_export(tmp_path) is None, content
    results.write_text(json.dumps({"export_path": str(version)}))
    assert run_record.recorded_export(tmp_path) == str(version)
    assert run_record.recorded_export(tmp_path / "no_such_run") is None


# --- The lock. ---

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
    assert not (run_dir / run_lock.LOCK_FILE).exists()  # a normal end removes the file
    with hold(run_dir):  # free again
        pass


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    run_dir = tmp_path / "run"
    with HeldElsewhere(run_dir) as proc:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    lock = run_dir / run_lock.LOCK_FILE
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
    os.symlink(secret, run_dir / run_lock.LOCK_FILE)
    with pytest.raises(ValueError, match=r"Cannot open the lock file .*run.lock \(a symbolic link: remove it\)"):
        with hold(run_dir):
            pass
    assert secret.read_text() == "keep me"  # the holder's details would have overwritten it
    os.remove(run_dir / run_lock.LOCK_FILE)
    os.symlink(run_dir / run_lock.LOCK_FILE, run_dir / run_lock.LOCK_FILE)  # a link to itself: a loop
    with pytest.raises(ValueError, match="a symbolic link: remove it"):
        with hold(run_dir):
            pass


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_lock_file_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / run_lock.LOCK_FILE
    lock.mkdir() if kind == "folder" else os.mkfifo(lock)
    with pytest.raises(ValueError, match=r"lock file .*run.lock"):
        with hold(run_dir):
            pass


def test_garbage_in_a_stale_lock_file_is_replaced_and_a_silent_holder_still_refuses(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / run_lock.LOCK_FILE).write_bytes(b"\x00garbage" * 1000)  # left by anything
    with hold(run_dir) as path:
        assert json.loads(open(path).read())["pid"] == os.getpid()
    # A holder that has not yet written its details (or wrote garbage) is still a holder.
    script = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); os.write(fd, b'[1]'); "
              "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.readline()")
    proc = subprocess.Popen([sys.executable, "-c", script, str(run_dir / run_lock.LOCK_FILE)], stdin=subprocess.PIPE,
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
    lock = run_dir / run_lock.LOCK_FILE
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
