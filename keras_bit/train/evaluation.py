"""The final evaluation of a fine-tuning run: loss, top-1, top-5 and the confusion matrix, from one prediction pass."""

import numpy as np

from keras_bit.backend import tensorflow as _tensorflow
from keras_bit.train import distribute, pipeline

tf = _tensorflow("Fine-tuning")


def evaluate(model, split, num_classes, batch_size, crop, strategy=None):
    """Evaluates `model` (logits) on `split` with BiT's evaluation transform.

    Every process predicts the whole split, in order, so each holds all the
    predictions. Under a multi-worker strategy the model runs batch by batch
    outside the strategy: `predict` there pads the last batch of every worker's
    input to the global batch size (16 predictions for 14 examples, found
    here), so its outputs cannot be matched to the labels.

    Returns:
        A dict: `loss` (mean softmax cross-entropy), `accuracy`,
        `top5_accuracy` (top-min(5, C)), `examples`, and `confusion_matrix`
        (C x C counts, rows = true class, columns = predicted class).
    """
    images = pipeline.eval_pipeline(split, num_classes, batch_size, crop).map(lambda x, y: x)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        forward = tf.function(lambda x: model(x, training=False))
        logits = np.concatenate([forward(x).numpy() for x in images]).astype(np.float64)
    else:
        images = images.with_options(distribute.shard_options(tf.data.experimental.AutoShardPolicy.OFF))
        logits = np.asarray(model.predict(images, verbose=0), np.float64)
    return scores(logits, np.asarray(split.labels), num_classes)


def scores(logits, labels, num_classes):
    """Loss, top-1, top-k and the confusion matrix of `logits` `(N, C)` against integer `labels` `(N,)`."""
    if len(logits) != len(labels):
        raise ValueError(f"{len(logits)} predictions for {len(labels)} labels.")
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    k = min(5, num_classes)
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    predicted = top[:, 0]
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    return {
        "loss": float(-log_probs[np.arange(len(labels)), labels].mean()),
        "accuracy": float(np.mean(predicted == labels)),
        "top5_accuracy": float(np.mean((top == labels[:, None]).any(axis=1))),
        "examples": len(labels),
        "confusion_matrix": confusion.tolist(),
    }
