"""What a fine-tuning run records while it trains: metrics.csv, TensorBoard scalars, one console line per chunk.

`metrics.csv` has one row per chunk of steps (a Keras epoch), keyed by the
optimizer step at its end:

    step,loss,accuracy,learning_rate,val_loss,val_accuracy,val_top5_accuracy

`loss`/`accuracy` are the training means over the chunk, `learning_rate` the
schedule's value for the chunk's last update, and the `val_*` cells are empty
where no evaluation ran (every `eval_every` steps, and always at the end).
The file is rewritten atomically on every row, and a resumed run first drops
the rows of chunks that its backup does not cover, so each step appears once.
TensorBoard gets the same scalars against the step, in the runs `train` and
`validation` under `logs/`.
"""

import math
import os
import time

import keras

from keras_bit.backend import tensorflow as _tensorflow
from keras_bit.train.run_dir import METRICS_COLUMNS

tf = _tensorflow("Fine-tuning")

_TRAIN = ("loss", "accuracy")
_VAL = ("val_loss", "val_accuracy", "val_top5_accuracy")


def _rows_up_to(run_dir, step):
    """The rows of the run's metrics.csv up to `step` (a resumed run's); [] if it is absent, foreign or damaged."""
    try:
        return [row for row in run_dir.read_metrics() if row["step"] <= step]
    except (OSError, ValueError):
        return []


class RunLog(keras.callbacks.Callback):
    """Writes metrics.csv and TensorBoard scalars, and prints one line per chunk of steps.

    Args:
        run_dir: the run folder, a `keras_bit.train.run_dir.RunDir`.
        learning_rate: callable `step -> float` (the schedule, in optimizer steps).
        steps_per_epoch: optimizer steps per Keras epoch.
        total_steps: optimizer steps of the whole run (the last epoch may be shorter).
        start_step: the step this invocation starts from (a resumed run's backup).
        write: whether this process writes files (the chief).
        verbose: print the progress lines.
    """

    def __init__(self, run_dir, learning_rate, steps_per_epoch, total_steps, start_step=0, write=True,
                 verbose=True):
        super().__init__()
        self.run_dir = run_dir
        self.learning_rate = learning_rate
        self.steps_per_epoch = steps_per_epoch
        self.total = total_steps
        self.write = write
        self.verbose = verbose
        self.rows = _rows_up_to(run_dir, start_step) if write else []
        self.history = []
        self._writers = {}
        self._start = time.monotonic()

    def step_at_end(self, epoch):
        return min((epoch + 1) * self.steps_per_epoch, self.total)

    def on_train_begin(self, logs=None):
        self._start = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        step = self.step_at_end(epoch)
        row = {"step": step, "learning_rate": self.learning_rate(step - 1)}
        row.update({k: logs.get(k) for k in _TRAIN + _VAL})
        self.history.append(row)
        # The last chunk's line is printed by `finish`, with the final evaluation.
        self._emit(row, show=step < self.total)

    def finish(self, step, evaluation):
        """Adds the final evaluation to the row of `step` (written now if it is not there yet)."""
        row = next((r for r in self.history if r["step"] == step), None)
        if row is None:  # the run was already complete: nothing trained in this invocation
            row = {"step": step, "learning_rate": self.learning_rate(step - 1)}
            row.update({k: None for k in _TRAIN})
            for previous in self.rows:
                if previous["step"] == step:
                    row.update({k: previous[k] for k in _TRAIN})
            self.history.append(row)
        row.update(val_loss=evaluation["loss"], val_accuracy=evaluation["accuracy"],
                   val_top5_accuracy=evaluation["top5_accuracy"])
        self._emit(row)
        self.close()

    def close(self):
        for writer in self._writers.values():
            writer.close()
        self._writers = {}

    def _emit(self, row, show=True):
        if self.write:
            self.rows = [r for r in self.rows if r["step"] != row["step"]]
            self.rows.append({k: row.get(k) for k in METRICS_COLUMNS})
            self.run_dir.write_metrics(self.rows)
            self._write_scalars(row)
        if self.verbose and show:
            print(self._line(row), flush=True)

    def _writer(self, name):
        if name not in self._writers:
            self._writers[name] = tf.summary.create_file_writer(os.path.join(self.run_dir.logs_dir, name))
        return self._writers[name]

    def _write_scalars(self, row):
        for run, keys in (("train", _TRAIN + ("learning_rate",)), ("validation", _VAL)):
            values = {k.removeprefix("val_"): row.get(k) for k in keys if row.get(k) is not None}
            if values:
                with self._writer(run).as_default(step=row["step"]):
                    for name, value in values.items():
                        tf.summary.scalar(name, float(value))
                self._writer(run).flush()

    def _line(self, row):
        width = len(str(self.total))
        text = f"step {row['step']:>{width}}/{self.total}"
        if row.get("loss") is not None:
            text += f"  loss {row['loss']:.4f}  accuracy {row['accuracy']:.4f}"
        text += f"  lr {row['learning_rate']:.2e}"
        if row.get("val_accuracy") is not None:
            text += (f"  | eval loss {row['val_loss']:.4f}  top-1 {row['val_accuracy']:.4f}"
                     f"  top-5 {row['val_top5_accuracy']:.4f}")
        return text + f"  ({_duration(time.monotonic() - self._start)})"


def _duration(seconds):
    minutes, seconds = divmod(int(math.floor(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"
