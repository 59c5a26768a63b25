"""MultiWorkerMirroredStrategy for real: two worker processes on 127.0.0.1 driven by TF_CONFIG.

Each worker is a separate Python process with one CPU device; they talk over
gRPC on free ports chosen at run time, as two hosts would. The run is compared
with a one-process run of the same global batch, and a worker is killed
mid-run to check that restarting the cluster resumes from the chief's backup.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest

from helpers import run_finetune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# base_lr 0.05, not run_finetune's 0.5: at 0.5 these 8 steps are chaotic (a 1e-7 change of summation order grows
# about 10x per step, measured), so the comparison below would only pass where the two summation orders happen to
# agree to the last bit.
SETTINGS = dict(batch_size=8, steps=8, checkpoint_every=2, mixup=0.0, base_lr=0.05)

WORKER = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, "tests")
    import keras
    import keras_bit
    from helpers import learnable, TINY_BUILDER
    settings = json.loads(sys.argv[2])
    pause = float(sys.argv[3])  # seconds per step, so that the test can kill a worker mid-run
    slow = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs=None: time.sleep(pause))
    result = keras_bit.finetune(TINY_BUILDER, learnable(), resolution=(36, 32),
                                output_dir=sys.argv[1], verbose=0, callbacks=[slow], **settings)
    strategy = result.model.distribute_strategy
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, "type": type(strategy).__name__,
                      "accuracy": result.eval_accuracy, "steps": result.steps}))
    """
)


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start_cluster(output_dir, settings, log_dir, pause=0.0):
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
                   TF_CONFIG=json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}))
        log = open(os.path.join(log_dir, f"worker{index}.log"), "w")
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(output_dir), json.dumps(settings), str(pause)],
                                      stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=ROOT))
    return procs


def _finish(procs, log_dir, timeout=600):
    reports = []
    for index, proc in enumerate(procs):
        out, _ = proc.communicate(timeout=timeout)
        log = open(os.path.join(log_dir, f"worker{index}.log")).read()
        assert proc.returncode == 0, f"worker {index} failed:\n{log[-4000:]}"
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def _backed_up_step(output_dir):
    """The newest backup's step (0 before the first): read from the file names, safe while the chief writes."""
    try:
        names = os.listdir(os.path.join(output_dir, "backup"))
    except OSError:
        return 0
    steps = [int(n[len("step-"):-len(".weights.h5")]) for n in names
             if n.startswith("step-") and n.endswith(".weights.h5")]
    return max(steps, default=0)


@pytest.mark.slow
def test_two_workers_match_one_process(tmp_path):
    out = tmp_path / "cluster"
    reports = _finish(_start_cluster(out, SETTINGS, tmp_path), tmp_path)
    assert [r["type"] for r in reports] == ["MultiWorkerStrategy"] * 2  # keras_bit's MultiWorkerMirroredStrategy
    assert [r["replicas"] for r in reports] == [2, 2]
    # Chief-only files: worker 1 wrote nothing of its own; the chief's model loads.
    assert sorted(os.listdir(out)) == ["backup", "class_names.txt", "logs", "metrics.csv", "model.keras",
                                       "results.json", "run.json", "summary.png"]
    assert json.loads((out / "run.json").read_text())["replicas"] == 2
    assert _backed_up_step(out) == 8  # the last of 4 backups, one every 2 steps
    cluster = keras.saving.load_model(out / "model.keras")

    single = run_finetune(tmp_path, "single", **SETTINGS)
    # Same global batch of 8: each worker computes its 4 examples' mean loss, the
    # all-reduce averages the two halves. Only the float32 summation order differs
    # (two partial sums vs one), ~1e-7 relative per step; 8 steps stay far below
    # 1e-4, while one wrong example or a doubled learning rate moves weights by >1e-2.
    for a, b in zip(single.model.weights, cluster.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-5, err_msg=a.path)
    # Evaluation is sharded across the workers and all-reduced: the same accuracy on the
    # same 14 held-out examples (at most one argmax may flip within the tolerance above).
    assert all(abs(r["accuracy"] - single.eval_accuracy) <= 1 / 14 + 1e-6 for r in reports)


@pytest.mark.slow
def test_killed_worker_then_restarted_cluster_resumes_from_the_backup(tmp_path):
    out = tmp_path / "cluster"
    settings = dict(SETTINGS, checkpoint_every=1)  # 8 chunks of one step
    procs = _start_cluster(out, settings, tmp_path, pause=0.5)
    try:
        deadline = time.monotonic() + 300
        while _backed_up_step(out) < 2 and time.monotonic() < deadline and procs[0].poll() is None:
            time.sleep(0.2)
        killed_at = _backed_up_step(out)
        if not 2 <= killed_at < 8:  # say why: the chief's own log (a port taken, an early error)
            chief_log = open(os.path.join(tmp_path, "worker0.log")).read()[-4000:]
            pytest.fail(f"chief backed up step {killed_at} of 8 before the kill (chief exit status "
                        f"{procs[0].poll()}):\n{chief_log}")
        procs[1].send_signal(signal.SIGKILL)  # worker 1 dies mid-run
        procs[1].wait()
        try:  # the chief cannot finish without its peer: it errors out or hangs in the all-reduce
            procs[0].wait(timeout=60)
        except subprocess.TimeoutExpired:
            procs[0].kill()
            procs[0].wait()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    stopped_at = _backed_up_step(out)
    assert stopped_at < 8, "the run finished although a worker was killed"

    reports = _finish(_start_cluster(out, settings, tmp_path), tmp_path)  # the same command again
    assert [r["steps"] for r in reports] == [8, 8]
    assert _backed_up_step(out) == 8
    steps = [int(line.split(",")[0]) for line in (out / "metrics.csv").read_text().strip().splitlines()[1:]]
    # metrics.csv (written by the chief, one row per chunk, keyed by step): the first
    # run's chunks, then the restarted run's from the last backup on. A restart from
    # scratch would repeat steps, a lost backup would skip some.
    assert steps == list(range(1, 9)), (stopped_at, steps)
    # The restarted cluster continued the same data stream from the restored step and
    # optimizer state: it ends with the weights of an uninterrupted one-process run.
    # Same tolerance as above; this tiny net at 32 px is chaotic enough that longer runs
    # amplify float32 reordering (a 1e-6 change of the learning rate moves weights by 1e-3
    # after 40 steps), so the run is kept at 8 steps.
    single = run_finetune(tmp_path, "single", **settings)
    for a, b in zip(single.model.weights, keras.saving.load_model(out / "model.keras").weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-5, err_msg=a.path)


@pytest.mark.parametrize("jobs,task,chief", [
    ({"worker": ["a:1", "b:1"]}, ("worker", 0), True),
    ({"worker": ["a:1", "b:1"]}, ("worker", 1), False),
    ({"chief": ["c:1"], "worker": ["a:1"]}, ("chief", 0), True),
    ({"chief": ["c:1"], "worker": ["a:1"]}, ("worker", 0), False),
    ({}, (None, None), True),
])
def test_is_chief_follows_the_cluster_spec(jobs, task, chief):
    import types

    import tensorflow as tf

    from keras_bit.train.distribute import is_chief

    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(jobs), task_type=task[0], task_id=task[1])
    assert is_chief(types.SimpleNamespace(cluster_resolver=resolver)) is chief
    assert is_chief(tf.distribute.get_strategy()) is True  # no cluster: the lone process writes
