"""One picture of a fine-tuning run: curves, learning rate and confusion matrix.

Reads a run folder through `keras_bit.train.run_dir.RunDir.load` (its
metrics.csv and results.json) and draws its summary.png. Only NumPy and
(optionally) matplotlib are used, never TensorFlow, so a run folder copied
off a GPU or TPU machine can be drawn anywhere.

Example:
    >>> from keras_bit.train import report
    >>> report.write_summary("runs/flowers")  # -> "runs/flowers/summary.png"
"""

import logging
import os

import numpy as np

from keras_bit.io import atomic_path
from keras_bit.train.run_dir import INSTALL_HINT, RunDir

logger = logging.getLogger("keras_bit")


def write_summary(run_dir, output=None):
    """Draws `run_dir/summary.png` (or `output`) if matplotlib is installed.

    Meant for the end of a fine-tuning run, where the picture is an extra:
    without matplotlib it is skipped with one logged line instead of failing
    the run. The file is replaced atomically, so an interrupted call never
    leaves a half-written PNG.

    Args:
        run_dir: str or path-like, the run's `output_dir`.
        output: where to write the PNG; default `run_dir/summary.png`.

    Returns:
        The path written, or None when matplotlib is not installed.

    Raises:
        ValueError: as `RunDir.load`, or `output` does not end in `.png`.

    Example:
        >>> write_summary("runs/flowers")
        'runs/flowers/summary.png'
    """
    try:
        return _write(run_dir, output)
    except ImportError:
        logger.warning("Skipped the run summary picture: matplotlib is not installed (%s draws it).", INSTALL_HINT)
        return None


def main(run_dir, output=None):
    """`keras-bit report RUN_DIR [--output PNG]`: draws the summary and returns its path.

    Unlike `write_summary`, a missing matplotlib is an error: the user asked
    for the picture.

    Raises:
        ValueError: a user error (`RunDir.load`'s, a bad `output`, or matplotlib
            missing, with the command that installs it).
    """
    try:
        return _write(run_dir, output)
    except ImportError as e:
        raise ValueError(f"`keras-bit report` needs matplotlib: {INSTALL_HINT}") from e


def _write(run_dir, output):
    run_dir = RunDir(run_dir)
    run = run_dir.load()
    path = run_dir.summary_png if output is None else os.fspath(output)
    if not path.lower().endswith(".png"):
        raise ValueError(f"`output` must be a .png path. Received: output={output!r}")
    figure = summary_figure(run)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as partial, open(partial, "wb") as f:
        figure.savefig(f, format="png")
    return path


def summary_figure(run):
    """The summary of `run` as a matplotlib `Figure` (Agg canvas, no pyplot state).

    Layout (1600x900 px): training/validation loss, accuracy (train top-1,
    validation top-1 and top-5) and learning rate (log scale) against the
    step, stacked on the left; the final confusion matrix on the right.

    Args:
        run: a `RunRecord` from `RunDir.load`.

    Returns:
        A `matplotlib.figure.Figure`; its axes carry the labels "loss",
        "accuracy", "learning_rate" and "confusion_matrix".

    Raises:
        ImportError: matplotlib is not installed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(16, 9), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)  # a private Agg canvas: the user's pyplot backend is untouched
    grid = figure.add_gridspec(3, 2, width_ratios=(1, 1.05))
    loss = figure.add_subplot(grid[0, 0], label="loss")
    accuracy = figure.add_subplot(grid[1, 0], sharex=loss, label="accuracy")
    learning_rate = figure.add_subplot(grid[2, 0], sharex=loss, label="learning_rate")
    confusion = figure.add_subplot(grid[:, 1], label="confusion_matrix")
    _plot_curves(run.metrics, loss, accuracy, learning_rate)
    if run.results is None:
        confusion.set_axis_off()
        confusion.text(0.5, 0.5, f"No final evaluation yet\n(no {RunDir.results_json_name}: the run is still going or "
                                 "was stopped)",
                       ha="center", va="center", fontsize=13, color="0.4", transform=confusion.transAxes)
    else:
        _plot_confusion(figure, confusion, run.results)
    figure.suptitle(_title(run), fontsize=14)
    return figure


def _title(run):
    name = _cut_middle(os.path.basename(os.path.normpath(os.path.abspath(run.run_dir))), 48)
    r = run.results
    if r is None:
        last = f" (last logged step {int(run.metrics['step'][-1])})" if run.rows else ""
        return f"{name}: no final evaluation yet{last}"
    top5 = "n/a" if r.top5_accuracy is None else f"{r.top5_accuracy:.1%}"
    return (f"{name}: final evaluation after {r.steps:,} steps on {r.examples:,} examples: "
            f"top-1 {r.accuracy:.1%}, top-5 {top5}, loss {r.loss:.3g}")


def _plot_curves(metrics, loss, accuracy, learning_rate):
    from matplotlib.ticker import PercentFormatter

    step = metrics["step"]
    _plot_training(loss, step, metrics["loss"], "training")
    _plot_validation(loss, step, metrics["val_loss"], "o", "C1", "validation")
    loss.set_ylabel("loss")
    _plot_training(accuracy, step, metrics["accuracy"], "training top-1")
    _plot_validation(accuracy, step, metrics["val_accuracy"], "o", "C1", "validation top-1")
    _plot_validation(accuracy, step, metrics["val_top5_accuracy"], "s", "C2", "validation top-5")
    accuracy.set_ylim(-0.02, 1.02)
    accuracy.yaxis.set_major_formatter(PercentFormatter(xmax=1))
    accuracy.set_ylabel("accuracy")
    _plot_learning_rate(learning_rate, step, metrics["learning_rate"])
    learning_rate.set_xlabel("optimizer step")
    for ax in (loss, accuracy, learning_rate):
        ax.grid(True, alpha=0.3)
        if not len(step):
            ax.text(0.5, 0.5, f"no rows in {RunDir.metrics_csv_name} yet", ha="center", va="center", color="0.4",
                    transform=ax.transAxes)
        elif ax.get_legend_handles_labels()[0]:
            # Above the panel, not inside it: curves fill every corner at some point.
            ax.legend(loc="lower left", bbox_to_anchor=(0, 1), ncol=4, fontsize=8.5, frameon=False,
                      borderaxespad=0.2, handlelength=1.6, columnspacing=1.0)
    for ax in (loss, accuracy):
        ax.tick_params(labelbottom=False)


def _plot_training(ax, step, values, label, smooth_above=60):
    if len(step) <= smooth_above:
        # A lone point is invisible as a line: give it a mark.
        ax.plot(step, values, marker="." if len(step) < 2 else None, color="C0", label=label)
        return
    # Hundreds of noisy chunk means hide the validation points: draw them faint, with a centred running mean on top.
    window = len(step) // 30
    ax.plot(step, values, color="C0", alpha=0.3, linewidth=0.8, label=label)
    kernel = np.ones(window) / window
    ax.plot(np.convolve(step, kernel, "valid"), np.convolve(values, kernel, "valid"), color="C0",
            label=f"running mean ({window} rows)")


def _plot_validation(ax, step, values, marker, color, label):
    present = ~np.isnan(values)
    if present.any():  # above the training curves, which may be dense
        ax.plot(step[present], values[present], marker=marker, markersize=5, color=color, label=label, zorder=3)


def _plot_learning_rate(ax, step, rate):
    ax.set_ylabel("learning rate")
    positive = rate > 0
    if not positive.any() or rate[positive].max() < 10 * rate[positive].min():
        ax.plot(step, rate, marker="." if len(step) < 2 else None, color="C3")
        return
    # BiT decays by 10x three times: only a log scale shows every phase. Zeros
    # (start of warm-up, after the last support) have no place on it, so they
    # are drawn as marks on the bottom edge.
    ax.set_yscale("log")
    ax.plot(step, np.where(positive, rate, np.nan), color="C3", label="schedule")
    if not positive.all():
        ax.plot(step[~positive], np.zeros(int((~positive).sum())), linestyle="none", marker="v", color="C3",
                markersize=6, clip_on=False, transform=ax.get_xaxis_transform(), label="0 (off the log scale)")


def _plot_confusion(figure, ax, results):
    counts = results.confusion_matrix
    classes = len(counts)
    from matplotlib.colors import PowerNorm
    from matplotlib.ticker import PercentFormatter

    normalised = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    # Square-root colours: a 2% confusion would be invisible on a linear scale.
    image = ax.imshow(normalised, cmap="Blues", norm=PowerNorm(0.5, vmin=0, vmax=1), interpolation="nearest")
    colorbar = figure.colorbar(image, ax=ax, shrink=0.8, format=PercentFormatter(xmax=1, decimals=0))
    colorbar.set_label("share of the true class (square-root colour scale)")
    colorbar.set_ticks([0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if classes > 30:
        # Names and counts would be unreadable: class indices every few rows instead.
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(10, integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(10, integer=True))
        ax.set_title(f"Confusion matrix: {classes} classes, shown by index (too many for names and counts)",
                     fontsize=11)
        return
    labels = _tick_labels(results.class_names)
    ax.set_xticks(range(classes), labels, rotation=45 if classes > 3 else 0, ha="right" if classes > 3 else "center",
                  rotation_mode="anchor", fontsize=9 if classes <= 15 else 7)
    ax.set_yticks(range(classes), labels, fontsize=9 if classes <= 15 else 7)
    with_counts = classes <= 15
    if with_counts:
        size = 12 if classes <= 6 else 10 if classes <= 10 else 8
        dark = image.norm(normalised) > 0.6  # where black text would not stand out
        for (i, j), count in np.ndenumerate(counts):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=size, color="white" if dark[i, j] else "black")
    ax.set_title("Confusion matrix (colour: share of the true class" + ("; text: counts)" if with_counts else ")"),
                 fontsize=11)


def _tick_labels(names, limit=20):
    """Names cut to `limit` characters, prefixed with the class index where cutting makes two equal."""
    short = [_cut_middle(n, limit) for n in names]
    if len(set(short)) < len(short):
        short = [f"{i}: " + _cut_middle(n, limit - len(f"{i}: "), keep_end=False) for i, n in enumerate(names)]
    return short


def _cut_middle(text, limit, keep_end=True):
    # The ends of names tell them apart more often than their middles do.
    if len(text) <= limit:
        return text
    tail = limit // 2 if keep_end else 0
    return text[: limit - 1 - tail] + "\u2026" + text[len(text) - tail:]
