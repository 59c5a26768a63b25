"""The plan of a fine-tuning run: the model and weights checked, and every setting resolved with BiT-HyperRule.

The settings themselves are declared and checked in `keras_bit.train.config`;
here the ones left as None get BiT-HyperRule's value for the data set at hand
(resolution from the image size, schedule and MixUp from the training-set
size, base LR from whether the backbone is pretrained), and the run.json
record is assembled (`keras_bit.train.resume` compares it on resume).

Reference:
    Kolesnikov et al., "Big Transfer (BiT)", https://arxiv.org/abs/1912.11370, section 3.3.
"""

import dataclasses
import functools
import math
import os

from keras_bit import presets
from keras_bit.train import hyperrule
from keras_bit.train.config import check_resolution, frozen_blocks


def resolve_resolution(resolution, image_size):
    """`(resize, crop)`: BiT-HyperRule's for `image_size` when `resolution` is None."""
    if resolution is None:
        return hyperrule.get_resolution(image_size)
    return check_resolution(resolution)


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
        from keras_bit.weights.sources import resolve_source

        resolve_source(weights)  # a file or Hub handle the builder will load: checked now, nothing downloaded


def fetch_weights(model, weights):
    """Published or Hub weights made local before any data is read: an offline miss leaves no output behind."""
    hub = isinstance(weights, str) and weights.startswith("hf://")
    if weights is None or not (isinstance(model, str) or hub):
        return
    from keras_bit.weights import sources

    sources.fetch(sources.resolve_source(weights, model if isinstance(model, str) else None))


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
        from keras_bit.backend import tensorflow

        if not isinstance(strategy, tensorflow("Fine-tuning").distribute.Strategy):
            raise ValueError(f"`strategy` must be None or a tf.distribute.Strategy. Received: strategy={strategy!r}")


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


def make_plan(model, args, dataset, train, replicas, fingerprints, environment=None, workers=1, folder=False):
    """The run's `Plan`: BiT-HyperRule for whatever `args` leaves open.

    Args:
        model: the `model` argument (name or builder), described in the record.
        args: the checked `FinetuneConfig`.
        dataset: the loaded `keras_bit.train.sources.Dataset`.
        train: the training split actually used (the few-shot draw, if any).
        replicas: the strategy's replica count (recorded, not compared: it
            changes only the float summation order of the same global batch).
        fingerprints: `(train, eval)` digests of the examples.
        environment: what the float results depend on besides the settings
            (library versions, thread count); recorded, and a resume under
            another environment is logged as not bit-identical.
        workers: processes that build input (multi-worker); compared when MixUp is on.
        folder: whether `data` is an image folder (then `max_pixels` selects examples and is recorded).
    """
    n = len(train)
    resize, crop = resolve_resolution(args.resolution, dataset.image_size)
    supports = hyperrule.get_schedule(n)
    if args.steps is not None:
        supports = hyperrule.scale_schedule(supports, args.steps)
    total = supports[-1]
    base_lr = default_base_lr(args.weights) if args.base_lr is None else args.base_lr
    mixup = hyperrule.get_mixup(n) if args.mixup is None else args.mixup
    checkpoint_every = min(args.checkpoint_every or max(1, total // 10), total)
    eval_every = min(args.eval_every, total) if args.eval_every else None
    accumulation = args.gradient_accumulation_steps
    run = Plan(resize, crop, tuple(supports), base_lr, hyperrule.scaled_lr(args.batch_size, base_lr), mixup,
               checkpoint_every, eval_every, chunk_steps(total, checkpoint_every, eval_every), accumulation,
               args.batch_size // accumulation, frozen_blocks(args.trainable), record={})
    run.record = _record(model, args, dataset, train, run, fingerprints, dict(
        replicas=replicas, mixup_workers=workers if mixup else None, environment=environment), folder)
    return run


def _record(model, args, dataset, train, run, fingerprints, context, folder):
    """run.json: every setting as resolved, the examples' digests, and what the floats depend on."""
    return {
        "model": describe_model(model),
        "weights": args.weights,
        "data": dataset.name,
        "split": args.split,
        "eval_split": args.eval_split,
        "skip_bad_images": args.skip_bad_images,
        "data_dir": args.data_dir,
        "max_pixels": args.max_pixels if folder else None,
        "eval_fraction": args.eval_fraction,
        "train_examples": len(train),
        "eval_examples": len(dataset.eval),
        "train_fingerprint": fingerprints[0],
        "eval_fingerprint": fingerprints[1],
        "class_names": list(dataset.class_names),
        "examples_per_class": args.examples_per_class,
        "examples_per_class_seed": None if args.examples_per_class is None else args.few_shot_seed,
        "batch_size": args.batch_size,
        "steps": run.total,
        "schedule": list(run.supports),
        "resolution": [run.resize, run.crop],
        "base_lr": run.base_lr,
        "learning_rate": run.learning_rate,
        "mixup": run.mixup,
        "seed": args.seed,
        "mixed_precision": args.mixed_precision or "float32",
        "jit_compile": args.jit_compile,
        "deterministic": args.deterministic,
        "gradient_accumulation_steps": run.accumulation,
        "trainable": args.trainable,
        "checkpoint_every": run.checkpoint_every,
        "eval_every": run.eval_every,
        "replicas": context["replicas"],
        # MixUp pairs examples within each worker's share of the batch: the worker count then matters.
        "mixup_workers": context["mixup_workers"],
        "environment": context["environment"],
    }


def describe_model(model):
    """A process-independent description of `model` for run.json (no memory addresses)."""
    if isinstance(model, str):
        return model
    if isinstance(model, functools.partial):
        args = [repr(a) for a in model.args] + [f"{k}={v!r}" for k, v in sorted(model.keywords.items())]
        return f"{describe_model(model.func)}({', '.join(args)})"
    name = getattr(model, "__qualname__", None) or type(model).__qualname__
    return f"{getattr(model, '__module__', None) or type(model).__module__}.{name}"
