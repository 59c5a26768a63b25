"""Few-shot classification from exported BiT feature vectors: kNN and a linear probe on scikit-learn's digits.

    python examples/fewshot_features.py                     # a tiny randomly initialised BiT (seconds, offline)
    python examples/fewshot_features.py --run bit_finetune  # a fine-tuning run's model.keras (e.g. the main job)

The model is exported with `outputs="features"` (the pooled pre-logits
embedding, TF Hub's BiT "feature_vector") as a SavedModel, and the features are
computed by that SavedModel, as a retrieval or few-shot service would. From the
digits that a run held out (the same draw as `keras-bit finetune --data
sklearn:digits`, so a run's model never trained on them), K examples per class
are the support set and the rest the queries; accuracies are averaged over
several draws. Everything is offline: the digits ship with scikit-learn.

A run fine-tuned on digits has seen the task's classes, so its numbers measure
how well its features separate digits, not transfer to a new task; the random
model is the floor any pretrained embedding should beat.
"""

import argparse
import json
import os
import tempfile

import keras
import numpy as np

import keras_bit
from keras_bit.export import export_model, load_exported

SHOTS = (1, 5, 10)


def build_model(run, size):
    """The run's fine-tuned classifier (its pre-logits are exported), else a tiny random BiT without a head."""
    if run:
        from keras_bit.predict import load_model

        return load_model(os.path.join(run, "model.keras"))
    return keras_bit.ResNetV2(block_units=(2, 1, 1, 1), base_width=32, groups=8, weights=None, include_top=False,
                              pooling="avg", input_shape=(size, size, 3), name="tiny_random_bit")


def held_out_digits(run):
    """uint8 RGB images and labels of the digits the run (or a default run: seed 0) did not train on."""
    seed, fraction = 0, 0.2
    if run:
        with open(os.path.join(run, "run.json")) as f:
            settings = json.load(f)
        seed, fraction = settings.get("seed", 0), settings.get("eval_fraction", 0.2)
    split = keras_bit.data.load("sklearn:digits", seed=seed, eval_fraction=fraction).eval
    images = np.stack([split.decode(record).numpy() for record, _ in split.ordered()])
    return images, np.asarray(split.labels)


def exported_features(model, images, size, batch=128):
    """The SavedModel feature export of `model`, run on `images` (resized inside the export to `size`)."""
    with tempfile.TemporaryDirectory() as folder:
        fixed = model.input_shape[1] is not None
        path = export_model(model, os.path.join(folder, "features"), "tf_saved_model", outputs="features",
                            image_size=None if fixed else (size, size))
        exported = load_exported(path)
        return np.concatenate([exported(images[i:i + batch])["features"] for i in range(0, len(images), batch)])


def few_shot_accuracies(features, labels, shots, draws, seed=0):
    """`{k: (knn, linear)}` mean query accuracies over `draws` support draws of `k` examples per class."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    # L2-normalised: kNN by cosine similarity, and a probe that does not depend on the features' scale.
    features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    rng, classes, scores = np.random.default_rng(seed), np.unique(labels), {}
    # One BLAS thread: the fits are tiny, and BLAS threads competing with TensorFlow's on a small machine made
    # each one 40x slower (2.5 s instead of 0.06 s on 2 cores).
    with threadpool_limits(1):
        for k in shots:
            for _ in range(draws):
                support = np.concatenate([rng.choice(np.flatnonzero(labels == c), k, replace=False)
                                          for c in classes])
                query = np.setdiff1d(np.arange(len(labels)), support)
                x, y = features[support], labels[support]
                knn = KNeighborsClassifier(n_neighbors=1).fit(x, y)
                probe = LogisticRegression(C=10.0, max_iter=2000).fit(x, y)
                scores.setdefault(k, []).append([m.score(features[query], labels[query]) for m in (knn, probe)])
    return {k: tuple(np.mean(rows, axis=0).tolist()) for k, rows in scores.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None, help="a fine-tuning run folder (model.keras, run.json)")
    parser.add_argument("--size", type=int, default=32, help="input size when the model's is not fixed")
    parser.add_argument("--draws", type=int, default=5, help="support draws averaged per K")
    args = parser.parse_args()

    keras.utils.set_random_seed(0)  # the random model's initial weights
    model = build_model(args.run, args.size)
    images, labels = held_out_digits(args.run)
    features = exported_features(model, images, args.size)
    print(f"model: {args.run or model.name}; {len(images)} held-out digits -> features {list(features.shape)}")
    print("examples/class   1-NN (cosine)   linear probe")
    for k, (knn, linear) in few_shot_accuracies(features, labels, SHOTS, args.draws).items():
        print(f"{k:>14d}   {knn:13.3f}   {linear:12.3f}")


if __name__ == "__main__":
    main()
