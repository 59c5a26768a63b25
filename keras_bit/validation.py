"""Argument checks shared by the public functions (keras.applications-style messages).

The one place that says what an integer argument is: a Python or NumPy
integer (`np.int64` sizes come out of every array computation, and Keras
takes them), never a bool. Checks return the value as a plain `int`, which
is what callers must keep: a NumPy integer in a layer config or `run.json`
would not serialise.
"""

import collections.abc

import numpy as np


def is_int(value):
    """True for Python and NumPy integers; False for bools (`True` is not a size) and everything else."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def positive_int_arg(value):
    """argparse `type` of a positive integer option (`--top 5`): one clear message for anything else."""
    import argparse

    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def weights_arg(value):
    """argparse `type` of a `--weights` option: "none" (any case) is None, anything else the name or path."""
    return None if value.lower() == "none" else value


def check_positive_int(value, name, maximum=None):
    """Returns `value` as an `int`; `ValueError` naming `name` unless it is an integer in 1..`maximum`.

    Example:
        >>> check_positive_int(np.int64(10), "classes")
        10
    """
    if not is_int(value) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"`{name}` must be at most {maximum}. Received: {name}={value!r}")
    return int(value)


def as_sequence(value):
    """`value` as a tuple if it is an ordered sequence (tuple, list, range, 1-D NumPy array), else None.

    Strings, bytes, sets, dicts and iterators are not sequences of sizes: None.

    Example:
        >>> as_sequence(range(1, 3)), as_sequence("12")
        ((1, 2), None)
    """
    if isinstance(value, np.ndarray):
        return tuple(value.tolist()) if value.ndim == 1 else None
    if isinstance(value, (str, bytes, bytearray)) or not isinstance(value, collections.abc.Sequence):
        return None
    return tuple(value)


def check_name(value, name="name"):
    """Returns `value` if it is a non-empty string without "/" (what Keras needs of a model or layer name)."""
    if not isinstance(value, str) or not value or "/" in value:
        raise ValueError(f"`{name}` must be a non-empty string without '/'. Received: {name}={value!r}")
    return value


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
