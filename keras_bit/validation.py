"""Argument checks shared by the public functions (keras.applications-style messages)."""

import numpy as np


def check_positive_int(value, name):
    """Raises `ValueError` naming `name` and the value unless `value` is an int > 0 (bools excluded)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")


def check_class_names(names, num_classes, where="class names"):
    """Class names must be `num_classes` distinct, non-empty, single-line strings (one per line in class_names.txt)."""
    if not isinstance(names, (list, tuple, np.ndarray)):  # a set or dict has no reliable order
        raise TypeError(f"{where} must be a list of strings, one per class. Received: {names!r:.80}")
    names = [str(n) if isinstance(n, (np.str_, np.integer)) else n for n in names]
    if len(names) != num_classes:
        raise ValueError(f"{where}: {len(names)} names for {num_classes} classes.")
    for name in names:
        if not isinstance(name, str) or not name.strip() or "\n" in name or "\r" in name:
            raise ValueError(
                f"{where}: every class name must be a non-empty single-line string. Received: {name!r}"
            )
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{where}: class names must be distinct. Repeated: {duplicates[:5]}")
    return names
