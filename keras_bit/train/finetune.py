"""Fine-tune a BiT model with BiT-HyperRule: `model.fit` on tf.data under a tf.distribute strategy.

`finetune` runs named steps: check every setting before any work
(`keras_bit.train.config`, `_check`), load and check the data
(`keras_bit.train.sources`), plan the run with BiT-HyperRule and refuse a
backup made with other settings (`keras_bit.train.plan`, `keras_bit.train.resume`),
build the model (frozen stages, compile, restore the newest backup), fit, and
write the outputs into the run folder (`keras_bit.train.run_dir`). The run
is split into chunks of steps (Keras epochs); every `checkpoint_every` steps
`keras_bit.train.backup` writes the model and optimizer state, so running the
same command again after a crash resumes at the last backup and ends with the
weights of an uninterrupted run (the data stream is a function of the step, see
`keras_bit.train.pipeline`). A different command is refused, never mixed.

Reference:
    Kolesnikov et al., "Big Transfer (BiT)", https://arxiv.org/abs/1912.11370, section 3.3.
"""

import contextlib
import dataclasses
import logging
import os
import time

import keras

from keras_bit.train import backup, distribute, evaluation, hyperrule, outputs, pipeline, plan, resume, run_lock
from keras_bit.train import sources as data_lib
from keras_bit.train.config import NUM_BLOCKS, FinetuneConfig, docstring as _settings_doc
from keras_bit.train.logs import RunLog
from keras_bit.train.run_dir import RunDir
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


def finetune(model, data, config=None, *, eval_data=None, strategy=None, callbacks=(), verbose="auto", **settings):
    """Fine-tunes a BiT model with BiT-HyperRule and returns the trained model and its evaluation.

    Args:
        model: a model name such as "BiT-M-R50x1", or a callable taking
            `weights, input_shape, classes, classifier_activation` and returning
            a keras_bit model (e.g. `functools.partial(keras_bit.ResNetV2, ...)`).
        data: a tfds name, "sklearn:digits", an image-folder path (`root/<class>/<img>`
            or `root/train|test/<class>/<img>`), `(images, labels)` arrays, or
            a `keras_bit.data.Dataset`.
        config: a `keras_bit.train.config.FinetuneConfig` (None: the defaults);
            `**settings` override its fields (the keywords below).
        eval_data: `(images, labels)` arrays to evaluate on (with array `data`).
        strategy: a `tf.distribute.Strategy`; default `select_strategy()`:
            `keras_bit.MultiWorkerStrategy` when `TF_CONFIG` names a cluster
            (every worker runs the same call; `output_dir` must then be on
            storage all workers share: the chief writes, the others only
            restore), else `MirroredStrategy` over the local GPUs.
        callbacks: extra Keras callbacks.
        verbose: 0 for silence; otherwise one line per chunk and the result.
        **settings: any `FinetuneConfig` field:
{settings}

    Returns:
        A `FinetuneResult` with `.model`, `.eval_accuracy` and `.eval_metrics`.

    Raises:
        ValueError: a bad setting (named), or an `output_dir` holding a run with
            other settings (`RunMismatchError`); TypeError: an unknown setting.

    Example:
        >>> result = keras_bit.finetune("BiT-M-R50x1", "cifar10", weights="imagenet21k", batch_size=64)
        >>> result.eval_accuracy
    """
    args = _settings(config, settings)
    run_dir, strategy = _check(model, data, args, callbacks, strategy)
    chief = distribute.is_chief(strategy)
    # Only the chief writes into output_dir (the other workers read its backups): it alone holds the folder.
    with run_lock.hold(run_dir) if chief else contextlib.nullcontext():
        dataset, train = _load_data(data, args, eval_data)
        run = _plan(model, data, args, dataset, train, strategy, run_dir, chief)
        show = verbose not in (0, False)
        started = time.monotonic()
        with _precision(args.mixed_precision):
            trained, scores, log, start = _train(model, args, run, dataset, train, strategy, chief, run_dir,
                                                 list(callbacks), show)
        export_path, summary_path = outputs.write_outputs(trained, run, dataset, scores, run_dir, chief,
                                                          args.export_dir, show, time.monotonic() - started, start)
    return FinetuneResult(trained, scores["accuracy"], scores, log.history, run_dir.path, run.total, run.supports,
                          (run.resize, run.crop), list(dataset.class_names), export_path, summary_path)


def _settings(config, settings):
    """The run's checked `FinetuneConfig`: `config` (or the defaults) with the keyword settings applied."""
    if config is not None and not isinstance(config, FinetuneConfig):
        raise TypeError(f"`config` must be a keras_bit FinetuneConfig or None. Received: config={config!r}")
    return (config or FinetuneConfig()).replace(**settings)


def _check(model, data, args, callbacks, strategy):
    """Step 1: everything checked before any data is read; the weights fetched; the strategy chosen."""
    plan.check_model(model, args.weights)
    plan.check_extras(args.export_dir, callbacks, strategy)
    run_dir = RunDir.checked(args.output_dir)
    data_lib.check_outside(data, output_dir=run_dir.path, export_dir=args.export_dir)
    plan.fetch_weights(model, args.weights)
    with native_stderr_silenced():  # the command's console: CUDA's own "failed call to cuInit" line on a CPU machine
        strategy = distribute.select_strategy(strategy, args.gradient_accumulation_steps)
    return run_dir, strategy


def _plan(model, data, args, dataset, train, strategy, run_dir, chief):
    """Step 3: BiT-HyperRule applied, a backup with other settings refused, run.json written."""
    os.makedirs(run_dir.path, exist_ok=True)
    fingerprints = (train.fingerprint(), dataset.eval.fingerprint())
    run = plan.make_plan(model, args, dataset, train, strategy.num_replicas_in_sync, fingerprints, _environment(),
                         distribute.worker_count(strategy), folder=bool(data_lib.folder_source(data)))
    resume.check_resume(run_dir, run.record, bool(backup.list_backups(run_dir.backup_dir)))
    if chief:
        outputs.write_run_files(run_dir, run.record, dataset)
    _log_plan(run, dataset, train, args, run_dir)
    return run


def _train(model, args, run, dataset, train, strategy, chief, run_dir, callbacks, show):
    """Steps 4 and 5: the model built and restored, fitted from its backup, evaluated, with probabilities out."""
    if args.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(args.seed)  # reproducible random initialisation (weights=None)
    with strategy.scope():
        net = _build_model(model, args.weights, run, dataset.num_classes, args.jit_compile)
        start = backup.restore(net, run_dir.backup_dir, iterations_per_step=run.accumulation)
    log = _fit(net, run, train, dataset, strategy, start, chief, run_dir, callbacks, show)
    scores = evaluation.evaluate(net, dataset.eval, dataset.num_classes, run.micro_batch, run.crop, strategy)
    log.finish(run.total, scores)
    with strategy.scope():
        probs = keras.layers.Activation("softmax", dtype="float32", name="probabilities")(net.output)
        trained = keras.Model(net.input, probs, name=net.name)
    return trained, scores, log, start


def _environment():
    """What the trained weights depend on besides the settings: measured, TensorFlow's intra-op thread
    count changes them (benchmarks/RESULTS.md, "Determinism"), so do library versions and oneDNN."""
    threads = tf.config.threading.get_intra_op_parallelism_threads()  # 0: TensorFlow's default, one per core
    if not threads:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"tensorflow": tf.__version__, "keras": keras.__version__, "intra_op_threads": threads,
            "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default")}


def _load_data(data, args, eval_data):
    """Step 2: the data set (every image checked) and the training split actually used."""
    dataset = data_lib.load(data, eval_data=eval_data, split=args.split, eval_split=args.eval_split,
                            eval_fraction=args.eval_fraction, seed=args.seed, data_dir=args.data_dir,
                            skip_bad_images=args.skip_bad_images, max_pixels=args.max_pixels)
    train = dataset.train
    if args.examples_per_class is not None:
        train = data_lib.few_shot(train, args.examples_per_class, dataset.num_classes, args.few_shot_seed)
    return dataset, train


def _log_plan(run, dataset, train, args, run_dir):
    n = len(train)
    logger.info("Fine-tuning on %d examples (%d classes) at %d/%d px, batch %d, %d steps, lr %.3g (base %.3g%s), "
                "mixup %.2f", n, dataset.num_classes, run.resize, run.crop, args.batch_size, run.total,
                run.learning_rate, run.base_lr,
                ", from-scratch default" if args.base_lr is None and args.weights is None else "", run.mixup)
    if args.batch_size > n:
        logger.info("The batch (%d) is larger than the training set (%d examples): each batch holds every "
                    "example about %d times, each with its own augmentation.", args.batch_size, n,
                    args.batch_size // n)
    logger.info("Backups every %d steps in %s; evaluation %s.", run.checkpoint_every,
                os.path.basename(run_dir.backup_dir) + "/",
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
    if frozen > NUM_BLOCKS:
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


def _fit(net, run, train, dataset, strategy, start, chief, run_dir, callbacks, show):
    """Steps 4 and 5: the input pipelines, the callbacks and `model.fit` from the restored step."""
    log = RunLog(run_dir, lambda step: hyperrule.lr_at(step, run.supports, run.learning_rate),
                 run.steps_per_epoch, run.total, start_step=start, write=chief, verbose=show)
    if start >= run.total:
        logger.info("The run in %s is complete (step %d of %d): nothing left to train; evaluating its weights.",
                    run_dir.path, start, run.total)
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
        backup.Backup(run_dir.backup_dir, steps_per_epoch=run.steps_per_epoch, total_steps=run.total,
                      every=run.checkpoint_every, write=chief),
    ] + callbacks
    net.fit(train_ds, epochs=epochs, initial_epoch=start // run.steps_per_epoch,
            steps_per_epoch=run.steps_per_epoch * run.accumulation, callbacks=fit_callbacks, verbose=0,
            shuffle=False, **validation)
    return log


if finetune.__doc__:  # None under python -OO
    finetune.__doc__ = finetune.__doc__.replace("{settings}", _settings_doc())


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
