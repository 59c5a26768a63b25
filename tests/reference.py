"""An independent NumPy (float64) BiT forward pass, and random official-layout checkpoints.

Nothing here imports keras_bit or Keras: it is written from the BiT paper and
the authors' key layout only, so agreement with it is evidence, not tautology.
"""

import numpy as np

GROUPS = 32


def random_checkpoint(block_units, width=1, classes=None, base=64, seed=0, in_channels=3):
    """A dict in the official .npz key layout with random weights (float32).

    GroupNorm scales/offsets and the head are random too, so that every
    parameter influences the output (a zero head would hide all errors).
    """
    rng = np.random.default_rng(seed)
    d = {}

    def conv(key, shape):
        d[f"{key}/standardized_conv2d/kernel"] = rng.normal(size=shape).astype(np.float32)

    def gn(key, c):
        d[f"{key}/group_norm/gamma"] = (1.0 + 0.2 * rng.normal(size=c)).astype(np.float32)
        d[f"{key}/group_norm/beta"] = (0.2 * rng.normal(size=c)).astype(np.float32)

    root = base * width
    conv("resnet/root_block", (7, 7, in_channels, root))
    cin = root
    for b, units in enumerate(block_units, start=1):
        mid = root * 2 ** (b - 1)
        out = 4 * mid
        for u in range(1, units + 1):
            p = f"resnet/block{b}/unit{u:02d}"
            gn(f"{p}/a", cin)
            conv(f"{p}/a", (1, 1, cin, mid))
            if u == 1 and (b > 1 or cin != out):
                conv(f"{p}/a/proj", (1, 1, cin, out))
            gn(f"{p}/b", mid)
            conv(f"{p}/b", (3, 3, mid, mid))
            gn(f"{p}/c", mid)
            conv(f"{p}/c", (1, 1, mid, out))
            cin = out
    gn("resnet", cin)
    if classes:
        d["resnet/head/conv2d/kernel"] = (0.05 * rng.normal(size=(1, 1, cin, classes))).astype(np.float32)
        d["resnet/head/conv2d/bias"] = (0.1 * rng.normal(size=classes)).astype(np.float32)
    return d


def standardize(k):
    k = k.astype(np.float64)
    mean = k.mean(axis=(0, 1, 2), keepdims=True)
    var = k.var(axis=(0, 1, 2), keepdims=True)  # biased, as tf.nn.moments
    return (k - mean) / np.sqrt(var + 1e-10)


def pad(x, p):
    return np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))


def conv2d(x, k, stride=1, dilation=1):
    """VALID convolution, NHWC x HWIO, by explicit patch extraction; tap (i, j) reads offset dilation * (i, j)."""
    kh, kw, _, _ = k.shape
    n, h, w, c = x.shape
    oh, ow = (h - dilation * (kh - 1) - 1) // stride + 1, (w - dilation * (kw - 1) - 1) // stride + 1
    out = np.zeros((n, oh, ow, k.shape[3]))
    for i in range(kh):
        for j in range(kw):
            r, q = dilation * i, dilation * j
            patch = x[:, r : r + stride * (oh - 1) + 1 : stride, q : q + stride * (ow - 1) + 1 : stride, :]
            out += np.tensordot(patch, k[i, j], axes=([3], [0]))
    return out


def group_norm(x, gamma, beta, groups=GROUPS, eps=1e-5):
    n, h, w, c = x.shape
    g = x.reshape(n, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    g = (g - mean) / np.sqrt(var + eps)
    return g.reshape(n, h, w, c) * gamma + beta


def max_pool_3x3_s2(x):
    n, h, w, c = x.shape
    oh, ow = (h - 3) // 2 + 1, (w - 3) // 2 + 1
    out = np.full((n, oh, ow, c), -np.inf)
    for i in range(3):
        for j in range(3):
            out = np.maximum(out, x[:, i : i + 2 * (oh - 1) + 1 : 2, j : j + 2 * (ow - 1) + 1 : 2, :])
    return out


def forward(d, x, groups=GROUPS, features=False, output_stride=32):
    """BiT forward pass of `x` (NHWC, already in [-1, 1]) with checkpoint dict `d`.

    Returns logits when the dict has a head and `features` is False, else the
    final GN-ReLU feature map. `output_stride` 16 or 8 dilates the later blocks
    instead of striding them (`stage_dilations`).
    """
    relu = lambda t: np.maximum(t, 0.0)  # noqa: E731
    gn = lambda t, key: group_norm(t, d[f"{key}/group_norm/gamma"], d[f"{key}/group_norm/beta"], groups)  # noqa: E731
    ws = lambda key: standardize(d[f"{key}/standardized_conv2d/kernel"])  # noqa: E731

    x = x.astype(np.float64)
    x = conv2d(pad(x, 3), ws("resnet/root_block"), stride=2)
    x = max_pool_3x3_s2(pad(x, 1))  # zero padding, as the authors do
    for b, (block_stride, first_rate, rate) in enumerate(stage_dilations(output_stride), start=1):
        u = 1
        while f"resnet/block{b}/unit{u:02d}/a/group_norm/gamma" in d:
            p = f"resnet/block{b}/unit{u:02d}"
            stride = block_stride if u == 1 else 1
            dil = first_rate if u == 1 else rate
            pre = relu(gn(x, f"{p}/a"))
            shortcut = x
            if f"{p}/a/proj/standardized_conv2d/kernel" in d:
                shortcut = conv2d(pre, ws(f"{p}/a/proj"), stride=stride)
            y = conv2d(pre, ws(f"{p}/a"))
            # 3x3 padding = dilation on each side, as timm's get_padding(3, s, d).
            y = conv2d(pad(relu(gn(y, f"{p}/b")), dil), ws(f"{p}/b"), stride=stride, dilation=dil)
            y = conv2d(relu(gn(y, f"{p}/c")), ws(f"{p}/c"))
            x = y + shortcut
            u += 1
    x = relu(gn(x, "resnet"))
    if features or "resnet/head/conv2d/kernel" not in d:
        return x
    pooled = x.mean(axis=(1, 2))
    return pooled @ d["resnet/head/conv2d/kernel"][0, 0].astype(np.float64) + d["resnet/head/conv2d/bias"]


def stage_dilations(output_stride=32):
    """`(stride, first-unit dilation, later-unit dilation)` for blocks 1-4, from timm's ResNetV2 rule.

    The network is at stride 4 after the stem. Block 1 would stride by 1 and
    the others by 2; once the running stride has reached `output_stride`, a
    block's stride is multiplied into the dilation instead and the block
    strides by 1. The first unit of a block uses dilation 1 while the
    dilation is 1 or 2, and 2 beyond (timm ResNetStage `first_dilation`).
    """
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
    current, rate, rows = 4, 1, []
    for b in range(1, 5):
        s = 1 if b == 1 else 2
        if current >= output_stride:
            rate, s = rate * s, 1
        current *= s
        rows.append((s, 1 if rate <= 2 else 2, rate))
    return tuple(rows)


# --- The same weights in PyTorch key layouts (timm, transformers), from the published layouts alone. ---

_PYTORCH_UNIT_PARTS = {"a": "1", "b": "2", "c": "3"}


def _oihw(kernel):
    """A TF convolution kernel (H, W, I, O) as PyTorch stores it (O, I, H, W)."""
    return np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))


def _timm_key(key):
    """timm's name of an official-layout key.

    Example: resnet/block2/unit01/b/group_norm/gamma -> stages.1.blocks.0.norm2.weight.
    """
    parts = key.split("/")
    leaf = {"kernel": "weight", "gamma": "weight", "beta": "bias", "bias": "bias"}[parts[-1]]
    if parts[1] == "root_block":
        return f"stem.conv.{leaf}"
    if parts[1] == "group_norm":
        return f"norm.{leaf}"
    if parts[1] == "head":
        return f"head.fc.{leaf}"
    block, unit, part = int(parts[1][len("block"):]), int(parts[2][len("unit"):]), parts[3]
    if part == "a" and parts[4] == "proj":
        module = "downsample.conv"
    else:
        module = ("conv" if parts[4] == "standardized_conv2d" else "norm") + _PYTORCH_UNIT_PARTS[part]
    return f"stages.{block - 1}.blocks.{unit - 1}.{module}.{leaf}"


def to_timm(d):
    """An official-layout dict as timm's ResNetV2 state dict: OIHW kernels, head.fc a (C, in, 1, 1) 1x1 conv."""
    out = {}
    for key, value in d.items():
        out[_timm_key(key)] = _oihw(value) if value.ndim == 4 else np.array(value)
    return out


def to_transformers(d, prefix="bit."):
    """An official-layout dict as transformers' BitForImageClassification state dict (`prefix=""`: BitModel).

    transformers renames timm's keys: stem.conv -> embedder.convolution, blocks -> layers, norm -> norm,
    the rest under encoder.; the head is a Linear `classifier.1` (C, in), absent from a BitModel.
    """
    out = {}
    for key, value in to_timm(d).items():
        if key.startswith("head.fc."):
            if prefix == "bit.":  # a BitModel (no prefix) has no classifier
                leaf = key.rsplit(".", 1)[1]
                out["classifier.1." + leaf] = value.reshape(value.shape[:2]) if value.ndim == 4 else value
            continue
        if key.startswith("stem.conv."):
            name = "embedder.convolution." + key.rsplit(".", 1)[1]
        elif key.startswith("norm."):
            name = key
        else:
            name = "encoder." + key.replace(".blocks.", ".layers.")
        out[prefix + name] = value
    return out
