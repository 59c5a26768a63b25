"""keras_bit speed benchmarks: inference and training img/s, same-run baselines, load time, RSS, profile.

    python benchmarks/benchmark.py            # full suite (about 15 minutes on 2 cores)
    python benchmarks/benchmark.py --quick    # 224 px batch 16 inference + training, fewer repeats
    python benchmarks/benchmark.py --json     # machine-readable (also with --quick)
    python benchmarks/benchmark.py --only profile   # one section: inference, training, bf16, load, profile

Every number is the median of several timed runs after warm-up, and every
comparison is a ratio between paths timed in the same process, so that the
ratios hold on a noisy machine. Baselines: `keras.applications.ResNet50V2`
(BatchNorm, same size class) and, when PyTorch is installed, a PyTorch
BiT-R50x1 written in `torch_bit.py` (eager, NCHW, as the authors' code).
Nothing here is asserted: speed goals are read off this output, never checked
by the test suite. benchmarks/RESULTS.md records the numbers.
"""

import argparse
import collections
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
from keras_bit.export import export_saved_model, fold_standardization  # noqa: E402

try:
    import torch
except ImportError:  # PyTorch is an optional baseline only.
    torch = None

MODEL = "BiT-S-R50x1"


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

    torch.set_num_threads(os.cpu_count())
    return torch_bit.load_official(torch_bit.ResNetV2(), _random_checkpoint(seed=seed)).eval()


def inference(size, batch, repeats, quick=False):
    """img/s for every inference path of one (size, batch), with the baselines and their ratios."""
    x_np = _images(batch, size)
    x = tf.constant(x_np)
    model = _build(size)
    _real_scale_weights(model)
    folded = fold_standardization(model)
    bf16 = fold_standardization(_bf16_copy(model, size))

    def graph(m, xla=False):
        fn = tf.function(lambda t: m(t, training=False), jit_compile=xla)
        return lambda: fn(x).numpy()

    paths = {
        "eager model(x)": lambda: model(x, training=False).numpy(),
        "model.predict": lambda: model.predict(x, batch_size=batch, verbose=0),
        "tf.function": graph(model),
        "tf.function XLA": graph(model, xla=True),
        "tf.function, WS precomputed": graph(folded),
        "tf.function XLA, WS precomputed": graph(folded, xla=True),
        "mixed_bfloat16 tf.function, WS precomputed": graph(bf16),
    }
    with tempfile.TemporaryDirectory() as tmp:
        if not quick:
            classes = [str(i) for i in range(int(model.output_shape[-1]))]
            served = tf.saved_model.load(export_saved_model(model, tmp, class_names=classes))
            signature = served.signatures["serving_default"]
            pixels = tf.constant(((x_np + 1) * 127.5).astype("uint8"))
            paths["SavedModel serving_default (uint8, WS folded)"] = lambda: signature(images=pixels)[
                "probabilities"
            ].numpy()
        reference_model = keras.applications.ResNet50V2(weights=None, input_shape=(size, size, 3))
        paths["baseline: keras ResNet50V2 tf.function"] = graph(reference_model)
        if torch is not None:
            net = _torch_model()
            x_torch = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy())

            def torch_eager():
                with torch.no_grad():
                    net(x_torch)

            paths["baseline: PyTorch BiT eager"] = torch_eager
        rows = {name: batch / seconds for name, seconds in _interleaved_seconds(paths, repeats).items()}
    fp32 = {k: v for k, v in rows.items() if not k.startswith(("baseline", "mixed", "SavedModel"))}
    best = max(fp32, key=fp32.get)
    ratios = {
        "best fp32 path": best,
        "bf16 / best fp32": rows["mixed_bfloat16 tf.function, WS precomputed"] / rows[best],
        "best fp32 / keras ResNet50V2": rows[best] / rows["baseline: keras ResNet50V2 tf.function"],
    }
    if torch is not None:
        ratios["best fp32 / PyTorch eager"] = rows[best] / rows["baseline: PyTorch BiT eager"]
        ratios["model.predict / PyTorch eager"] = rows["model.predict"] / rows["baseline: PyTorch BiT eager"]
    return {"size": size, "batch": batch, "img_per_s": rows, "ratios": ratios}


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
    """Training-step img/s (SGD momentum, model.fit under a one-device MirroredStrategy) and baselines."""
    x = _images(batch, size)
    y = keras.utils.to_categorical(np.arange(batch) % 10, 10)
    data = tf.data.Dataset.from_tensors((x, y)).repeat()

    def keras_fit(build, jit_compile):
        strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
        with strategy.scope():
            model = build()
            model.compile(
                optimizer=keras.optimizers.SGD(0.003, momentum=0.9),
                loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                jit_compile=jit_compile,
            )
        stamps = []
        callback = keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda batch, logs=None: stamps.append(time.perf_counter()))
        model.fit(data, steps_per_epoch=warmup + steps, epochs=1, callbacks=[callback], verbose=0)
        return batch / statistics.median(np.diff(stamps[warmup - 1:]))

    def bit():
        return keras_bit.BiT(MODEL, weights=None, input_shape=(size, size, 3), classes=10, classifier_activation=None)

    def resnet():
        return keras.applications.ResNet50V2(
            weights=None, input_shape=(size, size, 3), classes=10, classifier_activation=None
        )

    rows = {
        "keras_bit model.fit": keras_fit(bit, False),
        "keras_bit model.fit XLA": keras_fit(bit, True),
        "baseline: keras ResNet50V2 model.fit": keras_fit(resnet, False),
    }
    if torch is not None:
        net = _torch_model().train()
        net.head = torch.nn.Conv2d(2048, 10, 1)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.003, momentum=0.9)
        x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        y_torch = torch.from_numpy(np.arange(batch) % 10)

        def step():
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x_torch), y_torch).backward()
            optimizer.step()

        rows["baseline: PyTorch BiT eager"] = batch / _median_seconds(step, steps, warmup)
    best = max(("keras_bit model.fit", "keras_bit model.fit XLA"), key=rows.get)
    ratios = {"best keras_bit path": best, "best / keras ResNet50V2": rows[best] / rows[
        "baseline: keras ResNet50V2 model.fit"]}
    if torch is not None:
        ratios["best / PyTorch eager"] = rows[best] / rows["baseline: PyTorch BiT eager"]
    return {"size": size, "batch": batch, "img_per_s": rows, "ratios": ratios}


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


def _own_peak_rss_mb():
    # VmHWM belongs to this process image; ru_maxrss would carry the parent's peak over exec.
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def profile(size=224, batch=16, policy="float32", runs=3, top=12):
    """Per-op-type time of one inference batch (WS precomputed), from TF's step stats.

    The model is frozen to a GraphDef (variables become constants, so the WS of
    the unfolded model is constant-folded too) and run in a v1 Session with a
    full trace; the node timings are summed per op type.
    """
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    model = _build(size, policy)
    fn = tf.function(lambda t: model(t, training=False))
    frozen = convert_variables_to_constants_v2(fn.get_concrete_function(tf.TensorSpec((batch, size, size, 3))))
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(frozen.graph.as_graph_def(), name="")
    feed = {frozen.inputs[0].name: _images(batch, size)}
    totals = collections.Counter()
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
    total = sum(totals.values())
    # What the unfolded model adds per call (per replica in training): standardizing every kernel.
    from keras_bit.layers import StandardizedConv2D, standardize_kernel

    kernels = [layer.kernel for layer in model.layers if isinstance(layer, StandardizedConv2D)]
    standardize_all = tf.function(lambda: [standardize_kernel(k) for k in kernels])
    ws_ms = 1000 * _median_seconds(lambda: [t.numpy() for t in standardize_all()], runs)
    return {
        "size": size,
        "batch": batch,
        "policy": policy,
        "ws_ms_per_call": ws_ms,
        "ws_parameters": int(sum(np.prod(k.shape) for k in kernels)),
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
              f"(R50x1 at 224 px = 8.46 GFLOP/image: float32 ceiling {peak['float32'] / 8.46:.1f} img/s)")
    for kind, section in [(kind, s) for kind in ("inference", "training") for s in report.get(kind, [])]:
        print(f"\nR50x1 {kind}, {section['size']} px, batch {section['batch']} (img/s)")
        for name, value in section["img_per_s"].items():
            print(f"  {name:<58} {value:8.2f}")
        for name, value in section["ratios"].items():
            shown = value if isinstance(value, str) else f"{value:.2f}x"
            print(f"  ratio {name:<52} {shown:>8}")
    if "bf16" in report:
        b = report["bf16"]
        print(f"\nmixed_bfloat16 vs float32, {b['images']} random {b['size']} px images, top-1 agreement")
        for name, value in b["top1_agreement"].items():
            print(f"  {name:<58} {100 * value:7.1f}%")
        for name, value in b["max_feature_error"].items():
            print(f"  {'max ' + name + ' error / max |feature|':<58} {value:8.1e}")
    for p in report.get("profile", []):
        print(f"\nprofile {p['policy']} {p['size']} px batch {p['batch']}: {p['ms_per_batch']:.0f} ms of op time "
              f"(WS precomputed; standardizing all {p['ws_parameters']:,} kernel weights costs "
              f"{p['ws_ms_per_call']:.1f} ms per call when it is not)")
        for op in p["top_ops"]:
            print(f"  {op['op']:<40} {op['ms']:8.1f} ms {100 * op['share']:5.1f}%")
    if "load" in report:
        print(f"\n{report['load']['what']:<60} {report['load']['seconds']:8.2f} s")
        print(f"{'  peak RSS of that process (TF + model + checkpoint)':<60} {report['load']['peak_rss_mb']:8.0f} MB")
    print(f"{'peak RSS of the whole suite (every model it built)':<60} {info['peak_rss_mb']:8.0f} MB")


SECTIONS = ("inference", "training", "bf16", "load", "profile")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="224 px batch 16 only, fewer repeats")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--only", choices=SECTIONS, action="append", help="run only these sections")
    parser.add_argument("--load-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load_child:
        return _load_child(args.load_child)
    sections = args.only or (("inference", "training", "load") if args.quick else SECTIONS)

    repeats = 3 if args.quick else 5
    configs = [(224, 16)] if args.quick else [(224, 16), (224, 1), (128, 16), (128, 1)]
    report = {"matmul_gflops": matmul_peak()}
    if "inference" in sections:
        report["inference"] = [inference(size, batch, repeats, quick=args.quick) for size, batch in configs]
    if "training" in sections:
        report["training"] = [training(128, 16, steps=5 if args.quick else 10)]
    if "bf16" in sections:
        report["bf16"] = bf16_agreement()
    if "profile" in sections:
        report["profile"] = [profile(policy="float32"), profile(policy="mixed_bfloat16")]
    if "load" in sections:
        report["load"] = checkpoint_load(2 if args.quick else 3)
    report["info"] = {
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "cpus": os.cpu_count(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "torch": torch.__version__ if torch is not None else None,
        "keras_bit": keras_bit.__version__,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)


if __name__ == "__main__":
    main()
