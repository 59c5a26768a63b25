import builtins
import functools
import json
import logging
import operator
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from keras_bit.train import report
from keras_bit.train.run_dir import RunDir

HEADER = "step,loss,accuracy,learning_rate,val_loss,val_accuracy,val_top5_accuracy"
ROWS = 22  # one row per 10 steps; validation every 5 rows and at the last
BASE_LR = 0.003


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Overrides the conftest's Keras reset: report.py never touches Keras, and the reset's
    garbage collection costs half a second per test."""
    yield


def _bit_lr(step, supports=(44, 88, 132, 176, 220)):
    """The BiT schedule scaled to 220 steps, written out independently of hyperrule.py."""
    if step < supports[0]:
        return BASE_LR * step / supports[0]
    if step >= supports[-1]:
        return 0.0
    return BASE_LR / 10 ** sum(s < step for s in supports[1:4])


def _metrics_lines(seed=0, rows=ROWS):
    rng = np.random.default_rng(seed)
    lines = [HEADER]
    for i in range(1, rows + 1):
        step = 10 * i
        loss = 2.5 * np.exp(-step / 60) + 0.1 + 0.05 * rng.random()
        acc = min(1.0, 0.3 + 0.6 * (1 - np.exp(-step / 50)) + 0.02 * rng.random())
        val = ["", "", ""]
        if i % 5 == 0 or i == rows:
            val = [f"{loss + 0.1:.4f}", f"{acc - 0.05:.4f}", f"{min(1.0, acc + 0.08):.4f}"]
        lines.append(",".join([str(step), f"{loss:.4f}", f"{acc:.4f}", repr(_bit_lr(step)), *val]))
    return lines


def _results(classes, seed=0, long_names=False):
    rng = np.random.default_rng(seed)
    # Mostly right, with a few confusions: what a fine-tuned model gives.
    confusions = rng.integers(1, 4, size=(classes, classes)) * (rng.random((classes, classes)) < 3 / classes)
    matrix = confusions * (1 - np.eye(classes, dtype="int64")) + np.diag(rng.integers(15, 30, size=classes))
    names = [f"class {i}" for i in range(classes)]
    if long_names:  # names that differ only after their first 20 characters, as species names do
        names = [f"Amanita {'muscaria' if i % 2 else 'phalloides'} var. number {i} (long)" for i in range(classes)]
    return {
        "steps": 10 * ROWS,
        "eval": {
            "loss": 0.41,
            "accuracy": round(float(np.trace(matrix) / matrix.sum()), 4),
            "top5_accuracy": 0.991,
            "examples": int(matrix.sum()),
        },
        "confusion_matrix": matrix.tolist(),
        "class_names": names,
        "model": "BiT-M-R50x1",  # other keys are ignored
    }


def _run(path, classes=3, seed=0, long_names=False, results=True, lines=None):
    os.makedirs(path, exist_ok=True)
    lines = _metrics_lines(seed) if lines is None else lines
    with open(os.path.join(path, "metrics.csv"), "w") as f:
        f.write("".join(line + "\n" for line in lines))
    if results:
        data = _results(classes, seed, long_names) if results is True else results
        with open(os.path.join(path, "results.json"), "w") as f:
            json.dump(data, f, indent=2)
    return str(path)


def _pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype="float64")


def _axes(figure):
    return {ax.get_label(): ax for ax in figure.axes}


def test_three_class_summary_is_a_real_picture(tmp_path):
    run = _run(tmp_path / "run")
    path = report.write_summary(run)
    assert path == os.path.join(run, "summary.png")
    pixels = _pixels(path)
    assert pixels.shape == (900, 1600, 3)
    assert pixels.std() > 20  # not a blank page
    assert sorted(os.listdir(run)) == ["metrics.csv", "results.json", "summary.png"]  # no temporary file left


def test_three_class_figure_contents(tmp_path):
    run = RunDir(_run(tmp_path / "run")).load()
    axes = _axes(report.summary_figure(run))
    # Validation is drawn only where it ran: rows 5, 10, 15, 20 and the last (22).
    val_lines = [line for line in axes["loss"].get_lines() if line.get_label() == "validation"]
    np.testing.assert_array_equal(val_lines[0].get_xdata(), [50, 100, 150, 200, 220])
    lr = axes["learning_rate"]
    assert lr.get_yscale() == "log"
    zero_marks = [line for line in lr.get_lines() if line.get_label().startswith("0 ")]
    np.testing.assert_array_equal(zero_marks[0].get_xdata(), [220])  # the schedule is over at the last step
    image = axes["confusion_matrix"].images[0]
    counts = run.results.confusion_matrix
    np.testing.assert_allclose(image.get_array(), counts / counts.sum(axis=1, keepdims=True))  # row-normalised
    np.testing.assert_allclose(image.norm([0.0, 0.04, 0.25, 1.0]), [0.0, 0.2, 0.5, 1.0])  # square-root colours
    cells = sorted(int(t.get_text()) for t in axes["confusion_matrix"].texts)
    assert cells == sorted(run.results.confusion_matrix.ravel().tolist())
    ticks = [t.get_text() for t in axes["confusion_matrix"].get_yticklabels()]
    assert ticks == ["class 0", "class 1", "class 2"]


def test_long_runs_get_a_running_mean(tmp_path):
    rng = np.random.default_rng(0)
    lines = [HEADER] + [f"{10 * i},{rng.random():.4f},{rng.random():.4f},0.001,,," for i in range(1, 301)]
    lines[-1] = lines[-1][:-3] + ",0.5,0.8,0.9"
    run = RunDir(_run(tmp_path / "run", lines=lines)).load()
    lines_by_label = {line.get_label(): line for line in _axes(report.summary_figure(run))["loss"].get_lines()}
    mean = lines_by_label["running mean (10 rows)"]  # 300 rows / 30
    loss = run.metrics["loss"]
    np.testing.assert_allclose(mean.get_ydata()[[0, -1]], [loss[:10].mean(), loss[-10:].mean()])
    np.testing.assert_array_equal(mean.get_xdata()[[0, -1]], [55, 2955])  # centred on its window
    assert len(lines_by_label["training"].get_xdata()) == 300


def test_fifty_classes_long_names(tmp_path):
    run_dir = _run(tmp_path / "run", classes=50, long_names=True)
    axes = _axes(report.summary_figure(RunDir(run_dir).load()))
    confusion = axes["confusion_matrix"]
    assert len(confusion.texts) == 0
    shown = [tick for tick in confusion.get_xticks() if -0.5 <= tick <= 49.5]
    assert shown == list(range(0, 50, 5))  # class indices, not names
    assert not any("Amanita" in t.get_text() for t in confusion.get_xticklabels() + confusion.get_yticklabels())
    assert "50 classes" in confusion.get_title()
    pixels = _pixels(report.write_summary(run_dir))
    assert pixels.shape == (900, 1600, 3) and pixels.std() > 20


def test_twenty_classes_get_shortened_names_without_counts(tmp_path):
    run = RunDir(_run(tmp_path / "run", classes=20, long_names=True)).load()
    confusion = _axes(report.summary_figure(run))["confusion_matrix"]
    labels = [t.get_text() for t in confusion.get_yticklabels()]
    assert len(set(labels)) == 20 and all(len(name) <= 20 for name in labels)  # cut short, yet told apart
    assert labels[7] == "Amanita m\u2026r 7 (long)"  # cut in the middle: the ends differ
    assert len(confusion.texts) == 0


def test_names_differing_only_in_the_middle_get_their_index(tmp_path):
    results = _results(12)
    results["class_names"] = [f"Amanita species {i:02d} of a long-named genus" for i in range(12)]
    run = RunDir(_run(tmp_path / "run", results=results)).load()
    labels = [t.get_text() for t in _axes(report.summary_figure(run))["confusion_matrix"].get_xticklabels()]
    assert len(set(labels)) == 12 and all(len(name) <= 20 for name in labels)
    assert labels[0].startswith("0: Amanita") and labels[11].startswith("11: Amanita")


def test_same_data_same_pixels_different_data_different_pixels(tmp_path):
    a = _pixels(report.write_summary(_run(tmp_path / "a", seed=0)))
    a_again = _pixels(report.write_summary(_run(tmp_path / "a_again", seed=0)))
    b = _pixels(report.write_summary(_run(tmp_path / "b", seed=1)))
    # The run folder's name is in the title; compare below it.
    np.testing.assert_array_equal(a[60:], a_again[60:])
    assert np.abs(a - b).mean() > 0.5


def test_load_reads_the_values(tmp_path):
    run = RunDir(_run(tmp_path / "run")).load()
    assert run.rows == ROWS
    np.testing.assert_array_equal(run.metrics["step"], np.arange(10, 10 * ROWS + 1, 10))
    assert run.metrics["learning_rate"][3] == pytest.approx(0.003 * 40 / 44)  # warm-up
    assert run.metrics["learning_rate"][9] == pytest.approx(0.003 / 10)  # step 100: after one decay
    has_val = ~np.isnan(run.metrics["val_accuracy"])
    np.testing.assert_array_equal(np.flatnonzero(has_val), [4, 9, 14, 19, 21])
    matrix = np.array(_results(3)["confusion_matrix"])
    assert run.results.accuracy == pytest.approx(np.trace(matrix) / matrix.sum(), abs=1e-4)
    assert run.results.steps == 220 and run.results.top5_accuracy == 0.991 and run.results.examples == matrix.sum()
    assert run.results.confusion_matrix.shape == (3, 3) and run.results.class_names == ["class 0", "class 1", "class 2"]


def test_run_without_results_draws_curves_and_a_note(tmp_path):
    run_dir = _run(tmp_path / "run", results=False, lines=_metrics_lines()[:14])  # stopped after step 130
    run = RunDir(run_dir).load()
    assert run.results is None and run.rows == 13
    figure = report.summary_figure(run)
    assert "no final evaluation yet (last logged step 130)" in figure._suptitle.get_text()
    confusion = _axes(figure)["confusion_matrix"]
    assert not confusion.axison and "No final evaluation yet" in confusion.texts[0].get_text()
    # Before the schedule ends no rate is 0: no marks below the log scale.
    assert [line.get_label() for line in _axes(figure)["learning_rate"].get_lines()] == ["schedule"]
    pixels = _pixels(report.write_summary(run_dir))
    assert pixels.shape == (900, 1600, 3) and pixels.std() > 20


def test_results_without_rows_still_draw(tmp_path):
    run_dir = _run(tmp_path / "run", lines=[HEADER])
    run = RunDir(run_dir).load()
    assert run.rows == 0 and run.results.steps == 220
    assert "no rows in metrics.csv yet" in _axes(report.summary_figure(run))["loss"].texts[0].get_text()


@pytest.mark.parametrize("lines", [[], [HEADER]], ids=["empty file", "header only"])
def test_nothing_to_report_yet(tmp_path, lines):
    run_dir = _run(tmp_path / "run", results=False, lines=lines)
    with pytest.raises(ValueError, match="Nothing to report yet .*metrics.csv has no rows and there is no results"):
        report.main(run_dir)


def test_resumed_run_keeps_the_latest_rows(tmp_path):
    lines = _metrics_lines()
    # Killed after step 70, resumed from the backup at step 50: steps 60 and 70 are logged again.
    resumed = lines[:8] + [line.replace(",0.", ",0.9", 1) for line in lines[6:]]
    run = RunDir(_run(tmp_path / "run", lines=resumed)).load()
    np.testing.assert_array_equal(run.metrics["step"], np.arange(10, 221, 10))
    assert run.metrics["loss"][5] == float(resumed[8].split(",")[1])  # step 60 from the resumed run


def test_unterminated_last_row_of_a_live_run_is_ignored(tmp_path, caplog):
    run_dir = _run(tmp_path / "run", results=False)
    with open(os.path.join(run_dir, "metrics.csv"), "a") as f:
        f.write("230,0.12")  # the writer is mid-row
    with caplog.at_level(logging.WARNING, logger="keras_bit"):
        run = RunDir(run_dir).load()
    assert run.rows == ROWS and "unterminated last line 24" in caplog.text
    with open(os.path.join(run_dir, "metrics.csv"), "a") as f:
        f.write("\n")  # the same row, finished with a newline, is corrupt
    with pytest.raises(ValueError, match=r"metrics.csv line 24: expected 7 comma-separated cells"):
        RunDir(run_dir).load()


def _replace_line(number, text):
    lines = _metrics_lines()
    lines[number - 1] = text
    return lines


@pytest.mark.parametrize(
    "lines,message",
    [
        (_replace_line(1, "epoch,loss,accuracy"), r"line 1: expected the header 'step,loss,accuracy,learning_rate,"),
        (_replace_line(4, "30,0.5,0.5,0.001,,"), r"line 4: expected 7 comma-separated cells .* found 6"),
        (_replace_line(5, "40,abc,0.5,0.001,,,"), r"line 5, column 'loss': expected a number, found 'abc'"),
        (_replace_line(5, "40,,0.5,0.001,,,"), r"line 5, column 'loss': expected a number, found ''"),
        (_replace_line(6, "50,0.5,0.5,0.001,x,0.5,0.9"), r"line 6, column 'val_loss': expected a number or an empty"),
        (_replace_line(3, "20.5,0.5,0.5,0.001,,,"), r"line 3, column 'step': expected a whole number >= 0"),
        (_replace_line(3, "-20,0.5,0.5,0.001,,,"), r"line 3, column 'step': expected a whole number >= 0"),
        (_replace_line(3, "20,0.5,0.5,-0.001,,,"), r"line 3, column 'learning_rate': expected a finite number >= 0"),
        (_replace_line(3, "20,0.5,87.5,0.001,,,"), r"line 3, column 'accuracy': expected a fraction in \[0, 1\]"),
        (_replace_line(11, "100,0.5,0.5,0.001,0.5,0.5,1.5"), r"line 11, column 'val_top5_accuracy': expected a"),
    ],
    ids=["header", "cell count", "text", "empty loss", "bad val", "fractional step", "negative step", "negative lr",
         "percent accuracy", "top5 > 1"],
)
def test_malformed_metrics_name_the_file_and_line(tmp_path, lines, message):
    run_dir = _run(tmp_path / "run", lines=lines)
    with pytest.raises(ValueError, match=r"metrics\.csv " + message):
        RunDir(run_dir).load()


def test_undecodable_bytes_name_the_line(tmp_path):
    run_dir = _run(tmp_path / "run")
    with open(os.path.join(run_dir, "metrics.csv"), "r+b") as f:
        f.seek(len(HEADER) + 1 + len(_metrics_lines()[1]) + 1 + 3)  # line 3, inside the loss cell
        f.write(b"\xff")
    with pytest.raises(ValueError, match=r"metrics\.csv line 3, column 'loss': expected a number"):
        RunDir(run_dir).load()


def test_a_diverged_loss_is_data_not_an_error(tmp_path):
    run = RunDir(_run(tmp_path / "run", lines=_replace_line(23, "220,nan,0.1,0.0,nan,0.1,0.5"))).load()
    assert np.isnan(run.metrics["loss"][-1]) and np.isnan(run.metrics["val_loss"][-1])
    assert run.metrics["val_accuracy"][-1] == 0.1


_DROP = object()


def _broken_results(*where, value=_DROP):
    """`_results(3)` with the item at the key path `where` replaced by `value`, or deleted."""
    data = _results(3)
    *parents, last = where
    target = functools.reduce(operator.getitem, parents, data)
    if value is _DROP:
        del target[last]
    else:
        target[last] = value
    return data


@pytest.mark.parametrize(
    "results,message",
    [
        (_broken_results("confusion_matrix", -1), r"'confusion_matrix' row 0: expected 2 counts"),
        (_broken_results("confusion_matrix", 1, -1), r"'confusion_matrix' row 1: expected 3 counts .* found 2"),
        (_broken_results("class_names", -1), r"2 class names for a 3x3 confusion matrix; expected 3"),
        (_broken_results("confusion_matrix", 2, 0, value=-1), r"row 2: expected whole-number counts"),
        (_broken_results("confusion_matrix", 2, 0, value=1.5), r"row 2: expected whole-number counts"),
        (_broken_results("confusion_matrix", value=[]), r"'confusion_matrix' to be a non-empty square"),
        (_broken_results("eval"), r"expected 'eval' to be an object, found None"),
        (_broken_results("steps"), r"expected 'steps' to be a whole number, found None"),
        (_broken_results("eval", "accuracy", value=87.3), r"'eval.accuracy' to be a fraction in \[0, 1\]"),
        (_broken_results("eval", "examples", value="88"), r"'eval.examples' to be a whole number"),
        (_broken_results("class_names", value=[1, 2, 3]), r"'class_names' to be a list of strings"),
        ([1, 2], r"expected a JSON object, found list"),
    ],
    ids=["rows", "row length", "names", "negative count", "float count", "empty", "no eval", "no steps",
         "percent accuracy", "string examples", "int names", "not an object"],
)
def test_malformed_results_name_the_file_and_key(tmp_path, results, message):
    run_dir = _run(tmp_path / "run", results=results)
    with pytest.raises(ValueError, match=r"results\.json: .*" + message):
        RunDir(run_dir).load()


def test_results_that_are_not_json_name_the_line(tmp_path):
    run_dir = _run(tmp_path / "run")
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        f.write('{\n  "steps": 220,\n  "eval": {"loss": 0.4,,}\n}\n')
    with pytest.raises(ValueError, match=r"results\.json line 3: not valid JSON"):
        RunDir(run_dir).load()


def test_class_names_fall_back_to_class_names_txt(tmp_path):
    results = _results(3)
    del results["class_names"]
    run_dir = _run(tmp_path / "run", results=results)
    assert RunDir(run_dir).load().results.class_names == ["0", "1", "2"]
    with open(os.path.join(run_dir, "class_names.txt"), "w") as f:
        f.write("cat\ndog\nbird\n")
    assert RunDir(run_dir).load().results.class_names == ["cat", "dog", "bird"]
    with open(os.path.join(run_dir, "class_names.txt"), "w") as f:
        f.write("cat\ndog\n")
    with pytest.raises(ValueError, match=r"class_names\.txt: 2 class names for a 3x3 confusion matrix"):
        RunDir(run_dir).load()


def test_not_a_run_folder(tmp_path):
    with pytest.raises(ValueError, match="Run folder not found: .*missing"):
        report.main(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"Not a fine-tuning run folder: .*empty' \(no metrics\.csv\)"):
        report.main(tmp_path / "empty")


def test_output_path(tmp_path):
    run_dir = _run(tmp_path / "run")
    output = tmp_path / "pictures" / "flowers.png"  # a folder that does not exist yet
    assert report.main(run_dir, output=output) == str(output)
    assert _pixels(output).shape == (900, 1600, 3) and not os.path.exists(os.path.join(run_dir, "summary.png"))
    with pytest.raises(ValueError, match=r"`output` must be a \.png path. Received: output='summary\.pdf'"):
        report.main(run_dir, output="summary.pdf")


def _without_matplotlib(monkeypatch):
    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing_import)


def test_missing_matplotlib(tmp_path, monkeypatch, caplog):
    run_dir = _run(tmp_path / "run")
    _without_matplotlib(monkeypatch)
    with caplog.at_level(logging.INFO, logger="keras_bit"):
        assert report.write_summary(run_dir) is None
    # One line, at a level Python shows without any logging set-up.
    assert len(caplog.records) == 1 and "\n" not in caplog.records[0].getMessage()
    assert caplog.records[0].levelno == logging.WARNING
    assert "Skipped the run summary picture" in caplog.text and "pip install 'keras-bit[report]'" in caplog.text
    with pytest.raises(ValueError, match=r"needs matplotlib: pip install 'keras-bit\[report\]'"):
        report.main(run_dir)
    assert sorted(os.listdir(run_dir)) == ["metrics.csv", "results.json"]


def test_a_failed_write_leaves_the_previous_picture(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    run_dir = _run(tmp_path / "run")
    path = report.write_summary(run_dir)
    before = _pixels(path)

    def interrupted_savefig(self, f, **kwargs):
        f.write(b"\x89PNG half a picture")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", interrupted_savefig)
    with pytest.raises(KeyboardInterrupt):
        report.write_summary(run_dir)
    np.testing.assert_array_equal(_pixels(path), before)
    assert sorted(os.listdir(run_dir)) == ["metrics.csv", "results.json", "summary.png"]


def test_report_module_imports_neither_tensorflow_nor_keras():
    # Loaded by file path, io and run_dir first under their package names, so that keras_bit/__init__.py
    # (which does import Keras) stays out of it.
    from keras_bit import io
    from keras_bit.train import run_dir

    code = (
        "import importlib.util, sys\n"
        "def load(name, path):\n"
        "    spec = importlib.util.spec_from_file_location(name, path)\n"
        "    module = sys.modules[name] = importlib.util.module_from_spec(spec)\n"
        "    spec.loader.exec_module(module)\n"
        f"load('keras_bit.io', {io.__file__!r})\n"
        f"load('keras_bit.train.run_dir', {run_dir.__file__!r})\n"
        f"load('report', {report.__file__!r})\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'matplotlib')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
