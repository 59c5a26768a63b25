"""keras_bit.finetune end to end on a tiny BiT: learning, outputs, resume (exact or refused), few-shot,
evaluation while training, partial fine-tuning, precision, accumulation, a two-replica MirroredStrategy."""

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import keras
import numpy as np
import pytest

import keras_bit
from helpers import TINY_BUILDER, Crash, HeldElsewhere, copy_run, folder_digests, learnable, run_finetune
from keras_bit.train.resume import RunMismatchError


def _metrics(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_finetune_learns_and_writes_outputs(tmp_path, capsys):
    result = run_finetune(tmp_path, steps=30, verbose=1)
    assert result.eval_accuracy >= 0.8  # chance is 1/3
    printed = capsys.readouterr().out
    assert f"eval top-1 accuracy: {result.eval_accuracy:.4f}" in printed
    steps = [line.split()[1] for line in printed.splitlines() if line.startswith("step ")]
    assert steps == [f"{s}/30" for s in range(3, 31, 3)]  # one line per chunk of 3 steps
    assert result.steps == 30 and result.supports == (6, 12, 18, 24, 30) and result.resolution == (36, 32)
    assert result.model.output_shape == (None, 3)
    probs = result.model.predict(np.zeros((2, 32, 32, 3), "float32"), verbose=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    out = tmp_path / "run"
    for name in ("model.keras", "metrics.csv", "results.json", "run.json", "class_names.txt", "backup", "logs"):
        assert (out / name).exists(), name
    rows = _metrics(out / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(3, 31, 3))
    assert [r["val_accuracy"] for r in rows[:-1]] == [""] * 9  # evaluated only at the end by default
    results = json.loads((out / "results.json").read_text())
    assert float(rows[-1]["val_accuracy"]) == pytest.approx(results["eval"]["accuracy"]) == result.eval_accuracy
    confusion = np.array(results["confusion_matrix"])
    assert confusion.shape == (3, 3) and confusion.sum() == results["eval"]["examples"] == 14
    assert np.trace(confusion) / confusion.sum() == pytest.approx(result.eval_accuracy)
    assert json.loads((out / "run.json").read_text())["learning_rate"] == pytest.approx(0.5 * 8 / 512)
    restored = keras.saving.load_model(out / "model.keras")
    x = keras_bit.pipeline.eval_transform(learnable()[0][:4], 32)
    np.testing.assert_allclose(restored.predict(x, verbose=0), result.model.predict(x, verbose=0), atol=1e-6)


def test_final_metrics_match_an_independent_evaluation(tmp_path):
    result = run_finetune(tmp_path, steps=10)
    dataset = keras_bit.data.load(learnable())
    x = keras_bit.pipeline.eval_transform(dataset.eval.records, 32)
    probs = result.model.predict(x, verbose=0).astype(np.float64)
    labels = dataset.eval.labels
    assert result.eval_metrics["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == labels))
    loss = -np.mean(np.log(probs[np.arange(len(labels)), labels]))
    assert result.eval_metrics["loss"] == pytest.approx(loss, rel=1e-4)
    assert result.eval_metrics["top5_accuracy"] == 1.0  # 3 classes: top-3 always holds the label


def test_eval_every_fills_metrics_and_tensorboard(tmp_path):
    result = run_finetune(tmp_path, steps=12, checkpoint_every=6, eval_every=4)
    rows = _metrics(tmp_path / "run" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10, 12]  # chunks of gcd(6, 4) steps
    evaluated = [int(r["step"]) for r in rows if r["val_accuracy"]]
    assert evaluated == [4, 8, 12]
    assert all(0.0 <= float(r["val_top5_accuracy"]) <= 1.0 for r in rows if r["val_accuracy"])
    assert [h["step"] for h in result.history] == [2, 4, 6, 8, 10, 12]
    runs = sorted(os.listdir(tmp_path / "run" / "logs"))
    assert runs == ["train", "validation"] and os.listdir(tmp_path / "run" / "logs" / "validation")


def test_last_chunk_may_be_shorter(tmp_path):
    result = run_finetune(tmp_path, steps=10, checkpoint_every=4)
    rows = _metrics(tmp_path / "run" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [4, 8, 10]
    assert int(result.model.layers[-1].input.shape[-1]) == 3
    assert sorted(os.listdir(tmp_path / "run" / "backup"))[-2:] == ["step-000000010.weights.h5",
                                                                     "step-000000010.weights.h5.sha256"]


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    settings = dict(steps=12, checkpoint_every=4, mixup=0.2)
    reference = run_finetune(tmp_path, "straight", **settings)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(tmp_path, "crashed", callbacks=[Crash(after_batches=6)], **settings)  # dies in chunk 2
    assert sorted(os.listdir(tmp_path / "crashed" / "backup")) == ["step-000000004.weights.h5",
                                                                    "step-000000004.weights.h5.sha256"]
    resumed = run_finetune(tmp_path, "crashed", **settings)
    assert resumed.steps == 12 and [h["step"] for h in resumed.history] == [8, 12]  # only what was left
    assert [r["step"] for r in _metrics(tmp_path / "crashed" / "metrics.csv")] == ["4", "8", "12"]
    for a, b in zip(reference.model.weights, resumed.model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)  # deterministic: bit-identical


def test_rerunning_a_finished_run_trains_nothing_and_says_so(tmp_path, caplog, finished_run):
    run, first = finished_run
    copy_run(run, tmp_path)
    with caplog.at_level("INFO", logger="keras_bit"):
        again = run_finetune(tmp_path, steps=5, verbose=1)  # prints the final row read back from metrics.csv
    assert "is complete (step 5 of 5): nothing left to train" in caplog.text
    assert again.eval_accuracy == first.eval_accuracy and again.history[-1]["step"] == 5
    assert [r["step"] for r in _metrics(tmp_path / "run" / "metrics.csv")].count("5") == 1


@pytest.mark.parametrize("change,message", [
    (dict(checkpoint_every=4), "checkpoint_every=2 -> 4"),
    (dict(base_lr=0.25), "base_lr=0.5 -> 0.25"),
    (dict(mixed_precision="mixed_bfloat16"), "mixed_precision='float32' -> 'mixed_bfloat16'"),
    (dict(eval_fraction=0.3), r"eval_fraction=0.2 -> 0.3\. Run again"),  # named, not as a fingerprint
    (dict(steps=12), "steps=10 -> 12"),
    (dict(batch_size=4), "batch_size=8 -> 4"),
    (dict(mixup=0.1), "mixup=0.0 -> 0.1"),
    (dict(seed=1), "seed=0 -> 1"),
    (dict(trainable="head"), "trainable='all' -> 'head'"),
    (dict(deterministic=False), "deterministic=True -> False"),
    (dict(data=learnable(n_per_class=23)), "data="),
])
def test_resume_refuses_any_changed_setting(tmp_path, interrupted_run, change, message):
    copy_run(interrupted_run, tmp_path, "r")  # killed after 3 of 10 steps, a backup every 2: trained once
    with pytest.raises(RunMismatchError, match=message):
        run_finetune(tmp_path, "r", **{**dict(steps=10, checkpoint_every=2), **change})
    # Nothing touched: the folder is byte for byte the one the other tests resume (the original still resumes).
    assert folder_digests(tmp_path / "r") == folder_digests(interrupted_run)


def test_presentation_options_may_change_on_resume(tmp_path, interrupted_run):
    copy_run(interrupted_run, tmp_path, "r")
    result = run_finetune(tmp_path, "r", steps=10, checkpoint_every=2, eval_every=4, verbose=1)
    assert result.steps == 10


@pytest.mark.parametrize("k", [1, 5, 10])
def test_few_shot_trains_at_a_batch_larger_than_the_draw(tmp_path, k):
    result = run_finetune(tmp_path, steps=5, batch_size=32, examples_per_class=k, seed=3)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["train_examples"] == 3 * k and run["examples_per_class_seed"] == 3
    assert len(result.history) and np.isfinite(result.history[-1]["loss"])


def test_few_shot_draw_has_its_own_seed(tmp_path):
    dataset = keras_bit.data.load(learnable())
    a = keras_bit.data.few_shot(dataset.train, 2, 3, seed=0)
    b = keras_bit.data.few_shot(dataset.train, 2, 3, seed=1)
    assert not np.array_equal(a.records, b.records)
    run_finetune(tmp_path, "x", steps=5, examples_per_class=2, seed=0, examples_per_class_seed=1)
    run_finetune(tmp_path, "y", steps=5, examples_per_class=2, seed=0, examples_per_class_seed=0)
    fx = json.loads((tmp_path / "x" / "run.json").read_text())["train_fingerprint"]
    fy = json.loads((tmp_path / "y" / "run.json").read_text())["train_fingerprint"]
    assert fx == b.fingerprint() and fy == a.fingerprint() and fx != fy


@pytest.mark.parametrize("trainable,frozen_prefixes", [
    ("head", ("root_", "block1_", "block2_", "block3_", "block4_", "post_gn")),
    (3, ("root_", "block1_", "block2_")),
])
def test_partial_finetuning_keeps_frozen_weights_bit_identical(tmp_path, trainable, frozen_prefixes):
    keras.utils.set_random_seed(0)
    initial = TINY_BUILDER(weights=None, input_shape=(32, 32, 3), classes=3, classifier_activation=None)
    before = {w.path: w.numpy().copy() for w in initial.weights}
    result = run_finetune(tmp_path, steps=6, trainable=trainable)  # same seed: same initial weights
    after = {w.path: w.numpy() for w in result.model.weights}
    frozen = [p for p in before if p.startswith(frozen_prefixes)]
    trained = [p for p in before if not p.startswith(frozen_prefixes)]
    assert frozen and trained
    for path in frozen:
        np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    assert any(not np.array_equal(after[p], before[p]) for p in trained)
    assert all(not np.array_equal(after[p], before[p]) for p in trained if p.startswith("head"))


def test_gradient_accumulation_equals_the_full_batch(tmp_path):
    """GroupNorm is per example, so 2 micro-batches of 4 give the batch-8 gradient."""
    full = run_finetune(tmp_path, "full", steps=6, mixup=0.0)
    split = run_finetune(tmp_path, "split", steps=6, mixup=0.0, gradient_accumulation_steps=2)
    for a, b in zip(full.model.weights, split.model.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-4, err_msg=a.path)


def test_gradient_accumulation_never_replaces_the_callers_strategy(tmp_path):
    import tensorflow as tf

    with pytest.raises(ValueError, match="cannot run under MirroredStrategy.*keras-team/keras#17429"):
        run_finetune(tmp_path, gradient_accumulation_steps=2, strategy=tf.distribute.MirroredStrategy())


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_run(tmp_path, policy):
    result = run_finetune(tmp_path, steps=10, mixed_precision=policy)
    assert keras.config.dtype_policy().name == "float32"  # restored
    assert np.isfinite(result.eval_accuracy)
    assert all(np.all(np.isfinite(w.numpy())) for w in result.model.weights)


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="must be divisible by gradient_accumulation_steps"):
        run_finetune(tmp_path, gradient_accumulation_steps=3)
    with pytest.raises(ValueError, match="The parent of `output_dir` does not exist"):
        keras_bit.finetune(TINY_BUILDER, learnable(), output_dir=tmp_path / "no" / "such" / "dir")
    with pytest.raises(ValueError, match="`output_dir` must be a non-empty path"):
        keras_bit.finetune(TINY_BUILDER, learnable(), output_dir="")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="`output_dir` is a file"):
        keras_bit.finetune(TINY_BUILDER, learnable(), output_dir=tmp_path / "file")
    with pytest.raises(ValueError, match="Unknown BiT model name"):
        keras_bit.finetune("BiT-Q-R50x1", learnable(), output_dir=tmp_path / "x")
    with pytest.raises(ValueError, match=r"`mixup` \(MixUp alpha\) must be a finite number >= 0"):
        run_finetune(tmp_path, mixup=float("nan"))
    assert not (tmp_path / "run").exists()  # refused before anything was written


MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path.insert(0, "tests")
    import keras_bit
    from helpers import learnable, TINY_BUILDER
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    result = keras_bit.finetune(TINY_BUILDER, learnable(), batch_size=8, steps=20, resolution=(36, 32),
                                base_lr=0.5, output_dir=sys.argv[1], strategy=strategy, verbose=0, eval_every=10)
    kernel = result.model.get_layer("root_block_conv").kernel
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, "accuracy": result.eval_accuracy,
                      "loss": [h["loss"] for h in result.history], "mirrored": len(getattr(kernel.value, "values", ())),
                      "val": [h["val_accuracy"] for h in result.history]}))
    """
)


@pytest.mark.slow
def test_mirrored_strategy_two_logical_cpus(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT, str(tmp_path / "m")], capture_output=True,
                          text=True, timeout=600, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["replicas"] == 2 and report["mirrored"] == 2  # one copy of each variable per replica
    assert report["loss"][-1] < report["loss"][0]
    assert report["accuracy"] >= 0.6
    assert report["val"][4] is not None and report["val"][-1] == report["accuracy"]  # evaluated at 10 and 20


def test_resume_under_another_environment_is_logged(tmp_path, caplog, interrupted_run):
    copy_run(interrupted_run, tmp_path, "r")
    record = json.loads((tmp_path / "r" / "run.json").read_text())
    assert record["environment"]["tensorflow"] and record["environment"]["intra_op_threads"] >= 1
    record["environment"]["intra_op_threads"] += 7  # as if the run had started on a bigger machine
    (tmp_path / "r" / "run.json").write_text(json.dumps(record))
    with caplog.at_level("WARNING", logger="keras_bit"):
        assert run_finetune(tmp_path, "r", steps=10, checkpoint_every=2).steps == 10
    assert "Resuming under another environment" in caplog.text and "not be bit-identical" in caplog.text


# --- One run per output_dir; the export written once; NumPy integers as Python ones (issue 22). ---


def test_a_second_run_is_refused_while_the_first_trains_before_any_data_is_read(tmp_path):
    from keras_bit.train.run_lock import RunFolderBusyError

    training, proceed = threading.Event(), threading.Event()

    class Pause(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if not training.is_set():
                training.set()
                proceed.wait(300)

    outcome = {}
    first = threading.Thread(target=lambda: outcome.update(result=run_finetune(tmp_path, steps=6, callbacks=[Pause()])))
    first.start()
    try:
        assert training.wait(300), "the first run never trained"
        # A folder that does not exist as data: reading the data first would say "Image folder not found".
        with pytest.raises(RunFolderBusyError, match=rf"is in use by another fine-tuning run \(pid {os.getpid()} "
                                                     r"\(this process\)"):
            run_finetune(tmp_path, steps=6, data=str(tmp_path / "no" / "such" / "folder"))
    finally:
        proceed.set()
        first.join(600)
    assert outcome["result"].steps == 6  # the first run was not disturbed
    assert not (tmp_path / "run" / "run.lock").exists()  # and released the folder


@pytest.mark.slow
def test_a_run_held_by_another_process_is_refused_and_a_killed_holder_blocks_nothing(tmp_path):
    with HeldElsewhere(tmp_path / "run") as holder:
        with pytest.raises(ValueError, match=rf"`output_dir` {tmp_path / 'run'} is in use by another fine-tuning run "
                                             rf"\(pid {holder.pid} on host"):
            run_finetune(tmp_path, steps=5)
        os.kill(holder.pid, signal.SIGKILL)  # the lock file stays behind, the OS lock does not
        holder.wait(60)
    assert (tmp_path / "run" / "run.lock").exists()
    with pytest.raises(KeyboardInterrupt):
        run_finetune(tmp_path, steps=6, checkpoint_every=2, callbacks=[Crash(after_batches=3)])
    assert not (tmp_path / "run" / "run.lock").exists()  # released on the way out of a crash
    assert run_finetune(tmp_path, steps=6, checkpoint_every=2).steps == 6


def test_output_dir_inside_the_image_folder_is_refused_before_anything_is_written(tmp_path):
    from PIL import Image

    images, labels = learnable(n_per_class=4)
    root = tmp_path / "colours"
    for i, (image, label) in enumerate(zip(images, labels)):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / str(label) / f"{i}.png")
    before = sorted(str(p) for p in root.rglob("*"))
    for kwargs in (dict(output_dir=root / "run"), dict(output_dir=root), dict(export_dir=root / "0" / "exports")):
        kwargs = {"output_dir": tmp_path / "run", **kwargs}
        name = "export_dir" if "export_dir" in kwargs else "output_dir"
        with pytest.raises(ValueError, match=rf"`{name}` .* is inside the image folder {root}"):
            keras_bit.finetune(TINY_BUILDER, str(root), steps=5, batch_size=8, verbose=0, **kwargs)
    assert sorted(str(p) for p in root.rglob("*")) == before and not (tmp_path / "run").exists()
    assert run_finetune(tmp_path, data=str(root), steps=5).class_names == ["0", "1", "2"]  # outside: trains


def test_a_finished_run_started_again_does_not_export_again(tmp_path, caplog, finished_run):
    run, first = finished_run
    exports = run.parent / "exports"  # where the session's run exported (looked at, never changed)
    assert first.export_path == str(exports / "bit_resnetv2" / "1")
    copy_run(run, tmp_path)
    with caplog.at_level("INFO", logger="keras_bit"):
        again = run_finetune(tmp_path, steps=5, export_dir=exports)
    assert again.export_path == first.export_path and os.listdir(exports / "bit_resnetv2") == ["1"]
    assert "already exported to" in caplog.text and "keras-bit export" in caplog.text
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["export_path"] == first.export_path
    run_finetune(tmp_path, steps=5)  # started again without export_dir: the record stays
    assert json.loads((tmp_path / "run" / "results.json").read_text())["export_path"] == first.export_path
    elsewhere = run_finetune(tmp_path, steps=5, export_dir=tmp_path / "other")  # another place: asked for
    assert elsewhere.export_path == str(tmp_path / "other" / "bit_resnetv2" / "1")
    import shutil

    shutil.rmtree(tmp_path / "other")  # the recorded export was deleted: exported anew
    assert run_finetune(tmp_path, steps=5, export_dir=tmp_path / "other").export_path == elsewhere.export_path


def test_numpy_integers_are_taken_as_python_ints(tmp_path):
    result = run_finetune(tmp_path, steps=np.int64(6), batch_size=np.int32(8), checkpoint_every=np.uint8(3),
                          resolution=(np.int64(36), np.int16(32)), seed=np.uint32(3), trainable=np.int64(2),
                          eval_every=np.int64(3), max_pixels=np.int64(10**6), base_lr=np.float32(0.5))
    assert result.steps == 6 and result.resolution == (36, 32)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [type(record[k]) for k in ("steps", "batch_size", "seed", "trainable")] == [int] * 4
    # The same run in Python numbers is the same run: accepted, and finished already.
    again = run_finetune(tmp_path, steps=6, batch_size=8, checkpoint_every=3, resolution=(36, 32), seed=3,
                         trainable=2, eval_every=3, base_lr=0.5)
    assert again.eval_accuracy == result.eval_accuracy


@pytest.mark.parametrize("seed", [2**32, 2**64 + 1, -1, np.int64(-2), 1.0, True])
def test_a_seed_numpy_cannot_take_is_refused_up_front(tmp_path, seed):
    with pytest.raises(ValueError, match=r"`seed` must be a non-negative integer below 2\*\*32 \(NumPy's seed "
                                         r"range\)\. Received: seed="):
        run_finetune(tmp_path, seed=seed)
    assert not (tmp_path / "run").exists()
