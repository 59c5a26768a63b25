"""Index draws over any `Split`: the train/eval holdout and BiT's few-shot draw (same seed, same draw)."""

import numpy as np

from keras_bit.validation import check_positive_int


def holdout(n, fraction, seed):
    """Deterministic train/eval index split of `n` examples (eval = `fraction` of n, at least 1), both sorted."""
    if not 0 < fraction < 1:
        raise ValueError(f"`eval_fraction` must be in (0, 1). Received: eval_fraction={fraction!r}")
    order = np.random.default_rng(seed).permutation(n)
    n_eval = max(1, int(round(n * fraction)))
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def few_shot(split, examples_per_class, num_classes, seed=0):
    """Exactly `examples_per_class` examples of every class of `split`, drawn with `seed`, as an in-memory `Split`.

    Works on every source: it reads `split.labels` and keeps the draw with
    `split.subset` (a tfds split reads its files once and keeps only the K * C
    chosen records).

    Example:
        >>> draw = few_shot(dataset.train, 5, dataset.num_classes, seed=0)
        >>> len(draw) == 5 * dataset.num_classes
        True
    """
    check_positive_int(examples_per_class, "examples_per_class")
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(split.labels == c)
        if len(members) < examples_per_class:
            raise ValueError(
                f"Class {c} has {len(members)} training examples, fewer than "
                f"examples_per_class={examples_per_class}."
            )
        chosen.append(rng.choice(members, examples_per_class, replace=False))
    return split.subset(np.sort(np.concatenate(chosen)))
