"""A fine-tuning run folder (`RunDir`): the name of every file in it, and the one reader and writer of each.

- `run.json`: the resolved settings, compared on resume (`keras_bit.train.resume`);
- `backup/`: model and optimizer state every few steps (`keras_bit.train.backup`);
- `logs/`: TensorBoard scalars, and `metrics.csv`: one row per chunk of
  optimizer steps (see `METRICS_COLUMNS`), the three `val_*` cells empty where
  no evaluation ran (both written by `keras_bit.train.logs`);
- `class_names.txt`: one name a line; `skipped_images.txt`: the image files
  left out (`skip_bad_images`), one a line;
- `results.json` (written when the run ends): `steps`, `eval` (`loss`,
  `accuracy`, `top5_accuracy`, `examples`), `confusion_matrix` (rows = true
  class), `class_names` and, once exported, `export_path`;
- `model.keras`, `summary.png` (`keras_bit.train.report`);
- `run.lock`: present while a run holds the folder (`keras_bit.train.run_lock`).

Every file is written under a temporary name and renamed into place
(`keras_bit.io.atomic_path`). Only NumPy and the standard library are used,
never TensorFlow, so a run folder copied off a GPU or TPU machine can be read
anywhere.
"""

import csv
import dataclasses
import io
import json
import logging
import math
import os
from typing import Optional

import numpy as np

from keras_bit.io import atomic_path, read_json_object, temp_path, write_json, write_text

logger = logging.getLogger("keras_bit")

METRICS_COLUMNS = ("step", "loss", "accuracy", "learning_rate", "val_loss", "val_accuracy", "val_top5_accuracy")
INSTALL_HINT = "pip install 'keras-bit[report]'"
# run.json holds the settings and class names: 21843 ImageNet-21k names are under 1 MB.
_RUN_FILE_LIMIT = 64 << 20
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
    """A run folder, validated by `RunDir.load`.

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


class RunDir:
    """The run folder `path` (made absolute): its paths, and the reader / writer of each of its files.

    Args:
        path: str or path-like, the `output_dir` of a fine-tuning run.

    Example:
        >>> run_dir = RunDir.checked("runs/flowers")  # refuses a folder it cannot write
        >>> run_dir.write_settings({"steps": 500})
        >>> run = RunDir("runs/flowers").load()  # what `keras-bit report` draws
        >>> run.metrics["val_accuracy"][-1], run.results.accuracy
    """

    run_json_name = "run.json"
    metrics_csv_name = "metrics.csv"
    results_json_name = "results.json"

    def __init__(self, path):
        self.path = os.path.abspath(os.fspath(path))

    def __fspath__(self):
        return self.path

    def __repr__(self):
        return f"RunDir({self.path!r})"

    def _file(self, name):
        return os.path.join(self.path, name)

    run_json = property(lambda self: self._file(self.run_json_name), doc="The settings (`read_settings`).")
    metrics_csv = property(lambda self: self._file(self.metrics_csv_name), doc="One row per chunk of steps.")
    results_json = property(lambda self: self._file(self.results_json_name), doc="The final evaluation.")
    backup_dir = property(lambda self: self._file("backup"), doc="The backups (`keras_bit.train.backup`).")
    logs_dir = property(lambda self: self._file("logs"), doc="TensorBoard's runs `train` and `validation`.")
    class_names_txt = property(lambda self: self._file("class_names.txt"), doc="One class name a line.")
    skipped_txt = property(lambda self: self._file("skipped_images.txt"), doc="The image files left out.")
    model_keras = property(lambda self: self._file("model.keras"), doc="The trained classifier.")
    summary_png = property(lambda self: self._file("summary.png"), doc="The picture `report` draws.")
    lock = property(lambda self: self._file("run.lock"), doc="Held by the running run (`run_lock`).")

    # --- The folder itself. ---

    @classmethod
    def checked(cls, output_dir):
        """The `RunDir` of `output_dir`; `ValueError` unless it is a non-empty path to a writable folder."""
        if output_dir is None or not os.fspath(output_dir).strip():
            raise ValueError(f"`output_dir` must be a non-empty path. Received: output_dir={output_dir!r}")
        run_dir = cls(output_dir)
        run_dir.check_writable()
        return run_dir

    def check_writable(self):
        """Raises `ValueError` unless the folder can be written (created if its parent exists).

        A folder that does not exist yet is created and removed again by the check (so that a run refused
        later, e.g. for its data, leaves nothing behind); `finetune` creates it once the data is loaded.
        """
        path, parent = self.path, os.path.dirname(self.path)
        if not os.path.isdir(parent):
            what = "is not a folder" if os.path.exists(parent) else "does not exist"
            raise ValueError(f"The parent of `output_dir` {what}: {parent}")
        if os.path.islink(path) and not os.path.exists(path):
            raise ValueError(f"`output_dir` is a symbolic link that leads nowhere (a loop, or a missing target): "
                             f"{path} -> {os.readlink(path)}")
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"`output_dir` is a file, not a folder: {path}")
        created = not os.path.exists(path)
        try:
            os.makedirs(path, exist_ok=True)
            # A real write, not os.access: root passes access checks on read-only file systems.
            probe = temp_path(os.path.join(path, "probe"))  # a name backup clean-up recognises
            try:
                with open(probe, "x"):
                    pass
            finally:
                if os.path.lexists(probe):
                    os.remove(probe)
            if created:
                os.rmdir(path)
        except OSError as e:
            raise ValueError(f"`output_dir` is not writable: {path} ({e.strerror or e})") from e

    # --- Written before training. ---

    def write_settings(self, record):
        """Writes run.json atomically (other workers may read it while the chief writes)."""
        write_json(self.run_json, record)

    def read_settings(self):
        """The settings in run.json (a dict), None when there is none; ValueError naming the file if bad."""
        if not os.path.lexists(self.run_json):
            return None
        try:
            return read_json_object(self.run_json, _RUN_FILE_LIMIT, what="The run settings file")
        except ValueError as e:
            raise ValueError(f"{e} Delete it with the backup folder to start over, or choose another output "
                             "directory.") from e

    def write_class_names(self, names):
        write_text(self.class_names_txt, "\n".join(names) + "\n")

    def write_skipped(self, paths):
        """Writes skipped_images.txt, one path a line, when there are any."""
        if paths:
            write_text(self.skipped_txt, "\n".join(paths) + "\n")

    # --- metrics.csv: written after every chunk, read on resume and by `report`. ---

    def write_metrics(self, rows):
        """Writes metrics.csv: `rows` are dicts of `METRICS_COLUMNS` (None: an empty cell), sorted by step."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(METRICS_COLUMNS)
        for row in sorted(rows, key=lambda r: r["step"]):
            writer.writerow([str(int(row["step"]))] + [_format(row.get(k)) for k in METRICS_COLUMNS[1:]])
        write_text(self.metrics_csv, buffer.getvalue())

    def read_metrics(self):
        """The rows of metrics.csv, steps increasing: dicts of `METRICS_COLUMNS`, None for an empty `val_*` cell.

        A resumed run logs again the steps after its backup: the latest row of a step is kept. An
        unterminated last line that does not parse is a row still being written: left out, with a warning.

        Raises:
            OSError: the file cannot be read. ValueError: it is malformed (the line, column and expectation named).
        """
        path = self.metrics_csv
        # Undecodable bytes become U+FFFD, which the cell checks then report by line.
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            text = f.read()
        lines = text.splitlines()
        try:
            return _parse_metrics(path, lines)
        except ValueError:
            if not lines or text.endswith(("\n", "\r")):
                raise
            logger.warning("%s: ignoring its unterminated last line %d (a row still being written?)", path,
                           len(lines))
            return _parse_metrics(path, lines[:-1])

    # --- Written at the end. ---

    def save_model(self, model):
        """Saves `model` as model.keras (Keras writes in place: a temporary name keeps a kill from halving it)."""
        try:
            with atomic_path(self.model_keras) as tmp:
                model.save(tmp)
        except OSError as e:
            raise OSError(e.errno, f"Cannot write {self.model_keras}: {e.strerror or e}. The run's weights are in "
                                   "its newest backup: free space and run the same command again to write the "
                                   "outputs.") from e

    def write_results(self, results):
        write_json(self.results_json, results, indent=1)

    def recorded_export(self):
        """The `export_path` results.json records (an existing folder), else None. Never raises for a bad file."""
        try:
            with open(self.results_json, encoding="utf-8") as f:
                path = json.load(f).get("export_path")
        except (OSError, ValueError, AttributeError, RecursionError):
            return None
        return path if isinstance(path, str) and os.path.isdir(path) else None

    def load(self):
        """Reads and validates the run's metrics.csv and results.json, for `keras-bit report`.

        Returns:
            A `RunRecord`.

        Raises:
            ValueError: the folder or its metrics.csv is missing, a file is
                malformed (the message names the file, the line or key, and
                what was expected), or the folder holds nothing to draw yet.
        """
        if not os.path.isdir(self.path):
            raise ValueError(f"Run folder not found: {self.path!r}")
        if not os.path.isfile(self.metrics_csv):
            raise ValueError(f"Not a fine-tuning run folder: {self.path!r} (no {self.metrics_csv_name})")
        rows = self.read_metrics()
        table = np.array([[math.nan if row[k] is None else row[k] for k in METRICS_COLUMNS] for row in rows],
                         dtype="float64").reshape(len(rows), len(METRICS_COLUMNS))
        metrics = {name: table[:, i] for i, name in enumerate(METRICS_COLUMNS)}
        results = _read_results(self.results_json, self) if os.path.isfile(self.results_json) else None
        if not rows and results is None:
            raise ValueError(f"Nothing to report yet in {self.path!r}: {self.metrics_csv_name} has no rows and "
                             f"there is no {self.results_json_name}.")
        return RunRecord(run_dir=self.path, metrics=metrics, results=results)


def _format(value):
    return "" if value is None else f"{float(value):.6g}"


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
            while rows and rows[-1]["step"] >= row["step"]:
                rows.pop()
            rows.append(row)
    return rows


def _parse_row(path, number, cells):
    if len(cells) != len(METRICS_COLUMNS):
        raise ValueError(
            f"{path} line {number}: expected {len(METRICS_COLUMNS)} comma-separated cells "
            f"({','.join(METRICS_COLUMNS)}), found {len(cells)}: {','.join(cells)!r}"
        )
    row = {name: _parse_cell(path, number, name, cell.strip()) for name, cell in zip(METRICS_COLUMNS, cells)}
    step, learning_rate = row["step"], row["learning_rate"]
    if not (math.isfinite(step) and step >= 0 and step == int(step)):
        raise ValueError(f"{path} line {number}, column 'step': expected a whole number >= 0, found {cells[0]!r}")
    if not (math.isfinite(learning_rate) and learning_rate >= 0):
        raise ValueError(
            f"{path} line {number}, column 'learning_rate': expected a finite number >= 0, found {cells[3]!r}"
        )
    row["step"] = int(step)
    return row


def _parse_cell(path, number, name, cell):
    optional = name in _VALIDATION_COLUMNS
    if optional and not cell:
        return None
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
    names = _class_names(path, data.get("class_names"), run_dir.class_names_txt, len(matrix))
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


def _class_names(path, names, class_names_txt, classes):
    source = path
    if names is None:
        source = class_names_txt
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
