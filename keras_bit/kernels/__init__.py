"""Fused CPU kernels for TensorFlow, built on first use; the keras.ops layers are the fallback.

`group_norm` runs BiT's GroupNorm (+ ReLU) as one TensorFlow op (group_norm.cc)
instead of ~11 separate passes over the batch; its gradient is a second fused
op. Results do not depend on the batch size or thread count: a sample's
output is the same bits in any batch, and parameter gradients are pairwise
sums over samples (a batch's equals the sum of its halves'). The op is compiled from the
source shipped in the package with the machine's C++ compiler (`$CXX`, else
`c++`) against the installed TensorFlow's headers (`tf.sysconfig`), once per
(source, TensorFlow, compiler, CPU), into `$KERAS_HOME/keras_bit_kernels/`
(default `~/.keras`), written atomically with a record of its size and sha256
that is checked before every load (cache.py: a truncated or replaced library
is rebuilt once, never loaded). Nothing is needed beyond a plain `pip install`:
without a compiler, or if the build or its load fails, a logged warning says so
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
import logging
import os
import threading

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
                    "keras_bit's fused GroupNorm kernel could not be built or loaded (%s); using the keras.ops "
                    "GroupNorm instead (same function, slower on CPU). Set %s=0 to skip the build.", e, ENV_SWITCH)
        return _state["library"]


def _load():
    import tensorflow as tf

    from keras_bit.kernels import cache  # the build, its record and the verified load

    module = cache.load(tf, cache.locate(tf))
    _register_gradient(tf, module)
    return module


def _register_gradient(tf, module):
    @tf.RegisterGradient("KerasBitGroupNorm")
    def _group_norm_gradient(op, grad_y, unused_grad_mean, unused_grad_rstd):
        # mean and rstd are auxiliary outputs for this gradient; nothing else consumes them.
        return module.keras_bit_group_norm_grad(
            grad_y, op.inputs[0], op.inputs[1], op.inputs[2], op.outputs[1], op.outputs[2],
            groups=op.get_attr("groups"), relu=op.get_attr("relu"))
