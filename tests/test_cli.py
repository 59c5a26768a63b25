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
    shapes = "[[1, 16, 16, 256], [1, 8, 8, 512], [1, 4, 4, 1024], [1, 2, 2, 2048]]"
    assert f"block outputs (strides 4/8/16/32): {shapes}" in out


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


@pytest.mark.slow
def test_finetune_command_on_bundled_digits(tmp_path, capsys):
    """The README's main job, shortened: BiT-M-R50x1 on scikit-learn's digits, 5 steps."""
    out = tmp_path / "digits"
    argv = ["finetune", "--data", "sklearn:digits", "--steps", "5", "--batch-size", "8",
            "--resolution", "32", "--output-dir", str(out), "--seed", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "eval top-1 accuracy:" in printed and f"model: {out / 'model.keras'}" in printed
    assert (out / "model.keras").is_file()
    assert (out / "class_names.txt").read_text().split() == [str(i) for i in range(10)]
    import json

    run = json.loads((out / "run.json").read_text())
    assert run["model"] == "BiT-M-R50x1" and run["schedule"] == [1, 2, 3, 4, 5] and run["resolution"] == [32, 32]
    assert run["data"] == "sklearn:digits" and run["train_examples"] == 1438


def test_finetune_command_rejects_bad_resolution(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--resolution", "1,2,3"])


@pytest.mark.parametrize("argv,message", [
    (["finetune", "--batch-size", "0"], "argument --batch-size: must be a positive integer, got 0"),
    (["finetune", "--checkpoint-every", "-3"], "argument --checkpoint-every: must be a positive integer, got -3"),
    (["finetune", "--steps", "x"], "argument --steps: must be a positive integer, got x"),
    (["finetune", "--model", "BiT-Q"], "argument --model: invalid choice: 'BiT-Q'"),
    (["finetune", "--mixup", "-1", "--steps", "5"], "`mixup` (MixUp alpha) must be a finite number >= 0"),
    (["finetune", "--trainable", "7", "--steps", "5"], "`trainable` must be \"all\""),
    (["finetune", "--output-dir", "", "--steps", "5"], "`output_dir` must be a non-empty path"),
    (["report", "/no/such/run"], "Run folder not found"),
])
def test_user_errors_are_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        status = main(argv)
        raise SystemExit(status)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"keras-bit {argv[0]}: error: ") and message in err[0], err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 512)", "(default: sklearn:digits)", "(default: bit_finetune)", "(default: all)",
                    "(default: 0.003 with --weights, 0.2 from random init)"):
        assert default in text, default


@pytest.mark.slow
def test_resume_mismatch_names_flags(tmp_path, capsys):
    out = tmp_path / "digits"
    base = ["finetune", "--data", "sklearn:digits", "--steps", "5", "--batch-size", "8", "--resolution", "32",
            "--output-dir", str(out), "--checkpoint-every", "1"]
    assert main(base) == 0
    capsys.readouterr()
    assert main(base[:-1] + ["2"] + ["--base-lr", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--base-lr 0.2 -> 0.5" in err[0] and "--checkpoint-every 1 -> 2" in err[0], err
    assert "choose a new --output-dir" in err[0]


@pytest.mark.slow
def test_report_command_redraws_the_summary(tmp_path, capsys):
    out = tmp_path / "digits"
    assert main(["finetune", "--steps", "5", "--batch-size", "8", "--resolution", "32", "--output-dir", str(out),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("eval top-1 accuracy:") and "step " not in printed  # --quiet: the result only
    (out / "summary.png").unlink()
    assert main(["report", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "summary.png") and (out / "summary.png").stat().st_size


@pytest.mark.slow
def test_console_has_no_tensorflow_noise(tmp_path):
    """The installed command: TensorFlow is imported (the error comes from finetune), yet stderr is one line."""
    import os
    import shutil
    import subprocess
    import sys

    beside = os.path.join(os.path.dirname(sys.executable), "keras-bit")  # this interpreter's, not another's
    command = beside if os.path.exists(beside) else shutil.which("keras-bit")
    if command is None:
        pytest.skip("the keras-bit console script is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run([command, "finetune", "--mixup", "nan", "--steps", "5"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "keras-bit finetune: error: `mixup` (MixUp alpha) must be a finite number >= 0. Received: mixup=nan"]


def test_demo_never_swaps_named_weights_for_random_ones(monkeypatch, capsys):
    monkeypatch.setenv("KERAS_BIT_BASE_URL", "file:///nonexistent/")
    assert main(["demo", "--model", "BiT-S-R50x1", "--weights", "imagenet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("keras-bit demo: error: Could not download")


@pytest.mark.parametrize("flag", ["--top=0", "--top=-3", "--size=0"])
def test_demo_counts_must_be_positive(flag, capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", flag])
    assert info.value.code == 2
    assert "keras-bit demo: error:" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["export", "model.keras", "--features", "--class-names", "names.txt"],
     "--class-names: not used by --features (a feature export has no classes)"),
    (["export", "model.keras", "--features", "--top", "3", "--activation", "softmax"],
     "--top, --activation softmax: not used by --features"),
    (["predict", "a.png", "--model", "m.onnx", "--save-features", "out.txt"],
     "--save-features must name a .npy file. Received: 'out.txt'"),
    (["predict", "a.png", "--model", "m.onnx", "--save-features", "missing/out.npy"],
     "--save-features missing/out.npy: folder"),
])
def test_feature_flag_errors_are_one_line_before_any_model_loads(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # nothing named exists there: the flags are refused first
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"keras-bit {argv[0]}: error: ") and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
