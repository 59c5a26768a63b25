"""tf.distribute for fine-tuning: strategy choice, the chief, per-worker input, Keras 3 workarounds.

Keras 3's `fit` and tf.distribute disagree in two places, each worked around
here and nowhere else:

- `MultiWorkerMirroredStrategy.reduce` rejects what Keras passes it (see
  `MultiWorkerStrategy`);
- Keras' gradient accumulation applies the accumulated update inside a `cond`,
  where tf.distribute cannot all-reduce (keras-team/keras#17429): it runs only
  without replicas (see `select_strategy`).
"""

import json
import os

from keras_bit.backend import tensorflow as _tensorflow

tf = _tensorflow("Fine-tuning")



class MultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """`tf.distribute.MultiWorkerMirroredStrategy` that Keras 3's `fit` can use.

    Keras 3 (checked up to 3.15) calls `strategy.reduce` in two ways the
    multi-worker strategy rejects: at the start of `fit` on one whole batch, an
    `(x, y)` tuple of per-replica values ("Attempt to convert a value
    (PerReplica...)"), and on every step's scalar metrics with `axis=0`
    ("Invalid reduction dimension 0 for input with 0 dimensions"). This
    subclass reduces nested structures leaf by leaf and reduces scalars across
    replicas (what `axis=0` means for a per-replica scalar); it is otherwise
    the TensorFlow strategy, configured from `TF_CONFIG` in the same way.
    Create it at program start, before any other TensorFlow op.
    """

    def reduce(self, reduce_op, value, axis):
        parent = super()

        def reduce_one(v):
            first = self.experimental_local_results(v)[0]
            return parent.reduce(reduce_op, v, None if first.shape.rank == 0 else axis)

        return tf.nest.map_structure(reduce_one, value)


def tpu_strategy(tpu="local"):
    """Connects to a Cloud TPU and returns a `tf.distribute.TPUStrategy` for `finetune(strategy=...)`.

    `tpu`: "local" on a TPU VM, else the TPU's name or `grpc://` address. TPU
    workers read data through TensorFlow ops only, so the image source must be
    a tfds dataset or files on storage they can reach (e.g. `gs://`).
    """
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as e:
        raise ValueError(f"Cannot connect to the TPU {tpu!r}: {str(e).splitlines()[0] if str(e) else e!r}") from e
    return tf.distribute.TPUStrategy(resolver)


def select_strategy(strategy=None, accumulation_steps=1):
    """The strategy to train under.

    `strategy` when given; else `MultiWorkerStrategy` when `TF_CONFIG` names a
    cluster, else `MirroredStrategy` over all local GPUs (the CPU when there is
    none). With gradient accumulation, TensorFlow's default strategy (one
    device): Keras applies the accumulated update inside a `cond`, where a
    tf.distribute strategy cannot all-reduce (keras-team/keras#17429), even
    with one replica. A strategy passed in is never replaced: with
    accumulation it is refused instead.
    """
    cluster = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster", {})
    multi_worker = sum(len(v) for v in cluster.values()) > 1
    if accumulation_steps > 1:
        if strategy is None and multi_worker:
            raise ValueError(
                f"gradient_accumulation_steps={accumulation_steps} cannot run on the cluster TF_CONFIG names: "
                "each worker would train alone (keras-team/keras#17429). Use gradient_accumulation_steps=1, "
                "with the global batch spread over the workers."
            )
        if strategy is not None and strategy is not tf.distribute.get_strategy():
            raise ValueError(
                f"gradient_accumulation_steps={accumulation_steps} cannot run under {type(strategy).__name__}: "
                "Keras applies the accumulated update inside a cond, where tf.distribute cannot all-reduce "
                "(keras-team/keras#17429). Pass strategy=None to train on one device with accumulation, or "
                "gradient_accumulation_steps=1 with more replicas to grow the batch."
            )
        return tf.distribute.get_strategy()
    if strategy is None:
        if multi_worker:
            return MultiWorkerStrategy()
        return tf.distribute.MirroredStrategy()
    if type(strategy) is tf.distribute.MultiWorkerMirroredStrategy:
        raise ValueError(
            "Keras 3's `fit` cannot run under a plain tf.distribute.MultiWorkerMirroredStrategy (its "
            "`reduce` rejects the nested batch Keras passes). Create `keras_bit.MultiWorkerStrategy(...)` "
            "instead (same arguments), or pass no strategy and set TF_CONFIG."
        )
    return strategy


def worker_count(strategy):
    """Processes that build input under `strategy`: the cluster's chief and workers, else 1."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return 1
    jobs = resolver.cluster_spec().as_dict()
    return max(1, sum(len(jobs.get(job, ())) for job in ("chief", "worker")))


def is_chief(strategy):
    """Whether this process writes the run's files: the `chief` task, else worker 0, else a lone process."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    if not task_type or task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and resolver.task_id == 0 and not has_chief


def shard_options(policy):
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = policy
    return options


def distributed_train_input(strategy, make_pipeline, global_batch):
    """Per-worker training input: each worker builds only its share of every global batch.

    The shares are cut by example position in the deterministic stream (see
    `keras_bit.train.pipeline.train_pipeline`), so tf.data's auto-sharding is switched off
    on purpose: it would either re-shard the shares or fall back to DATA
    sharding, which decodes and augments every example on every worker.
    """

    def dataset_fn(context):
        ds = make_pipeline(shard=(context.input_pipeline_id, context.num_input_pipelines),
                           per_replica_batch_size=context.get_per_replica_batch_size(global_batch))
        return ds.with_options(shard_options(tf.data.experimental.AutoShardPolicy.OFF))

    return strategy.distribute_datasets_from_function(dataset_fn)


