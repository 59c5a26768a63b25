"""Same command, same seed, bit-identical weights: the full R50x1, in new processes, on a busy machine.

Two fine-tuning processes run at the same time, beside a busy loop, so each
sees a loaded machine whose load changes while it trains (what broke the
README main job's reproducibility once). `benchmarks/determinism.py` runs the
longer version and the `deterministic=False` control.
"""

import json
import multiprocessing
import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow  # two R50x1 fine-tunes in new processes

RUN = """
import hashlib, json, sys, keras_bit
result = keras_bit.finetune("BiT-M-R50x1", "sklearn:digits", steps=8, batch_size=8, resolution=(36, 32),
                            output_dir=sys.argv[1], checkpoint_every=4, verbose=0)
digest = hashlib.sha256(b"".join(w.tobytes() for w in result.model.get_weights())).hexdigest()
head = result.model.get_layer("head").kernel.numpy()
print(json.dumps({"digest": digest, "parameters": result.model.count_params(), "accuracy": result.eval_accuracy,
                  "head": float(abs(head).sum())}))
"""


def _busy(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_two_processes_on_a_busy_machine_train_bit_identical_weights(tmp_path):
    hog = multiprocessing.Process(target=_busy, args=(300,), daemon=True)
    hog.start()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    try:
        procs = [subprocess.Popen([sys.executable, "-c", RUN, str(tmp_path / f"run{i}")], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
        outputs = [p.communicate(timeout=600) for p in procs]
    finally:
        hog.terminate()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert reports[0]["parameters"] == 23_520_842  # R50x1 backbone + a 10-class head: the full model
    assert reports[0]["digest"] == reports[1]["digest"]
    assert reports[0]["accuracy"] == reports[1]["accuracy"]
    assert reports[0]["head"] > 0  # the zero-initialised head trained: these are not two untouched copies
