"""The `keras-bit` command: `demo` and `convert`.

Examples:
    keras-bit demo                                   # build BiT-S-R50x1, classify a generated image
    keras-bit convert BiT-M-R50x1.npz bit.weights.h5 --model BiT-M-R50x1
"""

import argparse
import logging
import sys
import time

import numpy as np

from keras_bit import configs


def _weights_arg(value):
    return None if value.lower() == "none" else value


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
