"""The two layers that make a ResNetV2 into a BiT network.

BiT replaces every BatchNorm with GroupNorm and standardizes every convolution
kernel (Weight Standardization), so that normalisation never depends on the
batch: the same network trains at batch 4096 upstream and batch 1 downstream.

Reference:
    Kolesnikov et al., "Big Transfer (BiT): General Visual Representation
    Learning", https://arxiv.org/abs/1912.11370 (section 2.1 and 4.3).
    Qiao et al., "Micro-Batch Training with Batch-Channel Normalization and
    Weight Standardization", https://arxiv.org/abs/1903.10520.
"""

import keras
from keras import ops

from keras_bit import kernels

# The authors' code adds this to the kernel variance (bit_tf2/models.py: `var + 1e-10`).
WS_EPSILON = 1e-10
# The authors' GroupNorm (bit_tf2/normalization.py) uses 32 groups and 1e-5, not Keras' 1e-3.
GN_GROUPS = 32
GN_EPSILON = 1e-5


def _at_least_float32(dtype):
    # Not keras.backend.result_type: it maps float64 to float32 on every backend but TensorFlow
    # (keras-team/keras#23704).
    return "float64" if keras.backend.standardize_dtype(dtype) == "float64" else "float32"


def standardize_kernel(kernel, epsilon=WS_EPSILON):
    """Standardizes an HWIO kernel per output channel, in float32.

    Each output filter gets zero mean and unit (biased) variance over its
    height, width and input-channel axes: `(k - mean) / sqrt(var + epsilon)`.

    Args:
        kernel: tensor of shape `(h, w, in_channels, out_channels)`.
        epsilon: float added to the variance, `1e-10` as in BiT.

    Returns:
        A float32 tensor of the kernel's shape (float64 for a float64 kernel).

    Example:
        >>> k = standardize_kernel(np.random.rand(3, 3, 8, 16))
        >>> ops.mean(k, axis=(0, 1, 2)).shape
        (16,)
    """
    # At least float32 (float64 kernels stay float64, as in Keras' GroupNormalization).
    kernel = ops.cast(kernel, _at_least_float32(kernel.dtype))
    mean, var = ops.moments(kernel, axes=(0, 1, 2), keepdims=True)
    # Divide by the square root rather than multiply by rsqrt, as the authors do:
    # parity with the published checkpoints is to the last bit where possible.
    return (kernel - mean) / ops.sqrt(var + epsilon)


@keras.saving.register_keras_serializable(package="keras_bit")
class StandardizedConv2D(keras.layers.Conv2D):
    """2D convolution with a weight-standardized kernel (BiT's convolution).

    Before every convolution the kernel is standardized per output channel
    (mean and biased variance over the HWI axes, `epsilon=1e-10`). The
    standardization runs in float32 even under a mixed-precision policy; only
    the standardized kernel is cast to the compute dtype. The kernel variable
    itself stays as trained, so checkpoints hold the raw kernels as in BiT.

    Args:
        filters: int, number of output channels.
        kernel_size: int or tuple of 2 ints.
        epsilon: float added to the kernel variance. Defaults to `1e-10`.
        use_bias: bool. BiT's convolutions have none. Defaults to `False`.
        **kwargs: any other `keras.layers.Conv2D` argument (`strides`,
            `padding`, `kernel_initializer`, `name`, `dtype`, ...).

    Reference:
        Qiao et al., https://arxiv.org/abs/1903.10520; BiT, arXiv 1912.11370.

    Example:
        >>> conv = StandardizedConv2D(64, 3, name="conv")
        >>> conv(np.zeros((1, 8, 8, 3))).shape
        (1, 6, 6, 64)
    """

    def __init__(self, filters, kernel_size, epsilon=WS_EPSILON, use_bias=False, **kwargs):
        super().__init__(filters, kernel_size, use_bias=use_bias, **kwargs)
        if not isinstance(epsilon, (int, float)) or epsilon < 0:
            raise ValueError(
                f"`epsilon` must be a non-negative float. Received: epsilon={epsilon!r}"
            )
        self.epsilon = float(epsilon)

    def add_weight(self, *args, **kwargs):
        # The raw float32 kernel must reach `convolution_op`: autocasting it to a
        # float16 compute dtype first would lose the precision the moments need.
        kwargs["autocast"] = False
        return super().add_weight(*args, **kwargs)

    def convolution_op(self, inputs, kernel):
        kernel = ops.cast(standardize_kernel(kernel, self.epsilon), inputs.dtype)
        return super().convolution_op(inputs, kernel)

    def call(self, inputs):
        # With autocast off, a float32 bias would promote the output; keep the policy's dtype.
        return ops.cast(super().call(inputs), self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config["epsilon"] = self.epsilon
        return config


@keras.saving.register_keras_serializable(package="keras_bit")
class GroupNormalization(keras.layers.GroupNormalization):
    """Keras' GroupNormalization with BiT's defaults, an optional fused ReLU and faster NHWC paths.

    Same layer, weights and numerics contract as
    `keras.layers.GroupNormalization` (32 groups and epsilon 1e-5 as in BiT),
    plus `activation`, applied to the result (BiT follows every GroupNorm with
    a ReLU; fusing it saves a pass over the activations).

    For 4D channels-last inputs on TensorFlow on CPU, the layer runs a fused
    C++ kernel (`keras_bit.kernels`: one op, statistics and the ReLU in three
    passes per sample, bfloat16 in and out), built on first use; where it
    cannot run (other backends, GPU/TPU, XLA, exported files, no compiler) the
    keras.ops path below computes the same function. That path computes the
    statistics in a cheaper order than Keras' 5D reduction: per-channel mean
    and variance over the contiguous spatial axes (two-pass, as
    `ops.moments`), combined exactly into group statistics
    (`var_group = mean(var_channel) + mean((mean_channel - mean_group)^2)`,
    valid because every channel of a group has the same number of elements),
    applied as one per-(sample, channel) scale and shift. Other ranks and
    layouts use Keras' implementation unchanged.

    Statistics and the normalisation run in float32 (float64 for float64
    inputs) for any input dtype, and the variance is never computed as
    `E[x^2] - E[x]^2`, so constant inputs give exact zeros, never NaN.

    Args:
        groups: int, number of channel groups. Defaults to 32.
        epsilon: float added to the group variance. Defaults to `1e-5`.
        activation: None or a Keras activation applied to the output; "relu"
            is fused into the kernel. Defaults to None.
        **kwargs: any other `keras.layers.GroupNormalization` argument.

    Reference:
        Wu & He, "Group Normalization", https://arxiv.org/abs/1803.08494.
        Chan, Golub & LeVeque, "Algorithms for computing the sample variance"
        (1983), for combining per-channel moments.

    Example:
        >>> gn = GroupNormalization(activation="relu", name="gn")
        >>> gn(np.random.rand(2, 4, 4, 64)).shape
        (2, 4, 4, 64)
    """

    def __init__(self, groups=GN_GROUPS, epsilon=GN_EPSILON, activation=None, **kwargs):
        super().__init__(groups=groups, epsilon=epsilon, **kwargs)
        try:
            self.activation = keras.activations.get(activation)
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"`activation` must be None or a Keras activation. Received: activation={activation!r}") from e

    def call(self, inputs):
        if len(inputs.shape) != 4 or self.axis not in (-1, 3):
            return self.activation(super().call(inputs))
        gamma = self.gamma if self.scale else ops.ones((inputs.shape[-1],))
        beta = self.beta if self.center else ops.zeros((inputs.shape[-1],))
        # The kernel returns its input's dtype: only where that is the layer's compute dtype.
        if (self.activation in (keras.activations.relu, keras.activations.linear)
                and keras.backend.standardize_dtype(inputs.dtype) == self.compute_dtype):
            outputs = kernels.group_norm(inputs, ops.cast(gamma, "float32"), ops.cast(beta, "float32"), self.groups,
                                         self.epsilon, relu=self.activation is keras.activations.relu)
            if outputs is not None:
                return ops.cast(outputs, self.compute_dtype)
        return self.activation(self._normalize_nhwc(inputs, gamma, beta))

    def _normalize_nhwc(self, inputs, gamma, beta):
        channels = inputs.shape[-1]
        per_group = channels // self.groups
        x = ops.cast(inputs, _at_least_float32(inputs.dtype))
        batch = ops.shape(x)[0]
        channel_mean, channel_var = ops.moments(x, axes=(1, 2))
        channel_mean = ops.reshape(channel_mean, (batch, self.groups, per_group))
        channel_var = ops.reshape(channel_var, (batch, self.groups, per_group))
        mean = ops.sum(channel_mean, axis=-1, keepdims=True) / per_group
        var = ops.sum(channel_var + ops.square(channel_mean - mean), axis=-1, keepdims=True) / per_group
        scale = ops.rsqrt(var + self.epsilon) * ops.reshape(ops.cast(gamma, x.dtype), (self.groups, per_group))
        shift = ops.reshape(ops.cast(beta, x.dtype), (self.groups, per_group)) - mean * scale
        outputs = x * ops.reshape(scale, (batch, 1, 1, channels)) + ops.reshape(shift, (batch, 1, 1, channels))
        return ops.cast(outputs, self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config["activation"] = keras.activations.serialize(self.activation)
        return config
