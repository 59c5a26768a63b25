"""Fused CPU kernels for TensorFlow, built on first use; the keras.ops layers are the fallback.

`group_norm` runs BiT's GroupNorm (+ ReLU) as one TensorFlow op (group_norm.cc)
instead of ~11 separate passes over the batch; its gradient is a second fused
op. Results do not depend on the batch size or thread count: a sample's
output is the same bits in any batch, and parameter gradients are pairwise
sums over samples (a batch's equals the sum of its halves'). The op is compiled from the
source shipped in the package with the machine's C++ compiler (`$CXX`, else
`c++`) against the installed TensorFlow's headers (`tf.sysconfig`), once per
(source, TensorFlow, compiler, CPU), into `$KERAS_HOME/keras_bit_kernels/`
(default `~/.keras`), written atomically. Nothing is needed beyond a plain
`pip install`: without a compiler, or if the build fails, a logged warning says so
once and the layers use their keras.ops implementation (the same function to
float32 rounding, slower).

The kernel is used only where it can run and be saved: TensorFlow backend,
CPU-only machines (a GPU or TPU keeps TensorFlow's own kernels), outside XLA
and outside `tf.saved_model.save`, and never inside `portable()`, which the
exporters use so that SavedModel / LiteRT / ONNX / OpenVINO files contain only
standard ops. `KERAS_BIT_FUSED_KERNELS=0` turns it off. Both are read when a
function is traced: set the variable before the first call, and trace inside
`portable()` any function you hand to a converter yourself. The library is
native code loaded from `$KERAS_HOME`: that folder must be trusted.
"""

import contextlib
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import threading

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "group_norm.cc")
ENV_SWITCH = "KERAS_BIT_FUSED_KERNELS"
FUSED_DTYPES = ("float32", "bfloat16")
_state = {"library": None, "tried": False}
_lock = threading.Lock()
_portable = threading.local()
logger = logging.getLogger("keras_bit")


@contextlib.contextmanager
def portable():
    """Within this block (this thread) the layers trace standard TensorFlow ops only, never the fused kernel.

    Example:
        >>> with portable():
        ...     tf.saved_model.save(module, path)
    """
    depth = getattr(_portable, "depth", 0)
    _portable.depth = depth + 1
    try:
        yield
    finally:
        _portable.depth = depth


def group_norm(x, gamma, beta, groups, epsilon, relu):
    """GroupNorm (+ ReLU) of an NHWC tensor with the fused kernel, or None where it cannot be used here.

    Args:
        x: 4D channels-last float32 or bfloat16 tensor.
        gamma, beta: float32 vectors, one value per channel.
        groups: int dividing the channel count.
        epsilon: float added to the group variance.
        relu: bool, whether to apply ReLU to the result.

    Returns:
        A tensor of `x`'s shape and dtype, or None (the caller then uses keras.ops).
    """
    library = _usable_library(x)
    if library is None:
        return None
    return library.keras_bit_group_norm(x, gamma, beta, groups=groups, epsilon=epsilon, relu=relu)[0]


def _usable_library(x):
    import keras

    if (os.environ.get(ENV_SWITCH, "1") == "0" or getattr(_portable, "depth", 0)
            or keras.backend.backend() != "tensorflow"
            or keras.backend.standardize_dtype(x.dtype) not in FUSED_DTYPES):
        return None
    import tensorflow as tf
    # Private TensorFlow helpers, isolated here: XLA cannot compile a custom op, and a SavedModel must not need one.
    from tensorflow.python.ops import control_flow_util
    from tensorflow.python.saved_model import save_context

    if (save_context.in_save_context()
            or (not tf.executing_eagerly()
                and control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))
            or tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU")):
        return None
    return library()


def library():
    """The loaded kernel library (built first if needed), or None if it cannot be built here."""
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            try:
                _state["library"] = _load()
            except Exception as e:  # noqa: BLE001 - any failure to build or load means: use keras.ops, and say so
                # A log line, not a warning: the CLI prints it as one line; Python users see it on stderr.
                logger.warning(
                    "keras_bit's fused GroupNorm kernel could not be built (%s); using the keras.ops GroupNorm "
                    "instead (same function, slower on CPU). Set %s=0 to skip the build.", e, ENV_SWITCH)
        return _state["library"]


def _load():
    import tensorflow as tf

    path = _build_if_missing(tf)
    try:
        module = tf.load_op_library(path)
    except tf.errors.NotFoundError as e:  # e.g. built against another TensorFlow ABI
        raise RuntimeError(f"{path} does not load: {e.message.splitlines()[0]}") from e
    _register_gradient(tf, module)
    return module


def _compile_command(tf, output):
    compiler = os.environ.get("CXX", "c++")
    return [compiler, "-shared", "-fPIC", "-O3", "-march=native", "-ffp-contract=off", "-w", SOURCE, "-o", output,
            *tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags()]


def _build_if_missing(tf):
    command = _compile_command(tf, "OUTPUT")
    try:
        compiler = subprocess.run([command[0], "--version"], capture_output=True, text=True, errors="replace",
                                  timeout=60).stdout
    except FileNotFoundError as e:
        raise RuntimeError(f"no C++ compiler {command[0]!r} (set $CXX)") from e
    key = hashlib.sha256()
    with open(SOURCE, "rb") as f:
        key.update(f.read())
    for part in (tf.__version__, " ".join(command), compiler, _cpu_identity()):
        key.update(part.encode())
    from keras_bit.weights.download import resolve_cache_dir  # lazily: building a model imports no weights code

    folder = os.path.join(resolve_cache_dir(), "keras_bit_kernels")
    path = os.path.join(folder, f"group_norm_{key.hexdigest()[:16]}.so")
    if os.path.exists(path):
        return path
    os.makedirs(folder, exist_ok=True)
    logger.info("Building keras_bit's fused GroupNorm kernel into %s (once per machine and TensorFlow)", path)
    fd, tmp = tempfile.mkstemp(prefix=".group_norm_", suffix=".so.part", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run(_compile_command(tf, tmp), capture_output=True, text=True, errors="replace", timeout=600)
        if done.returncode:
            errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines()
            raise RuntimeError(f"{command[0]} failed: {errors[0] if errors else done.returncode}")
        os.chmod(tmp, 0o755)  # mkstemp's 0600 would hide it from other users of a shared $KERAS_HOME
        os.replace(tmp, path)  # atomic: another process sees the whole library or none
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _cpu_identity():
    """The CPU's model and instruction-set flags: a library built with -march=native only runs where they match."""
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(sorted({line for line in f if line.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.machine() + platform.processor()


def _register_gradient(tf, module):
    @tf.RegisterGradient("KerasBitGroupNorm")
    def _group_norm_gradient(op, grad_y, unused_grad_mean, unused_grad_rstd):
        # mean and rstd are auxiliary outputs for this gradient; nothing else consumes them.
        return module.keras_bit_group_norm_grad(
            grad_y, op.inputs[0], op.inputs[1], op.inputs[2], op.outputs[1], op.outputs[2],
            groups=op.get_attr("groups"), relu=op.get_attr("relu"))
