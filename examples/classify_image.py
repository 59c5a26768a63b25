"""Classify an image file with a pretrained BiT model.

    python examples/classify_image.py photo.jpg --model BiT-M-R50x1 --weights imagenet

Downloads the checkpoint once into the Keras cache (~/.keras/bit_models/); with
no network, place the .npz there yourself (the error message says where).
"""

import argparse

import numpy as np
from PIL import Image

import keras_bit


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image")
    parser.add_argument("--model", default="BiT-M-R50x1", choices=keras_bit.MODEL_NAMES)
    parser.add_argument("--weights", default="imagenet", help='"imagenet", "imagenet21k" (BiT-M) or a path')
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args()

    model = keras_bit.BiT(args.model, weights=args.weights)
    size = model.input_shape[1]
    # BiT's evaluation rule: resize straight to the model's resolution, no centre crop.
    image = Image.open(args.image).convert("RGB").resize((size, size), Image.BILINEAR)
    x = keras_bit.preprocess_input(np.asarray(image)[None])
    for wnid, name, score in keras_bit.decode_predictions(model.predict(x, verbose=0), top=args.top)[0]:
        print(f"{score:.4f}  {wnid}  {name}")


if __name__ == "__main__":
    main()
