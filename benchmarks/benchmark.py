"""keras_bit speed benchmarks against the peers users pick: img/s, the machine's ceiling, RSS, profile.

    python benchmarks/benchmark.py            # full suite (about 6 minutes on a 2-core Zen 5)
    python benchmarks/benchmark.py --quick    # 224 px batch 16 inference + training, fewer repeats
    python benchmarks/benchmark.py --json     # machine-readable (also with --quick)
    python benchmarks/benchmark.py --only profile   # sections: inference, training, bf16, trained-bf16, rss,
                                                    # load, profile

Every number is the median of several timed runs after warm-up, and every
comparison is a ratio between paths timed in the same process and the same
rounds (interleaved), so that the ratios hold on a noisy machine; the
float32 / bfloat16 matmul peak measured in the same run is the ceiling.
Peers (benchmarks/peers.py, each optional): timm's BiT-R50x1 eager
(channels_last, float32 and bfloat16 autocast), ONNX Runtime and OpenVINO
(float32, bfloat16) on PyTorch's ONNX export of it. Nothing here is asserted:
speed goals are read off this output, never checked by the test suite.
benchmarks/RESULTS.md records the numbers.
"""

import argparse
import collections
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)
import keras_bit  # noqa: E402
import peers  # noqa: E402
from keras_bit import kernels  # noqa: E402
from keras_bit.export import export_saved_model, fold_standardization  # noqa: E402


def _optional_torch():
    """PyTorch, an optional peer, or None; imported only where used, so that no RSS child carries it."""
    try:
        import torch
    except ImportError:
        return None
    return torch


MODEL = "BiT-S-R50x1"
R50X1_GFLOP_224 = 8.46  # multiply-adds x 2 of BiT-R50x1 at 224 px
BEST_FP32 = "keras_bit tf.function + fold, fused GroupNorm"
MIXED_BF16 = "keras_bit mixed_bfloat16 tf.function + fold, fused GroupNorm"
STORED_BF16 = "keras_bit bfloat16 weights (fold dtype='bfloat16'), fused GroupNorm"


def _median_seconds(fn, repeats, warmup=2):
    return _interleaved_seconds({"": fn}, repeats, warmup)[""]


def _interleaved_seconds(paths, repeats, warmup=2):
    """Median seconds per call of each path; the paths take turns in every round.

    Interleaving spreads the machine's slow phases over all paths, so their
    ratios stay stable even when the absolute numbers drift.
    """
    for fn in paths.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _images(batch, size, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)).astype("float32")


def _random_checkpoint(classes=1000, seed=0):
    """An official-layout random checkpoint: unit-scale kernels, random GN and head (tests/reference.py)."""
    import reference

    return reference.random_checkpoint((3, 4, 6, 3), width=1, classes=classes, seed=seed)


def _real_scale_weights(model, seed=0):
    """Loads `_random_checkpoint` into `model` through keras_bit's own loader."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "random.npz")
        np.savez(path, **_random_checkpoint(int(model.output_shape[-1]), seed))
        keras_bit.load_weights(model, path)


def _build(size, policy="float32"):
    keras.mixed_precision.set_global_policy(policy)
    try:
        return keras_bit.BiT(MODEL, weights=None, input_shape=(size, size, 3))
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _torch_model(seed=0):
    """The PyTorch baseline holding the same random checkpoint as `_real_scale_weights` gives keras_bit."""
    import torch_bit

    _optional_torch().set_num_threads(os.cpu_count())
    return torch_bit.load_official(torch_bit.ResNetV2(), _random_checkpoint(seed=seed)).eval()


@contextlib.contextmanager
def _fused_kernels(on):
    """keras_bit's fused GroupNorm kernel on or off for the tf.functions traced (or models fitted) inside."""
    previous = os.environ.get(kernels.ENV_SWITCH)
    os.environ[kernels.ENV_SWITCH] = "1" if on else "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[kernels.ENV_SWITCH]
        else:
            os.environ[kernels.ENV_SWITCH] = previous


def _gflop_per_image(size):
    return R50X1_GFLOP_224 * (size / 224) ** 2  # the convolutions dominate and scale with the pixel count


def inference(size, batch, repeats, ceiling_gflops, quick=False):
    """img/s of keras_bit's inference paths and of its peers for one (size, batch), with the ratios."""
    x_np = _images(batch, size)
    x = tf.constant(x_np)
    model = _build(size)
    _real_scale_weights(model)
    folded = fold_standardization(model)
    bf16 = fold_standardization(_bf16_copy(model, size))

    def graph(m, fused=True):
        fn = tf.function(lambda t: m(t, training=False))
        with _fused_kernels(fused):
            fn(x)  # traced here, with or without the kernel
        return lambda: fn(x).numpy()

    paths = {
        "keras_bit model.predict": lambda: model.predict(x, batch_size=batch, verbose=0),
        BEST_FP32: graph(folded),
        "keras_bit tf.function + fold, keras.ops GroupNorm": graph(folded, fused=False),
        MIXED_BF16: graph(bf16),
        STORED_BF16: graph(fold_standardization(model, dtype="bfloat16")),
    }
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        if not quick:
            classes = [str(i) for i in range(int(model.output_shape[-1]))]
            served = tf.saved_model.load(export_saved_model(model, tmp, class_names=classes))
            signature = served.signatures["serving_default"]
            pixels = tf.constant(((x_np + 1) * 127.5).astype("uint8"))
            paths["keras_bit exported SavedModel (uint8 in, standard ops)"] = lambda: signature(images=pixels)[
                "probabilities"].numpy()
        notes += _add_peers(paths, size, x_np, tmp)
        rows = {name: batch / seconds for name, seconds in _interleaved_seconds(paths, repeats).items()}
    ceiling = ceiling_gflops / _gflop_per_image(size)
    best_bf16 = max((MIXED_BF16, STORED_BF16), key=rows.get)
    ratios = {"best fp32 share of the fp32 matmul ceiling": rows[BEST_FP32] / ceiling,
              "fused / keras.ops GroupNorm (fp32)": rows[BEST_FP32] / rows[
                  "keras_bit tf.function + fold, keras.ops GroupNorm"],
              "best bf16 path": "stored bfloat16 weights" if best_bf16 == STORED_BF16 else "mixed_bfloat16",
              "best bf16 / best fp32": rows[best_bf16] / rows[BEST_FP32]}
    for peer in [name for name in rows if name.startswith("peer")]:
        mine = best_bf16 if "bf16" in peer else BEST_FP32
        ratios[f"{'bf16' if 'bf16' in peer else 'fp32'} keras_bit / {peer[6:]}"] = rows[mine] / rows[peer]
    return {"size": size, "batch": batch, "img_per_s": rows, "ratios": ratios, "notes": notes}


def _add_peers(paths, size, x_np, tmp):
    """Adds timm (fp32, bf16 autocast), ONNX Runtime and OpenVINO (fp32, bf16) to `paths`; returns notes."""
    missing = peers.available("torch")
    if missing:
        return [missing]
    name, net = peers.torch_model()
    notes = [f"PyTorch model: {name}"]
    paths["peer: timm eager channels_last fp32"] = peers.torch_inference(net, x_np, bf16=False)
    paths["peer: timm eager channels_last bf16 autocast"] = peers.torch_inference(net, x_np, bf16=True)
    onnx_path = peers.export_onnx(net, size, os.path.join(tmp, "peer.onnx"))
    for module, label, make in (("onnxruntime", "ONNX Runtime fp32",
                                 lambda: peers.onnxruntime_session(onnx_path, x_np)),
                                ("openvino", "OpenVINO fp32", lambda: peers.openvino_request(onnx_path, x_np, "f32")),
                                ("openvino", "OpenVINO bf16", lambda: peers.openvino_request(onnx_path, x_np, "bf16"))):
        missing = peers.available(module)
        if missing:
            notes.append(missing)
        else:
            paths[f"peer: {label}"] = make()
    return notes


def _bf16_copy(model, size):
    copy = _build(size, "mixed_bfloat16")
    copy.set_weights(model.get_weights())
    return copy


def _with_features(model):
    """`model` with a second output, the pooled pre-head features, so one call gives both."""
    return keras.Model(model.input, [model.output, model.get_layer("avg_pool").output])


def _top1_and_features(model, x):
    probabilities, features = model(x, training=False)
    return np.argmax(keras.ops.convert_to_numpy(probabilities), -1), np.asarray(tf.cast(features, tf.float32))


def _max_relative_error(values, reference):
    return float(np.abs(values - reference).max() / np.abs(reference).max())


def bf16_agreement(size=128, images=512, batch=32):
    """Top-1 agreement of mixed_bfloat16 with float32 on random inputs, real-scale random weights.

    Two controls calibrate the number. float32 run on inputs rounded to
    bfloat16 (one rounding, everything else float32) bounds what any bfloat16
    pipeline can reach on these inputs; PyTorch's bfloat16 autocast on the same
    checkpoint shows what another framework's bfloat16 reaches. The float32
    PyTorch model is also compared with keras_bit's, which checks that the
    speed baseline computes the same function.
    """
    model = _build(size)
    _real_scale_weights(model)
    float32 = _with_features(model)
    bfloat16 = _with_features(_bf16_copy(model, size))
    torch = _optional_torch()
    net = _torch_model() if torch is not None else None
    agree = collections.Counter()
    error = collections.defaultdict(float)
    for start in range(0, images, batch):
        x = _images(batch, size, seed=start + 1)
        top1, features = _top1_and_features(float32, x)
        top1_bf16, features_bf16 = _top1_and_features(bfloat16, x)
        agree["bf16"] += int(np.sum(top1 == top1_bf16))
        x_rounded = tf.cast(tf.cast(x, tf.bfloat16), tf.float32)
        agree["fp32 on bf16-rounded inputs"] += int(np.sum(top1 == _top1_and_features(float32, x_rounded)[0]))
        error["bf16 feature"] = max(error["bf16 feature"], _max_relative_error(features_bf16, features))
        if net is not None:
            with torch.no_grad():
                x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
                torch_features = net.features(x_torch)
                torch_top1 = net.logits(torch_features).argmax(-1).numpy()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    torch_top1_bf16 = net(x_torch).argmax(-1).numpy()
            agree["PyTorch bf16 autocast vs PyTorch fp32"] += int(np.sum(torch_top1 == torch_top1_bf16))
            agree["PyTorch fp32 vs keras_bit fp32"] += int(np.sum(torch_top1 == top1))
            error["PyTorch fp32 feature"] = max(error["PyTorch fp32 feature"],
                                                _max_relative_error(torch_features.numpy(), features))
    return {
        "size": size,
        "images": images,
        "top1_agreement": {name: count / images for name, count in agree.items()},
        "max_feature_error": dict(error),
    }


def training(size, batch, steps, warmup=3):
    """Training-step img/s (SGD momentum, model.fit under a one-device MirroredStrategy) against timm."""
    x = _images(batch, size)
    labels = np.arange(batch) % 10
    data = tf.data.Dataset.from_tensors((x, keras.utils.to_categorical(labels, 10))).repeat()

    def keras_fit(policy, fused):
        strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
        with strategy.scope():
            keras.mixed_precision.set_global_policy(policy)
            try:
                model = keras_bit.BiT(MODEL, weights=None, input_shape=(size, size, 3), classes=10,
                                      classifier_activation=None)
            finally:
                keras.mixed_precision.set_global_policy("float32")
            model.compile(optimizer=keras.optimizers.SGD(0.003, momentum=0.9),
                          loss=keras.losses.CategoricalCrossentropy(from_logits=True), jit_compile=False)
        stamps = []
        callback = keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda batch, logs=None: stamps.append(time.perf_counter()))
        with _fused_kernels(fused):
            model.fit(data, steps_per_epoch=warmup + steps, epochs=1, callbacks=[callback], verbose=0)
        return batch / statistics.median(np.diff(stamps[warmup - 1:]))

    rows = {
        "keras_bit model.fit fp32, fused GroupNorm": keras_fit("float32", True),
        "keras_bit model.fit fp32, keras.ops GroupNorm": keras_fit("float32", False),
        "keras_bit model.fit mixed_bfloat16, fused GroupNorm": keras_fit("mixed_bfloat16", True),
    }
    ratios = {"fused / keras.ops GroupNorm (fp32)": rows["keras_bit model.fit fp32, fused GroupNorm"] / rows[
        "keras_bit model.fit fp32, keras.ops GroupNorm"]}
    torch = _optional_torch()
    notes = [peers.available("torch")] if torch is None else []
    if torch is not None:
        name, _ = peers.torch_model(classes=10)
        notes.append(f"PyTorch model: {name}")
        steps_by_path = {f"peer: timm eager channels_last {kind}": peers.torch_training_step(
            peers.torch_model(classes=10)[1], x, labels, bf16=kind == "bf16 autocast") for kind in
            ("fp32", "bf16 autocast")}
        for path, seconds in _interleaved_seconds(steps_by_path, steps, warmup).items():
            rows[path] = batch / seconds
        for mine, peer in (("fp32, fused", "fp32"), ("mixed_bfloat16, fused", "bf16 autocast")):
            ours = rows[f"keras_bit model.fit {mine} GroupNorm"]
            ratios[f"keras_bit {mine.split(',')[0]} / timm {peer}"] = ours / rows[
                f"peer: timm eager channels_last {peer}"]
    return {"size": size, "batch": batch, "img_per_s": rows, "ratios": ratios, "notes": notes}


def trained_bf16_agreement(model_path):
    """Top-1 agreement of mixed_bfloat16 with float32 on a model trained on real images.

    `model_path` is the README main job's `digits_run/model.keras` (BiT-M-R50x1
    fine-tuned on scikit-learn's digits at 32 px); the images are its
    held-out digits (the run's own split) and, for more cases, all 1797.
    Both models are folded and use the fused GroupNorm, as the fast paths do.
    """
    from keras_bit.train import pipeline, sources as data

    model = keras.saving.load_model(model_path, compile=False)
    size = int(model.input_shape[1])
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        copy = keras.Model.from_config(_retyped_config(model.get_config()))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    copy.set_weights(model.get_weights())
    dataset = data.load("sklearn:digits")
    result = {"model": model_path, "size": size}
    for name, splits in (("held-out", [dataset.eval]), ("all", [dataset.train, dataset.eval])):
        images = np.concatenate([np.concatenate([x for x, _ in pipeline.eval_pipeline(
            split, dataset.num_classes, 256, size).as_numpy_iterator()]) for split in splits])
        labels = np.concatenate([np.asarray(split.labels) for split in splits])
        top1 = {kind: np.argmax(np.asarray(tf.cast(fold_standardization(m)(images, training=False), tf.float32)), -1)
                for kind, m in (("fp32", model), ("bf16", copy))}
        result[name] = {"images": len(labels), "agreement": float(np.mean(top1["fp32"] == top1["bf16"])),
                        "fp32_accuracy": float(np.mean(top1["fp32"] == labels)),
                        "bf16_accuracy": float(np.mean(top1["bf16"] == labels))}
    return result


def _retyped_config(config):
    """A Functional config whose layers take the global policy, except the float32 head (keras_bit's rule)."""
    for layer in config["layers"]:
        if layer["class_name"] != "InputLayer" and layer["config"].get("name") != "head":
            layer["config"].pop("dtype", None)
    return config


def checkpoint_load(repeats):
    """Seconds to build BiT-M-R50x1 and load an official-layout 21k .npz (68M parameters), and the peak RSS.

    Runs in a fresh Python process so that its peak RSS is the load's own
    (TensorFlow + model + checkpoint), not the rest of the suite's.
    """
    import subprocess

    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--load-child", str(repeats)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _load_child(repeats):
    d = _random_checkpoint(classes=21843)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "BiT-M-R50x1.npz")
        np.savez(path, **d)
        del d
        seconds = _median_seconds(lambda: keras_bit.BiT("BiT-M-R50x1", weights=path), repeats, warmup=1)
    print(json.dumps({"what": "BiT-M-R50x1 build + load official .npz (21843 classes)", "seconds": seconds,
                      "peak_rss_mb": _own_peak_rss_mb()}))


RSS_PATHS = ("keras_bit fp32", "keras_bit mixed_bfloat16", "peer: timm fp32", "peer: OpenVINO fp32",
             "framework only: TensorFlow + Keras imported", "framework only: PyTorch imported")


def peak_rss(size=224, batch=16):
    """Peak RSS (MB) of each inference path at (size, batch), each in its own fresh process.

    keras_bit's children import TensorFlow; the peers' children (peers.py) do not,
    so nothing is counted against a peer that it does not load itself.
    """
    import subprocess

    out = {}
    for path in RSS_PATHS:
        script = os.path.join(HERE, "peers.py" if "PyTorch" in path or path.startswith("peer") else "benchmark.py")
        proc = subprocess.run([sys.executable, script, "--rss-child", path, str(size), str(batch)],
                              capture_output=True, text=True)
        lines = proc.stdout.strip().splitlines()
        out[path] = json.loads(lines[-1])["peak_rss_mb"] if proc.returncode == 0 and lines else None
    return {"size": size, "batch": batch, "peak_rss_mb": out}


def _rss_child(path, size, batch):
    if path.startswith("keras_bit"):
        folded = fold_standardization(_build(size, "mixed_bfloat16" if "bfloat16" in path else "float32"))
        x = tf.constant(_images(batch, size))
        fn = tf.function(lambda t: folded(t, training=False))
        for _ in range(5):
            fn(x).numpy()
    print(json.dumps({"path": path, "peak_rss_mb": _own_peak_rss_mb()}))


def _own_peak_rss_mb():
    # VmHWM belongs to this process image; ru_maxrss would carry the parent's peak over exec.
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def profile(size=224, batch=16, policy="float32", fused=True, runs=3, top=12):
    """Per-op-type time of one inference batch (WS precomputed), from TF's step stats.

    The model is frozen to a GraphDef (variables become constants, so the WS of
    the unfolded model is constant-folded too) and run in a v1 Session with a
    full trace; the node timings are summed per op type, and GroupNorm's share
    is the time of every node inside a `*_gn` layer (the fused op, or the
    keras.ops composition with `fused=False`).
    """
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    model = _build(size, policy)
    fn = tf.function(lambda t: model(t, training=False))
    with _fused_kernels(fused):
        concrete = fn.get_concrete_function(tf.TensorSpec((batch, size, size, 3)))
    frozen = convert_variables_to_constants_v2(concrete)
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(frozen.graph.as_graph_def(), name="")
    feed = {frozen.inputs[0].name: _images(batch, size)}
    totals = collections.Counter()
    group_norm_micros = 0
    with tf.compat.v1.Session(graph=graph) as session:
        for _ in range(2):
            session.run(frozen.outputs[0].name, feed)
        options = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE)
        for _ in range(runs):
            metadata = tf.compat.v1.RunMetadata()
            session.run(frozen.outputs[0].name, feed, options=options, run_metadata=metadata)
            for device in metadata.step_stats.dev_stats:
                for node in device.node_stats:
                    label = node.timeline_label
                    op = label.split("=", 1)[1].split("(")[0].strip() if "=" in label else node.node_name
                    totals[op] += node.op_end_rel_micros - node.op_start_rel_micros
                    if "_gn" in node.node_name:  # every node of a `*_gn` layer (named `..._gn[_N]/...`)
                        group_norm_micros += node.op_end_rel_micros - node.op_start_rel_micros
    total = sum(totals.values())
    # What the unfolded model adds per call (per replica in training): standardizing every kernel.
    from keras_bit.layers import StandardizedConv2D, standardize_kernel

    conv_kernels = [layer.kernel for layer in model.layers if isinstance(layer, StandardizedConv2D)]
    standardize_all = tf.function(lambda: [standardize_kernel(k) for k in conv_kernels])
    ws_ms = 1000 * _median_seconds(lambda: [t.numpy() for t in standardize_all()], runs)
    return {
        "size": size,
        "batch": batch,
        "policy": policy,
        "group_norm": "fused kernel" if fused else "keras.ops",
        "group_norm_share": group_norm_micros / total,
        "ws_ms_per_call": ws_ms,
        "ws_parameters": int(sum(np.prod(k.shape) for k in conv_kernels)),
        "ms_per_batch": total / runs / 1000,
        "top_ops": [
            {"op": op, "ms": micros / runs / 1000, "share": micros / total} for op, micros in totals.most_common(top)
        ],
    }


def matmul_peak(n=4096, repeats=5):
    """GFLOP/s of one n x n x n float32 and bfloat16 matmul: the machine's compute ceiling for convolutions."""
    out = {}
    for dtype in (tf.float32, tf.bfloat16):
        a = tf.cast(tf.random.normal((n, n)), dtype)
        fn = tf.function(lambda: tf.matmul(a, a))
        out[dtype.name] = 2 * n**3 / _median_seconds(lambda: fn().numpy(), repeats) / 1e9
    return out


def _print_table(report):
    info = report["info"]
    print(f"keras_bit {info['keras_bit']}, TF {info['tensorflow']}, Keras {info['keras']}, "
          f"torch {info['torch']}, {info['cpus']} CPUs ({info['machine']})")
    if "matmul_gflops" in report:
        peak = report["matmul_gflops"]
        print(f"matmul peak: float32 {peak['float32']:.0f} GFLOP/s, bfloat16 {peak['bfloat16']:.0f} GFLOP/s "
              f"(R50x1 at 224 px = {R50X1_GFLOP_224} GFLOP/image: float32 ceiling "
              f"{peak['float32'] / R50X1_GFLOP_224:.1f} img/s)")
    for kind, section in [(kind, s) for kind in ("inference", "training") for s in report.get(kind, [])]:
        print(f"\nR50x1 {kind}, {section['size']} px, batch {section['batch']} (img/s)")
        for name, value in section["img_per_s"].items():
            print(f"  {name:<58} {value:8.2f}")
        for name, value in section["ratios"].items():
            shown = value if isinstance(value, str) else f"{value:.2f}x"
            print(f"  ratio {name:<52} {shown:>8}")
        for note in section.get("notes", []):
            print(f"  note: {note}")
    if "trained_bf16" in report:
        t = report["trained_bf16"]
        print(f"\nmixed_bfloat16 vs float32 on a trained model ({t['model']}, {t['size']} px)")
        for name in ("held-out", "all"):
            r = t[name]
            print(f"  {name + ' digits (' + str(r['images']) + ')':<30} top-1 agreement {100 * r['agreement']:6.2f}%  "
                  f"accuracy fp32 {100 * r['fp32_accuracy']:6.2f}%  bf16 {100 * r['bf16_accuracy']:6.2f}%")
    if "rss" in report:
        r = report["rss"]
        print(f"\npeak RSS, inference at {r['size']} px batch {r['batch']}, each path in a fresh process (MB)")
        for name, value in r["peak_rss_mb"].items():
            print(f"  {name:<58} {value if value is None else round(value):>8}")
    if "bf16" in report:
        b = report["bf16"]
        print(f"\nmixed_bfloat16 vs float32, {b['images']} random {b['size']} px images, top-1 agreement")
        for name, value in b["top1_agreement"].items():
            print(f"  {name:<58} {100 * value:7.1f}%")
        for name, value in b["max_feature_error"].items():
            print(f"  {'max ' + name + ' error / max |feature|':<58} {value:8.1e}")
    for p in report.get("profile", []):
        print(f"\nprofile {p['policy']} {p['size']} px batch {p['batch']}, {p['group_norm']} GroupNorm: "
              f"{p['ms_per_batch']:.0f} ms of op time, GroupNorm {100 * p['group_norm_share']:.1f}% "
              f"(WS precomputed; standardizing all {p['ws_parameters']:,} kernel weights costs "
              f"{p['ws_ms_per_call']:.1f} ms per call when it is not)")
        for op in p["top_ops"]:
            print(f"  {op['op']:<40} {op['ms']:8.1f} ms {100 * op['share']:5.1f}%")
    if "load" in report:
        print(f"\n{report['load']['what']:<60} {report['load']['seconds']:8.2f} s")
        print(f"{'  peak RSS of that process (TF + model + checkpoint)':<60} {report['load']['peak_rss_mb']:8.0f} MB")
    print(f"{'peak RSS of the whole suite (every model it built)':<60} {info['peak_rss_mb']:8.0f} MB")


SECTIONS = ("inference", "training", "bf16", "trained-bf16", "rss", "load", "profile")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="224 px batch 16 only, fewer repeats")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--only", choices=SECTIONS, action="append", help="run only these sections")
    parser.add_argument("--trained-model", default="digits_run/model.keras",
                        help="the README main job's model, for the trained-bf16 section (skipped if missing)")
    parser.add_argument("--load-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rss-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load_child:
        return _load_child(args.load_child)
    if args.rss_child:
        return _rss_child(args.rss_child[0], int(args.rss_child[1]), int(args.rss_child[2]))
    sections = args.only or (("inference", "training", "load") if args.quick else SECTIONS)

    repeats = 3 if args.quick else 5
    configs = [(224, 16)] if args.quick else [(224, 16), (224, 1), (128, 16), (128, 1)]
    report = {"matmul_gflops": matmul_peak()}
    if "inference" in sections:
        report["inference"] = [inference(size, batch, repeats, report["matmul_gflops"]["float32"], quick=args.quick)
                               for size, batch in configs]
    if "training" in sections:
        report["training"] = [training(128, 16, steps=5 if args.quick else 10)]
    if "bf16" in sections:
        report["bf16"] = bf16_agreement()
    if "trained-bf16" in sections:
        if os.path.exists(args.trained_model):
            report["trained_bf16"] = trained_bf16_agreement(args.trained_model)
        else:
            print(f"trained-bf16: {args.trained_model} not found (run the README main job first); skipped")
    if "rss" in sections:
        report["rss"] = peak_rss()
    if "profile" in sections:
        report["profile"] = [profile(policy="float32"), profile(policy="mixed_bfloat16"),
                             profile(policy="float32", fused=False), profile(policy="mixed_bfloat16", fused=False)]
    if "load" in sections:
        report["load"] = checkpoint_load(2 if args.quick else 3)
    report["info"] = {
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "cpus": os.cpu_count(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "torch": getattr(_optional_torch(), "__version__", None),
        "keras_bit": keras_bit.__version__,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)


if __name__ == "__main__":
    main()
