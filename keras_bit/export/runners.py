"""Opening an export with its own runtime, importing nothing but NumPy and that runtime.

`runtimes.load_exported` opens exports in the caller's process with `OPENERS`.
`export_model` also runs every new LiteRT / ONNX / OpenVINO file once in a
child process that loads only this file (see `runtimes.check_runs`): a runtime
that aborts on a broken file (the LiteRT interpreter on some int8 models:
SIGABRT, no Python error) then ends the child, not the caller, and the child
starts in a fraction of a second (importing keras_bit imports Keras and
TensorFlow: seconds). Hence no keras_bit import here.
"""

import io
import re
import sys

import numpy as np

OUTPUTS = ("probabilities", "top_k_indices", "top_k_scores")
# The module each format's runtime is imported from, and its name in messages.
RUNTIME_MODULES = {"tf_saved_model": "tensorflow", "litert": "ai_edge_litert.interpreter", "onnx": "onnxruntime",
                   "openvino": "openvino"}
RUNTIME_NAMES = {"tf_saved_model": "TensorFlow", "litert": "the LiteRT interpreter", "onnx": "ONNX Runtime",
                 "openvino": "OpenVINO"}
# What the child prints before the runtime's first error line (its other output is the runtime's own logging).
ERROR_MARK = "keras_bit-test-run-error: "
# OpenVINO's messages start with lines naming C++ sources ("Exception from src/inference/src/cpp/core.cpp:132:").
_SOURCE_LOCATION = re.compile(r"\.(c|cc|cpp|h|hpp):\d+:?$")


def first_line(error):
    """The first line of `error`'s message that says what is wrong (not a C++ source location), at most 300 chars."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if not _SOURCE_LOCATION.search(line)]
    return (useful or lines or [type(error).__name__])[0][:300]


def open_saved_model(path):
    import tensorflow as tf

    signatures = tf.saved_model.load(path).signatures
    if "serving_default" not in signatures or set(OUTPUTS) - set(signatures["serving_default"].structured_outputs):
        raise ValueError(f"{path} is a SavedModel without keras_bit's serving_default signature "
                         f"(outputs {', '.join(OUTPUTS)})")
    serve = signatures["serving_default"]
    return lambda images: {k: v.numpy() for k, v in serve(images=tf.constant(images)).items()}


def open_litert(path):
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=path).get_signature_runner()
    return lambda images: runner(images=images)


def open_onnx(path):
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda images: dict(zip(names, session.run(names, {"images": images})))


def open_openvino(path, precision="f32"):
    """OpenVINO computes in bfloat16 by default on CPUs that support it: `precision="f32"` asks for the float32
    the model was exported in (None keeps the CPU default; benchmarks/RESULTS.md measures both)."""
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": precision} if precision else {}
    compiled = ov.Core().compile_model(path, "CPU", config)

    def run(images):
        result = compiled(images)
        return {name: result[output] for output in compiled.outputs for name in output.names if name in OUTPUTS}

    return run


OPENERS = {"tf_saved_model": open_saved_model, "litert": open_litert, "onnx": open_onnx, "openvino": open_openvino}


def run_once(fmt, path, images):
    """Opens the `fmt` export at `path`, runs it on `images`; ValueError unless it returns keras_bit's outputs.

    The outputs must hold `OUTPUTS`, one row per image, and finite
    probabilities (a broken conversion can run and still return NaN).
    """
    outputs = OPENERS[fmt](path)(images)
    missing = [name for name in OUTPUTS if name not in outputs]
    if missing:
        raise ValueError(f"the outputs lack {', '.join(missing)} (it returned {', '.join(sorted(outputs))})")
    probabilities = np.asarray(outputs["probabilities"])
    if probabilities.ndim != 2 or probabilities.shape[0] != len(images):
        raise ValueError(f"`probabilities` has shape {probabilities.shape} for {len(images)} image(s)")
    if not np.isfinite(probabilities).all():
        raise ValueError("it returns NaN or infinite probabilities")


def main(argv):
    """The child: `<fmt> <path>`, images as a .npy on stdin; exit status 1 and `ERROR_MARK` + a line on failure."""
    fmt, path = argv
    images = np.load(io.BytesIO(sys.stdin.buffer.read()))
    try:
        run_once(fmt, path, images)
    except Exception as e:  # noqa: BLE001 (each runtime has its own error types)
        print(ERROR_MARK + first_line(e), file=sys.stderr, flush=True)
        sys.exit(1)
