"""A fine-tuning run folder as written by `keras_bit.train.finetune`: its files, how they are written, who holds it.

- `metrics.csv`: one row per chunk of optimizer steps (see `METRICS_COLUMNS`);
  the three `val_*` cells are empty where no evaluation ran;
- `results.json` (written when the run ends): `steps`, `eval` (`loss`,
  `accuracy`, `top5_accuracy`, `examples`), `confusion_matrix` (rows = true
  class), `class_names` and, once exported, `export_path`;
- `class_names.txt`: one name a line;
- `skipped_images.txt`: the image files left out (`skip_bad_images`), one a line;
- `run.json`: the resolved settings, compared on resume (`keras_bit.train.plan`);
- `run.lock`: present while a run holds the folder (`keras_bit.train.run_lock`).

The names and columns are defined here once, for the writers (`logs`,
`finetune`, `backup`) and the reader (`report`). Every file is written under a
temporary name unique to the process and the call (`temp_path`) and renamed
into place. Only NumPy and the standard library are used, never TensorFlow, so
a run folder copied off a GPU or TPU machine can be read anywhere.
"""

import csv
import dataclasses
import json
import logging
import math
import os
import uuid
from typing import Optional

import numpy as np

logger = logging.getLogger("keras_bit")

METRICS_FILE = "metrics.csv"
RESULTS_FILE = "results.json"
CLASS_NAMES_FILE = "class_names.txt"
SUMMARY_FILE = "summary.png"
SKIPPED_FILE = "skipped_images.txt"
RUN_FILE = "run.json"
LOCK_FILE = "run.lock"
# Every file of a run folder is written under this prefix first (the backups' cleanup finds them by it).
TEMP_PREFIX = ".writing-"
# run.json holds the settings and class names: 21843 ImageNet-21k names are under 1 MB.
_RUN_FILE_LIMIT = 64 << 20
METRICS_COLUMNS = ("step", "loss", "accuracy", "learning_rate", "val_loss", "val_accuracy", "val_top5_accuracy")
INSTALL_HINT = "pip install 'keras-bit[report]'"

_VALIDATION_COLUMNS = frozenset(METRICS_COLUMNS[4:])
_FRACTION_COLUMNS = frozenset({"accuracy", "val_accuracy", "val_top5_accuracy"})


@dataclasses.dataclass(frozen=True)
class FinalEvaluation:
    """The contents of `results.json`, validated.

    Attributes:
        steps: int, optimizer steps the run made.
        loss, accuracy, examples: the final evaluation.
        top5_accuracy: float, or None where the run recorded none.
        confusion_matrix: int64 array `(classes, classes)`, rows = true class.
        class_names: list of `classes` strings.
    """

    steps: int
    loss: float
    accuracy: float
    top5_accuracy: Optional[float]
    examples: int
    confusion_matrix: np.ndarray
    class_names: list


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """A run folder, validated by `load_run`.

    Attributes:
        run_dir: str, the folder.
        metrics: dict mapping each of `METRICS_COLUMNS` to a float64 array with
            one entry per logged row (steps strictly increasing); NaN where a
            `val_*` cell was empty.
        results: a `FinalEvaluation`, or None while the run has not finished
            (still running, or stopped before its last step).
    """

    run_dir: str
    metrics: dict
    results: Optional[FinalEvaluation]

    @property
    def rows(self):
        return len(self.metrics["step"])


def load_run(run_dir):
    """Reads and validates a fine-tuning run folder.

    Args:
        run_dir: str or path-like, the `output_dir` of a fine-tuning run.

    Returns:
        A `RunRecord`.

    Raises:
        ValueError: the folder or its `metrics.csv` is missing, a file is
            malformed (the message names the file, the line or key, and what
            was expected), or the folder holds nothing to draw yet.

    Example:
        >>> run = load_run("runs/flowers")
        >>> run.metrics["val_accuracy"][-1], run.results.accuracy
    """
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise ValueError(f"Run folder not found: {run_dir!r}")
    metrics_path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(metrics_path):
        raise ValueError(f"Not a fine-tuning run folder: {run_dir!r} (no {METRICS_FILE})")
    metrics = _read_metrics(metrics_path)
    results_path = os.path.join(run_dir, RESULTS_FILE)
    results = _read_results(results_path, run_dir) if os.path.isfile(results_path) else None
    run = RunRecord(run_dir=run_dir, metrics=metrics, results=results)
    if not run.rows and results is None:
        raise ValueError(
            f"Nothing to report yet in {run_dir!r}: {METRICS_FILE} has no rows and there is no {RESULTS_FILE}."
        )
    return run


def _read_metrics(path):
    # Undecodable bytes become U+FFFD, which the cell checks then report by line.
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        text = f.read()
    lines = text.splitlines()
    # A run that is still going may be caught mid-row: an unterminated last
    # line that does not parse is that row being written, not corruption.
    try:
        return _parse_metrics(path, lines)
    except ValueError:
        if not lines or text.endswith(("\n", "\r")):
            raise
        logger.warning("%s: ignoring its unterminated last line %d (a row still being written?)", path, len(lines))
        return _parse_metrics(path, lines[:-1])


def _parse_metrics(path, lines):
    rows = []
    for number, cells in enumerate(csv.reader(lines), start=1):
        if number == 1:
            if tuple(c.strip() for c in cells) != METRICS_COLUMNS:
                raise ValueError(
                    f"{path} line 1: expected the header {','.join(METRICS_COLUMNS)!r}, found {','.join(cells)!r}"
                )
        elif cells:  # blank lines carry nothing
            row = _parse_row(path, number, cells)
            # Resuming from a backup re-logs the steps after it: keep the latest.
            while rows and rows[-1][0] >= row[0]:
                rows.pop()
            rows.append(row)
    table = np.array(rows, dtype="float64").reshape(len(rows), len(METRICS_COLUMNS))
    return {name: table[:, i] for i, name in enumerate(METRICS_COLUMNS)}


def _parse_row(path, number, cells):
    if len(cells) != len(METRICS_COLUMNS):
        raise ValueError(
            f"{path} line {number}: expected {len(METRICS_COLUMNS)} comma-separated cells "
            f"({','.join(METRICS_COLUMNS)}), found {len(cells)}: {','.join(cells)!r}"
        )
    row = []
    for name, cell in zip(METRICS_COLUMNS, cells):
        row.append(_parse_cell(path, number, name, cell.strip()))
    step, learning_rate = row[0], row[3]
    if not (math.isfinite(step) and step >= 0 and step == int(step)):
        raise ValueError(f"{path} line {number}, column 'step': expected a whole number >= 0, found {cells[0]!r}")
    if not (math.isfinite(learning_rate) and learning_rate >= 0):
        raise ValueError(
            f"{path} line {number}, column 'learning_rate': expected a finite number >= 0, found {cells[3]!r}"
        )
    return row


def _parse_cell(path, number, name, cell):
    optional = name in _VALIDATION_COLUMNS
    if optional and not cell:
        return math.nan
    try:
        value = float(cell)
    except ValueError:
        value = None
    # "nan" is a real value: Keras logs it when the loss diverges.
    if value is None or (name in _FRACTION_COLUMNS and not (0 <= value <= 1 or math.isnan(value))):
        expected = "a fraction in [0, 1]" if name in _FRACTION_COLUMNS else "a number"
        raise ValueError(
            f"{path} line {number}, column {name!r}: expected {expected}{' or an empty cell' if optional else ''}, "
            f"found {cell!r}"
        )
    return value


def _read_results(path, run_dir):
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    evaluation = _field(path, data, "eval", dict, "an object")
    matrix = _confusion_matrix(path, data.get("confusion_matrix"))
    names = _class_names(path, data.get("class_names"), run_dir, len(matrix))
    top5 = evaluation.get("top5_accuracy")
    result = FinalEvaluation(
        steps=_field(path, data, "steps", int, "a whole number"),
        loss=float(_field(path, evaluation, "loss", (int, float), "a number", "eval.")),
        accuracy=_fraction(path, evaluation, "accuracy"),
        top5_accuracy=None if top5 is None else _fraction(path, evaluation, "top5_accuracy"),
        examples=_field(path, evaluation, "examples", int, "a whole number", "eval."),
        confusion_matrix=matrix,
        class_names=names,
    )
    if int(matrix.sum()) != result.examples:
        logger.warning("%s: the confusion matrix counts %d examples, eval.examples %d", path, matrix.sum(),
                       result.examples)
    return result


def _field(path, obj, key, kind, expected, prefix=""):
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{path}: expected {prefix + key!r} to be {expected}, found {value!r}")
    return value


def _fraction(path, evaluation, key):
    value = float(_field(path, evaluation, key, (int, float), "a fraction in [0, 1]", "eval."))
    if not 0 <= value <= 1:
        raise ValueError(f"{path}: expected 'eval.{key}' to be a fraction in [0, 1], found {value!r}")
    return value


def _confusion_matrix(path, value):
    expected = "a non-empty square list of lists of counts (rows = true class)"
    if not isinstance(value, list) or not value:
        raise ValueError(f"{path}: expected 'confusion_matrix' to be {expected}, found {str(value)[:80]}")
    classes = len(value)
    for i, row in enumerate(value):
        if not isinstance(row, list) or len(row) != classes:
            found = f"{len(row)} cells" if isinstance(row, list) else repr(row)[:40]
            raise ValueError(f"{path}: 'confusion_matrix' row {i}: expected {classes} counts (one per class), "
                             f"found {found}")
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in row):
            raise ValueError(f"{path}: 'confusion_matrix' row {i}: expected whole-number counts >= 0, found {row[:10]}")
    return np.array(value, dtype="int64")


def _class_names(path, names, run_dir, classes):
    source = path
    if names is None:
        source = os.path.join(run_dir, CLASS_NAMES_FILE)
        if not os.path.isfile(source):
            return [str(i) for i in range(classes)]
        with open(source, encoding="utf-8", errors="replace") as f:
            names = [line.rstrip("\r\n") for line in f if line.strip()]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: expected 'class_names' to be a list of strings, found {str(names)[:80]}")
    if len(names) != classes:
        raise ValueError(
            f"{source}: {len(names)} class names for a {classes}x{classes} confusion matrix; expected {classes} names"
        )
    return names


# --- Writing: atomic files under names no other process or call uses. ---


def temp_path(path):
    """Where to write `path` before renaming it into place: `.writing-<pid>-<random>-<name>` beside it.

    Unique per process and per call, so two writers never share (or remove)
    each other's partial file; the name keeps `path`'s ending, which Keras
    needs (`.keras`, `.weights.h5`).
    """
    folder, name = os.path.split(os.fspath(path))
    return os.path.join(folder, f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}-{name}")


def write_text(path, text):
    """Writes `text` (UTF-8) to `path` atomically: a kill leaves the old file or the new one, no temp file."""
    tmp = temp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, value, indent=2):
    """Writes `value` as JSON to `path` atomically (see `write_text`)."""
    write_text(path, json.dumps(value, indent=indent))


def write_run_json(run_dir, settings):
    """Writes run.json atomically (other workers may read it while the chief writes)."""
    write_json(os.path.join(run_dir, RUN_FILE), settings)


def read_run_json(run_dir):
    """The settings in `run_dir/run.json` (a dict), None when there is none; ValueError naming the file if bad."""
    from keras_bit.io import read_json_object

    path = os.path.join(os.fspath(run_dir), RUN_FILE)
    if not os.path.lexists(path):
        return None
    try:
        return read_json_object(path, _RUN_FILE_LIMIT, what="The run settings file")
    except ValueError as e:
        raise ValueError(f"{e} Delete it with the backup folder to start over, or choose another output "
                         "directory.") from e


def recorded_export(run_dir):
    """The `export_path` results.json records (an existing folder), else None. Never raises for a bad file."""
    try:
        with open(os.path.join(os.fspath(run_dir), RESULTS_FILE), encoding="utf-8") as f:
            path = json.load(f).get("export_path")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    return path if isinstance(path, str) and os.path.isdir(path) else None

