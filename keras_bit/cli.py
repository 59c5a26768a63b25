"""The `keras-bit` command: `finetune`, `export`, `predict`, `demo` and `convert`.

Examples:
    keras-bit finetune --data cifar10 --weights imagenet21k --batch-size 128
    keras-bit export bit_finetune/model.keras --class-names bit_finetune/class_names.txt
    keras-bit predict cat.jpg dog.png --model saved_models/bit_m_r50x1/1 --top 3
    keras-bit demo                                   # build BiT-S-R50x1, classify a generated image
    keras-bit convert BiT-M-R50x1.npz bit.weights.h5 --model BiT-M-R50x1
"""

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

from keras_bit import configs
from keras_bit.train import hyperrule


def _weights_arg(value):
    return None if value.lower() == "none" else value


def _resolution_arg(value):
    parts = [int(v) for v in value.split(",")]
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError("expected CROP or RESIZE,CROP")
    return parts[0] if len(parts) == 1 else tuple(parts)


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
    parser = argparse.ArgumentParser(prog="keras-bit", description="Big Transfer (BiT) for Keras 3.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="build a BiT model and classify a generated image")
    p.add_argument("--model", default="BiT-S-R50x1", choices=configs.MODEL_NAMES)
    p.add_argument("--weights", default="default", type=_weights_arg,
                   help='"default" (the family checkpoint; random if it cannot be fetched), "none", a name or a path')
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--size", type=int, default=None, help="image size (default: the model's)")

    p = sub.add_parser("finetune", help="fine-tune with BiT-HyperRule (model.fit on tf.data under tf.distribute)")
    p.add_argument("--model", default="BiT-M-R50x1", choices=configs.MODEL_NAMES)
    p.add_argument("--data", default="sklearn:digits",
                   help='tfds name, image folder, or "sklearn:digits" (bundled, offline; the default)')
    p.add_argument("--weights", default=None, type=_weights_arg,
                   help='checkpoint to start from ("imagenet21k", "imagenet", a path); default: random init')
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=None, help="total steps (default: BiT-HyperRule's)")
    p.add_argument("--resolution", type=_resolution_arg, default=None, help='CROP or RESIZE,CROP (default: HyperRule)')
    p.add_argument("--output-dir", default="bit_finetune", help="created if missing; its parent must exist")
    p.add_argument("--examples-per-class", type=int, default=None, help="few-shot: K examples of each class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-lr", type=float, default=hyperrule.BASE_LR,
                   help="learning rate at batch 512 (scaled linearly)")
    p.add_argument("--mixup", type=float, default=None, help="MixUp alpha (default: HyperRule)")
    p.add_argument("--split", default="train")
    p.add_argument("--eval-split", default=None)
    p.add_argument("--eval-fraction", type=float, default=0.2, help="held-out share when there is no eval split")
    p.add_argument("--data-dir", default=None, help="tfds data_dir")
    p.add_argument("--mixed-precision", default=None, choices=("float32", "mixed_float16", "mixed_bfloat16"))
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (gradient accumulation)")
    p.add_argument("--xla", action="store_true", help="compile the training step with XLA")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between backups")
    p.add_argument("--export-dir", default=None, help="also export a serving SavedModel under this folder")
    p.add_argument("--tpu", default=None,
                   help='train on a Cloud TPU (TPUStrategy): "local" on a TPU VM, else its name or grpc:// address')

    p = sub.add_parser("export", help="export a .keras model as a TF-Serving SavedModel (raw-pixel signatures)")
    p.add_argument("model", help="a .keras file (e.g. a fine-tuning run's model.keras) or a BiT model name")
    p.add_argument("--export-dir", default="saved_models")
    p.add_argument("--name", default=None, help="folder name (default: the model's name)")
    p.add_argument("--version", type=int, default=None, help="default: the next free version")
    p.add_argument("--class-names", default=None, help="text file, one class name per line")
    p.add_argument("--top", type=int, default=5)

    p = sub.add_parser("predict", help="classify image files with a SavedModel, a .keras model or a BiT name")
    p.add_argument("images", nargs="+")
    p.add_argument("--model", required=True, help="SavedModel folder, .keras file or BiT model name")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("convert", help="convert an official .npz checkpoint to a Keras .weights.h5")
    p.add_argument("input", help="official-layout .npz checkpoint")
    p.add_argument("output", help="destination .weights.h5")
    p.add_argument("--model", required=True, choices=configs.MODEL_NAMES, help="architecture of the checkpoint")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[keras-bit] %(message)s")
    try:
        if args.command == "demo":
            demo(args.model, args.weights, args.top, args.size)
        elif args.command == "finetune":
            from keras_bit.train.distribute import tpu_strategy
            from keras_bit.train.finetune import finetune

            strategy = tpu_strategy(args.tpu) if args.tpu else None
            result = finetune(
                args.model, args.data, weights=args.weights, batch_size=args.batch_size, steps=args.steps,
                resolution=args.resolution, output_dir=args.output_dir,
                examples_per_class=args.examples_per_class, seed=args.seed, base_lr=args.base_lr,
                mixup=args.mixup, split=args.split, eval_split=args.eval_split,
                eval_fraction=args.eval_fraction, data_dir=args.data_dir, mixed_precision=args.mixed_precision,
                gradient_accumulation_steps=args.grad_accum, jit_compile=args.xla,
                checkpoint_every=args.checkpoint_every, export_dir=args.export_dir, strategy=strategy, verbose=2,
            )
            print(f"model: {os.path.join(result.output_dir, 'model.keras')}")
            if result.export_path:
                print(f"SavedModel: {result.export_path}")
        elif args.command == "export":
            from keras_bit.export import export_saved_model
            from keras_bit.predict import load_model, read_class_names

            model = load_model(args.model)
            names = read_class_names(args.class_names) if args.class_names else None
            print(export_saved_model(model, args.export_dir, name=args.name, version=args.version,
                                     class_names=names, top_k=args.top))
        elif args.command == "predict":
            from keras_bit.predict import predict_files

            results = predict_files(args.images, args.model, top=args.top)
            if args.json:
                print(json.dumps(results, indent=2))
            else:
                for item in results:
                    print(item["image"])
                    for entry in item["top"]:
                        label = f"  {entry['label']}" if entry.get("label") is not None else ""
                        print(f"  {entry['score']:.4f}  class {entry['index']}{label}")
        elif args.command == "convert":
            from keras_bit.checkpoints import convert

            convert(args.input, args.output, args.model)
            print(f"Wrote {args.output}")
    except (ValueError, OSError) as e:
        print(f"keras-bit {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
