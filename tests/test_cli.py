import numpy as np
import pytest

from keras_bit.cli import generated_image, main


def test_demo_offline_falls_back_to_random_weights(monkeypatch, capsys):
    monkeypatch.setenv("KERAS_BIT_BASE_URL", "file:///no/such/mirror/")
    assert main(["demo", "--size", "64"]) == 0
    out = capsys.readouterr().out
    assert "Could not download file:///no/such/mirror/BiT-S-R50x1.npz" in out
    assert "model: BiT-S-R50x1 (25,549,352 parameters, random weights)" in out
    assert "input: [1, 64, 64, 3] -> 1000 classes" in out
    assert "top-5: class" in out
    assert "block outputs (strides 4/8/16/32): [[1, 16, 16, 256], [1, 8, 8, 512], [1, 4, 4, 1024], [1, 2, 2, 2048]]" in out


def test_generated_image_is_deterministic_rgb():
    a, b = generated_image(32), generated_image(32)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert a.std() > 20


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "none.npz"), str(tmp_path / "o.weights.h5"), "--model", "BiT-M-R50x1"]) == 2
    assert "keras-bit convert: error: `weights` file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", "a.npz", "b.weights.h5", "--model", "BiT-X-R50x1"])


def test_finetune_command_on_bundled_digits(tmp_path, capsys):
    """The README's main job, shortened: BiT-M-R50x1 on scikit-learn's digits, 5 steps."""
    out = tmp_path / "digits"
    argv = ["finetune", "--data", "sklearn:digits", "--steps", "5", "--batch-size", "8",
            "--resolution", "32", "--output-dir", str(out), "--seed", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "eval top-1 accuracy:" in printed and f"model: {out / 'model.keras'}" in printed
    assert (out / "model.keras").is_file() and (out / "class_names.txt").read_text().split() == [str(i) for i in range(10)]
    import json

    run = json.loads((out / "run.json").read_text())
    assert run["model"] == "BiT-M-R50x1" and run["schedule"] == [1, 2, 3, 4, 5] and run["resolution"] == [32, 32]
    assert run["data"] == "sklearn:digits" and run["train_examples"] == 1438


def test_finetune_command_rejects_bad_resolution(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--resolution", "1,2,3"])
