"""A minimal PyTorch BiT-R50x1 (ResNetV2 + GroupNorm + weight-standardized convs).

The same-run baseline for benchmarks/benchmark.py, written from the paper's
description in the layout the authors' own PyTorch code uses (NCHW, weight
standardization recomputed in every forward, `nn.GroupNorm`). It is only a
speed reference: nothing in keras_bit imports it and PyTorch is never a
dependency of the package.
"""

import torch
import torch.nn.functional as F
from torch import nn


class StdConv2d(nn.Conv2d):
    def forward(self, x):
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
        weight = (self.weight - mean) / torch.sqrt(var + 1e-10)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class PreActBottleneck(nn.Module):
    def __init__(self, cin, cout, cmid, stride):
        super().__init__()
        self.gn1 = nn.GroupNorm(32, cin, eps=1e-5)
        self.conv1 = StdConv2d(cin, cmid, 1, bias=False)
        self.gn2 = nn.GroupNorm(32, cmid, eps=1e-5)
        self.conv2 = StdConv2d(cmid, cmid, 3, stride=stride, padding=1, bias=False)
        self.gn3 = nn.GroupNorm(32, cmid, eps=1e-5)
        self.conv3 = StdConv2d(cmid, cout, 1, bias=False)
        self.downsample = StdConv2d(cin, cout, 1, stride=stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = F.relu(self.gn1(x))
        residual = self.downsample(out) if self.downsample is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.gn2(out)))
        out = self.conv3(F.relu(self.gn3(out)))
        return out + residual


class ResNetV2(nn.Module):
    def __init__(self, block_units=(3, 4, 6, 3), width=1, classes=1000):
        super().__init__()
        self.block_units = tuple(block_units)
        root = 64 * width
        self.root = nn.Sequential(
            StdConv2d(3, root, 7, stride=2, padding=3, bias=False),
            nn.ConstantPad2d(1, 0.0),
            nn.MaxPool2d(3, stride=2),
        )
        units, cin = [], root
        for b, n in enumerate(block_units):
            mid = root * 2**b
            for u in range(n):
                stride = 2 if (u == 0 and b > 0) else 1
                units.append(PreActBottleneck(cin, 4 * mid, mid, stride))
                cin = 4 * mid
        self.body = nn.Sequential(*units)
        self.gn = nn.GroupNorm(32, cin, eps=1e-5)
        self.head = nn.Conv2d(cin, classes, 1)

    def features(self, x):
        """The pooled pre-head features, `(batch, channels)`."""
        return F.relu(self.gn(self.body(self.root(x)))).mean(dim=(2, 3))

    def logits(self, features):
        """The head applied to `features()`."""
        return self.head(features[:, :, None, None]).flatten(1)

    def forward(self, x):
        return self.logits(self.features(x))


def load_official(model, weights):
    """Copies an official-layout BiT checkpoint (`.npz` key -> array, HWIO kernels) into `model`.

    The same random checkpoint then runs in both frameworks, so the benchmark
    can check that this baseline computes the function keras_bit computes and
    compare the two frameworks' bfloat16 numerics on equal terms.
    """

    def conv(module, key):
        kernel = weights[f"{key}/standardized_conv2d/kernel"]
        module.weight.data = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())

    def gn(module, key):
        module.weight.data = torch.from_numpy(weights[f"{key}/group_norm/gamma"].copy())
        module.bias.data = torch.from_numpy(weights[f"{key}/group_norm/beta"].copy())

    conv(model.root[0], "resnet/root_block")
    units = iter(model.body)
    for b, count in enumerate(model.block_units, start=1):
        for u in range(1, count + 1):
            unit, prefix = next(units), f"resnet/block{b}/unit{u:02d}"
            for letter, norm, convolution in (("a", unit.gn1, unit.conv1), ("b", unit.gn2, unit.conv2),
                                              ("c", unit.gn3, unit.conv3)):
                gn(norm, f"{prefix}/{letter}")
                conv(convolution, f"{prefix}/{letter}")
            if unit.downsample is not None:
                conv(unit.downsample, f"{prefix}/a/proj")
    gn(model.gn, "resnet")
    model.head.weight.data = torch.from_numpy(weights["resnet/head/conv2d/kernel"].transpose(3, 2, 0, 1).copy())
    model.head.bias.data = torch.from_numpy(weights["resnet/head/conv2d/bias"].copy())
    return model
