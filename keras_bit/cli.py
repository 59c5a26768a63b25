"""The `keras-bit` command: `finetune`, `fewshot`, `report`, `export`, `predict`, `demo`, `convert` and `push`.

Examples:
    keras-bit finetune --data cifar10 --weights imagenet21k --batch-size 128
    keras-bit fewshot --data cifar10 --weights imagenet21k --shots 1 5 10 25 --draws 3
    keras-bit report bit_finetune                    # redraw bit_finetune/summary.png
    keras-bit export bit_finetune/model.keras --class-names bit_finetune/class_names.txt
    keras-bit export bit_finetune/model.keras --format onnx --output bit.onnx
    keras-bit predict cat.jpg photos/ --model saved_models/bit_m_r50x1/1 --top 3
    keras-bit demo                                   # build BiT-S-R50x1, classify a generated image
    keras-bit convert BiT-M-R50x1.npz bit.weights.h5 --model BiT-M-R50x1
    keras-bit push bit_finetune me/flowers-bit --format timm   # publish on the Hugging Face Hub
"""

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys
import time

import numpy as np

from keras_bit import presets
from keras_bit.backend import BackendError
from keras_bit.io import DEFAULT_MAX_PIXELS
from keras_bit.validation import positive_int_arg as _positive_int, weights_arg as _weights_arg


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default, unless its help already says it (or it is an on/off flag)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.nargs == 0 or "default" in text or action.default is argparse.SUPPRESS
                or not action.option_strings or action.required):  # positionals and required options have none
            return text
        return f"{text} (default: %(default)s)".strip()


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`keras-bit finetune: error: ...`, exit status 2) and defaults in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def generated_image(size=224, seed=0):
    """A deterministic RGB test image (uint8): a bright disc on a gradient with noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = np.stack([xx, yy, 1.0 - xx], axis=-1) * 160.0
    disc = (xx - 0.55) ** 2 + (yy - 0.45) ** 2 < 0.07
    image[disc] = (230.0, 190.0, 40.0)
    image += rng.normal(0.0, 8.0, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def demo(model_name="BiT-S-R50x1", weights="default", top=5, size=None):
    """Builds a named BiT model and classifies a generated image; returns the printed report."""
    import keras_bit

    kwargs = {} if weights == "default" else {"weights": weights}
    if size:
        kwargs["input_shape"] = (size, size, 3)
    try:
        model = keras_bit.BiT(model_name, **kwargs)
        pretrained = kwargs.get("weights", True) is not None
    except keras_bit.DownloadError as e:
        if weights != "default":
            raise  # weights the user named: an error, never a silent swap for random ones
        print(f"[keras-bit demo] {e}\n[keras-bit demo] Continuing with random weights (weights=None).")
        model = keras_bit.BiT(model_name, **{**kwargs, "weights": None})
        pretrained = False
    size = model.input_shape[1]
    image = generated_image(size)
    x = keras_bit.preprocess_input(image[None])
    start = time.perf_counter()
    probs = model.predict(x, verbose=0)
    seconds = time.perf_counter() - start
    best = np.argsort(probs[0])[::-1][:top]
    report = {
        "model": model_name,
        "pretrained": pretrained,
        "parameters": int(model.count_params()),
        "input": list(x.shape),
        "classes": int(probs.shape[1]),
        "seconds": round(seconds, 3),
        "top": [{"class": int(i), "probability": float(probs[0, i])} for i in best],
    }
    if pretrained:
        try:
            names = keras_bit.decode_predictions(probs, top=top)[0]
            for entry, (wnid, name, _) in zip(report["top"], names):
                entry.update(wnid=wnid, name=name)
        except (keras_bit.DownloadError, ValueError) as e:
            print(f"[keras-bit demo] Class names unavailable: {e}")
    features = keras_bit.feature_model(model)(x)
    report["block_outputs"] = [list(f.shape) for f in features]
    print(f"model: {model_name} ({report['parameters']:,} parameters, "
          f"{'pretrained' if pretrained else 'random'} weights)")
    print(f"input: {report['input']} -> {report['classes']} classes in {seconds:.2f} s")
    for rank, entry in enumerate(report["top"], start=1):
        label = f" {entry['wnid']} {entry['name']}" if "name" in entry else ""
        print(f"  top-{rank}: class {entry['class']:5d}{label}  p={entry['probability']:.4f}")
    print(f"block outputs (strides 4/8/16/32): {report['block_outputs']}")
    if not pretrained:
        print("[keras-bit demo] Random weights: a fresh BiT head is zero, so every class scores "
              f"1/{probs.shape[1]}. Pass --weights or connect to the network for real predictions.")
    return report


def build_parser():
    parser = _Parser(prog="keras-bit", description="Big Transfer (BiT) for Keras 3.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("demo", help="build a BiT model and classify a generated image")
    p.add_argument("--model", default="BiT-S-R50x1", choices=presets.MODEL_NAMES, metavar="MODEL",
                   help="a BiT model name")
    p.add_argument("--weights", default="default", type=_weights_arg,
                   help='"default" (the family checkpoint; random if it cannot be fetched), "none", a name, '
                        "an hf:// handle or a path")
    p.add_argument("--top", type=_positive_int, default=5, help="how many classes to show")
    p.add_argument("--size", type=_positive_int, default=None, help="image size (default: the model's)")

    _add_finetune_parser(sub)
    _add_other_parsers(sub)
    from keras_bit.publish.command import add_parser as add_push_parser

    add_push_parser(sub)
    from keras_bit.train.fewshot import add_parser as add_fewshot_parser

    add_fewshot_parser(sub)
    return parser


def _add_finetune_parser(sub):
    from keras_bit.train import config

    p = sub.add_parser("finetune", help="fine-tune with BiT-HyperRule (model.fit on tf.data under tf.distribute)")
    p.add_argument("--model", default="BiT-M-R50x1", choices=presets.MODEL_NAMES, metavar="MODEL",
                   help=f"one of {', '.join(presets.MODEL_NAMES)}")
    p.add_argument("--data", default="sklearn:digits",
                   help='tfds name, image folder, or "sklearn:digits" (bundled with scikit-learn, offline)')
    config.add_arguments(p)  # every setting of keras_bit.train.config.FinetuneConfig
    p.add_argument("--tpu", default=None,
                   help='train on a Cloud TPU (TPUStrategy): "local" on a TPU VM, else its name or grpc:// address')
    p.add_argument("--quiet", action="store_true", help="print only the result and warnings")


_ACTIVATION_HELP = ("how outputs become probabilities: auto reads the last layer (a linear head gets a softmax); "
                    "softmax: the outputs are logits; none: they are probabilities already")


def _add_other_parsers(sub):
    p = sub.add_parser("report", help="redraw a fine-tuning run's summary.png (curves and confusion matrix)")
    p.add_argument("run_dir", help="the run's --output-dir")
    p.add_argument("--output", default=None, help="PNG path (default: RUN_DIR/summary.png)")

    p = sub.add_parser("export", help="export a .keras model for serving: TF SavedModel (default), LiteRT, ONNX "
                                      "or OpenVINO; uint8 pixels in, probabilities (or --features) out")
    p.add_argument("model", help="a .keras file (e.g. a fine-tuning run's model.keras) or a BiT model name")
    p.add_argument("--format", default="tf_saved_model", choices=("tf_saved_model", "litert", "onnx", "openvino"),
                   help="artifact format")
    p.add_argument("--output", default=None,
                   help="artifact path (a folder for tf_saved_model; a .tflite / .onnx / .xml file otherwise). "
                        "default: <export-dir>/<name>/<version>/ for tf_saved_model, ./<name>.<ext> otherwise")
    p.add_argument("--export-dir", default=None,
                   help="TF Serving root for tf_saved_model without --output (default: saved_models)")
    p.add_argument("--name", default=None, help="folder / file name (default: the model's name)")
    p.add_argument("--version", type=_positive_int, default=None,
                   help="TF Serving version folder (default: the next free one)")
    p.add_argument("--class-names", default=None, help="text file, one class name per line")
    p.add_argument("--top", type=_positive_int, default=None, help="top-k classes the export returns (default: 5)")
    p.add_argument("--activation", default="auto", choices=("auto", "softmax", "none"), help=_ACTIVATION_HELP)
    p.add_argument("--features", action="store_true",
                   help="export the pooled pre-logits embedding (output `features`, float32 [batch, channels]) "
                        "instead of probabilities: for retrieval, clustering, kNN or linear probes; takes a "
                        "classifier or an include_top=False model")
    p.add_argument("--quantization", default=None, choices=("float16", "int8", "bfloat16"),
                   help="litert: float16 weights, or full-integer int8 (needs --representative-data); "
                        "tf_saved_model: bfloat16 weights and compute")
    p.add_argument("--representative-data", default=None,
                   help="int8: a folder of typical images to calibrate on (a few hundred)")
    p.add_argument("--max-pixels", type=_positive_int, default=None,
                   help="tf_saved_model: largest image the bytes signature decodes, height x width "
                        f"(default: {DEFAULT_MAX_PIXELS})")
    p.add_argument("--jpeg-dct-scaling", action="store_true",
                   help="tf_saved_model: decode large JPEGs at 1/2-1/8 scale (faster; not the same pixels)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")

    p = sub.add_parser("predict", help="classify image files (or folders of them) with an export, a .keras "
                                       "model or a BiT name")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, GIF, BMP, WebP) or folders of them")
    p.add_argument("--model", required=True,
                   help="SavedModel folder, .tflite / .onnx / .xml export, .keras file or BiT model name")
    p.add_argument("--top", type=_positive_int, default=5, help="how many classes to show")
    p.add_argument("--activation", default="auto", choices=("auto", "softmax", "none"),
                   help="a .keras model or BiT name: " + _ACTIVATION_HELP)
    p.add_argument("--max-pixels", type=_positive_int, default=None,
                   help="largest image decoded, height x width; larger files are reported, not decoded "
                        f"(default: {DEFAULT_MAX_PIXELS})")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--save-features", default=None, metavar="FILE.npy",
                   help="save the images' pooled feature vectors as one float32 [images, channels] .npy array "
                        "(row k: the k-th image listed); a feature export (export --features) or a .keras model "
                        "without a head gives them anyway, a .keras classifier or BiT name its pre-logits")

    p = sub.add_parser("convert", help="convert any BiT weights (bucket name, hf:// handle, .npz, .safetensors) "
                                       "to a Keras .weights.h5")
    p.add_argument("input", help='what --weights accepts: a published name ("imagenet21k"), an hf://<owner>/<repo> '
                                 "handle, or an .npz / .weights.h5 / timm or transformers .safetensors file")
    p.add_argument("output", help="destination .weights.h5")
    p.add_argument("--model", required=True, choices=presets.MODEL_NAMES, help="architecture of the checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def _finetune(args):
    from keras_bit.train import config
    from keras_bit.train.distribute import tpu_strategy
    from keras_bit.train.finetune import finetune
    from keras_bit.train.run_dir import RunDir

    strategy = tpu_strategy(args.tpu) if args.tpu else None
    result = finetune(args.model, args.data, config.from_cli(args), strategy=strategy, verbose=0 if args.quiet else 1)
    if args.quiet:
        print(f"eval top-1 accuracy: {result.eval_accuracy:.4f}")
    print(f"model: {RunDir(result.output_dir).model_keras}")
    if result.summary_path:
        print(f"summary: {result.summary_path}")
    if result.export_path:
        print(f"SavedModel: {result.export_path}")


def _report(args):
    from keras_bit.train import report

    print(report.main(args.run_dir, args.output))


def _export(args):
    from keras_bit.export import DEFAULT_EXPORT_DIR, DEFAULT_MAX_PIXELS, EXTENSIONS, export_model, export_saved_model
    from keras_bit.export.artifact import check_plain_name
    from keras_bit.export.labels import read_labels
    from keras_bit.export.serving import input_size
    from keras_bit.predict import load_model

    _check_export_flags(args)
    outputs = "features" if args.features else "probabilities"
    names = read_labels(args.class_names) if args.class_names else None
    max_pixels = args.max_pixels or DEFAULT_MAX_PIXELS
    model = load_model(args.model)
    representative = None
    if args.representative_data:
        representative = _representative_images(args, input_size(model), max_pixels)
    if args.format == "tf_saved_model" and args.output is None:
        path = export_saved_model(model, args.export_dir or DEFAULT_EXPORT_DIR, name=args.name, version=args.version,
                                  class_names=names, top_k=args.top or 5, max_pixels=max_pixels,
                                  jpeg_dct_scaling=args.jpeg_dct_scaling, quantization=args.quantization,
                                  activation=args.activation, outputs=outputs)
    else:
        output = args.output or check_plain_name(args.name or model.name, "--name") + EXTENSIONS[args.format]
        path = export_model(model, output, args.format, class_names=names, quantization=args.quantization,
                            representative_data=representative, top_k=args.top or 5, overwrite=args.overwrite,
                            activation=args.activation, outputs=outputs,
                            max_pixels=max_pixels, jpeg_dct_scaling=args.jpeg_dct_scaling)
    print(path)


def _check_export_flags(args):
    """Flags that the chosen format would ignore are refused (exit 2) before anything is loaded."""
    from keras_bit.export.formats import QUANTIZATION_FORMATS

    serving_layout = args.format == "tf_saved_model" and args.output is None
    unused = []
    if args.format != "tf_saved_model":
        unused += [f for f, v in (("--max-pixels", args.max_pixels), ("--jpeg-dct-scaling", args.jpeg_dct_scaling))
                   if v]
    if args.quantization and args.format not in QUANTIZATION_FORMATS[args.quantization]:
        unused.append(f"--quantization {args.quantization} (only with --format "
                      f"{' or '.join(QUANTIZATION_FORMATS[args.quantization])})")
    if args.format != "litert":
        unused += ["--representative-data"] if args.representative_data else []
    elif args.representative_data and args.quantization != "int8":
        unused.append("--representative-data (only with --quantization int8)")
    if not serving_layout:
        unused += [f for f, v in (("--export-dir", args.export_dir), ("--version", args.version)) if v is not None]
        if args.output is not None and args.name is not None:
            unused.append("--name (the name is --output's)")
    elif args.overwrite:
        unused.append("--overwrite (TF Serving versions are never overwritten; a new version is written)")
    if args.features:
        classes_only = [f for f, v in (("--class-names", args.class_names), ("--top", args.top)) if v is not None]
        classes_only += [f"--activation {args.activation}"] if args.activation != "auto" else []
        if classes_only:
            raise ValueError(f"{', '.join(classes_only)}: not used by --features (a feature export has no classes)")
    if unused:
        where = f"--format {args.format}" + ("" if serving_layout or args.output is None else " with --output")
        raise ValueError(f"{', '.join(unused)}: not used by {where}")


def _representative_images(args, size, max_pixels):
    """uint8 images from --representative-data resized to `size` (unreadable files named, then skipped)."""
    from keras_bit.backend import tensorflow
    from keras_bit.predict import decode_file, expand_paths

    tf = tensorflow("--representative-data")

    if not os.path.isdir(args.representative_data):
        raise ValueError(f"--representative-data must be a folder of images. Received: {args.representative_data}")
    images = []
    for path in expand_paths([args.representative_data]):
        try:
            image = decode_file(path, max_pixels)
        except (ValueError, OSError) as e:
            print(f"keras-bit export: skipping {path}: {e}", file=sys.stderr)
            continue
        images.append(tf.cast(tf.round(tf.image.resize(image, size)), tf.uint8).numpy())
    if not images:
        raise ValueError(f"--representative-data {args.representative_data}: no readable images")
    return np.stack(images)


def _predict(args):
    from keras_bit.predict import check_features_path, feature_report, predict_files

    if args.save_features is not None:
        check_features_path(args.save_features)  # before the model loads
    results = predict_files(args.images, args.model, top=args.top, max_pixels=args.max_pixels,
                            activation=args.activation, outputs="features" if args.save_features else None)
    failed = [item for item in results if "error" in item]
    for item in failed:
        print(f"keras-bit predict: error: {item['image']}: {item['error']}", file=sys.stderr)
    if any("features" in item for item in results) or args.save_features:
        print(feature_report(results, args.save_features, args.json))
    elif args.json:
        print(json.dumps(results, indent=2))
    else:
        for item in results:
            if "top" not in item:
                continue
            print(item["image"])
            for entry in item["top"]:
                label = f"  {entry['label']}" if entry.get("label") is not None else ""
                print(f"  {entry['score']:.4f}  class {entry['index']}{label}")
    return 1 if failed else 0


def _convert(args):
    from keras_bit.models.bit import convert

    convert(args.input, args.output, args.model, overwrite=args.overwrite)
    print(f"Wrote {args.output}")


def _push(args):
    from keras_bit.publish.command import run

    return run(args)


_COMMANDS = {
    "demo": lambda args: demo(args.model, args.weights, args.top, args.size),
    "finetune": _finetune,
    "report": _report,
    "export": _export,
    "predict": _predict,
    "convert": _convert,
    "push": _push,
    "fewshot": lambda args: importlib.import_module("keras_bit.train.fewshot").run_command(args),
}


@contextlib.contextmanager
def _console_logging(quiet=False):
    """keras_bit's messages on stderr, once each, for the command's duration; the logging state is restored after.

    Only the "keras_bit" logger gets a handler (a root handler would also print TensorFlow's), and
    libraries' own Python warnings (tfds through absl: "Variant folder ... has no dataset_info.json")
    stay off.
    """
    log, absl = logging.getLogger("keras_bit"), logging.getLogger("absl")
    saved = log.level, log.propagate, absl.level
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[keras-bit] %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.level, log.propagate, absl.level = saved[0], saved[1], saved[2]


def main(argv=None):
    """Runs the `keras-bit` command; returns the exit status (2 for user errors, one line on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        with _console_logging(quiet=getattr(args, "quiet", False)):
            result = _COMMANDS[args.command](args)
            status = result if type(result) is int else 0  # `predict` returns 1 when a file failed; `demo`, a dict
    except (ValueError, OSError, BackendError) as e:
        from keras_bit.train.resume import RunMismatchError

        message = e.describe(flags=True) if isinstance(e, RunMismatchError) else str(e)
        print(f"keras-bit {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"keras-bit {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        tf = sys.modules.get("tensorflow")  # only a program that imported TensorFlow can raise its errors
        export = sys.modules.get("keras_bit.export.formats")
        if export is not None and isinstance(e, export.ExportError):
            print(f"keras-bit {args.command}: error: {e}", file=sys.stderr)
            return 1
        if tf is None or not isinstance(e, tf.errors.OpError):
            raise
        # A TensorFlow runtime failure (a file removed mid-run, out of memory): its first line, not the trace.
        first = str(e.message if hasattr(e, "message") else e).strip().splitlines()[0]
        print(f"keras-bit {args.command}: error: {first}", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
