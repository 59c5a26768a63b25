"""The one table of fine-tuning settings: checks, the CLI parser, the README table and resume naming."""

import argparse
import math
import os

import numpy as np
import pytest

from keras_bit.train import config
from keras_bit.train.config import FinetuneConfig

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


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
        FinetuneConfig(**kwargs)


def test_good_arguments_pass():
    FinetuneConfig(batch_size=8, steps=5, mixup=0.0, trainable=3, resolution=(36, 32), eval_every=2)
    FinetuneConfig(trainable="head", base_lr=1, examples_per_class=1, examples_per_class_seed=0)


def test_frozen_stages():
    assert [config.frozen_blocks(t) for t in ("all", 1, 2, 3, 4, "head")] == [0, 1, 2, 3, 4, 5]


def test_every_result_changing_argument_is_compared():
    """Each of finetune's result-changing arguments maps to a compared run.json key."""
    compared_args = {config.name_of(key) for key in config.COMPARED}
    for arg in ("model", "weights", "data", "batch_size", "steps", "resolution", "base_lr", "mixup", "seed",
                "mixed_precision", "jit_compile", "deterministic", "gradient_accumulation_steps", "trainable",
                "checkpoint_every", "examples_per_class", "examples_per_class_seed", "split", "eval_split",
                "eval_fraction", "data_dir", "skip_bad_images", "max_pixels"):
        assert arg in compared_args, arg
    for arg in ("eval_every", "output_dir", "export_dir"):  # where and how often: not the weights
        assert arg not in compared_args, arg


def test_numpy_numbers_are_taken_and_become_python_numbers():
    args = FinetuneConfig(batch_size=np.int64(8), steps=np.int32(10), seed=np.uint64(2**32 - 1),
                          examples_per_class=np.int8(2), examples_per_class_seed=np.int64(0),
                          checkpoint_every=np.int16(5), eval_every=np.uint8(5), gradient_accumulation_steps=np.int64(2),
                          trainable=np.int64(3), resolution=np.int64(40), base_lr=np.float32(0.25),
                          mixup=np.float16(0.5), eval_fraction=np.float32(0.25), max_pixels=np.int64(1000))
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
        FinetuneConfig(**kwargs)




def _parser():
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return parser


def test_every_setting_is_declared_whole():
    flags = [f.metadata["flag"] for f in config.FIELDS.values()]
    assert len(set(flags)) == len(flags) and all(f.startswith("--") for f in flags)
    for name, field in config.FIELDS.items():
        assert field.metadata["help"].strip() and "\n" not in field.metadata["help"], name
        assert name in config.docstring(), name


def test_the_cli_parser_is_the_config():
    """No flag: the library defaults; each flag sets its field, with the CLI's spelling of values."""
    parser = _parser()
    assert config.from_cli(parser.parse_args([])) == FinetuneConfig()
    args = parser.parse_args(["--batch-size", "8", "--steps", "10", "--resolution", "36,32", "--weights", "none",
                              "--nondeterministic", "--xla", "--grad-accum", "2", "--trainable", "3",
                              "--skip-bad-images", "--mixed-precision", "mixed_bfloat16", "--max-pixels", "100"])
    assert config.from_cli(args) == FinetuneConfig(
        batch_size=8, steps=10, resolution=(36, 32), weights=None, deterministic=False, jit_compile=True,
        gradient_accumulation_steps=2, trainable=3, skip_bad_images=True, mixed_precision="mixed_bfloat16",
        max_pixels=100)
    assert config.from_cli(parser.parse_args(["--resolution", "40"])).resolution == (40, 40)
    with pytest.raises(ValueError, match="`steps` must be >= 5"):  # the library's check, not argparse's
        config.from_cli(parser.parse_args(["--steps", "3"]))


def test_overrides_and_unknown_settings():
    base = FinetuneConfig(batch_size=8, steps=10)
    changed = base.replace(steps=20)
    assert (changed.batch_size, changed.steps, base.steps) == (8, 20, 10)
    with pytest.raises(TypeError, match="Unknown fine-tuning setting.*batch_sise"):
        base.replace(batch_sise=8)
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer"):
        base.replace(batch_size=0)


def test_readme_option_table_is_the_config():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    assert config.markdown_table() in text, "README's option table differs: paste config.markdown_table()"


def test_refusals_name_settings_by_their_flags():
    for key in config.COMPARED:
        flag = config.name_of(key, flags=True)
        assert flag in [f.metadata["flag"] for f in config.FIELDS.values()] + ["--model", "--data",
                                                                                 "TF_CONFIG workers"], key


def test_refusals_name_changes_in_the_order_of_the_settings():
    assert config.COMPARED == (
        "model", "weights", "data", "split", "eval_split", "eval_fraction", "data_dir", "skip_bad_images",
        "max_pixels", "train_fingerprint", "eval_fingerprint", "class_names", "examples_per_class",
        "examples_per_class_seed", "batch_size", "steps", "schedule", "resolution", "base_lr", "mixup", "seed",
        "mixed_precision", "jit_compile", "deterministic", "gradient_accumulation_steps", "trainable",
        "checkpoint_every", "mixup_workers")


@pytest.mark.parametrize("kwargs,match", [
    (dict(weights=123), r"`weights` must be None, a name or a path \(str or os.PathLike\). Received: weights=123"),
    (dict(data_dir=["a"]), "`data_dir` must be None, a name or a path"),
])
def test_paths_of_the_wrong_type_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FinetuneConfig(**kwargs)


def test_cli_values_that_are_not_numbers_get_one_clear_line():
    parser = _parser()
    parser.error = lambda message: (_ for _ in ()).throw(ValueError(message))
    for argv, match in ((["--resolution", "abc"], "expected CROP or RESIZE,CROP \\(integers\\), got abc"),
                        (["--resolution", "1,2,3"], "expected CROP or RESIZE,CROP"),
                        (["--steps", "x"], "must be a positive integer, got x")):
        with pytest.raises(ValueError, match=match):
            parser.parse_args(argv)


def test_few_shot_seed_defaults_to_the_seed():
    assert FinetuneConfig(examples_per_class=2, seed=7).few_shot_seed == 7
    assert FinetuneConfig(examples_per_class=2, seed=7, examples_per_class_seed=3).few_shot_seed == 3


def test_example_selecting_settings_are_marked():
    """A refusal for one of these does not also name the examples' digests, which it changes."""
    assert config.SELECTING == {"data", "split", "eval_split", "eval_fraction", "data_dir", "skip_bad_images",
                                "max_pixels", "seed", "examples_per_class", "examples_per_class_seed"}
