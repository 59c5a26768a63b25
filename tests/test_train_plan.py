"""Argument checks, resolved settings and the resume comparison (no training here)."""

import math
import os

import numpy as np
import pytest

from keras_bit.train import hyperrule, plan, run_record


@pytest.mark.parametrize("kwargs,match", [
    (dict(batch_size=0), "`batch_size` must be a positive integer"),
    (dict(batch_size=8.0), "`batch_size` must be a positive integer"),
    (dict(batch_size=8, gradient_accumulation_steps=3), "must be divisible by gradient_accumulation_steps"),
    (dict(steps=3), r"`steps` must be >= 5"),
    (dict(steps=-1), "`steps` must be a positive integer"),
    (dict(checkpoint_every=0), "`checkpoint_every` must be a positive integer"),
    (dict(checkpoint_every=-5), "`checkpoint_every` must be a positive integer"),
    (dict(eval_every=0), "`eval_every` must be a positive integer"),
    (dict(examples_per_class=0), "`examples_per_class` must be a positive integer"),
    (dict(seed=-1), "`seed` must be a non-negative integer"),
    (dict(seed=1.5), "`seed` must be a non-negative integer"),
    (dict(examples_per_class=1, examples_per_class_seed=True), "`examples_per_class_seed` must be a non-negative"),
    (dict(examples_per_class_seed=3), "`examples_per_class_seed` seeds the few-shot draw: it needs"),
    (dict(mixup=-1.0), r"`mixup` \(MixUp alpha\) must be a finite number >= 0"),
    (dict(mixup=math.nan), "`mixup`"),
    (dict(mixup=math.inf), "`mixup`"),
    (dict(base_lr=0.0), "`base_lr` must be a finite number > 0"),
    (dict(base_lr=math.nan), "`base_lr`"),
    (dict(base_lr="0.1"), "`base_lr`"),
    (dict(eval_fraction=1.0), r"`eval_fraction` must be in \(0, 1\)"),
    (dict(eval_fraction=0), r"`eval_fraction` must be in \(0, 1\)"),
    (dict(mixed_precision="float16"), "`mixed_precision` must be one of"),
    (dict(jit_compile="yes"), "`jit_compile` must be True or False"),
    (dict(deterministic=None), "`deterministic` must be True or False"),
    (dict(trainable="backbone"), "`trainable` must be \"all\""),
    (dict(trainable=0), "`trainable` must be"),
    (dict(trainable=5), "`trainable` must be"),
    (dict(trainable=True), "`trainable` must be"),
    (dict(resolution=(32, 64)), "`resolution` must be None"),
    (dict(resolution=16), "`resolution` must be None"),
])
def test_bad_arguments_are_refused_up_front(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan.Arguments(**kwargs).check()


def test_good_arguments_pass():
    plan.Arguments(batch_size=8, steps=5, mixup=0.0, trainable=3, resolution=(36, 32), eval_every=2).check()
    plan.Arguments(trainable="head", base_lr=1, examples_per_class=1, examples_per_class_seed=0).check()


def test_frozen_stages():
    assert [plan.frozen_blocks(t) for t in ("all", 1, 2, 3, 4, "head")] == [0, 1, 2, 3, 4, 5]


def test_default_base_lr_depends_on_pretraining():
    assert plan.default_base_lr("imagenet21k") == hyperrule.BASE_LR == 0.003
    assert plan.default_base_lr(None) == hyperrule.SCRATCH_BASE_LR > 10 * hyperrule.BASE_LR


@pytest.mark.parametrize("total,every,evaluate,expected", [
    (100, 10, None, 10), (100, 10, 25, 5), (100, 7, None, 7), (100, 200, None, 100), (6, 4, 6, 2)])
def test_chunks_end_on_every_backup_and_evaluation(total, every, evaluate, expected):
    chunk = plan.chunk_steps(total, min(every, total), evaluate)
    assert chunk == expected
    assert min(every, total) % chunk == 0 and (evaluate is None or evaluate % chunk == 0)


def test_mismatch_names_settings_as_typed():
    changes = [("base_lr", 0.16, 0.5), ("jit_compile", False, True), ("weights", None, "imagenet21k"),
               ("train_fingerprint", "aaa", "bbb"), ("deterministic", True, False)]
    error = plan.RunMismatchError("/runs/r", changes)
    assert "base_lr=0.16 -> 0.5" in str(error) and "jit_compile=False -> True" in str(error)
    assert "choose a new `output_dir`" in str(error)
    cli = error.describe(flags=True)
    assert "--base-lr 0.16 -> 0.5" in cli and "--xla off -> on" in cli and "--weights none -> imagenet21k" in cli
    assert "--data aaa -> bbb (train_fingerprint)" in cli and "--output-dir" in cli
    assert "--nondeterministic off -> on" in cli and "deterministic=True -> False" in str(error)


def test_every_result_changing_argument_is_compared():
    """Each of finetune's result-changing arguments maps to a compared run.json key."""
    compared_args = {arg for _, arg, _ in plan.COMPARED}
    for arg in ("model", "weights", "data", "batch_size", "steps", "resolution", "base_lr", "mixup", "seed",
                "mixed_precision", "jit_compile", "deterministic", "gradient_accumulation_steps", "trainable",
                "checkpoint_every", "examples_per_class", "examples_per_class_seed"):
        assert arg in compared_args, arg


def test_check_resume(tmp_path):
    record = {key: 1 for key, _, _ in plan.COMPARED}
    plan.check_resume(tmp_path, record, has_backup=False)  # nothing to resume: anything goes
    with pytest.raises(ValueError, match="holds a backup but no run.json"):
        plan.check_resume(tmp_path, record, has_backup=True)
    run_record.write_run_json(tmp_path, record)
    plan.check_resume(tmp_path, dict(record, eval_every=7, replicas=2), has_backup=True)  # not compared
    with pytest.raises(plan.RunMismatchError, match=r"steps=1 -> 2"):
        plan.check_resume(tmp_path, dict(record, steps=2), has_backup=True)
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(ValueError, match="The run settings file .*run.json is not valid JSON"):
        plan.check_resume(tmp_path, record, has_backup=True)
    for text, kind in (("[1, 2]", "list"), ('"steps"', "str"), ("7", "int"), ("null", "NoneType")):
        (tmp_path / "run.json").write_text(text)  # valid JSON, but not the object of settings
        with pytest.raises(ValueError, match=rf"run.json must hold a JSON object, not a {kind}\. Delete it"):
            plan.check_resume(tmp_path, record, has_backup=True)


def test_check_model_refuses_a_non_callable_even_with_a_weights_file():
    with pytest.raises(ValueError, match=r"`model` must be a BiT model name .* or a builder callable. Received: model=123"):
        plan.check_model(123, "x.npz")


def test_numpy_numbers_are_taken_and_become_python_numbers():
    args = plan.Arguments(batch_size=np.int64(8), steps=np.int32(10), seed=np.uint64(2**32 - 1),
                          examples_per_class=np.int8(2), examples_per_class_seed=np.int64(0),
                          checkpoint_every=np.int16(5), eval_every=np.uint8(5), gradient_accumulation_steps=np.int64(2),
                          trainable=np.int64(3), resolution=np.int64(40), base_lr=np.float32(0.25),
                          mixup=np.float16(0.5), eval_fraction=np.float32(0.25), max_pixels=np.int64(1000))
    args.check()
    for name in ("batch_size", "steps", "seed", "examples_per_class", "examples_per_class_seed", "checkpoint_every",
                 "eval_every", "gradient_accumulation_steps", "trainable", "max_pixels"):
        assert type(getattr(args, name)) is int, name
    assert args.resolution == (40, 40) and all(type(r) is int for r in args.resolution)
    assert [type(v) for v in (args.base_lr, args.mixup, args.eval_fraction)] == [float] * 3
    assert args.seed == 2**32 - 1 and args.base_lr == 0.25


@pytest.mark.parametrize("kwargs,match", [
    (dict(seed=2**32), r"`seed` must be a non-negative integer below 2\*\*32 \(NumPy's seed range\). Received: "
                       r"seed=4294967296"),
    (dict(seed=2**64 + 1), "Received: seed=18446744073709551617"),
    (dict(seed=np.int64(-1)), r"Received: seed=np.int64\(-1\)"),
    (dict(seed=np.bool_(True)), "`seed` must be"),
    (dict(examples_per_class=1, examples_per_class_seed=2**40), "`examples_per_class_seed` must be a non-negative"),
    (dict(max_pixels=0), "`max_pixels` must be a positive integer"),
    (dict(max_pixels=1.5e7), "`max_pixels` must be a positive integer"),
    (dict(batch_size=np.float64(8)), "`batch_size` must be a positive integer"),
    (dict(resolution=(np.int64(64), np.float32(32))), "`resolution` must be None"),
    (dict(trainable=np.int64(5)), "`trainable` must be"),
])
def test_numpy_values_outside_the_range_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan.Arguments(**kwargs).check()


def test_output_dir_that_is_a_broken_link_or_below_a_file(tmp_path):
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    os.symlink(tmp_path / "missing", tmp_path / "dangling")
    for name in ("loop", "dangling"):
        with pytest.raises(ValueError, match=rf"`output_dir` is a symbolic link that leads nowhere \(a loop, or a "
                                             rf"missing target\): {tmp_path / name} -> "):
            plan.check_output_dir(tmp_path / name)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=rf"The parent of `output_dir` is not a folder: {tmp_path / 'file'}"):
        plan.check_output_dir(tmp_path / "file" / "run")
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "alias")  # a link to a folder is a folder
    assert plan.check_output_dir(tmp_path / "alias") == str(tmp_path / "alias")
