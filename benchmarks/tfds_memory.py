"""Peak memory of fine-tuning input from tfds: the file-backed reader against reading the split into memory.

For prepared tfds data sets of increasing size (generated 160x160 JPEGs, 10
classes), each approach runs in its own process and iterates training batches
(decode, BiT augmentation at 128 px): its peak RSS, the time to its first
batch, and the time to the first batch of a pipeline resumed in the middle of
a pass.

    python benchmarks/tfds_memory.py --sizes 2000 10000 50000 --work-dir /tmp/tfds_bench

"old" reimplements what keras_bit did before `keras_bit.train.sources.tfds`: the
whole split read through `tfds.load` into a list of encoded images (tfds'
defaults, auto-cache included) and fed to the in-memory pipeline.
"""

import argparse
import io
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # keras_bit from this checkout

import numpy as np  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

SIZE = 160  # stored images; BiT-HyperRule trains small images at resize 160, crop 128
BATCH = 64


class KerasBitBenchJpegs(tfds.core.GeneratorBasedBuilder):
    """Generated JPEGs: `n<count>` configs hold <count> training and 500 test images."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=f"n{n}") for n in (2000, 10000, 50000)]

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(SIZE, SIZE, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        count = int(self.builder_config.name[1:])
        return {"train": self._generate_examples(0, count), "test": self._generate_examples(10**7, 500)}

    def _generate_examples(self, first, count):
        from PIL import Image

        for i in range(first, first + count):
            yield i, {"image": _jpeg(Image, i), "label": i % 10}


def _jpeg(image_module, i):
    """A smooth, textured, distinct image (~10-20 KB), like a downsampled photo."""
    rng = np.random.default_rng(i)
    coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    pixels = np.asarray(image_module.fromarray(coarse).resize((SIZE, SIZE), image_module.BICUBIC), np.int16)
    pixels = np.clip(pixels + rng.integers(-12, 12, size=pixels.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    image_module.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _old_split(name, data_dir):
    """The replaced reader: every encoded image of the split in a Python list."""
    from keras_bit.train import sources

    ds = tfds.load(name, split="train", as_supervised=True, data_dir=data_dir,
                   decoders={"image": tfds.decode.SkipDecoding()})
    records, labels = [], []
    for image, label in ds.as_numpy_iterator():
        records.append(image)
        labels.append(label)
    return sources.EncodedSplit(np.array(records, dtype=object), np.array(labels, np.int64))


def _peak_mb():
    """This process's peak resident memory (Linux VmHWM; ru_maxrss would carry the parent's over exec)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024  # kB


def _first_batch_seconds(split, start_step):
    from keras_bit.train import pipeline

    started = time.perf_counter()
    stream = iter(pipeline.train_pipeline(split, 10, BATCH, SIZE, 128, seed=0, start_step=start_step))
    next(stream)
    return time.perf_counter() - started, stream


def measure(approach, name, data_dir, batches):
    """One approach in this process: a JSON line with peak RSS and timings."""
    import tensorflow as tf

    from keras_bit.train.sources import tfds as tfds_data

    tf.constant(0)  # TensorFlow's runtime up before the baseline
    baseline = _peak_mb()
    started = time.perf_counter()
    split = tfds_data.from_tfds(name, data_dir=data_dir).train if approach == "new" else _old_split(name, data_dir)
    load = time.perf_counter() - started
    first, stream = _first_batch_seconds(split, 0)
    started = time.perf_counter()
    for _ in range(batches - 1):
        next(stream)
    per_batch = (time.perf_counter() - started) / max(1, batches - 1)
    del stream
    resume_step = (len(split) // 2 + len(split) // 3) // BATCH  # deep into the first pass
    resume, _ = _first_batch_seconds(split, resume_step)
    print(json.dumps({"approach": approach, "examples": len(split), "baseline_mb": round(baseline),
                      "peak_mb": round(_peak_mb()), "load_s": round(load, 2), "first_batch_s": round(first, 2),
                      "batch_s": round(per_batch, 3), "resume_step": resume_step, "resume_s": round(resume, 2)}))


def prepare(sizes, work_dir):
    for n in sizes:
        builder = KerasBitBenchJpegs(config=f"n{n}", data_dir=work_dir)
        if not builder.is_prepared():
            started = time.perf_counter()
            builder.download_and_prepare()
            print(f"prepared {n} examples in {time.perf_counter() - started:.0f} s", file=sys.stderr)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000, 50000], choices=[2000, 10000, 50000])
    parser.add_argument("--work-dir", default="/tmp/keras_bit_tfds_bench")
    parser.add_argument("--batches", type=int, default=300)  # enough for tf.data autotuning to settle
    parser.add_argument("--measure", choices=["new", "old"], help=argparse.SUPPRESS)  # one child process
    args = parser.parse_args()
    if args.measure:
        return measure(args.measure, f"keras_bit_bench_jpegs/n{args.sizes[0]}", args.work_dir, args.batches)
    prepare(args.sizes, args.work_dir)
    rows = []
    for n in args.sizes:
        for approach in ("old", "new"):
            out = subprocess.run([sys.executable, __file__, "--measure", approach, "--sizes", str(n),
                                  "--work-dir", args.work_dir, "--batches", str(args.batches)],
                                 check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr)
    header = ("| examples | reader | peak RSS (MB) | over baseline (MB) | load (s) | first batch (s) | s/batch "
              "| resume (s) |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        print(f"| {r['examples']} | {r['approach']} | {r['peak_mb']} | {r['peak_mb'] - r['baseline_mb']} | "
              f"{r['load_s']} | {r['first_batch_s']} | {r['batch_s']} | {r['resume_s']} (step {r['resume_step']}) |")


if __name__ == "__main__":
    main()
