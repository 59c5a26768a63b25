"""Every fine-tuning setting, declared once: default, help, check, CLI flag, and whether it changes the result.

`FinetuneConfig` is the one table. `finetune(model, data, config=None,
**overrides)` takes it (or today's keywords), the `keras-bit finetune` parser
is built from it (`add_arguments`), `--help` and the README's option table
(`markdown_table`) show its help texts, and a resumed run compares exactly the
settings marked `compared` (the others only change what is shown or where it
goes). Adding a setting means one `setting(...)` line here plus its use.

Example:
    >>> config = FinetuneConfig(batch_size=64, steps=500)
    >>> keras_bit.finetune("BiT-M-R50x1", "cifar10", config, weights="imagenet21k")

Reference:
    Kolesnikov et al., "Big Transfer (BiT)", https://arxiv.org/abs/1912.11370, section 3.3
    (BiT-HyperRule: the defaults left as None).
"""

import argparse
import dataclasses
import math
import os

import numpy as np

from keras_bit.io import DEFAULT_MAX_PIXELS
from keras_bit.train import hyperrule
from keras_bit.validation import check_positive_int, is_int, positive_int_arg, weights_arg

POLICIES = (None, "float32", "mixed_float16", "mixed_bfloat16")
NUM_BLOCKS = 4
# keras.utils.set_random_seed passes the seed to np.random.seed, which takes 0..2**32 - 1.
MAX_SEED = 2**32 - 1


def setting(default, help, flag, compared=True, check=None, cli=None, doc=None, selects=False):
    """One field of `FinetuneConfig`.

    Args:
        default: the Python default (the CLI's too, unless `cli` sets another).
        help: one line, shown by `--help`, the README table and the docstring.
        flag: the CLI flag (`--batch-size`), or None for a Python-only setting.
        compared: whether a change alters the trained weights, so a resume must
            find it unchanged (recorded in run.json under the field's name).
        check: `check(value, name) -> value`, raising `ValueError` naming the
            setting; returns the plain Python value stored (NumPy numbers in).
        cli: extra `argparse.add_argument` keywords (type, choices, action).
        doc: more detail for the Python docstring.
        selects: whether it chooses which examples train or evaluate (a
            resume refused for it does not also name the examples' digests).
    """
    meta = dict(help=help, flag=flag, compared=compared, check=check, cli=cli or {}, doc=doc, selects=selects)
    return dataclasses.field(default=default, metadata=meta)


# --- Checks: each returns the plain value stored (NumPy numbers become Python ones). ---

def _positive(value, name):
    return check_positive_int(value, name)


def _optional_positive(value, name):
    return None if value is None else check_positive_int(value, name)


def _seed(value, name):
    if not (is_int(value) and 0 <= value <= MAX_SEED):
        raise ValueError(f"`{name}` must be a non-negative integer below 2**32 (NumPy's seed range). "
                         f"Received: {name}={value!r}")
    return int(value)


def _optional_seed(value, name):
    return None if value is None else _seed(value, name)


def _is_real(value, low, open_low=False):
    if not (is_int(value) or isinstance(value, (float, np.floating))) or not math.isfinite(value):
        return False
    return value > low if open_low else value >= low


def _base_lr(value, name):
    if value is not None and not _is_real(value, low=0.0, open_low=True):
        raise ValueError(f"`base_lr` must be a finite number > 0. Received: base_lr={value!r}")
    return None if value is None else float(value)


def _mixup(value, name):
    if value is not None and not _is_real(value, low=0.0):
        raise ValueError(f"`mixup` (MixUp alpha) must be a finite number >= 0. Received: mixup={value!r}")
    return None if value is None else float(value)


def _fraction(value, name):
    if not _is_real(value, low=0.0, open_low=True) or not value < 1:
        raise ValueError(f"`{name}` must be in (0, 1). Received: {name}={value!r}")
    return float(value)


def _policy(value, name):
    if value not in POLICIES:
        raise ValueError(f"`{name}` must be one of {POLICIES}. Received: {name}={value!r}")
    return value


def _bool(value, name):
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False. Received: {name}={value!r}")
    return value


def _truthy(value, name):
    return bool(value)


def _max_pixels(value, name):
    return DEFAULT_MAX_PIXELS if value is None else check_positive_int(value, name)


def _optional_path(value, name):
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"`{name}` must be None, a name or a path (str or os.PathLike). Received: {name}={value!r}")
    return None if value is None else os.fspath(value)


def frozen_blocks(trainable):
    """How many backbone stages `trainable` freezes: 0 ("all"), 1..4 (root and blocks below), 5 ("head").

    Stage 0 is the root (stem); `trainable=k` freezes the root and blocks 1..k-1.
    """
    if trainable == "all":
        return 0
    if trainable == "head":
        return NUM_BLOCKS + 1
    if is_int(trainable) and 1 <= trainable <= NUM_BLOCKS:
        return int(trainable)
    raise ValueError(
        '`trainable` must be "all" (default), "head" (linear probe: only the new head trains) or a block '
        f"number 1-{NUM_BLOCKS} (the root and the blocks below it stay frozen). Received: trainable={trainable!r}"
    )


def _trainable(value, name):
    frozen_blocks(value)
    return int(value) if is_int(value) else value


def check_resolution(resolution):
    """`(resize, crop)` ints from an int or a pair; `ValueError` unless 32 <= crop <= resize."""
    pair = (resolution, resolution) if is_int(resolution) else resolution
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(is_int(r) and r >= 32 for r in pair)
            or pair[1] > pair[0]):
        raise ValueError(
            "`resolution` must be None (BiT-HyperRule), an int >= 32, or (resize, crop) ints with "
            f"32 <= crop <= resize. Received: resolution={resolution!r}"
        )
    return tuple(int(r) for r in pair)


def _resolution(value, name):
    return None if value is None else check_resolution(value)


# --- CLI value types (argparse). ---

def _cli_resolution(value):
    try:
        parts = [int(v) for v in value.split(",")]
    except ValueError:
        parts = ()
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected CROP or RESIZE,CROP (integers), got {value}")
    return parts[0] if len(parts) == 1 else tuple(parts)


def _cli_trainable(value):
    return int(value) if value.isdigit() else value


_POSITIVE = dict(type=positive_int_arg)


@dataclasses.dataclass
class FinetuneConfig:
    """The settings of one fine-tuning run (see each field's help; `markdown_table()` lists them all)."""

    weights: object = setting(
        None, 'checkpoint to start from ("imagenet21k", "imagenet", an hf://<owner>/<repo> handle, a path); '
        "none: random initialisation", "--weights", check=_optional_path, cli=dict(type=weights_arg),
        doc="The head is always new and zero.")
    split: str = setting("train", "tfds training split", "--split", selects=True)
    eval_split: str = setting(None, 'tfds evaluation split (default: "test", else "validation")', "--eval-split",
                              selects=True)
    eval_fraction: float = setting(0.2, "held-out share of the training examples when there is no eval split",
                                   "--eval-fraction", selects=True, check=_fraction, cli=dict(type=float))
    data_dir: str = setting(None, "tfds data_dir", "--data-dir", selects=True, check=_optional_path)
    skip_bad_images: bool = setting(
        False, "leave out undecodable images (listed in skipped_images.txt) instead of stopping",
        "--skip-bad-images", selects=True, check=_truthy, cli=dict(action="store_true"),
        doc="Image folders are fully decoded once before training; an undecodable file, or one over "
            "`max_pixels`, is an error naming it.")
    max_pixels: int = setting(
        DEFAULT_MAX_PIXELS, "largest image of an image folder, height x width; larger ones are refused (or "
        "skipped with --skip-bad-images)", "--max-pixels", selects=True, check=_max_pixels, cli=_POSITIVE,
        doc="Read from each header first, as `keras-bit predict` and serving. None: the default.")
    examples_per_class: int = setting(None, "few-shot: train on exactly K examples of each class",
                                      "--examples-per-class", selects=True, check=_optional_positive, cli=_POSITIVE,
                                      doc="The authors' `--examples_per_class`; repeated through the stream at any "
                                          "batch size.")
    examples_per_class_seed: int = setting(None, "seed of the few-shot draw (default: --seed)",
                                           "--examples-per-class-seed", selects=True, check=_optional_seed,
                                           cli=dict(type=int))
    batch_size: int = setting(
        hyperrule.BASE_BATCH_SIZE, "global batch; may exceed the training set (it repeats, as in BiT's few-shot "
        "runs)", "--batch-size", check=_positive, cli=_POSITIVE,
        doc="Split over replicas and, with `gradient_accumulation_steps`, over micro-batches.")
    steps: int = setting(None, "total optimizer steps: BiT-HyperRule's schedule scaled to end there (default: its own "
                               "500 / 10k / 20k by training-set size)", "--steps", check=_optional_positive,
                         cli=_POSITIVE)
    resolution: object = setting(
        None, "CROP, or RESIZE,CROP (default: BiT-HyperRule's 160/128 below 96x96 px, else 512/480)",
        "--resolution", check=_resolution, cli=dict(type=_cli_resolution),
        doc="In Python an int (train and eval size, no random crop) or a `(resize, crop)` pair.")
    base_lr: float = setting(
        None, f"learning rate at batch 512, scaled linearly (default: {hyperrule.BASE_LR} with --weights, "
        f"{hyperrule.SCRATCH_BASE_LR} from random init)", "--base-lr", check=_base_lr,
        cli=dict(type=float))
    mixup: float = setting(None, "MixUp alpha (default: BiT-HyperRule's, 0.1 from 20k training examples, else off)",
                           "--mixup", check=_mixup, cli=dict(type=float))
    seed: int = setting(0, "seed of shuffling, augmentation, MixUp and random initialisation (0 to 2**32 - 1)",
                        "--seed", selects=True, check=_seed, cli=dict(type=int),
                        doc="Sets Keras' global seed (`keras.utils.set_random_seed`).")
    mixed_precision: str = setting(
        None, "Keras dtype policy: float32 (none), mixed_float16 (with loss scaling) or mixed_bfloat16",
        "--mixed-precision", check=_policy, cli=dict(choices=POLICIES[1:]))
    jit_compile: bool = setting(False, "compile the training step with XLA", "--xla", check=_bool,
                                cli=dict(action="store_true"))
    deterministic: bool = setting(
        True, "bit-identical results for the same command in a new process (TensorFlow op determinism)",
        "--nondeterministic", check=_bool,
        cli=dict(action="store_false", help="allow nondeterministic TensorFlow ops (default: bit-identical reruns)"),
        doc="The CLI flag turns it off.")
    gradient_accumulation_steps: int = setting(
        1, "micro-batches per step, accumulated (the authors' --batch_split); one device only", "--grad-accum",
        check=_positive, cli=_POSITIVE)
    trainable: object = setting(
        "all", '"all", "head" (linear probe) or a block 1-4 (the root and the blocks below it stay frozen)',
        "--trainable", check=_trainable, cli=dict(type=_cli_trainable))
    checkpoint_every: int = setting(None, "steps between backups (default: a tenth of the run)", "--checkpoint-every",
                                    check=_optional_positive, cli=_POSITIVE)
    eval_every: int = setting(None, "steps between evaluations (default: only at the end; the authors' --eval_every)",
                              "--eval-every", compared=False, check=_optional_positive, cli=_POSITIVE)
    output_dir: str = setting(
        "bit_finetune", "the run folder (created; its parent must exist): backups, logs, metrics.csv, "
        "results.json, run.json, class_names.txt, summary.png, model.keras", "--output-dir", compared=False,
        doc="One run at a time: while a run holds it (`run.lock`, an OS lock) another is refused, naming the "
            "holder. It may not lie inside an image folder given as `data`.")
    export_dir: str = setting(
        None, "also export a serving SavedModel to EXPORT_DIR/<model name>/<next version>/, once per run",
        "--export-dir", compared=False,
        doc="A finished run started again returns the version it exported (recorded in results.json).")

    def __post_init__(self):
        self.check()

    def check(self):
        """Checks and normalises every setting; raises `ValueError` naming the first bad one."""
        for field in dataclasses.fields(self):
            check = field.metadata["check"]
            if check is not None:
                setattr(self, field.name, check(getattr(self, field.name), field.name))
        if self.batch_size % self.gradient_accumulation_steps:
            raise ValueError(
                f"`batch_size` ({self.batch_size}) must be divisible by gradient_accumulation_steps "
                f"({self.gradient_accumulation_steps}).")
        if self.steps is not None and self.steps < 5:
            raise ValueError(f"`steps` must be >= 5 (one per BiT-HyperRule phase). Received: steps={self.steps!r}")
        if self.examples_per_class_seed is not None and self.examples_per_class is None:
            raise ValueError("`examples_per_class_seed` seeds the few-shot draw: it needs `examples_per_class`.")
        return self

    @property
    def few_shot_seed(self):
        """The seed of the few-shot draw: `examples_per_class_seed`, else `seed`."""
        return self.seed if self.examples_per_class_seed is None else self.examples_per_class_seed

    def replace(self, **overrides):
        """A checked copy with `overrides`; `TypeError` naming an unknown setting (as Python does for keywords)."""
        unknown = sorted(set(overrides) - set(FIELDS))
        if unknown:
            raise TypeError(f"Unknown fine-tuning setting(s) {', '.join(unknown)}; the settings are "
                            f"{', '.join(FIELDS)}")
        return dataclasses.replace(self, **overrides)


FIELDS = {f.name: f for f in dataclasses.fields(FinetuneConfig)}

# run.json keys compared on resume that are not settings: each names the setting (Python name, CLI flag) that
# changes it. The fingerprints compare the examples themselves (files and labels), whatever selected them.
DERIVED = {
    "model": ("model", "--model"),
    "data": ("data", "--data"),
    "train_fingerprint": ("data", "--data"),
    "eval_fingerprint": ("data", "--data"),
    "class_names": ("data", "--data"),
    "schedule": ("steps", "--steps"),
    "mixup_workers": ("strategy", "TF_CONFIG workers"),
}
# The digests of the examples themselves (files and labels), whatever selected them.
_DIGESTS = ("train_fingerprint", "eval_fingerprint", "class_names")
# Every run.json key a resume must find unchanged, in the order a refusal names them: each derived key right
# after the setting it follows.
_FOLLOWING = {"weights": ("data",), "max_pixels": _DIGESTS, "steps": ("schedule",)}
COMPARED = ("model",) + tuple(key for name, f in FIELDS.items() if f.metadata["compared"]
                              for key in (name,) + _FOLLOWING.get(name, ())) + ("mixup_workers",)
# Settings that select other examples: when one changed, the digests that then differ are not named too.
SELECTING = frozenset({"data"} | {name for name, f in FIELDS.items() if f.metadata["selects"]})
EXAMPLES = frozenset(_DIGESTS)


def name_of(key, flags=False):
    """The Python argument (or, `flags=True`, the CLI flag) that sets run.json `key`."""
    if key in DERIVED:
        return DERIVED[key][1 if flags else 0]
    return FIELDS[key].metadata["flag"] if flags and key in FIELDS else key


def add_arguments(parser):
    """Adds one option per setting with a CLI flag to an argparse `parser` (dest: the field name)."""
    for name, field in FIELDS.items():
        meta = field.metadata
        if meta["flag"] is None:
            continue
        kwargs = dict(meta["cli"])
        if "action" not in kwargs and "choices" not in kwargs:
            kwargs.setdefault("metavar", meta["flag"].lstrip("-").upper().replace("-", "_"))
        if field.default is None and "(default:" not in meta["help"]:
            kwargs.setdefault("help", f"{meta['help']} (default: none)")
        kwargs.setdefault("help", meta["help"])  # the parser's formatter appends other defaults
        parser.add_argument(meta["flag"], dest=name, default=field.default, **kwargs)


def from_cli(args):
    """The `FinetuneConfig` of parsed `keras-bit finetune` arguments."""
    return FinetuneConfig(**{name: getattr(args, name) for name in FIELDS if FIELDS[name].metadata["flag"]})


def markdown_table():
    """The README's option table: one row per setting (Python name, CLI flag, default, compared, help)."""
    rows = ["| `finetune` argument | `keras-bit finetune` flag | default | changes the result | what it sets |",
            "|---|---|---|---|---|"]
    for name, field in FIELDS.items():
        meta = field.metadata
        flag = f"`{meta['flag']}`" if meta["flag"] else "—"
        default = "None" if field.default is None else repr(field.default)
        text = meta["help"] + (f". {meta['doc']}" if meta["doc"] else "")
        rows.append(f"| `{name}` | {flag} | `{default}` | {'yes' if meta['compared'] else 'no'} | "
                    f"{text.replace('|', '/')} |")
    return "\n".join(rows)


def docstring():
    """Google-style `Args:` lines for every setting (appended to `finetune`'s docstring)."""
    lines = []
    for name, field in FIELDS.items():
        meta = field.metadata
        text = meta["help"] + (f". {meta['doc']}" if meta["doc"] else "")
        default = "" if "(default:" in meta["help"] else f" Default: {field.default!r}."
        lines.append(f"        {name}: {text}{default}")
    return "\n".join(lines)
