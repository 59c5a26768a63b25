"""Whether a run folder's backup may be resumed: the same settings, or a refusal naming each difference.

A run that finds a backup in its `output_dir` resumes only if every setting
that can change the trained weights (`config.COMPARED`) is the one in its
run.json, and otherwise names each difference the way the user typed it
(`--base-lr 0.16 -> 0.5` on the command line, `base_lr=0.16 -> 0.5` in Python).
"""

import logging

from keras_bit.train import config

logger = logging.getLogger("keras_bit")

# Derived keys shown with the setting's name: "--data a -> b (train_fingerprint)".
_EXPLAINED = frozenset({"train_fingerprint", "eval_fingerprint", "class_names", "schedule"})


class RunMismatchError(ValueError):
    """`output_dir` holds a backup of a run with other settings.

    Attributes:
        changes: list of `(run.json key, previous value, new value)`.
    """

    def __init__(self, output_dir, changes, flags=False):
        self.output_dir = output_dir
        self.changes = changes
        super().__init__(self.describe(flags))

    def describe(self, flags=False):
        """The message, naming settings as CLI flags (`flags=True`) or Python arguments."""
        parts = []
        for key, old, new in self.changes:
            name = config.name_of(key, flags)
            detail = f" ({key})" if key in _EXPLAINED else ""
            old, new = _show(old, flags, key), _show(new, flags, key)
            parts.append(f"{name} {old} -> {new}{detail}" if flags else f"{name}={old} -> {new}{detail}")
        where = "--output-dir" if flags else "`output_dir`"
        return (
            f"{self.output_dir} holds a backup of a run with other settings: {'; '.join(parts)}. "
            f"Run again with the same settings to resume it, or choose a new {where}."
        )


def _show(value, flags, key=None):
    if key == "deterministic" and flags and isinstance(value, bool):
        value = not value  # shown under --nondeterministic
    if value is None:
        return "none" if flags else "None"
    if isinstance(value, bool) and flags:
        return "on" if value else "off"
    if isinstance(value, list) and len(value) > 6:
        return f"[{len(value)} values]"
    return str(value) if flags else repr(value)


def changes(previous, record):
    """`(key, previous, new)` for each compared run.json key that differs; only the cause when examples differ."""
    found = [(key, previous.get(key), record.get(key)) for key in config.COMPARED
             if previous.get(key) != record.get(key)]
    if any(key in config.SELECTING for key, _, _ in found):  # that explains other examples: name only it
        found = [c for c in found if c[0] not in config.EXAMPLES]
    return found


def check_resume(run_dir, record, has_backup):
    """Refuses to resume a backup made with other settings (or with no record of its settings).

    Args:
        run_dir: the run's `RunDir`.
        record: the new run's run.json record.
        has_backup: whether `run_dir` holds a backup to resume.
    """
    if not has_backup:
        return
    previous = run_dir.read_settings()
    if previous is None:
        raise ValueError(
            f"{run_dir.path} holds a backup but no {run_dir.run_json_name} describing its settings, so it cannot be "
            "resumed safely. Delete the backup folder to start over, or choose a new output directory."
        )
    found = changes(previous, record)
    if found:
        raise RunMismatchError(run_dir.path, found)
    if previous.get("environment") != record.get("environment"):
        # Not refused: moving a crashed run to another machine is legitimate, and the settings
        # are the same. But the float results depend on these (e.g. TensorFlow's thread count).
        logger.warning(
            "Resuming under another environment (%s -> %s): the same settings, but the result will not be "
            "bit-identical to an uninterrupted run.", previous.get("environment"), record.get("environment"))
