"""Fine-tune a BiT model with BiT-HyperRule: `model.fit` on tf.data under a tf.distribute strategy.

The run is split into chunks of `checkpoint_every` steps (Keras "epochs"); after
each one `BackupAndRestore` writes the model and optimizer state, so running the
same command again after a crash resumes at the last chunk and ends at the same
step count with the same weights (the data stream is a function of the step,
see `keras_bit.data`).

Reference:
    Kolesnikov et al., "Big Transfer (BiT)", https://arxiv.org/abs/1912.11370, section 3.3.
"""

import dataclasses
import functools
import json
import logging
import os
import tempfile

import keras
import tensorflow as tf

from keras_bit import configs
from keras_bit.train import data as data_lib
from keras_bit.train import distribute, hyperrule, pipeline
from keras_bit.validation import check_positive_int

logger = logging.getLogger("keras_bit")

POLICIES = (None, "float32", "mixed_float16", "mixed_bfloat16")
RUN_FILE = "run.json"
# Settings that must match for a run to resume from an existing backup.
_RESUME_KEYS = ("model", "weights", "num_classes", "batch_size", "supports", "resolution", "seed", "mixup",
                "examples_per_class", "gradient_accumulation_steps", "train_examples")


@dataclasses.dataclass
class FinetuneResult:
    """What `finetune` returns.

    Attributes:
        model: the trained `keras.Model`, outputting class probabilities.
        eval_accuracy: top-1 accuracy on the evaluation split (float in [0, 1]).
        history: dict of per-chunk training metrics (this invocation's chunks).
        output_dir: where checkpoints, logs, metrics.csv and model.keras are.
        steps: optimizer steps of the whole run.
        supports: the learning-rate schedule supports used.
        resolution: `(resize, crop)` used for training.
        class_names: class names, in label order.
        export_path: the SavedModel version folder when `export_dir` was given, else None.
    """

    model: keras.Model
    eval_accuracy: float
    history: dict
    output_dir: str
    steps: int
    supports: tuple
    resolution: tuple
    class_names: list
    export_path: str = None


def _write_json(path, value):
    # Atomic: other workers may read run.json while the chief rewrites it.
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
    os.replace(tmp, path)


def _resolution(resolution, image_size):
    if resolution is None:
        return hyperrule.get_resolution(image_size)
    if isinstance(resolution, int) and not isinstance(resolution, bool):
        resolution = (resolution, resolution)
    if (not isinstance(resolution, (tuple, list)) or len(resolution) != 2
            or not all(isinstance(r, int) and r >= 32 for r in resolution) or resolution[1] > resolution[0]):
        raise ValueError(
            "`resolution` must be None (BiT-HyperRule), an int >= 32, or (resize, crop) ints with "
            f"32 <= crop <= resize. Received: resolution={resolution!r}"
        )
    return tuple(resolution)


def _check_output_dir(output_dir):
    output_dir = os.path.abspath(os.fspath(output_dir))
    parent = os.path.dirname(output_dir)
    if not os.path.isdir(parent):
        raise ValueError(f"The parent of `output_dir` does not exist: {parent}")
    try:
        os.makedirs(output_dir, exist_ok=True)
        # A real write, not os.access: root passes access checks on read-only file systems.
        with tempfile.NamedTemporaryFile(dir=output_dir):
            pass
    except OSError as e:
        raise ValueError(f"`output_dir` is not writable: {output_dir} ({e.strerror or e})") from e
    return output_dir


def _chunk_size(total, requested):
    """Largest divisor of `total` not above `requested` (Keras epochs must be equal-sized)."""
    requested = max(1, min(requested, total))
    return max(d for d in range(1, requested + 1) if total % d == 0)


def _resume_epoch(backup_dir):
    # BackupAndRestore's own metadata file: the chunk it will resume from.
    path = os.path.join(backup_dir, "training_metadata.json")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return int(json.load(f)["epoch"])


def _check_resume(output_dir, run, resuming, chief=True):
    path = os.path.join(output_dir, RUN_FILE)
    if resuming and os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        changed = [k for k in _RESUME_KEYS if previous.get(k) != run.get(k)]
        if changed:
            details = ", ".join(f"{k}: {previous.get(k)!r} -> {run.get(k)!r}" for k in changed)
            raise ValueError(
                f"{output_dir} holds a backup of a different run ({details}). Resume with the same "
                "settings, or use a new `output_dir`."
            )
    if chief:
        _write_json(path, run)


def _describe_model(model):
    """A process-independent description of `model` for run.json (no memory addresses)."""
    if isinstance(model, str):
        return model
    if isinstance(model, functools.partial):
        args = [repr(a) for a in model.args] + [f"{k}={v!r}" for k, v in sorted(model.keywords.items())]
        return f"{_describe_model(model.func)}({', '.join(args)})"
    name = getattr(model, "__qualname__", None) or type(model).__qualname__
    return f"{getattr(model, '__module__', None) or type(model).__module__}.{name}"


def _build(model, weights, crop, num_classes):
    if isinstance(model, str):
        from keras_bit.resnet_v2 import BiT

        return BiT(model, weights=weights, input_shape=(crop, crop, 3), classes=num_classes,
                   classifier_activation=None)
    if callable(model):
        return model(weights=weights, input_shape=(crop, crop, 3), classes=num_classes,
                     classifier_activation=None)
    raise ValueError(
        f"`model` must be a BiT model name ({', '.join(configs.MODEL_NAMES)}) or a builder callable. "
        f"Received: model={model!r}"
    )


def finetune(
    model,
    data,
    *,
    weights=None,
    batch_size=512,
    steps=None,
    resolution=None,
    output_dir="bit_finetune",
    examples_per_class=None,
    seed=0,
    strategy=None,
    base_lr=hyperrule.BASE_LR,
    mixup=None,
    split="train",
    eval_split=None,
    eval_data=None,
    eval_fraction=0.2,
    data_dir=None,
    mixed_precision=None,
    gradient_accumulation_steps=1,
    jit_compile=False,
    checkpoint_every=None,
    callbacks=(),
    export_dir=None,
    verbose="auto",
):
    """Fine-tunes a BiT model with BiT-HyperRule and returns the trained model and its accuracy.

    Args:
        model: a model name such as "BiT-M-R50x1", or a callable taking
            `weights, input_shape, classes, classifier_activation` and returning
            a keras_bit model (e.g. `functools.partial(keras_bit.ResNetV2, ...)`).
        data: a tfds name, "sklearn:digits", an image-folder path (`root/<class>/<img>`
            or `root/train|test/<class>/<img>`), `(images, labels)` arrays, or
            a `keras_bit.data.Dataset`.
        weights: checkpoint to start from (a `weights=` name or path), or None
            for random initialisation. The head is always new and zero.
        batch_size: global batch size (split over replicas and, with
            `gradient_accumulation_steps`, over micro-batches).
        steps: total optimizer steps. None: the hyper-rule's (500/10k/20k);
            otherwise the hyper-rule schedule is scaled to end at `steps`.
        resolution: None (hyper-rule: 160/128 for images < 96x96 px, else
            512/480), an int (train and eval size, no random crop), or
            `(resize, crop)`.
        output_dir: checkpoints (`backup/`), TensorBoard logs (`logs/`),
            `metrics.csv`, `run.json`, `class_names.txt` and `model.keras`.
        examples_per_class: few-shot: train on exactly this many examples of
            each class, drawn with `seed`.
        seed: seed of the few-shot draw, shuffling, augmentation, MixUp and
            random initialisation (sets Keras' global seed via
            `keras.utils.set_random_seed`).
        strategy: a `tf.distribute.Strategy`; default `select_strategy()`:
            `keras_bit.MultiWorkerStrategy` when `TF_CONFIG` names a cluster
            (every worker runs the same call; `output_dir` must then be on
            storage all workers share: the chief writes the backups, logs
            and model, the others only restore from them), else
            `MirroredStrategy` over the local GPUs. Each worker builds only its
            share of every global batch (see `keras_bit.data.train_pipeline`).
        base_lr: learning rate at batch size 512 (0.003); scaled linearly to
            `batch_size`.
        mixup: MixUp alpha; None applies the hyper-rule (0.1 when the training
            set has >= 20k examples, else off).
        split, eval_split, eval_data, eval_fraction, data_dir: where the
            training and evaluation examples come from (see `keras_bit.data.load`).
        mixed_precision: None/"float32", "mixed_float16" (with loss scaling) or
            "mixed_bfloat16".
        gradient_accumulation_steps: split each batch into this many
            micro-batches and accumulate (the authors' `--batch_split`).
        jit_compile: compile the training step with XLA.
        checkpoint_every: steps between backups (default: a tenth of the run).
        callbacks: extra Keras callbacks.
        export_dir: if given, also export a serving SavedModel (with the class
            names) to `<export_dir>/<model name>/<next version>/`.
        verbose: `model.fit` verbosity.

    Returns:
        A `FinetuneResult` with `.model` and `.eval_accuracy`.

    Example:
        >>> result = keras_bit.finetune("BiT-M-R50x1", "cifar10", weights="imagenet21k", batch_size=64)
        >>> result.eval_accuracy
    """
    check_positive_int(batch_size, "batch_size")
    check_positive_int(gradient_accumulation_steps, "gradient_accumulation_steps")
    if batch_size % gradient_accumulation_steps:
        raise ValueError(
            f"`batch_size` ({batch_size}) must be divisible by gradient_accumulation_steps "
            f"({gradient_accumulation_steps})."
        )
    if mixed_precision not in POLICIES:
        raise ValueError(f"`mixed_precision` must be one of {POLICIES}. Received: mixed_precision={mixed_precision!r}")
    if isinstance(model, str):
        configs.split_model_name(model)
    output_dir = _check_output_dir(output_dir)
    strategy = distribute.select_strategy(strategy)
    if gradient_accumulation_steps > 1:
        # Keras applies accumulated gradients inside a cond, and tf.distribute cannot all-reduce
        # (merge_call) inside one (keras-team/keras#17429). One replica needs no all-reduce.
        if strategy.num_replicas_in_sync > 1:
            raise ValueError(
                "gradient_accumulation_steps > 1 is not supported with several replicas "
                f"({strategy.num_replicas_in_sync}): Keras' accumulation cannot all-reduce inside its "
                "update cond. Use more replicas with a smaller per-replica batch instead."
            )
        strategy = tf.distribute.get_strategy()  # the default strategy: one device, no all-reduce

    dataset = data_lib.load(data, eval_data=eval_data, split=split, eval_split=eval_split,
                        eval_fraction=eval_fraction, seed=seed, data_dir=data_dir)
    train = dataset.train
    if examples_per_class is not None:
        train = data_lib.few_shot(train, examples_per_class, dataset.num_classes, seed)
    n = len(train)
    resize, crop = _resolution(resolution, dataset.image_size)
    supports = hyperrule.get_schedule(n)
    if steps is not None:
        supports = hyperrule.scale_schedule(supports, steps)
    total = supports[-1]
    mixup_alpha = hyperrule.get_mixup(n) if mixup is None else float(mixup)
    lr = hyperrule.scaled_lr(batch_size, base_lr)
    chunk = _chunk_size(total, checkpoint_every or max(1, total // 10))
    micro = gradient_accumulation_steps
    micro_batch = batch_size // micro  # examples per model call: per step, or per accumulated micro-step

    backup_dir = os.path.join(output_dir, "backup")
    start_epoch = _resume_epoch(backup_dir)
    run = {
        "model": _describe_model(model),
        "weights": weights if weights is None else os.fspath(weights),
        "num_classes": dataset.num_classes, "batch_size": batch_size, "supports": list(supports),
        "resolution": [resize, crop], "seed": seed, "mixup": mixup_alpha, "examples_per_class": examples_per_class,
        "gradient_accumulation_steps": micro, "train_examples": n, "base_lr": base_lr, "learning_rate": lr,
        "data": dataset.name, "checkpoint_every": chunk, "replicas": strategy.num_replicas_in_sync,
    }
    chief = distribute.is_chief(strategy)
    _check_resume(output_dir, run, resuming=start_epoch > 0, chief=chief)
    if chief:
        with open(os.path.join(output_dir, "class_names.txt"), "w") as f:
            f.write("\n".join(dataset.class_names) + "\n")
    logger.info("Fine-tuning on %d examples (%d classes) at %d/%d px, batch %d, %d steps, lr %.2e, mixup %.2f%s",
                n, dataset.num_classes, resize, crop, batch_size, total, lr, mixup_alpha,
                f"; resuming at step {start_epoch * chunk}" if start_epoch else "")

    def make_pipeline(**sharding):
        return pipeline.train_pipeline(train, dataset.num_classes, micro_batch, resize, crop, seed=seed,
                                       mixup_alpha=mixup_alpha, start_step=start_epoch * chunk * micro, **sharding)

    if strategy.num_replicas_in_sync > 1:
        train_ds = distribute.distributed_train_input(strategy, make_pipeline, micro_batch)
    else:
        train_ds = make_pipeline()
    if mixup_alpha and micro > 1:
        logger.info("MixUp mixes within each micro-batch of %d examples.", micro_batch)
    # Evaluation is split by element across workers (DATA, chosen explicitly: the
    # in-memory source has no files to shard by); the metrics are all-reduced.
    eval_ds = pipeline.eval_pipeline(dataset.eval, dataset.num_classes, micro_batch, crop).with_options(
        distribute.shard_options(tf.data.experimental.AutoShardPolicy.DATA))

    previous_policy = keras.config.dtype_policy()
    if mixed_precision:
        keras.config.set_dtype_policy(mixed_precision)
    try:
        keras.utils.set_random_seed(seed)  # reproducible random initialisation (weights=None)
        with strategy.scope():
            net = _build(model, weights, crop, dataset.num_classes)
            optimizer = keras.optimizers.SGD(
                hyperrule.BiTSchedule(lr, supports, accumulation_steps=micro), momentum=hyperrule.MOMENTUM,
                gradient_accumulation_steps=micro if micro > 1 else None,
            )
            net.compile(
                optimizer=optimizer,
                loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
                jit_compile=bool(jit_compile),
            )
        if chief:
            fit_callbacks = [
                keras.callbacks.BackupAndRestore(backup_dir, double_checkpoint=True, delete_checkpoint=False),
                keras.callbacks.CSVLogger(os.path.join(output_dir, "metrics.csv"), append=True),
                keras.callbacks.TensorBoard(os.path.join(output_dir, "logs")),
            ]
        else:
            fit_callbacks = [distribute.RestoreOnly(backup_dir, double_checkpoint=True, delete_checkpoint=False)]
        fit_callbacks += list(callbacks)
        history = net.fit(train_ds, epochs=total // chunk, steps_per_epoch=chunk * micro,
                          callbacks=fit_callbacks, verbose=verbose, shuffle=False)
        scores = net.evaluate(eval_ds, verbose=0, return_dict=True)
        with strategy.scope():
            probs = keras.layers.Activation("softmax", dtype="float32", name="probabilities")(net.output)
            trained = keras.Model(net.input, probs, name=net.name)
    finally:
        keras.config.set_dtype_policy(previous_policy)
    if chief:
        trained.save(os.path.join(output_dir, "model.keras"))
    accuracy = float(scores["accuracy"])
    print(f"eval top-1 accuracy: {accuracy:.4f} ({len(dataset.eval)} examples, {total} steps)")
    export_path = None
    if export_dir is not None and chief:
        from keras_bit.export import export_saved_model

        export_path = export_saved_model(trained, export_dir, class_names=dataset.class_names)
    return FinetuneResult(trained, accuracy, history.history, output_dir, total, tuple(supports),
                          (resize, crop), list(dataset.class_names), export_path)
