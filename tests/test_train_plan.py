"""Resolved settings: BiT-HyperRule for what the config leaves open, and the run.json record (no training)."""

import types

import pytest

from keras_bit.train import hyperrule, plan
from keras_bit.train.config import FinetuneConfig


def test_default_base_lr_depends_on_pretraining():
    assert plan.default_base_lr("imagenet21k") == hyperrule.BASE_LR == 0.003
    assert plan.default_base_lr(None) == hyperrule.SCRATCH_BASE_LR > 10 * hyperrule.BASE_LR


@pytest.mark.parametrize("total,every,evaluate,expected", [
    (100, 10, None, 10), (100, 10, 25, 5), (100, 7, None, 7), (100, 200, None, 100), (6, 4, 6, 2)])
def test_chunks_end_on_every_backup_and_evaluation(total, every, evaluate, expected):
    chunk = plan.chunk_steps(total, min(every, total), evaluate)
    assert chunk == expected
    assert min(every, total) % chunk == 0 and (evaluate is None or evaluate % chunk == 0)


def test_check_model_refuses_a_non_callable_even_with_a_weights_file():
    with pytest.raises(ValueError,
                       match=r"`model` must be a BiT model name .* or a builder callable. Received: model=123"):
        plan.check_model(123, "x.npz")


def _dataset(n_train, image_size, n_eval=7):
    train = type("S", (), {"__len__": lambda self: n_train})()
    evals = type("S", (), {"__len__": lambda self: n_eval})()
    return types.SimpleNamespace(name="toy", image_size=image_size, eval=evals, class_names=["a", "b"]), train


def test_plan_applies_the_hyper_rule_and_records_every_setting():
    dataset, train = _dataset(1000, (32, 32))
    run = plan.make_plan("BiT-M-R50x1", FinetuneConfig(batch_size=128, weights="imagenet21k"), dataset, train,
                         replicas=2, fingerprints=("t", "e"), environment={"x": 1}, workers=1)
    assert (run.resize, run.crop) == (160, 128) and run.supports == tuple(hyperrule.get_schedule(1000))
    assert run.base_lr == hyperrule.BASE_LR and run.learning_rate == pytest.approx(0.003 * 128 / 512)
    assert run.mixup == 0.0 and run.checkpoint_every == run.total // 10 and run.eval_every is None
    assert list(run.record) == [
        "model", "weights", "data", "split", "eval_split", "skip_bad_images", "data_dir", "max_pixels",
        "eval_fraction", "train_examples", "eval_examples", "train_fingerprint", "eval_fingerprint", "class_names",
        "examples_per_class", "examples_per_class_seed", "batch_size", "steps", "schedule", "resolution", "base_lr",
        "learning_rate", "mixup", "seed", "mixed_precision", "jit_compile", "deterministic",
        "gradient_accumulation_steps", "trainable", "checkpoint_every", "eval_every", "replicas", "mixup_workers",
        "environment"]
    assert run.record["max_pixels"] is None and run.record["mixup_workers"] is None  # not a folder; no MixUp
    assert run.record["mixed_precision"] == "float32" and run.record["replicas"] == 2
    few = plan.make_plan("BiT-M-R50x1", FinetuneConfig(examples_per_class=1, seed=3, mixup=0.5, steps=50), dataset,
                         train, replicas=1, fingerprints=("t", "e"), workers=2, folder=True)
    assert few.record["examples_per_class_seed"] == 3 and few.record["max_pixels"] == 40_000_000
    assert few.record["mixup_workers"] == 2 and few.total == 50 and few.base_lr == hyperrule.SCRATCH_BASE_LR
