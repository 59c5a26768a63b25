"""Resuming a run folder: the same settings, or a refusal naming each difference as the user typed it."""

import pytest

from keras_bit.train import config, resume
from keras_bit.train.run_dir import RunDir


def test_mismatch_names_settings_as_typed():
    changes = [("base_lr", 0.16, 0.5), ("jit_compile", False, True), ("weights", None, "imagenet21k"),
               ("train_fingerprint", "aaa", "bbb"), ("deterministic", True, False)]
    error = resume.RunMismatchError("/runs/r", changes)
    assert "base_lr=0.16 -> 0.5" in str(error) and "jit_compile=False -> True" in str(error)
    assert "choose a new `output_dir`" in str(error)
    cli = error.describe(flags=True)
    assert "--base-lr 0.16 -> 0.5" in cli and "--xla off -> on" in cli and "--weights none -> imagenet21k" in cli
    assert "--data aaa -> bbb (train_fingerprint)" in cli and "--output-dir" in cli
    assert "--nondeterministic off -> on" in cli and "deterministic=True -> False" in str(error)


def test_check_resume(tmp_path):
    run_dir = RunDir(tmp_path)
    record = {key: 1 for key in config.COMPARED}
    resume.check_resume(run_dir, record, has_backup=False)  # nothing to resume: anything goes
    with pytest.raises(ValueError, match="holds a backup but no run.json"):
        resume.check_resume(run_dir, record, has_backup=True)
    run_dir.write_settings(record)
    resume.check_resume(run_dir, dict(record, eval_every=7, replicas=2), has_backup=True)  # not compared
    with pytest.raises(resume.RunMismatchError, match=r"steps=1 -> 2"):
        resume.check_resume(run_dir, dict(record, steps=2), has_backup=True)
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(ValueError, match="The run settings file .*run.json is not valid JSON"):
        resume.check_resume(run_dir, record, has_backup=True)
    for text, kind in (("[1, 2]", "list"), ('"steps"', "str"), ("7", "int"), ("null", "NoneType")):
        (tmp_path / "run.json").write_text(text)  # valid JSON, but not the object of settings
        with pytest.raises(ValueError, match=rf"run.json must hold a JSON object, not a {kind}\. Delete it"):
            resume.check_resume(run_dir, record, has_backup=True)


