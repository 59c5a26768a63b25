"""R50x1 parity on the current Keras backend, per weight source: keras_bit vs the independent NumPy reference.

A random full-size BiT-M-R50x1 checkpoint (random head, random GroupNorm affine) is written in each format
keras_bit reads -- the authors' .npz, a Keras .weights.h5, timm's and transformers' safetensors, and the same two
as `hf://` handles from an offline Hugging Face cache -- loaded, and compared on 64x64 inputs with
`tests/reference.py` (float64 NumPy). Prints one line per source: max |diff| / max |reference| of the logits.

    KERAS_BACKEND=jax python benchmarks/parity.py
"""

import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_bit  # noqa: E402
import reference  # noqa: E402

R50 = (3, 4, 6, 3)


def _hub_repo(cache, repo, files):
    """A Hugging Face cache entry (models--owner--name/snapshots/<commit>/...) holding `files`."""
    commit = "0" * 40
    root = os.path.join(cache, "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(commit)
    snapshot = os.path.join(root, "snapshots", commit)
    os.makedirs(snapshot, exist_ok=True)
    for name, write in files.items():
        write(os.path.join(snapshot, name))


def main():
    from safetensors.numpy import save_file

    work = tempfile.mkdtemp(prefix="keras_bit_parity_")
    d = reference.random_checkpoint(R50, classes=1000, seed=3)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype("float32")
    expected = reference.forward(d, x)
    npz = os.path.join(work, "r50.npz")
    np.savez(npz, **d)
    timm_file, hf_file = os.path.join(work, "timm.safetensors"), os.path.join(work, "hf.safetensors")
    save_file(reference.to_timm(d), timm_file)
    save_file(reference.to_transformers(d), hf_file)
    model = keras_bit.BiTM_R50x1(weights=npz, input_shape=(64, 64, 3), classifier_activation=None)
    h5 = os.path.join(work, "r50.weights.h5")
    model.save_weights(h5)

    cache = os.path.join(work, "hub")
    os.environ["HF_HUB_CACHE"], os.environ["HF_HUB_OFFLINE"] = cache, "1"
    import huggingface_hub.constants as hub_constants  # read at import: point them at the test cache

    hub_constants.HF_HUB_CACHE, hub_constants.HF_HUB_OFFLINE = cache, True
    timm_config = {"architecture": "resnetv2_50x1_bit", "num_classes": 1000,
                   "pretrained_cfg": {"input_size": [3, 224, 224]}}
    hf_config = {"model_type": "bit", "layer_type": "preactivation", "depths": [3, 4, 6, 3], "width_factor": 1,
                 "embedding_size": 64, "num_groups": 32, "global_padding": None,
                 "id2label": {str(i): str(i) for i in range(1000)}}
    for repo, config, tensors in (("timm/r50", timm_config, timm_file), ("google/r50", hf_config, hf_file)):
        _hub_repo(cache, repo, {
            "config.json": lambda p, c=config: open(p, "w").write(json.dumps(c)),
            "model.safetensors": lambda p, t=tensors: os.symlink(t, p),
        })
    sources = {".npz": npz, ".weights.h5": h5, "timm .safetensors": timm_file,
               "transformers .safetensors": hf_file, "hf://timm/...": "hf://timm/r50", "hf://google/...": "hf://google/r50"}
    print(f"backend {keras.backend.backend()}, keras {keras.__version__}, BiT-M-R50x1 at 64x64, batch 2")
    for label, weights in sources.items():
        net = keras_bit.BiTM_R50x1(weights=weights, input_shape=(64, 64, 3), classifier_activation=None)
        got = keras.ops.convert_to_numpy(net(x))
        error = np.abs(got - expected).max() / np.abs(expected).max()
        print(f"  {label:28s} relative error {error:.2e}")


if __name__ == "__main__":
    main()
