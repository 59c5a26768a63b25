"""keras_bit.fewshot: BiT's few-shot protocol on a tiny BiT (folder layout, summary numbers against each sub-run's
results.json, restart without retraining, a changed protocol refused, argument and CLI errors, a killed sub-run)."""

import csv
import json
import os
import statistics

import numpy as np
import pytest

import keras_bit
from helpers import TINY_BUILDER, Crash, folder_digests, learnable
from keras_bit.cli import main
from keras_bit.train.fewshot import check_protocol, sub_run, summarize

SHOTS, DRAWS = (1, 2), 2
SETTINGS = dict(steps=5, batch_size=8, resolution=(36, 32), checkpoint_every=5)  # one chunk, one backup


def _data():
    """`learnable()` with a third of the labels shuffled: accuracies differ between draws, so the std is not 0."""
    images, labels = learnable()
    labels[::3] = np.random.default_rng(0).permutation(labels[::3])
    return images, labels


def _protocol(folder, **kwargs):
    return keras_bit.fewshot(TINY_BUILDER, _data(), shots=SHOTS, draws=DRAWS, output_dir=folder, verbose=0,
                             **{**SETTINGS, **kwargs})


@pytest.fixture(scope="module")
def protocol(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fewshot") / "protocol"
    return folder, _protocol(folder)


def _results(folder, k, d):
    with open(sub_run(folder, k, d).results_json) as f:
        return json.load(f)


def test_protocol_layout_and_summary_match_the_sub_runs(protocol):
    folder, result = protocol
    assert sorted(os.listdir(folder)) == ["fewshot.csv", "fewshot.json", "fewshot.md", "fewshot.png", "k1", "k2"]
    for k in SHOTS:
        assert sorted(os.listdir(folder / f"k{k}")) == [f"draw{d}" for d in range(DRAWS)]
        for d in range(DRAWS):
            with open(sub_run(folder, k, d).run_json) as f:
                settings = json.load(f)
            assert (settings["examples_per_class"], settings["examples_per_class_seed"]) == (k, d)
    with open(folder / "fewshot.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["shots"]), int(r["draw"])) for r in rows] == [(k, d) for k in SHOTS for d in range(DRAWS)]
    for row in rows:
        expected = _results(folder, int(row["shots"]), int(row["draw"]))
        assert float(row["top1"]) == pytest.approx(expected["eval"]["accuracy"], abs=1e-6)
        assert float(row["loss"]) == pytest.approx(expected["eval"]["loss"], rel=1e-5)
        assert float(row["top5"]) == pytest.approx(expected["eval"]["top5_accuracy"], abs=1e-6)
        assert (int(row["examples"]), int(row["steps"])) == (expected["eval"]["examples"], expected["steps"])
    markdown = (folder / "fewshot.md").read_text()
    for k in SHOTS:
        values = [_results(folder, k, d)["eval"]["accuracy"] for d in range(DRAWS)]
        mean, std = statistics.mean(values), statistics.stdev(values)  # an independent sample std
        assert result.summary[k][0] == pytest.approx(mean) and result.summary[k][1] == pytest.approx(std)
        assert f"| {k} | {DRAWS} | {mean:.4f} ± {std:.4f} | {', '.join(f'{v:.4f}' for v in values)} |" in markdown
    assert any(result.summary[k][1] > 0 for k in SHOTS)  # draws differ: the std check can fail
    png = (folder / "fewshot.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


def test_restart_trains_nothing_again_and_report_rebuilds(protocol):
    folder, first = protocol
    before = {k: folder_digests(folder / f"k{k}") for k in SHOTS}
    again = _protocol(folder)
    assert {k: folder_digests(folder / f"k{k}") for k in SHOTS} == before
    assert again.rows == first.rows
    os.remove(folder / "fewshot.md")
    rebuilt = keras_bit.fewshot_report(folder)
    assert rebuilt.summary == first.summary and (folder / "fewshot.md").is_file()


@pytest.mark.parametrize("change, named", [
    (dict(draws=3), "draws=2 -> 3"),
    (dict(shots=(1, 5)), "shots=[1, 2] -> [1, 5]"),
    (dict(steps=6), "steps=5 -> 6"),
])
def test_a_changed_protocol_is_refused(protocol, change, named):
    folder, _ = protocol
    before = folder_digests(folder)
    kwargs = {"shots": SHOTS, "draws": DRAWS, **{k: v for k, v in change.items() if k in ("shots", "draws")}}
    settings = {**SETTINGS, **{k: v for k, v in change.items() if k not in kwargs}}
    with pytest.raises(ValueError, match="holds a few-shot protocol with other settings") as e:
        keras_bit.fewshot(TINY_BUILDER, _data(), kwargs["shots"], kwargs["draws"], folder, verbose=0, **settings)
    assert named in str(e.value)
    assert folder_digests(folder) == before


@pytest.mark.parametrize("kwargs, message", [
    (dict(shots=()), "`shots` must be a non-empty"),
    (dict(shots=5), "`shots` must be a non-empty"),
    (dict(shots=(1, 0)), "`shots` must be a non-empty"),
    (dict(shots=(1, 2.5)), "`shots` must be a non-empty"),
    (dict(shots=(5, 5)), "must not repeat"),
    (dict(draws=0), "`draws` must be a positive int"),
    (dict(draws=True), "`draws` must be a positive int"),
    (dict(examples_per_class=3), "examples_per_class: set by the few-shot protocol"),
    (dict(examples_per_class_seed=1), "examples_per_class_seed: set by the few-shot protocol"),
    (dict(config=keras_bit.FinetuneConfig(examples_per_class=2)), "`config` sets examples_per_class"),
])
def test_argument_errors(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        keras_bit.fewshot(TINY_BUILDER, learnable(), output_dir=tmp_path / "p", **kwargs)
    assert not (tmp_path / "p").exists()


def test_output_dir_among_shared_settings_is_refused(tmp_path):
    with pytest.raises(ValueError, match="output_dir: set by the few-shot protocol"):
        check_protocol((1,), 1, {"output_dir": tmp_path})


def test_summarize_against_statistics():
    rows = [dict(shots=1, top1=0.25), dict(shots=1, top1=0.5), dict(shots=1, top1=1.0), dict(shots=4, top1=0.75)]
    assert summarize(rows) == {1: (pytest.approx(statistics.mean([0.25, 0.5, 1.0])),
                                   pytest.approx(statistics.stdev([0.25, 0.5, 1.0])), 3), 4: (0.75, None, 1)}


def test_report_of_a_folder_without_protocol(tmp_path):
    with pytest.raises(ValueError, match="Not a few-shot protocol folder"):
        keras_bit.fewshot_report(tmp_path)


@pytest.mark.parametrize("argv, message", [
    (["--shots", "1", "1"], "keras-bit fewshot: error: `shots` must not repeat a value"),
    (["--shots", "0"], "keras-bit fewshot: error: argument --shots"),
    (["--draws", "x"], "keras-bit fewshot: error: argument --draws"),
    (["--steps", "3"], "keras-bit fewshot: error: `steps` must be >= 5"),
])
def test_cli_user_errors_are_one_line(tmp_path, capsys, argv, message):
    try:
        status = main(["fewshot", "--output-dir", str(tmp_path / "p"), *argv])
    except SystemExit as e:
        status = e.code
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and len(err.splitlines()) == 1


@pytest.mark.parametrize("flag", ["--examples-per-class", "--examples-per-class-seed"])
def test_cli_does_not_offer_the_protocols_flags(capsys, flag):
    with pytest.raises(SystemExit) as e:
        main(["fewshot", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert flag not in text and "--shots" in text and "(default: 3)" in text
    with pytest.raises(SystemExit) as e:
        main(["fewshot", flag, "1"])
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.slow
def test_a_killed_sub_run_resumes_and_matches_an_uninterrupted_protocol(tmp_path):
    settings = dict(shots=(1,), checkpoint_every=2)  # backups at steps 2 and 4
    reference = keras_bit.fewshot(TINY_BUILDER, learnable(), draws=DRAWS, output_dir=tmp_path / "whole", verbose=0,
                                  **{**SETTINGS, **settings})
    folder = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):  # in k1/draw1 (after draw0's 5 steps), past its backup at step 2
        keras_bit.fewshot(TINY_BUILDER, learnable(), draws=DRAWS, output_dir=folder, verbose=0,
                          callbacks=[Crash(after_batches=8)], **{**SETTINGS, **settings})
    finished = folder_digests(sub_run(folder, 1, 0))
    assert not os.path.exists(sub_run(folder, 1, 1).results_json) and os.listdir(sub_run(folder, 1, 1).backup_dir)
    result = keras_bit.fewshot(TINY_BUILDER, learnable(), draws=DRAWS, output_dir=folder, verbose=0,
                               **{**SETTINGS, **settings})
    assert folder_digests(sub_run(folder, 1, 0)) == finished
    for d in range(DRAWS):
        assert _results(folder, 1, d)["eval"] == _results(tmp_path / "whole", 1, d)["eval"]
    assert result.summary == reference.summary
