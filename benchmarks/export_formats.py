"""Every export format against the Keras model: agreement, size on disk and speed, measured in one run.

    python benchmarks/export_formats.py                       # BiT-M-R50x1 at 224 px (random weights)
    python benchmarks/export_formats.py --digits digits_run/model.keras   # + quantized top-1 agreement
    python benchmarks/export_formats.py --json

Part 1 (R50x1, 224 px, random weights with a random head so that outputs
depend on the input): each format is exported by `keras_bit.export.export_model`,
run with its own runtime (`load_exported`), compared with the Keras model on the
same uint8 pixels (max |difference| of probabilities), and timed at batch 1 and
batch 8, interleaved with the Keras model (folded, `tf.function`) so that the
ratios hold on a noisy machine. OpenVINO is timed at its float32 setting and at
its CPU default (bfloat16 where the CPU has it).

Part 2 (`--digits`, the README's fine-tuned model): top-1 agreement of LiteRT
float16 / int8 with float32 on scikit-learn's digits (int8 calibrated on the
first 256, measured on the other 1541), and of the SavedModel's optional JPEG
DCT scaling with the default full decode (digits enlarged to 512 px JPEGs).
Nothing is asserted; benchmarks/RESULTS.md records the numbers.
"""

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_bit  # noqa: E402
from keras_bit.export import (ExportError, export_model, export_saved_model, fold_standardization,  # noqa: E402
                              load_exported)
from keras_bit.export.runtimes import Exported  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark import _interleaved_seconds  # noqa: E402  (the same interleaved timing as the main benchmark)

FORMATS = [("litert", ".tflite", None), ("litert", ".tflite", "float16"), ("litert", ".tflite", "int8"),
           ("onnx", ".onnx", None), ("openvino", ".xml", None), ("tf_saved_model", "", None)]


def _size_mb(path):
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files) / 1e6
    extra = os.path.splitext(path)[0] + ".bin" if path.endswith(".xml") else None
    return (os.path.getsize(path) + (os.path.getsize(extra) if extra else 0)) / 1e6


def _smooth_images(rng, n, size):
    """Photo-like uint8 images: random colour fields, bilinearly enlarged."""
    small = rng.uniform(0, 255, size=(n, 8, 8, 3)).astype("float32")
    return np.asarray(tf.clip_by_value(tf.image.resize(small, (size, size)), 0, 255), np.uint8)


def formats_section(size, repeats, folder):
    rng = np.random.default_rng(0)
    model = keras_bit.BiTM_R50x1(weights=None, classes=1000, input_shape=(size, size, 3))
    head = model.layers[-1]
    head.kernel.assign(rng.normal(0, 0.05, head.kernel.shape).astype("float32"))
    images = _smooth_images(rng, 8, size)
    folded = fold_standardization(model)
    keras_fn = tf.function(lambda x: folded(keras_bit.preprocess_input(tf.cast(x, tf.float32))))  # softmax head
    reference = keras_fn(images).numpy()
    rows, runners = [], {"keras (folded, tf.function)": (lambda x: keras_fn(x).numpy())}
    for fmt, ext, quantization in FORMATS:
        name = fmt + (f" {quantization}" if quantization else "")
        path = os.path.join(folder, f"r50x1_{quantization or 'float32'}_{fmt}{ext}")
        start = time.perf_counter()
        try:
            export_model(model, path, fmt, quantization=quantization, class_names=[str(i) for i in range(1000)],
                         representative_data=_smooth_images(rng, 32, size) if quantization == "int8" else None)
        except ExportError as e:  # reported, and the other formats still measured
            rows.append({"format": name, "error": str(e), "img_s_batch1": float("nan"), "img_s_batch8": float("nan")})
            continue
        seconds = time.perf_counter() - start
        exported = load_exported(path)
        out = exported(images)["probabilities"]
        rows.append({"format": name, "size_mb": round(_size_mb(path), 1), "export_s": round(seconds, 1),
                     "max_abs_diff": float(np.abs(out - reference).max()),
                     "top1_agreement": float(np.mean(out.argmax(1) == reference.argmax(1)))})
        runners[name] = exported
        if fmt == "openvino":
            from keras_bit.export import runtimes

            runners["openvino (CPU default precision)"] = Exported(path, "openvino", runtimes._openvino(path, None))
    timings = {}
    for batch in (1, 8):
        x = images[:batch]
        seconds = _interleaved_seconds({name: (lambda fn=fn: fn(x)) for name, fn in runners.items()}, repeats,
                                       warmup=1)
        timings[batch] = {name: batch / s for name, s in seconds.items()}
    for row in rows:
        if "error" not in row:
            row["img_s_batch1"], row["img_s_batch8"] = (round(timings[b][row["format"]], 1) for b in (1, 8))
    baseline = "keras (folded, tf.function)"
    rows.append({"format": baseline, "img_s_batch1": round(timings[1][baseline], 1),
                 "img_s_batch8": round(timings[8][baseline], 1)})
    bf16 = "openvino (CPU default precision)"
    rows.append({"format": bf16, "img_s_batch1": round(timings[1][bf16], 1), "img_s_batch8": round(timings[8][bf16], 1),
                 "max_abs_diff": float(np.abs(runners[bf16](images)["probabilities"] - reference).max())})
    return rows


def digits_section(model_path, folder):
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(grey[..., None], 3, axis=-1)
    calibration, held_out, labels = images[:256], images[256:], digits.target[256:]
    model = keras.saving.load_model(model_path)
    results = {}
    outputs = {}
    for quantization in (None, "float16", "int8"):
        path = os.path.join(folder, f"digits_{quantization or 'float32'}.tflite")
        try:
            export_model(model, path, "litert", quantization=quantization,
                         representative_data=calibration if quantization == "int8" else None)
        except ExportError as e:  # the int8 self-check: the interpreter aborts on this model
            results[quantization] = {"error": str(e)}
            continue
        outputs[quantization] = load_exported(path)(held_out)["probabilities"]
        results[quantization or "float32"] = {"size_mb": round(_size_mb(path), 1)}
    for name, out in outputs.items():
        results[name or "float32"].update(
            accuracy=float(np.mean(out.argmax(1) == labels)),
            top1_agreement_with_float32=float(np.mean(out.argmax(1) == outputs[None].argmax(1))),
            max_abs_diff=float(np.abs(out - outputs[None]).max()))
    # The SavedModel's JPEG shortcut: the same digits as 512 px JPEGs, decoded in full or at 1/8 scale.
    jpegs = [tf.io.encode_jpeg(tf.image.resize(img, (512, 512)).numpy().round().astype(np.uint8), quality=90).numpy()
             for img in held_out]
    served = {}
    for dct in (False, True):
        path = export_saved_model(model, folder, name=f"digits_dct_{dct}", jpeg_dct_scaling=dct)
        serve = tf.saved_model.load(path).signatures["serving_bytes"]
        probabilities, start = [], time.perf_counter()
        for i in range(0, len(jpegs), 64):
            probabilities.append(serve(image_bytes=tf.constant(jpegs[i:i + 64]))["probabilities"].numpy())
        served[dct] = (np.concatenate(probabilities), len(jpegs) / (time.perf_counter() - start))
    full, scaled = served[False][0], served[True][0]
    results["jpeg_dct_scaling"] = {
        "accuracy_full_decode": float(np.mean(full.argmax(1) == labels)),
        "accuracy_dct_scaled": float(np.mean(scaled.argmax(1) == labels)),
        "top1_agreement": float(np.mean(full.argmax(1) == scaled.argmax(1))),
        "max_abs_diff": float(np.abs(full - scaled).max()),
        "img_s_full_decode": round(served[False][1], 1), "img_s_dct_scaled": round(served[True][1], 1)}
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--digits", default=None, help="a fine-tuned digits model.keras (the README's main job)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        report = {"formats": formats_section(args.size, args.repeats, folder)}
        if args.digits:
            report["digits"] = digits_section(args.digits, folder)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"R50x1 at {args.size} px (random weights), each format with its own runtime, vs the Keras model:")
    print(f"{'format':36s} {'MB':>7s} {'max|dp|':>9s} {'top-1':>6s} {'img/s b1':>9s} {'img/s b8':>9s}")
    for row in report["formats"]:
        diff = f"{row['max_abs_diff']:.1e}" if "max_abs_diff" in row else "-"
        top1 = f"{row['top1_agreement']:.2f}" if "top1_agreement" in row else "-"
        print(f"{row['format']:36s} {row.get('size_mb', '-'):>7} {diff:>9s} {top1:>6s} "
              f"{row['img_s_batch1']:>9.1f} {row['img_s_batch8']:>9.1f}")
    if "digits" in report:
        print(json.dumps(report["digits"], indent=2))


if __name__ == "__main__":
    sys.exit(main())
