"""The plan of a fine-tuning run: checked arguments, resolved settings, and the run record.

Every argument of `finetune` is checked here before any data is read or any
model is built. The resolved settings (BiT-HyperRule applied, defaults filled
in) go to `run.json`; a run that finds a backup in its `output_dir` resumes
only if every setting that can change the trained weights is the same, and
otherwise names each difference the way the user typed it
(`--base-lr 0.16 -> 0.5` on the command line, `base_lr=0.16 -> 0.5` in Python).

Reference:
    Kolesnikov et al., "Big Transfer (BiT)", https://arxiv.org/abs/1912.11370, section 3.3.
"""

import dataclasses
import functools
import logging
import math
import os
import tempfile

import numpy as np

from keras_bit import presets
from keras_bit.train import hyperrule
from keras_bit.train.run_record import RUN_FILE, read_run_json
from keras_bit.validation import check_positive_int, is_int

logger = logging.getLogger("keras_bit")

POLICIES = (None, "float32", "mixed_float16", "mixed_bfloat16")
TRAINABLE = ("all", "head")
NUM_BLOCKS = 4
# keras.utils.set_random_seed passes the seed to np.random.seed, which takes 0..2**32 - 1.
MAX_SEED = 2**32 - 1

# Each setting that changes the trained weights: (run.json key, Python argument, CLI flag).
# The fingerprints compare the examples themselves (files and labels), whatever selected them.
COMPARED = (
    ("model", "model", "--model"),
    ("weights", "weights", "--weights"),
    ("data", "data", "--data"),
    ("split", "split", "--split"),
    ("eval_split", "eval_split", "--eval-split"),
    ("eval_fraction", "eval_fraction", "--eval-fraction"),
    ("data_dir", "data_dir", "--data-dir"),
    ("skip_bad_images", "skip_bad_images", "--skip-bad-images"),
    ("max_pixels", "max_pixels", "--max-pixels"),
    ("train_fingerprint", "data", "--data"),
    ("eval_fingerprint", "data", "--data"),
    ("class_names", "data", "--data"),
    ("examples_per_class", "examples_per_class", "--examples-per-class"),
    ("examples_per_class_seed", "examples_per_class_seed", "--examples-per-class-seed"),
    ("batch_size", "batch_size", "--batch-size"),
    ("steps", "steps", "--steps"),
    ("schedule", "steps", "--steps"),
    ("resolution", "resolution", "--resolution"),
    ("base_lr", "base_lr", "--base-lr"),
    ("mixup", "mixup", "--mixup"),
    ("seed", "seed", "--seed"),
    ("mixed_precision", "mixed_precision", "--mixed-precision"),
    ("jit_compile", "jit_compile", "--xla"),
    ("deterministic", "deterministic", "--nondeterministic"),
    ("gradient_accumulation_steps", "gradient_accumulation_steps", "--grad-accum"),
    ("trainable", "trainable", "--trainable"),
    ("checkpoint_every", "checkpoint_every", "--checkpoint-every"),
    ("mixup_workers", "strategy", "TF_CONFIG workers"),
)


# Settings that select other examples, and the digests that would then differ too.
_SELECTING = frozenset({"data", "split", "eval_split", "eval_fraction", "data_dir", "skip_bad_images", "max_pixels",
                        "seed", "examples_per_class", "examples_per_class_seed"})
_EXAMPLES = frozenset({"train_fingerprint", "eval_fingerprint", "class_names"})


class RunMismatchError(ValueError):
    """`output_dir` holds a backup of a run with other settings.

    Attributes:
        changes: list of `(run.json key, previous value, new value)`.
    """

    def __init__(self, output_dir, changes, flags=False):
        self.output_dir = output_dir
        self.changes = changes
        super().__init__(self.describe(flags))

    def describe(self, flags=False):
        """The message, naming settings as CLI flags (`flags=True`) or Python arguments."""
        names = {key: (flag if flags else arg) for key, arg, flag in COMPARED}
        parts = []
        for key, old, new in self.changes:
            name = names.get(key, key)
            detail = f" ({key})" if key in ("train_fingerprint", "eval_fingerprint", "class_names", "schedule") else ""
            old, new = _show(old, flags, key), _show(new, flags, key)
            parts.append(f"{name} {old} -> {new}{detail}" if flags else f"{name}={old} -> {new}{detail}")
        where = "--output-dir" if flags else "`output_dir`"
        return (
            f"{self.output_dir} holds a backup of a run with other settings: {'; '.join(parts)}. "
            f"Run again with the same settings to resume it, or choose a new {where}."
        )


def _show(value, flags, key=None):
    if key == "deterministic" and flags and isinstance(value, bool):
        value = not value  # shown under --nondeterministic
    if value is None:
        return "none" if flags else "None"
    if isinstance(value, bool) and flags:
        return "on" if value else "off"
    if isinstance(value, list) and len(value) > 6:
        return f"[{len(value)} values]"
    return str(value) if flags else repr(value)


@dataclasses.dataclass
class Arguments:
    """The arguments of `finetune` that shape the run (see `finetune` for each; checked by `check`)."""

    batch_size: int = hyperrule.BASE_BATCH_SIZE
    steps: int = None
    resolution: object = None
    base_lr: float = None
    mixup: float = None
    seed: int = 0
    examples_per_class: int = None
    examples_per_class_seed: int = None
    eval_fraction: float = 0.2
    mixed_precision: str = None
    gradient_accumulation_steps: int = 1
    jit_compile: bool = False
    deterministic: bool = True
    checkpoint_every: int = None
    eval_every: int = None
    trainable: object = "all"
    max_pixels: int = None

    def check(self):
        """Raises `ValueError` naming the first bad argument, before any work is done.

        NumPy numbers are taken wherever Python ones are (as Keras takes them)
        and converted here, so that run.json and the comparisons see plain values.
        """
        self.batch_size = check_positive_int(self.batch_size, "batch_size")
        self.gradient_accumulation_steps = check_positive_int(self.gradient_accumulation_steps,
                                                              "gradient_accumulation_steps")
        if self.batch_size % self.gradient_accumulation_steps:
            raise ValueError(
                f"`batch_size` ({self.batch_size}) must be divisible by gradient_accumulation_steps "
                f"({self.gradient_accumulation_steps})."
            )
        for name in ("steps", "examples_per_class", "checkpoint_every", "eval_every", "max_pixels"):
            if getattr(self, name) is not None:
                setattr(self, name, check_positive_int(getattr(self, name), name))
        if self.steps is not None and self.steps < 5:
            raise ValueError(f"`steps` must be >= 5 (one per BiT-HyperRule phase). Received: steps={self.steps!r}")
        if self.examples_per_class_seed is not None and self.examples_per_class is None:
            raise ValueError("`examples_per_class_seed` seeds the few-shot draw: it needs `examples_per_class`.")
        for name in ("seed", "examples_per_class_seed"):
            value = getattr(self, name)
            if value is not None and not (is_int(value) and 0 <= value <= MAX_SEED):
                raise ValueError(f"`{name}` must be a non-negative integer below 2**32 (NumPy's seed range). "
                                 f"Received: {name}={value!r}")
            setattr(self, name, None if value is None else int(value))
        if self.base_lr is not None and not _is_real(self.base_lr, low=0.0, open_low=True):
            raise ValueError(f"`base_lr` must be a finite number > 0. Received: base_lr={self.base_lr!r}")
        if self.mixup is not None and not _is_real(self.mixup, low=0.0):
            raise ValueError(f"`mixup` (MixUp alpha) must be a finite number >= 0. Received: mixup={self.mixup!r}")
        if not _is_real(self.eval_fraction, low=0.0, open_low=True) or not self.eval_fraction < 1:
            raise ValueError(f"`eval_fraction` must be in (0, 1). Received: eval_fraction={self.eval_fraction!r}")
        for name in ("base_lr", "mixup", "eval_fraction"):
            if getattr(self, name) is not None:
                setattr(self, name, float(getattr(self, name)))
        if self.mixed_precision not in POLICIES:
            raise ValueError(
                f"`mixed_precision` must be one of {POLICIES}. Received: mixed_precision={self.mixed_precision!r}"
            )
        for name in ("jit_compile", "deterministic"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False. Received: {name}={getattr(self, name)!r}")
        frozen_blocks(self.trainable)
        if is_int(self.trainable):
            self.trainable = int(self.trainable)
        if self.resolution is not None:
            self.resolution = resolve_resolution(self.resolution, None)


def _is_real(value, low, open_low=False):
    if not (is_int(value) or isinstance(value, (float, np.floating))) or not math.isfinite(value):
        return False
    return value > low if open_low else value >= low


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


def resolve_resolution(resolution, image_size):
    """`(resize, crop)`: BiT-HyperRule's for `image_size` when `resolution` is None."""
    if resolution is None:
        return hyperrule.get_resolution(image_size)
    pair = (resolution, resolution) if is_int(resolution) else resolution
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(is_int(r) and r >= 32 for r in pair)
            or pair[1] > pair[0]):
        raise ValueError(
            "`resolution` must be None (BiT-HyperRule), an int >= 32, or (resize, crop) ints with "
            f"32 <= crop <= resize. Received: resolution={resolution!r}"
        )
    return tuple(int(r) for r in pair)


def check_model(model, weights):
    """`model` is a BiT name or a builder; `weights` valid for it (names and files checked, nothing downloaded)."""
    if not isinstance(model, str) and not callable(model):
        raise ValueError(
            f"`model` must be a BiT model name ({', '.join(presets.MODEL_NAMES)}) or a builder callable. "
            f"Received: model={model!r}"
        )
    if isinstance(model, str):
        from keras_bit.models.bit import check_weights

        check_weights(model, weights)
    elif weights is not None and isinstance(weights, (str, os.PathLike)) and (
            os.sep in os.fspath(weights) or os.fspath(weights).endswith((".npz", ".h5", ".safetensors"))
            or os.fspath(weights).startswith("hf://")):
        from keras_bit.weights.sources import resolve

        resolve(weights)  # a file or Hub handle the builder will load: checked now, nothing downloaded


def fetch_weights(model, weights):
    """Published or Hub weights made local before any data is read: an offline miss leaves no output behind."""
    hub = isinstance(weights, str) and weights.startswith("hf://")
    if weights is None or not (isinstance(model, str) or hub):
        return
    from keras_bit.weights import sources

    sources.fetch(sources.resolve(weights, model if isinstance(model, str) else None))


def default_base_lr(weights):
    """BiT-HyperRule's base LR for a pretrained backbone, a larger one from random initialisation."""
    return hyperrule.BASE_LR if weights is not None else hyperrule.SCRATCH_BASE_LR


def chunk_steps(total, checkpoint_every, eval_every):
    """Steps per Keras epoch: every backup and evaluation falls on an epoch end."""
    chunk = math.gcd(checkpoint_every, eval_every or checkpoint_every)
    return min(chunk, total)


def check_extras(export_dir, callbacks, strategy):
    """The arguments that only matter at the end or to Keras, checked before any work too."""
    import keras

    if export_dir is not None:
        path = os.path.abspath(os.fspath(export_dir))
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"`export_dir` is a file, not a folder: {path}")
        if not os.path.isdir(os.path.dirname(path)):
            raise ValueError(f"The parent of `export_dir` does not exist: {os.path.dirname(path)}")
    if not isinstance(callbacks, (list, tuple)) or not all(isinstance(c, keras.callbacks.Callback) for c in callbacks):
        raise ValueError(f"`callbacks` must be a list of keras.callbacks.Callback. Received: callbacks={callbacks!r}")
    if strategy is not None:
        import tensorflow as tf

        if not isinstance(strategy, tf.distribute.Strategy):
            raise ValueError(f"`strategy` must be None or a tf.distribute.Strategy. Received: strategy={strategy!r}")


def check_output_dir(output_dir):
    """The absolute `output_dir`; raises `ValueError` unless it is a non-empty path to a writable folder.

    A folder that does not exist yet is created and removed again by the check (so that a run refused
    later, e.g. for its data, leaves nothing behind); `finetune` creates it once the data is loaded.
    """
    if output_dir is None or not os.fspath(output_dir).strip():
        raise ValueError(f"`output_dir` must be a non-empty path. Received: output_dir={output_dir!r}")
    output_dir = os.path.abspath(os.fspath(output_dir))
    parent = os.path.dirname(output_dir)
    if not os.path.isdir(parent):
        what = "is not a folder" if os.path.exists(parent) else "does not exist"
        raise ValueError(f"The parent of `output_dir` {what}: {parent}")
    if os.path.islink(output_dir) and not os.path.exists(output_dir):
        raise ValueError(f"`output_dir` is a symbolic link that leads nowhere (a loop, or a missing target): "
                         f"{output_dir} -> {os.readlink(output_dir)}")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"`output_dir` is a file, not a folder: {output_dir}")
    created = not os.path.exists(output_dir)
    try:
        os.makedirs(output_dir, exist_ok=True)
        # A real write, not os.access: root passes access checks on read-only file systems.
        with tempfile.NamedTemporaryFile(dir=output_dir):
            pass
        if created:
            os.rmdir(output_dir)
    except OSError as e:
        raise ValueError(f"`output_dir` is not writable: {output_dir} ({e.strerror or e})") from e
    return output_dir


def check_resume(output_dir, record, has_backup):
    """Refuses to resume a backup made with other settings (or with no record of its settings)."""
    if not has_backup:
        return
    previous = read_run_json(output_dir)
    if previous is None:
        raise ValueError(
            f"{output_dir} holds a backup but no {RUN_FILE} describing its settings, so it cannot be resumed "
            "safely. Delete the backup folder to start over, or choose a new output directory."
        )
    changes = [(key, previous.get(key), record.get(key)) for key, _, _ in COMPARED
               if previous.get(key) != record.get(key)]
    if any(key in _SELECTING for key, _, _ in changes):  # that explains other examples: name only it
        changes = [c for c in changes if c[0] not in _EXAMPLES]
    if changes:
        raise RunMismatchError(output_dir, changes)
    if previous.get("environment") != record.get("environment"):
        # Not refused: moving a crashed run to another machine is legitimate, and the settings
        # are the same. But the float results depend on these (e.g. TensorFlow's thread count).
        logger.warning(
            "Resuming under another environment (%s -> %s): the same settings, but the result will not be "
            "bit-identical to an uninterrupted run.", previous.get("environment"), record.get("environment"))


@dataclasses.dataclass
class Plan:
    """Resolved settings of one run (BiT-HyperRule applied) and the record that goes to run.json."""

    resize: int
    crop: int
    supports: tuple
    base_lr: float
    learning_rate: float
    mixup: float
    checkpoint_every: int
    eval_every: int
    steps_per_epoch: int
    accumulation: int
    micro_batch: int
    frozen: int
    record: dict

    @property
    def total(self):
        return self.supports[-1]


def resolve(model, weights, dataset, train, args, replicas, fingerprints, environment=None, selection=None,
            workers=1):
    """The run's `Plan`: BiT-HyperRule for whatever `args` leaves open.

    Args:
        model: the `model` argument (name or builder), described in the record.
        weights: the `weights` argument.
        dataset: the loaded `keras_bit.train.data.Dataset`.
        train: the training split actually used (the few-shot draw, if any).
        args: checked `Arguments`.
        replicas: the strategy's replica count (recorded, not compared: it
            changes only the float summation order of the same global batch).
        fingerprints: `(train, eval)` digests of the examples.
        workers: processes that build input (multi-worker); compared when MixUp is on.
        selection: the data-selecting arguments (`split`, `eval_split`,
            `data_dir`, `skip_bad_images`), recorded and compared as typed.
        environment: what the float results depend on besides the settings
            (library versions, thread count); recorded, and a resume under
            another environment is logged as not bit-identical.
    """
    n = len(train)
    resize, crop = resolve_resolution(args.resolution, dataset.image_size)
    supports = hyperrule.get_schedule(n)
    if args.steps is not None:
        supports = hyperrule.scale_schedule(supports, args.steps)
    total = supports[-1]
    base_lr = default_base_lr(weights) if args.base_lr is None else float(args.base_lr)
    mixup = hyperrule.get_mixup(n) if args.mixup is None else float(args.mixup)
    checkpoint_every = min(args.checkpoint_every or max(1, total // 10), total)
    eval_every = min(args.eval_every, total) if args.eval_every else None
    accumulation = args.gradient_accumulation_steps
    learning_rate = hyperrule.scaled_lr(args.batch_size, base_lr)
    record = {
        "model": describe_model(model),
        "weights": None if weights is None else os.fspath(weights),
        "data": dataset.name,
        **(selection or {}),
        "eval_fraction": args.eval_fraction,
        "train_examples": n,
        "eval_examples": len(dataset.eval),
        "train_fingerprint": fingerprints[0],
        "eval_fingerprint": fingerprints[1],
        "class_names": list(dataset.class_names),
        "examples_per_class": args.examples_per_class,
        "examples_per_class_seed": (None if args.examples_per_class is None
                                    else _default(args.examples_per_class_seed, args.seed)),
        "batch_size": args.batch_size,
        "steps": total,
        "schedule": list(supports),
        "resolution": [resize, crop],
        "base_lr": base_lr,
        "learning_rate": learning_rate,
        "mixup": mixup,
        "seed": args.seed,
        "mixed_precision": args.mixed_precision or "float32",
        "jit_compile": args.jit_compile,
        "deterministic": args.deterministic,
        "gradient_accumulation_steps": accumulation,
        "trainable": args.trainable,
        "checkpoint_every": checkpoint_every,
        "eval_every": eval_every,
        "replicas": replicas,
        # MixUp pairs examples within each worker's share of the batch: the worker count then matters.
        "mixup_workers": workers if mixup else None,
        "environment": environment,
    }
    return Plan(resize, crop, tuple(supports), base_lr, learning_rate, mixup, checkpoint_every, eval_every,
                chunk_steps(total, checkpoint_every, eval_every), accumulation,
                args.batch_size // accumulation, frozen_blocks(args.trainable), record)


def _default(value, default):
    return default if value is None else value


def describe_model(model):
    """A process-independent description of `model` for run.json (no memory addresses)."""
    if isinstance(model, str):
        return model
    if isinstance(model, functools.partial):
        args = [repr(a) for a in model.args] + [f"{k}={v!r}" for k, v in sorted(model.keywords.items())]
        return f"{describe_model(model.func)}({', '.join(args)})"
    name = getattr(model, "__qualname__", None) or type(model).__qualname__
    return f"{getattr(model, '__module__', None) or type(model).__module__}.{name}"
