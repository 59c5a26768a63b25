"""Argument checks shared by the public functions (keras.applications-style messages)."""


def check_positive_int(value, name):
    """Raises `ValueError` naming `name` and the value unless `value` is an int > 0 (bools excluded)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
