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

OUTPUTS = ("probabilities", "top_k_indices", "top_k_scores")  # a classifier export's outputs, in file order
FEATURE_OUTPUTS = ("features",)  # a feature export's (`outputs="features"`): the pooled pre-logits embedding
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


def output_names(names):
    """The keras_bit outputs among an artifact's output `names`: `FEATURE_OUTPUTS` or `OUTPUTS`, else ValueError."""
    if set(FEATURE_OUTPUTS) <= set(names):
        return FEATURE_OUTPUTS
    missing = [name for name in OUTPUTS if name not in names]
    if missing:
        raise ValueError(f"the outputs lack {', '.join(missing)} (it returned {', '.join(sorted(names))}); "
                         f"keras_bit exports return {', '.join(OUTPUTS)} or {', '.join(FEATURE_OUTPUTS)}")
    return OUTPUTS


class Runner:
    """What each opener returns: `runner(images)` -> {name: array}; `names`: the keras_bit outputs it declares."""

    def __init__(self, run, names):
        self._run, self.names = run, output_names(names)

    def __call__(self, images):
        return self._run(images)


def open_saved_model(path):
    import tensorflow as tf

    signatures = tf.saved_model.load(path).signatures
    if "serving_default" not in signatures:
        raise ValueError(f"{path} is a SavedModel without keras_bit's serving_default signature "
                         f"(outputs {', '.join(OUTPUTS)}, or {', '.join(FEATURE_OUTPUTS)})")
    serve = signatures["serving_default"]
    return Runner(lambda images: {k: v.numpy() for k, v in serve(images=tf.constant(images)).items()},
                  list(serve.structured_outputs))


def open_litert(path):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path)
    runner = interpreter.get_signature_runner()  # fails on a file without exactly one signature
    declared = next(iter(interpreter.get_signature_list().values()))["outputs"]
    return Runner(lambda images: runner(images=images), declared)


def open_onnx(path):
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return Runner(lambda images: dict(zip(names, session.run(names, {"images": images}))), names)


def open_openvino(path, precision="f32"):
    """OpenVINO computes in bfloat16 by default on CPUs that support it: `precision="f32"` asks for the float32
    the model was exported in (None keeps the CPU default; benchmarks/RESULTS.md measures both)."""
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": precision} if precision else {}
    compiled = ov.Core().compile_model(path, "CPU", config)
    known = OUTPUTS + FEATURE_OUTPUTS

    def run(images):
        result = compiled(images)
        return {name: result[output] for output in compiled.outputs for name in output.names if name in known}

    return Runner(run, [name for output in compiled.outputs for name in output.names if name in known])


OPENERS = {"tf_saved_model": open_saved_model, "litert": open_litert, "onnx": open_onnx, "openvino": open_openvino}


def run_once(fmt, path, images, expected=None):
    """Opens the `fmt` export at `path`, runs it on `images`; ValueError unless it returns keras_bit's outputs.

    The outputs must hold `OUTPUTS` or `FEATURE_OUTPUTS` (`expected`, when
    given: which), one row per image, and finite values in the first (a broken
    conversion can run and still return NaN).
    """
    outputs = OPENERS[fmt](path)(images)
    names = output_names(outputs)
    if expected is not None and tuple(names) != tuple(expected):
        raise ValueError(f"it returns {', '.join(names)}, not {', '.join(expected)}")
    first = np.asarray(outputs[names[0]])
    if first.ndim != 2 or first.shape[0] != len(images):
        raise ValueError(f"`{names[0]}` has shape {first.shape} for {len(images)} image(s)")
    if not np.isfinite(first).all():
        raise ValueError(f"it returns NaN or infinite {names[0]}")


def main(argv):
    """The child: `<fmt> <path> [<output>,...]`, images as a .npy on stdin; exit status 1 and `ERROR_MARK` + a
    line on failure."""
    fmt, path, *expected = argv
    images = np.load(io.BytesIO(sys.stdin.buffer.read()))
    try:
        run_once(fmt, path, images, tuple(expected[0].split(",")) if expected else None)
    except Exception as e:  # noqa: BLE001 (each runtime has its own error types)
        print(ERROR_MARK + first_line(e), file=sys.stderr, flush=True)
        sys.exit(1)
