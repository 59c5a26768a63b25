"""Exports that work or refuse, and hostile files around them (issue 22).

Every artifact is run once by its own runtime before `export_model` returns; a broken one raises ExportError and
leaves nothing. Export paths that are links, files or folders of the wrong kind, labels files that are FIFOs,
huge, binary or have blank lines, and corrupt export files are each refused with a message naming the file.
Most cases fake the converter (`keras.Model.export`), so they cost no conversion; one real export per format is
written once for the module.
"""

import os
import pathlib
import re
import shutil
import sys
import threading

import numpy as np
import pytest

from helpers import EXPORT_CLASSES, export_classifier
from keras_bit.export import ExportError, export_model, export_saved_model, load_exported, read_labels, runners
from keras_bit.export import runtimes
from keras_bit.export.labels import MAX_LABELS_BYTES

FILES = {"onnx": "m.onnx", "litert": "m.tflite", "openvino": "m.xml"}
RUNTIMES = {"onnx": "onnxruntime", "litert": "ai_edge_litert", "openvino": "openvino"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return export_classifier(tmp_path_factory.mktemp("model"))


@pytest.fixture
def exported(classifier_exports):
    """One real, test-run export per file format (conftest's, shared by the session): format -> path."""
    for fmt in FILES:
        pytest.importorskip(RUNTIMES[fmt])
    return classifier_exports


def fake_converter(monkeypatch, content=b"not a model"):
    """`keras.Model.export` writes `content` (and an empty OpenVINO .bin) instead of converting."""
    import keras

    def export(self, path, format, **kwargs):
        with open(path, "wb") as f:
            f.write(content)
        if format == "openvino":
            open(os.path.splitext(path)[0] + ".bin", "wb").close()

    monkeypatch.setattr(keras.Model, "export", export)


def no_runtime(monkeypatch, fmt):
    """The runtime of `fmt` looks uninstalled: the export is written without a test run (and a warning)."""
    monkeypatch.setitem(runners.RUNTIME_MODULES, fmt, "keras_bit_no_such_runtime")


# --- Every artifact is test-run; a broken one raises ExportError and leaves nothing. ---


@pytest.mark.parametrize("fmt, runtime, line", [
    ("onnx", "ONNX Runtime", "INVALID_PROTOBUF"),
    ("litert", "the LiteRT interpreter", "The model is not a valid Flatbuffer buffer"),
    ("openvino", "OpenVINO", "Unable to read the model"),
])
def test_a_file_its_runtime_cannot_run_is_refused_and_removed(model, tmp_path, monkeypatch, fmt, runtime, line):
    pytest.importorskip(RUNTIMES[fmt])
    fake_converter(monkeypatch)
    path = tmp_path / FILES[fmt]
    with pytest.raises(ExportError, match=rf"^The {fmt} export {re.escape(str(path))} fails in {runtime} on a test "
                                          rf"image \(.*{line}"):
        export_model(model, path, fmt, class_names=EXPORT_CLASSES)
    assert os.listdir(tmp_path) == []  # no file, labels, .bin or temporary folder


def test_a_saved_model_tensorflow_cannot_serve_is_refused(model, tmp_path, monkeypatch):
    import tensorflow as tf

    from keras_bit.export import saved_model

    monkeypatch.setattr(saved_model, "save", lambda served, path, *args: tf.saved_model.save(tf.Module(), path))
    message = r"fails in TensorFlow on a test image \(.*without keras_bit's serving_default signature"
    with pytest.raises(ExportError, match=rf"The tf_saved_model export {re.escape(str(tmp_path / 'sm'))} {message}"):
        export_model(model, tmp_path / "sm", "tf_saved_model")
    with pytest.raises(ExportError, match=message):
        export_saved_model(model, tmp_path / "serving", name="tiny")
    assert os.listdir(tmp_path) == ["serving"] and os.listdir(tmp_path / "serving" / "tiny") == []


@pytest.mark.parametrize("child, reason", [
    ("import os; os.abort()", r"killed by SIGABRT"),
    ("import sys; print('segfault-ish', file=sys.stderr); sys.exit(139)", r"exit status 139: segfault-ish\)"),
    ("import time; time.sleep(60)", r"no result after 1 s\)"),
])
def test_a_runtime_that_crashes_or_hangs_ends_its_child_not_the_caller(model, tmp_path, monkeypatch, child, reason):
    pytest.importorskip("onnxruntime")
    fake_converter(monkeypatch)
    monkeypatch.setattr(runtimes, "child_command", lambda fmt, path: [sys.executable, "-c", child])
    monkeypatch.setattr(runtimes, "TEST_RUN_TIMEOUT", 1)
    with pytest.raises(ExportError, match=rf"fails in ONNX Runtime on a test image \({reason}"):
        export_model(model, tmp_path / "m.onnx", "onnx")
    assert os.listdir(tmp_path) == []


def test_an_int8_refusal_keeps_its_advice(model, tmp_path, monkeypatch):
    pytest.importorskip("ai_edge_litert")
    fake_converter(monkeypatch)
    with pytest.raises(ExportError, match=r"The int8 litert export .* not written\. Export with "
                                          r"quantization='float16' \(or none\) instead"):
        export_model(model, tmp_path / "m.tflite", "litert", quantization="int8",
                     representative_data=np.zeros((3, 64, 64, 3), np.uint8))


def test_without_the_runtime_the_file_is_written_with_one_warning(model, tmp_path, monkeypatch, caplog):
    fake_converter(monkeypatch)
    no_runtime(monkeypatch, "onnx")
    path = export_model(model, tmp_path / "m.onnx", "onnx")
    assert pathlib.Path(path).read_bytes() == b"not a model"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [(f"keras_bit_no_such_runtime is not installed: the onnx export {path} was not test-run "
                         "(pip install 'keras-bit[export]').")]


@pytest.mark.parametrize("outputs, message", [
    ({"probabilities": np.full((2, 5), np.nan), "top_k_indices": 0, "top_k_scores": 0}, "NaN or infinite"),
    ({"probabilities": np.ones((1, 5)), "top_k_indices": 0, "top_k_scores": 0}, r"shape \(1, 5\) for 2 image"),
    ({"probabilities": np.ones((2, 5)), "scores": 0}, "the outputs lack top_k_indices, top_k_scores"),
])
def test_the_test_run_checks_what_the_runtime_returns(monkeypatch, outputs, message):
    monkeypatch.setitem(runners.OPENERS, "onnx", lambda path: lambda images: outputs)
    with pytest.raises(ValueError, match=message):
        runners.run_once("onnx", "m.onnx", runtimes.sample_images(8, 8))


def test_openvino_errors_are_reported_by_their_message_not_their_source_file():
    error = RuntimeError("Exception from src/inference/src/cpp/core.cpp:132:\nCheck 'x' failed at src/a.cpp:9:\n"
                         "Incorrect weights in bin file!\n\n")
    assert runners.first_line(error) == "Incorrect weights in bin file!"
    assert runners.first_line(ValueError()) == "ValueError"


def test_a_model_with_nan_weights_is_refused_before_conversion(tmp_path, monkeypatch):
    fake_converter(monkeypatch, content=b"must not be reached")
    model = export_classifier(tmp_path)
    kernel = model.get_layer("head").kernel
    kernel.assign(np.where(np.arange(kernel.shape[1]) == 2, np.nan, kernel.numpy()))
    for export in (lambda: export_model(model, tmp_path / "out" / "m.onnx", "onnx"),
                   lambda: export_saved_model(model, tmp_path / "out")):
        with pytest.raises(ValueError, match=r"weight head/kernel holds NaN or infinite values"):
            export()
    assert not os.path.exists(tmp_path / "out")


# --- Export paths: links are replaced, never followed; a file never becomes a folder or back. ---


def test_an_export_path_that_is_a_link_replaces_the_link_not_its_target(model, tmp_path, monkeypatch):
    fake_converter(monkeypatch)
    no_runtime(monkeypatch, "onnx")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("m.onnx", "m.onnx.labels.txt"):
        (tmp_path / name).symlink_to(victim)
    with pytest.raises(FileExistsError, match="already exist"):
        export_model(model, tmp_path / "m.onnx", "onnx", class_names=EXPORT_CLASSES)
    export_model(model, tmp_path / "m.onnx", "onnx", class_names=EXPORT_CLASSES, overwrite=True)
    assert victim.read_text() == "precious"
    assert not (tmp_path / "m.onnx").is_symlink() and (tmp_path / "m.onnx").read_bytes() == b"not a model"
    assert not (tmp_path / "m.onnx.labels.txt").is_symlink()
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.labels.txt", "victim.txt"]


def test_a_dangling_link_is_an_existing_path(model, tmp_path, monkeypatch):
    fake_converter(monkeypatch)
    (tmp_path / "m.onnx").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError, match=r"m\.onnx already exist"):
        export_model(model, tmp_path / "m.onnx", "onnx")


def test_a_saved_model_never_replaces_a_file_and_a_file_never_replaces_a_folder(model, tmp_path, monkeypatch):
    from keras_bit.export import saved_model

    fake_converter(monkeypatch)
    monkeypatch.setattr(saved_model, "save", lambda *args: pytest.fail("refused before converting"))
    keras_file = tmp_path / "model.keras"
    keras_file.write_bytes(b"the user's model")
    with pytest.raises(FileExistsError, match=r"model\.keras is a file; a SavedModel folder export never replaces"):
        export_model(model, keras_file, "tf_saved_model", overwrite=True)
    assert keras_file.read_bytes() == b"the user's model"
    (tmp_path / "m.onnx").mkdir()
    (tmp_path / "m.onnx" / "saved_model.pb").write_bytes(b"")
    with pytest.raises(FileExistsError, match=r"m\.onnx is a SavedModel folder; a file export never replaces it"):
        export_model(model, tmp_path / "m.onnx", "onnx", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "model.keras"]


def test_an_export_path_under_a_file_is_an_os_error(model, tmp_path, monkeypatch):
    fake_converter(monkeypatch)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        export_model(model, tmp_path / "file" / "m.onnx", "onnx")
    assert os.listdir(tmp_path) == ["file"]


# --- Labels files: one name per line, or an error naming the file and line. ---


@pytest.mark.parametrize("content, message", [
    (b"a\n\nb\n", r"line 2: blank; line k names class k - 1"),
    (b"a\nb\n\xff\xfe\x00c\n", r"line 3: not UTF-8 text \(byte 4 is b'\\xff'\)"),
    (b"a\nb\x00c\n", r"line 2: control character '\\x00' \(binary content\?\)"),
    (b"\x1b[31mred\n", r"line 1: control character '\\x1b'"),
    (b"", r"is empty"),
    (b"\n\n  \n", r"is empty"),
])
def test_bad_labels_files_are_refused_naming_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "names.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"class names file {re.escape(str(path))}(, | ){message}"):
        read_labels(path)


def test_labels_files_as_editors_write_them_are_read(tmp_path):
    path = tmp_path / "names.txt"
    path.write_bytes("\ufeffcat \r\n  dog\r\ngolden\tretriever\r\nćma\r\n\r\n\n".encode())
    assert read_labels(path) == ["cat", "dog", "golden\tretriever", "ćma"]


def test_a_labels_fifo_folder_or_huge_file_is_refused_without_reading_it(tmp_path):
    fifo, huge = tmp_path / "names.fifo", tmp_path / "huge.txt"
    os.mkfifo(fifo)
    with open(huge, "wb") as f:
        f.truncate(MAX_LABELS_BYTES + 1)  # sparse: nothing is written
    outcome = {}

    def read(path):
        try:
            read_labels(path)
        except ValueError as e:
            outcome[path] = str(e)

    for path in (fifo, tmp_path, huge):
        reader = threading.Thread(target=read, args=(path,), daemon=True)
        reader.start()
        reader.join(30)
        if reader.is_alive():  # the reader blocks on the FIFO: release it, then fail
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            pytest.fail(f"read_labels({path}) hangs")
    assert outcome[fifo] == f"class names file {fifo} is a FIFO, not a regular file."
    assert outcome[tmp_path] == f"class names file {tmp_path} is a folder, not a regular file."
    assert outcome[huge].startswith(f"class names file {huge} is {MAX_LABELS_BYTES + 1} bytes; at most")


def test_a_bad_labels_file_beside_an_export_is_named(exported, tmp_path):
    shutil.copy(exported["onnx"], tmp_path / "m.onnx")
    (tmp_path / "m.onnx.labels.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    labels = re.escape(str(tmp_path / "m.onnx.labels.txt"))
    with pytest.raises(ValueError, match=rf"class names file {labels}, line 1: not UTF-8"):
        load_exported(tmp_path / "m.onnx")
    os.remove(tmp_path / "m.onnx.labels.txt")
    os.mkfifo(tmp_path / "m.onnx.labels.txt")
    with pytest.raises(ValueError, match="is a FIFO, not a regular file"):
        load_exported(tmp_path / "m.onnx")


# --- Corrupt export files given to load_exported (and so to `keras-bit predict`). ---


def _damage(exported, tmp_path, fmt, how):
    """A damaged copy of the real `fmt` export in `tmp_path`; returns its path."""
    source = exported[fmt]
    target = tmp_path / os.path.basename(source)
    data = pathlib.Path(source).read_bytes()
    if fmt == "openvino":
        bin_data = pathlib.Path(os.path.splitext(source)[0] + ".bin").read_bytes()
        if how != "no .bin":
            target.with_suffix(".bin").write_bytes(bin_data[:1000] if how == "truncated .bin" else bin_data)
    damaged = {"truncated": data[:len(data) // 2], "header only": data[:64], "empty": b"",
               "bytes flipped": bytes(b ^ 0xFF if i % 997 == 0 else b for i, b in enumerate(data))}
    target.write_bytes(damaged.get(how, data))
    return target


@pytest.mark.parametrize("fmt, how, line", [
    ("onnx", "truncated", "INVALID_PROTOBUF"), ("onnx", "empty", "No graph was found"),
    ("onnx", "bytes flipped", "INVALID_PROTOBUF"),
    ("litert", "truncated", "not a valid Flatbuffer"), ("litert", "header only", "not a valid Flatbuffer"),
    ("litert", "empty", "mmap of size 0"), ("litert", "bytes flipped", "not a valid Flatbuffer"),
    ("openvino", "truncated", "at offset"), ("openvino", "bytes flipped", "at offset"),  # pugixml: "... at offset N"
    ("openvino", "truncated .bin", "Incorrect weights in bin file!"),
    ("openvino", "no .bin", "bin file cannot be found"),
])
def test_a_corrupt_export_is_a_value_error_naming_it(exported, tmp_path, fmt, how, line):
    path = _damage(exported, tmp_path, fmt, how)
    with pytest.raises(ValueError, match=rf"^Cannot load {re.escape(str(path))} as a {fmt} export: .*{line}"):
        load_exported(path)


def test_an_onnx_file_cannot_read_files_outside_its_folder(tmp_path):
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(4, dtype=np.float32).tobytes())
    (tmp_path / "model").mkdir()
    for location in (str(secret), "../secret.bin"):
        weight = numpy_helper.from_array(np.zeros(4, np.float32), "w")
        weight.ClearField("raw_data")
        weight.data_location = TensorProto.EXTERNAL
        for key, value in {"location": location, "offset": "0", "length": "16"}.items():
            entry = weight.external_data.add()
            entry.key, entry.value = key, value
        values = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4]) for n in ("images", "probabilities")]
        graph = helper.make_graph([helper.make_node("Add", ["images", "w"], ["probabilities"])], "g", values[:1],
                                  values[1:], [weight])
        path = tmp_path / "model" / "m.onnx"
        path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]).SerializeToString())
        with pytest.raises(ValueError, match=r"Cannot load .*m\.onnx as a onnx export: .*External data path"):
            load_exported(path)


def test_an_export_that_is_a_fifo_or_holds_one_is_refused_without_opening_it(exported, tmp_path):
    """OpenVINO blocks forever reading a FIFO .bin; TensorFlow would on FIFO variables."""
    os.mkfifo(tmp_path / "m.onnx")
    shutil.copy(exported["openvino"], tmp_path / "m.xml")
    os.mkfifo(tmp_path / "m.bin")
    (tmp_path / "sm").mkdir()
    (tmp_path / "sm" / "saved_model.pb").write_bytes(b"")
    (tmp_path / "sm" / "variables").mkdir()
    os.mkfifo(tmp_path / "sm" / "variables" / "variables.index")
    for path, file, fmt in (("m.onnx", "m.onnx", "onnx"), ("m.xml", "m.bin", "openvino"),
                            ("sm", "sm/variables/variables.index", "tf_saved_model")):
        with pytest.raises(ValueError, match=rf"^{fmt} export file {re.escape(str(tmp_path / file))} is a FIFO"):
            load_exported(tmp_path / path)
