"""`keras-bit predict` and `keras-bit export`: every file reported, bad ones named, never a traceback."""

import json
import os
import subprocess

import numpy as np
import pytest

from helpers import EXPORT_CLASSES, encode, export_classifier, keras_probabilities, uint8_images
from keras_bit import cli


def main(argv):
    """`keras-bit` as the shell runs it: the exit status, whether argparse or the command ends it."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A fine-tuning run's outputs: model.keras and class_names.txt."""
    folder = tmp_path_factory.mktemp("run")
    export_classifier(folder).save(folder / "model.keras")
    (folder / "class_names.txt").write_text("\n".join(EXPORT_CLASSES) + "\n")
    return folder


@pytest.fixture
def photos(tmp_path, rng):
    """Three good images (PNG, WebP, BMP; two sizes) and their pixels."""
    folder = tmp_path / "photos"
    folder.mkdir()
    images = {"a.png": uint8_images(rng, 1, 70, 50)[0], "b.webp": uint8_images(rng, 1, 70, 50)[0],
              "c.bmp": uint8_images(rng, 1, 33, 90)[0]}
    for name, image in images.items():
        fmt = {"png": "PNG", "webp": "WEBP", "bmp": "BMP"}[name.split(".")[1]]
        (folder / name).write_bytes(encode(image, fmt, **({"lossless": True} if fmt == "WEBP" else {})))
    return folder, images


def _expected(run_dir, images):
    import keras

    model = keras.saving.load_model(run_dir / "model.keras")
    return {name: keras_probabilities(model, image[None])[0] for name, image in images.items()}


def test_export_then_predict_with_every_model_kind(run_dir, photos, tmp_path, capsys):
    for module in ("tf2onnx", "onnxruntime"):  # the ONNX writer and runtime: the `export` extra
        pytest.importorskip(module, reason=f"{module} is not installed (pip install 'keras-bit[export]')")
    folder, images = photos
    expected = _expected(run_dir, images)
    keras_file, names = str(run_dir / "model.keras"), str(run_dir / "class_names.txt")
    assert main(["export", keras_file, "--export-dir", str(tmp_path / "sm"), "--name", "tiny", "--class-names",
                 names, "--top", "2"]) == 0
    saved = str(tmp_path / "sm" / "tiny" / "1")
    assert capsys.readouterr().out.strip() == saved
    assert main(["export", keras_file, "--format", "onnx", "--output", str(tmp_path / "m.onnx"),
                 "--class-names", names]) == 0
    capsys.readouterr()
    for source in (saved, keras_file, str(tmp_path / "m.onnx")):
        assert main(["predict", str(folder), "--model", source, "--top", "2", "--json"]) == 0, source
        report = json.loads(capsys.readouterr().out)
        assert [os.path.basename(r["image"]) for r in report] == sorted(images)  # the folder, expanded
        for row in report:
            probabilities = expected[os.path.basename(row["image"])]
            best = np.argsort(-probabilities)[:2]
            assert [e["index"] for e in row["top"]] == best.tolist()
            assert [e["label"] for e in row["top"]] == [EXPORT_CLASSES[i] for i in best]
            np.testing.assert_allclose([e["score"] for e in row["top"]], probabilities[best], atol=1e-4)


def test_a_bad_file_is_named_and_the_others_still_get_results(run_dir, photos, tmp_path, capsys):
    folder, _ = photos
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (tmp_path / "notes.txt").write_text("hello")
    truncated = (folder / "a.png").read_bytes()[:200]
    (tmp_path / "truncated.png").write_bytes(truncated)
    (tmp_path / "empty").mkdir()
    files = [str(folder / "a.png"), str(tmp_path / "corrupt.jpg"), str(tmp_path / "missing.png"),
             str(tmp_path / "notes.txt"), str(tmp_path / "truncated.png"), str(tmp_path / "empty"),
             str(folder / "c.bmp")]
    assert main(["predict", *files, "--model", str(run_dir / "model.keras")]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("keras-bit predict: error: ")]
    assert [line.split(": ")[2] for line in errors] == files[1:6]
    assert "No such file or directory" in errors[1] and "no .jpg/" in errors[4]
    assert out.splitlines()[0] == files[0] and files[-1] in out  # the good ones, in order
    assert main(["predict", str(folder / "a.png"), "--model", str(run_dir / "model.keras"), "--max-pixels", "100"]) == 1
    assert "50x70 image is over max_pixels=100" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--top", "0"], "argument --top: must be a positive integer, got 0"),
    (["--top", "-3"], "argument --top: must be a positive integer, got -3"),
    (["--model", "missing/model.keras"], "Model not found: missing/model.keras"),
    (["--model", "nothing.onnx"], "No exported model at nothing.onnx"),
    (["--model", "{tmp}"], "is a folder but not a SavedModel"),
    (["--model", "BiT-Q-R50x1"], "BiT-Q-R50x1"),
])
def test_predict_usage_errors_are_one_line(photos, tmp_path, capsys, argv, message):
    folder, _ = photos
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    argv = argv if "--model" in argv else argv + ["--model", "BiT-S-R50x1"]
    assert main(["predict", str(folder / "a.png"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("keras-bit predict: error: ") and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("argv, message", [
    (["--version", "-1"], "argument --version: must be a positive integer, got -1"),
    (["--name", "../escape"], "`name` must be a plain name"),
    (["--format", "onnx", "--quantization", "int8"],
     "--quantization int8 (only with --format litert): not used by --format onnx"),
    (["--format", "litert", "--quantization", "bfloat16"],
     "--quantization bfloat16 (only with --format tf_saved_model): not used by --format litert"),
    (["--format", "onnx", "--max-pixels", "100"], "--max-pixels: not used by --format onnx"),
    (["--quantization", "float16"],
     "--quantization float16 (only with --format litert): not used by --format tf_saved_model"),
    (["--overwrite"], "--overwrite (TF Serving versions are never overwritten; a new version is written)"),
    (["--format", "onnx", "--version", "2"], "--export-dir, --version: not used by --format onnx"),
    (["--output", "{tmp}/x.onnx", "--format", "onnx", "--name", "y"], "--name (the name is --output's)"),
    (["--format", "litert", "--representative-data", "{tmp}"], "--representative-data (only with --quantization"),
    (["--format", "litert", "--quantization", "int8"], "quantization='int8' needs `representative_data`"),
    (["--format", "litert", "--quantization", "int8", "--representative-data", "nowhere"],
     "--representative-data must be a folder of images"),
    (["--format", "tflite"], "argument --format: invalid choice: 'tflite'"),
    (["--output", "{tmp}/x.onnx", "--format", "litert"], r"A litert export is a '.tflite' file"),
])
def test_export_usage_errors_are_one_line(run_dir, tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--output" not in argv and "--format" not in argv or "--version" in argv:
        argv += ["--export-dir", str(tmp_path / "sm")]
    before = sorted(os.listdir(tmp_path))
    assert main(["export", str(run_dir / "model.keras"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("keras-bit export: error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(os.listdir(tmp_path)) == before and not os.path.exists(tmp_path.parent / "escape")


def test_int8_export_calibrates_on_a_folder(run_dir, photos, tmp_path, capsys):
    pytest.importorskip("ai_edge_litert")
    folder, _ = photos
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    output = str(tmp_path / "int8.tflite")
    assert main(["export", str(run_dir / "model.keras"), "--format", "litert", "--quantization", "int8",
                 "--representative-data", str(folder), "--output", output]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == output and f"skipping {folder / 'broken.png'}" in err
    assert main(["export", str(run_dir / "model.keras"), "--format", "litert", "--output", output]) == 2
    assert "already exist" in capsys.readouterr().err
    assert main(["predict", str(folder / "a.png"), "--model", output, "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["top"]) == 5


def test_convert_refuses_to_overwrite(tmp_path, capsys):
    from helpers import tiny_checkpoint

    tiny_checkpoint(tmp_path / "t.npz")
    out = tmp_path / "out.weights.h5"
    out.write_bytes(b"keep me")
    assert main(["convert", str(tmp_path / "t.npz"), str(out), "--model", "BiT-M-R50x1"]) == 2
    assert "already exists; pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"


def test_help_shows_the_library_defaults(capsys):
    from keras_bit.export import DEFAULT_MAX_PIXELS

    texts = {}
    for command in ("export", "predict"):
        assert main([command, "--help"]) == 0
        texts[command] = " ".join(capsys.readouterr().out.split())
        assert f"(default: {DEFAULT_MAX_PIXELS})" in texts[command], command
    assert "artifact format (default: tf_saved_model)" in texts["export"]
    assert "./<name>.<ext> otherwise --export-dir" in texts["export"]  # no second "(default: None)" after it


# --- Hostile and careless inputs (issue 22): one line naming the file, exit 2, through the installed command. ---


@pytest.fixture(scope="module")
def odd_models(run_dir, tmp_path_factory):
    """.keras files that are not what `predict` / `export` need, a corrupt export, labels files, an image."""
    import keras

    from helpers import tiny_model

    folder = tmp_path_factory.mktemp("odd")
    classifier = keras.saving.load_model(run_dir / "model.keras")
    tiny_model(include_top=False, pooling="avg").save(folder / "features.keras")
    keras.Model(classifier.input, [classifier.output, classifier.output]).save(folder / "two_outputs.keras")
    keras.Model(classifier.input, keras.layers.Identity()(classifier.output)).save(folder / "identity.keras")
    data = (run_dir / "model.keras").read_bytes()
    (folder / "truncated.keras").write_bytes(data[:len(data) // 2])
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # inside the weights member: the zip index is intact, a CRC is not
    (folder / "crc.keras").write_bytes(bytes(flipped))
    (folder / "corrupt.onnx").write_bytes(b"\x08\x07garbage")
    (folder / "blank.txt").write_text("class_0\n\nclass_1\nclass_2\nclass_3\nclass_4\n")
    (folder / "binary.txt").write_bytes(b"class_0\nclass_1\n\xff\xd8\xff\xe0\x00\x10JFIF\n")
    os.mkfifo(folder / "names.fifo")
    os.mkfifo(folder / "pipe.keras")
    (folder / "a.png").write_bytes(encode(np.zeros((20, 30, 3), np.uint8), "PNG"))
    return folder


@pytest.mark.parametrize("argv, fragments", [
    (["export", "{run}/model.keras", "--class-names", "{odd}/blank.txt"],
     ["class names file {odd}/blank.txt, line 2: blank"]),
    (["export", "{run}/model.keras", "--class-names", "{odd}/binary.txt"],
     ["class names file {odd}/binary.txt, line 3: not UTF-8 text"]),
    (["export", "{run}/model.keras", "--class-names", "{odd}/names.fifo"],
     ["class names file {odd}/names.fifo is a FIFO, not a regular file"]),
    (["predict", "{odd}/a.png", "--model", "{odd}/truncated.keras"],
     ["model file {odd}/truncated.keras is truncated or corrupt"]),
    (["export", "{odd}/features.keras", "--format", "onnx", "--output", "{tmp}/f.onnx"],
     ["outputs pooled features, not classes", "include_top=False", "keras-bit finetune"]),
    (["predict", "{odd}/a.png", "--model", "{odd}/two_outputs.keras"],
     ["has 1 inputs and 2 outputs", "keras.Model(model.inputs[0], model.outputs[i])"]),
    (["predict", "{odd}/a.png", "--model", "{odd}/identity.keras"],
     ["last layer (Identity) has no `activation`", "--activation softmax / none"]),
    (["predict", "{odd}/a.png", "--model", "{odd}/corrupt.onnx"],
     ["Cannot load {odd}/corrupt.onnx as a onnx export: "]),
], ids=["blank-labels-line", "binary-labels", "labels-fifo", "truncated-keras", "include-top-false", "two-outputs",
        "no-activation", "corrupt-onnx"])
def test_the_command_names_the_bad_file_in_one_line(run_dir, odd_models, tmp_path, argv, fragments, capsys,
                                                    monkeypatch, request):
    from helpers import assert_cli_error, installed_command

    def fill(text):
        return text.format(run=run_dir, odd=odd_models, tmp=tmp_path)

    if request.node.callspec.id in INSTALLED:  # the console script itself: no traceback, no TensorFlow noise
        # The portable ops: nothing to build or log before the error.
        proc = installed_command(*map(fill, argv), cwd=tmp_path, timeout=300, env={"KERAS_BIT_FUSED_KERNELS": "0"})
    else:  # the same `main` in this process (a console script start costs seconds each)
        monkeypatch.chdir(tmp_path)
        code = main(list(map(fill, argv)))
        captured = capsys.readouterr()
        proc = subprocess.CompletedProcess(argv, code, captured.out, captured.err)
    assert_cli_error(proc, argv[0], *map(fill, fragments))
    assert os.listdir(tmp_path) == []


# One export and one predict case go through the installed `keras-bit` in a subprocess.
INSTALLED = ("blank-labels-line", "truncated-keras")


def test_activation_flag_makes_the_advice_true(run_dir, odd_models, capsys):
    image = odd_models / "a.png"
    assert main(["predict", str(image), "--model", str(odd_models / "identity.keras"), "--activation", "none",
                 "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    expected = _expected(run_dir, {"a": np.zeros((20, 30, 3), np.uint8)})["a"]
    assert np.ptp(expected) > 1e-3
    np.testing.assert_allclose([e["score"] for e in row["top"]], np.sort(expected)[::-1], atol=1e-5)
    assert main(["predict", str(image), "--model", str(odd_models / "corrupt.onnx"), "--activation", "softmax"]) == 2
    assert "activation='softmax' (--activation) is for a .keras model or a BiT name" in capsys.readouterr().err


def test_a_damaged_keras_file_is_named(odd_models):
    from keras_bit.predict import load_model

    with pytest.raises(ValueError, match=r"Cannot load model file .*crc\.keras: Bad CRC-32 for file 'model\.weights"):
        load_model(str(odd_models / "crc.keras"))
    with pytest.raises(ValueError, match=r"model file .*pipe\.keras is a FIFO, not a regular file"):
        load_model(str(odd_models / "pipe.keras"))
    with pytest.raises(FileNotFoundError, match="Model file not found"):
        load_model(str(odd_models / "missing.keras"))
