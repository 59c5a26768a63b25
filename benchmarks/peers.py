"""The peers a user would pick for BiT-R50x1 on a CPU, as zero-argument callables for benchmark.py.

- timm's `resnetv2_50x1_bit`, eager, channels_last, float32 and bfloat16
  autocast (inference and SGD training steps). Where timm cannot be imported
  (on this project's machines PyPI's torchvision is a CUDA build that does
  not load beside the CPU torch, and timm imports torchvision), the same
  network from `torch_bit.py` stands in: the same PyTorch ops timm runs
  (`F.group_norm`, a weight-standardized `F.conv2d`); the report names which.
- ONNX Runtime and OpenVINO (float32 and bfloat16 precision hints) on the
  ONNX file PyTorch exports from that model.

Every peer is optional: a missing package gives a note instead of a row.
Nothing in keras_bit imports this module.
"""

import importlib
import os

import numpy as np


def _torch():
    import torch

    torch.set_num_threads(os.cpu_count())
    return torch


def torch_model(classes=1000):
    """`(name, eval-mode model)`: timm's BiT-R50x1, or torch_bit.py's where timm does not import."""
    torch = _torch()
    try:
        timm = importlib.import_module("timm")
        model, name = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=classes), "timm"
    except (ImportError, RuntimeError) as e:  # RuntimeError: torchvision's ops fail to register
        import torch_bit

        model = torch_bit.ResNetV2(classes=classes)
        name = f"PyTorch torch_bit.py (timm unavailable: {type(e).__name__})"
    return name, model.eval().to(memory_format=torch.channels_last)


def torch_inference(model, x_nhwc, bf16):
    """Eager inference of `model` on NHWC `x` given as channels_last NCHW, optionally under bf16 autocast."""
    torch = _torch()
    x = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)  # a channels_last view, no copy

    def run():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(x).float().numpy()

    return run


def torch_training_step(model, x_nhwc, labels, bf16):
    """One SGD-momentum step (forward, backward, update) of `model`, optionally under bf16 autocast."""
    torch = _torch()
    model = model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9)
    x = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)
    y = torch.from_numpy(labels)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    return step


def export_onnx(model, size, path):
    """The ONNX file PyTorch's exporter writes for `model` (NCHW input, dynamic batch)."""
    torch = _torch()
    with torch.inference_mode():
        torch.onnx.export(model.eval(), (torch.zeros(1, 3, size, size),), path, dynamo=False, opset_version=18,
                          input_names=["images"], output_names=["logits"], dynamic_axes={"images": {0: "batch"}})
    return path


def onnxruntime_session(path, x_nhwc):
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))
    return lambda: session.run(None, {"images": x})[0]


def openvino_request(path, x_nhwc, precision):
    """OpenVINO on CPU with `precision` "f32" or "bf16" (its default on bf16-capable CPUs)."""
    import openvino

    compiled = openvino.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                           "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    x = np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))
    return lambda: request.infer({0: x})[compiled.output(0)]


def available(module):
    """None if `module` imports, else a one-line note."""
    try:
        importlib.import_module(module)
        return None
    except (ImportError, RuntimeError) as e:
        return f"{module} not available ({type(e).__name__}: {str(e).splitlines()[0][:80]})"


def _rss_child(path, size, batch):
    """Runs one peer path 5 times in this fresh process (no TensorFlow) and prints its peak RSS as JSON."""
    import json
    import tempfile

    x = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype("float32")
    _torch()
    if path != "framework only: PyTorch imported":
        _, net = torch_model()
        if path == "peer: timm fp32":
            run = torch_inference(net, x, bf16=False)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                run = openvino_request(export_onnx(net, size, os.path.join(tmp, "peer.onnx")), x, "f32")
            del net
        for _ in range(5):
            run()
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    print(json.dumps({"path": path, "peak_rss_mb": peak}))


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 5 and sys.argv[1] == "--rss-child":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        _rss_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
