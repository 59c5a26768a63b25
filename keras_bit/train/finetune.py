"""Fine-tune a BiT model with BiT-HyperRule: `model.fit` on tf.data under a tf.distribute strategy.

`finetune` runs six named steps: check the arguments and plan the run
(`keras_bit.train.plan`), load and check the data, build the model (frozen
stages, compile, restore the newest backup), set up the callbacks, fit, and
write the outputs. The run is split into chunks of steps (Keras epochs); every
`checkpoint_every` steps `keras_bit.train.backup` writes the model and
optimizer state, so running the same command again after a crash resumes at
the last backup and ends with the weights of an uninterrupted run (the data
stream is a function of the step, see `keras_bit.train.pipeline`). A different
command is refused, never mixed.

Reference:
    Kolesnikov et al., "Big Transfer (BiT)", https://arxiv.org/abs/1912.11370, section 3.3.
"""

import contextlib
import dataclasses
import logging
import os
import time

import keras

from keras_bit.train import backup, distribute, evaluation, hyperrule, image_check, outputs, pipeline, plan, run_lock
from keras_bit.train import data as data_lib
from keras_bit.train.logs import RunLog
from keras_bit.backend import tensorflow as _tensorflow
from keras_bit.console import native_stderr_silenced

tf = _tensorflow("Fine-tuning")

logger = logging.getLogger("keras_bit")

@dataclasses.dataclass
class FinetuneResult:
    """What `finetune` returns.

    Attributes:
        model: the trained `keras.Model`, outputting class probabilities.
        eval_accuracy: top-1 accuracy on the evaluation split (float in [0, 1]).
        eval_metrics: `loss`, `accuracy`, `top5_accuracy`, `examples` and
            `confusion_matrix` of the final evaluation (also in results.json).
        history: one dict per chunk trained by this invocation (step, loss,
            accuracy, learning_rate and, where evaluated, val_* metrics).
        output_dir: where backups, logs, metrics.csv, results.json and model.keras are.
        steps: optimizer steps of the whole run.
        supports: the learning-rate schedule supports used.
        resolution: `(resize, crop)` used for training.
        class_names: class names, in label order.
        export_path: the SavedModel version folder when `export_dir` was given (a finished run started
            again: the one it exported before), else None.
        summary_path: `summary.png` when it was drawn, else None.
    """

    model: keras.Model
    eval_accuracy: float
    eval_metrics: dict
    history: list
    output_dir: str
    steps: int
    supports: tuple
    resolution: tuple
    class_names: list
    export_path: str = None
    summary_path: str = None


def finetune(
    model,
    data,
    *,
    weights=None,
    batch_size=hyperrule.BASE_BATCH_SIZE,
    steps=None,
    resolution=None,
    output_dir="bit_finetune",
    examples_per_class=None,
    examples_per_class_seed=None,
    seed=0,
    strategy=None,
    base_lr=None,
    mixup=None,
    split="train",
    eval_split=None,
    eval_data=None,
    eval_fraction=0.2,
    data_dir=None,
    skip_bad_images=False,
    max_pixels=image_check.DEFAULT_MAX_PIXELS,
    mixed_precision=None,
    gradient_accumulation_steps=1,
    jit_compile=False,
    deterministic=True,
    checkpoint_every=None,
    eval_every=None,
    trainable="all",
    callbacks=(),
    export_dir=None,
    verbose="auto",
):
    """Fine-tunes a BiT model with BiT-HyperRule and returns the trained model and its evaluation.

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
            `gradient_accumulation_steps`, over micro-batches). It may exceed
            the training set: the stream repeats it (BiT's few-shot protocol).
        steps: total optimizer steps. None: the hyper-rule's (500/10k/20k);
            otherwise the hyper-rule schedule is scaled to end at `steps`.
        resolution: None (hyper-rule: 160/128 for images < 96x96 px, else
            512/480), an int (train and eval size, no random crop), or
            `(resize, crop)`.
        output_dir: backups (`backup/`), TensorBoard logs (`logs/`),
            `metrics.csv`, `results.json`, `run.json`, `class_names.txt`,
            `summary.png` and `model.keras`. One run at a time: while a run
            holds it (`run.lock`, an OS lock the system drops when the
            process ends, however it ends) another is refused, naming the
            holder's pid, host and start time. It may not lie inside an image
            folder given as `data` (refused: its files would become examples).
        examples_per_class: few-shot: train on exactly this many examples of
            each class (the authors' `--examples_per_class`), repeated through
            the stream at any batch size.
        examples_per_class_seed: seed of the few-shot draw (default: `seed`).
        seed: seed of shuffling, augmentation, MixUp and random
            initialisation (sets Keras' global seed via `keras.utils.set_random_seed`):
            an integer in NumPy's seed range, 0 to 2**32 - 1.
        strategy: a `tf.distribute.Strategy`; default `select_strategy()`:
            `keras_bit.MultiWorkerStrategy` when `TF_CONFIG` names a cluster
            (every worker runs the same call; `output_dir` must then be on
            storage all workers share: the chief writes, the others only
            restore), else `MirroredStrategy` over the local GPUs.
        base_lr: learning rate at batch size 512, scaled linearly to
            `batch_size`. None: BiT-HyperRule's 0.003 with `weights`, 0.2 from
            random initialisation (`hyperrule.SCRATCH_BASE_LR`).
        mixup: MixUp alpha (>= 0); None applies the hyper-rule (0.1 when the
            training set has >= 20k examples, else off).
        split, eval_split, eval_data, eval_fraction, data_dir: where the
            training and evaluation examples come from (see `keras_bit.data.load`).
        skip_bad_images: image folders are fully decoded once before training;
            an undecodable file, or one over `max_pixels`, is an error naming
            it, or with True it is left out and listed in `skipped_images.txt`.
        max_pixels: largest image (height x width) of an image folder that is
            decoded, read from its header first; default 40 million, as
            `keras-bit predict` and serving (`keras_bit.export.DEFAULT_MAX_PIXELS`).
            None: that default.
        mixed_precision: None/"float32", "mixed_float16" (with loss scaling) or
            "mixed_bfloat16".
        gradient_accumulation_steps: split each batch into this many
            micro-batches and accumulate (the authors' `--batch_split`); runs
            on one device (see `keras_bit.train.distribute.select_strategy`).
        jit_compile: compile the training step with XLA.
        deterministic: bit-identical results for the same call in a new
            process (TensorFlow op determinism, for the rest of the process).
        checkpoint_every: steps between backups (default: a tenth of the run).
        eval_every: steps between evaluations on the evaluation split (the
            authors' `--eval_every`; default: only at the end).
        trainable: "all", "head" (linear probe) or a block number 1-4: the
            root and the blocks below it stay frozen.
        callbacks: extra Keras callbacks.
        export_dir: if given, also export a serving SavedModel (with the class
            names) to `<export_dir>/<model name>/<next version>/`, once per
            run: a finished run started again returns the version it
            exported (recorded in results.json) instead of writing another.
            To write another, run `keras-bit export <output_dir>/model.keras
            --class-names <output_dir>/class_names.txt --export-dir <dir>`.
        verbose: 0 for silence; otherwise one line per chunk and the result.

    Returns:
        A `FinetuneResult` with `.model`, `.eval_accuracy` and `.eval_metrics`.

    Example:
        >>> result = keras_bit.finetune("BiT-M-R50x1", "cifar10", weights="imagenet21k", batch_size=64)
        >>> result.eval_accuracy
    """
    args = plan.Arguments(
        batch_size=batch_size, steps=steps, resolution=resolution, base_lr=base_lr, mixup=mixup, seed=seed,
        examples_per_class=examples_per_class, examples_per_class_seed=examples_per_class_seed,
        eval_fraction=eval_fraction, mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps, jit_compile=jit_compile,
        deterministic=deterministic, checkpoint_every=checkpoint_every, eval_every=eval_every, trainable=trainable,
        max_pixels=image_check.DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels,
    )
    args.check()
    plan.check_model(model, weights)
    plan.check_extras(export_dir, callbacks, strategy)
    output_dir = plan.check_output_dir(output_dir)
    data_lib.check_outside(data, output_dir=output_dir, export_dir=export_dir)
    plan.fetch_weights(model, weights)
    with native_stderr_silenced():  # the command's console: CUDA's own "failed call to cuInit" line on a CPU machine
        strategy = distribute.select_strategy(strategy, gradient_accumulation_steps)
    chief = distribute.is_chief(strategy)
    # Only the chief writes into output_dir (the other workers read its backups): it alone holds the folder.
    with run_lock.hold(output_dir) if chief else contextlib.nullcontext():
        dataset, train = _load_data(data, args, eval_data, split, eval_split, data_dir, skip_bad_images)
        os.makedirs(output_dir, exist_ok=True)
        fingerprints = (train.fingerprint(), dataset.eval.fingerprint())
        selection = dict(split=split, eval_split=eval_split, skip_bad_images=bool(skip_bad_images),
                         data_dir=None if data_dir is None else os.fspath(data_dir),
                         max_pixels=args.max_pixels if data_lib.folder_source(data) else None)
        run = plan.resolve(model, weights, dataset, train, args, strategy.num_replicas_in_sync, fingerprints,
                           _environment(), selection, distribute.worker_count(strategy))
        backup_dir = os.path.join(output_dir, "backup")
        plan.check_resume(output_dir, run.record, bool(backup.list_backups(backup_dir)))
        if chief:
            outputs.write_run_files(output_dir, run.record, dataset)
        _log_plan(run, dataset, train, weights, args)
        show = verbose not in (0, False)
        started = time.monotonic()
        with _precision(args.mixed_precision):
            if args.deterministic:
                tf.config.experimental.enable_op_determinism()
            keras.utils.set_random_seed(args.seed)  # reproducible random initialisation (weights=None)
            with strategy.scope():
                net = _build_model(model, weights, run, dataset.num_classes, args.jit_compile)
                start = backup.restore(net, backup_dir, iterations_per_step=run.accumulation)
            log = _fit(net, run, train, dataset, strategy, start, chief, backup_dir, list(callbacks), show)
            scores = evaluation.evaluate(net, dataset.eval, dataset.num_classes, run.micro_batch, run.crop, strategy)
            log.finish(run.total, scores)
            with strategy.scope():
                probs = keras.layers.Activation("softmax", dtype="float32", name="probabilities")(net.output)
                trained = keras.Model(net.input, probs, name=net.name)
        export_path, summary_path = outputs.write_outputs(trained, run, dataset, scores, output_dir, chief,
                                                          export_dir, show, time.monotonic() - started, start)
    return FinetuneResult(trained, scores["accuracy"], scores, log.history, output_dir, run.total, run.supports,
                          (run.resize, run.crop), list(dataset.class_names), export_path, summary_path)


def _environment():
    """What the trained weights depend on besides the settings: measured, TensorFlow's intra-op thread
    count changes them (benchmarks/RESULTS.md, "Determinism"), so do library versions and oneDNN."""
    threads = tf.config.threading.get_intra_op_parallelism_threads()  # 0: TensorFlow's default, one per core
    if not threads:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"tensorflow": tf.__version__, "keras": keras.__version__, "intra_op_threads": threads,
            "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default")}


def _load_data(data, args, eval_data, split, eval_split, data_dir, skip_bad_images):
    """Step 2: the data set (every image checked) and the training split actually used."""
    dataset = data_lib.load(data, eval_data=eval_data, split=split, eval_split=eval_split,
                            eval_fraction=args.eval_fraction, seed=args.seed, data_dir=data_dir,
                            skip_bad_images=skip_bad_images, max_pixels=args.max_pixels)
    train = dataset.train
    if args.examples_per_class is not None:
        draw_seed = args.seed if args.examples_per_class_seed is None else args.examples_per_class_seed
        train = data_lib.few_shot(train, args.examples_per_class, dataset.num_classes, draw_seed)
    return dataset, train


def _log_plan(run, dataset, train, weights, args):
    n = len(train)
    logger.info("Fine-tuning on %d examples (%d classes) at %d/%d px, batch %d, %d steps, lr %.3g (base %.3g%s), "
                "mixup %.2f", n, dataset.num_classes, run.resize, run.crop, args.batch_size, run.total,
                run.learning_rate, run.base_lr,
                ", from-scratch default" if args.base_lr is None and weights is None else "", run.mixup)
    if args.batch_size > n:
        logger.info("The batch (%d) is larger than the training set (%d examples): each batch holds every "
                    "example about %d times, each with its own augmentation.", args.batch_size, n,
                    args.batch_size // n)
    logger.info("Backups every %d steps in %s; evaluation %s.", run.checkpoint_every, "backup/",
                f"every {run.eval_every} steps and at the end" if run.eval_every else "at the end")
    if run.mixup and run.accumulation > 1:
        logger.info("MixUp mixes within each micro-batch of %d examples.", run.micro_batch)


@contextlib.contextmanager
def _precision(policy):
    previous = keras.config.dtype_policy()
    if policy:
        keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _build_model(model, weights, run, num_classes, jit_compile):
    """Step 3: the network with logits, its frozen stages and the BiT-HyperRule optimizer."""
    shape = (run.crop, run.crop, 3)
    if isinstance(model, str):
        from keras_bit.models.bit import BiT

        net = BiT(model, weights=weights, input_shape=shape, classes=num_classes, classifier_activation=None)
    else:
        net = model(weights=weights, input_shape=shape, classes=num_classes, classifier_activation=None)
    _freeze(net, run.frozen)
    optimizer = keras.optimizers.SGD(
        hyperrule.BiTSchedule(run.learning_rate, run.supports, accumulation_steps=run.accumulation),
        momentum=hyperrule.MOMENTUM,
        gradient_accumulation_steps=run.accumulation if run.accumulation > 1 else None,
    )
    net.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy"),
                 keras.metrics.TopKCategoricalAccuracy(k=min(5, num_classes), name="top5_accuracy")],
        jit_compile=jit_compile,
    )
    return net


def _freeze(net, frozen):
    """Freezes the root (stage 0) and blocks 1..frozen-1; `frozen` 5 leaves only the head trainable."""
    if not frozen:
        return
    if frozen > plan.NUM_BLOCKS:
        prefixes = None
    else:
        prefixes = ("root_",) + tuple(f"block{b}_" for b in range(1, frozen))
    found = False
    for layer in net.layers:
        if prefixes is None:
            if layer.name != "head" and layer.weights:
                layer.trainable = False
                found = True
        elif layer.name.startswith(prefixes):
            layer.trainable = False
            found = True
    if not found or (prefixes is None and "head" not in [layer.name for layer in net.layers]):
        raise ValueError(
            "`trainable` needs a BiT model with layers named as keras_bit names them (root_*, block1_* ..., "
            f"head); {net.name} has none to freeze."
        )


def _fit(net, run, train, dataset, strategy, start, chief, backup_dir, callbacks, show):
    """Steps 4 and 5: the input pipelines, the callbacks and `model.fit` from the restored step."""
    log = RunLog(os.path.dirname(backup_dir), lambda step: hyperrule.lr_at(step, run.supports, run.learning_rate),
                 run.steps_per_epoch, run.total, start_step=start, write=chief, verbose=show)
    if start >= run.total:
        logger.info("The run in %s is complete (step %d of %d): nothing left to train; evaluating its weights.",
                    os.path.dirname(backup_dir), start, run.total)
        return log

    def make_pipeline(**sharding):
        return pipeline.train_pipeline(train, dataset.num_classes, run.micro_batch, run.resize, run.crop,
                                       seed=run.record["seed"], mixup_alpha=run.mixup,
                                       start_step=start * run.accumulation, **sharding)

    if strategy.num_replicas_in_sync > 1:
        train_ds = distribute.distributed_train_input(strategy, make_pipeline, run.micro_batch)
    else:
        train_ds = make_pipeline()
    epochs = -(-run.total // run.steps_per_epoch)
    validation = {}
    if run.eval_every:
        # Evaluation is split by element across workers (DATA: the in-memory source has no files to
        # shard by); the metrics are all-reduced. The last epoch's evaluation is the final one, below.
        freq = [e + 1 for e in range(epochs - 1) if log.step_at_end(e) % run.eval_every == 0]
        if freq:
            validation = dict(
                validation_data=pipeline.eval_pipeline(dataset.eval, dataset.num_classes, run.micro_batch,
                                                       run.crop).with_options(
                    distribute.shard_options(tf.data.experimental.AutoShardPolicy.DATA)),
                validation_freq=freq,
            )
    fit_callbacks = [
        _StopAfter((run.total - start) * run.accumulation),
        log,
        backup.Backup(backup_dir, steps_per_epoch=run.steps_per_epoch, total_steps=run.total,
                      every=run.checkpoint_every, write=chief),
    ] + callbacks
    net.fit(train_ds, epochs=epochs, initial_epoch=start // run.steps_per_epoch,
            steps_per_epoch=run.steps_per_epoch * run.accumulation, callbacks=fit_callbacks, verbose=0,
            shuffle=False, **validation)
    return log


class _StopAfter(keras.callbacks.Callback):
    """Ends the last, shorter chunk at the run's final step (Keras epochs are otherwise equal).

    Counts batches rather than reading the optimizer's counter, which a loss-scale
    optimizer does not advance on a step it skips for overflowing gradients.
    """

    def __init__(self, batches):
        super().__init__()
        self.remaining = batches

    def on_train_batch_end(self, batch, logs=None):
        self.remaining -= 1
        if self.remaining <= 0:
            self.model.stop_training = True
