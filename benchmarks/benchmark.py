"""keras_bit speed benchmarks: R50x1 inference img/s and checkpoint load time.

    python benchmarks/benchmark.py            # full table
    python benchmarks/benchmark.py --quick    # 224 px, batch 16, fewer repeats
    python benchmarks/benchmark.py --json     # machine-readable

Each number is the median of several timed runs after warm-up. Nothing here is
asserted: speed goals are read off this table, never checked by the test suite.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import keras_bit  # noqa: E402


def _median_seconds(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def inference(size, batch, repeats):
    model = keras_bit.BiT("BiT-S-R50x1", weights=None, input_shape=(size, size, 3))
    x = tf.constant(np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype("float32"))
    graph = tf.function(lambda t: model(t, training=False), reduce_retracing=True)
    xla = tf.function(lambda t: model(t, training=False), jit_compile=True)
    paths = {
        "model.predict": lambda: model.predict(x, batch_size=batch, verbose=0),
        "eager model(x)": lambda: model(x, training=False).numpy(),
        "tf.function": lambda: graph(x).numpy(),
        "tf.function XLA": lambda: xla(x).numpy(),
    }
    rows = []
    for name, fn in paths.items():
        seconds = _median_seconds(fn, repeats)
        rows.append({"what": f"R50x1 {size}px batch {batch}: {name}", "img_per_s": batch / seconds})
    return rows


def checkpoint_load(repeats):
    """Time to build BiT-M-R50x1 and load an official-layout 21k .npz (68M parameters)."""
    import reference

    d = reference.random_checkpoint((3, 4, 6, 3), width=1, classes=21843)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "BiT-M-R50x1.npz")
        np.savez(path, **d)
        del d
        seconds = _median_seconds(lambda: keras_bit.BiT("BiT-M-R50x1", weights=path), repeats, warmup=1)
    return [{"what": "BiT-M-R50x1 build + load official .npz (21843 classes)", "seconds": seconds}]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="224 px batch 16 only, fewer repeats")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    repeats = 3 if args.quick else 5
    configs = [(224, 16)] if args.quick else [(224, 1), (224, 16), (128, 1), (128, 16)]
    rows = []
    for size, batch in configs:
        rows += inference(size, batch, repeats)
    rows += checkpoint_load(2 if args.quick else 3)
    info = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "tensorflow": tf.__version__,
        "keras_bit": keras_bit.__version__,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if args.json:
        print(json.dumps({"info": info, "results": rows}, indent=2))
        return
    print(f"keras_bit {info['keras_bit']}, TF {info['tensorflow']}, {info['cpus']} CPUs ({info['machine']})")
    for row in rows:
        value = f"{row['img_per_s']:8.2f} img/s" if "img_per_s" in row else f"{row['seconds']:8.2f} s"
        print(f"{row['what']:<60} {value}")
    print(f"{'peak RSS':<60} {info['peak_rss_mb']:8.0f} MB")


if __name__ == "__main__":
    main()
