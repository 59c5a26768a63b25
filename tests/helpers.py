"""Small builders shared by the test modules."""

import functools
import shutil

import keras
import numpy as np

import keras_bit
import reference

TINY = dict(block_units=(2, 1, 1, 1), base_width=32, groups=8)  # unit02: an identity shortcut
TINY_SIZE = 64


def tiny_checkpoint(path, classes=10, seed=0, **kwargs):
    """Writes a random tiny official-layout .npz; returns its dict."""
    d = reference.random_checkpoint(TINY["block_units"], base=TINY["base_width"], classes=classes, seed=seed, **kwargs)
    np.savez(path, **d)
    return d


def tiny_model(weights=None, **kwargs):
    kwargs.setdefault("input_shape", (TINY_SIZE, TINY_SIZE, 3))
    return keras_bit.ResNetV2(weights=weights, **TINY, **kwargs)


def images(rng, n=2, size=TINY_SIZE):
    """Preprocessed-range inputs in [-1, 1]."""
    return rng.uniform(-1.0, 1.0, size=(n, size, size, 3)).astype("float32")


TINY_BUILDER = functools.partial(keras_bit.ResNetV2, **TINY)


def learnable(n_per_class=24, size=16, seed=0):
    """Three classes told apart by colour: a task a tiny BiT learns in a few dozen steps."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), n_per_class)
    base = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]])[labels]
    pixels = base[:, None, None, :] + rng.integers(-30, 30, size=(len(labels), size, size, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8), labels


def run_finetune(tmp_path, name="run", data=None, **kwargs):
    """A tiny fine-tuning run (batch 8, 20 steps at 36/32 px, quiet) in `tmp_path / name`."""
    kwargs.setdefault("batch_size", 8)
    kwargs.setdefault("steps", 20)
    kwargs.setdefault("resolution", (36, 32))
    kwargs.setdefault("base_lr", 0.5)
    kwargs.setdefault("verbose", 0)
    return keras_bit.finetune(TINY_BUILDER, learnable() if data is None else data, output_dir=tmp_path / name,
                              **kwargs)


def copy_run(run_dir, tmp_path, name="run"):
    """A copy of a session-wide run folder (conftest's `interrupted_run`) in `tmp_path / name`, to resume or refuse."""
    shutil.copytree(run_dir, tmp_path / name)
    return tmp_path / name


def folder_digests(folder):
    """`{relative path: sha256}` of every file under `folder`: equal digests mean nothing was written or changed."""
    import hashlib
    import os

    digests = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                digests[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return digests


class Crash(keras.callbacks.Callback):
    """Raises KeyboardInterrupt after `after_batches` training batches: a killed run."""

    def __init__(self, after_batches):
        super().__init__()
        self.after = after_batches
        self.seen = 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.after:
            raise KeyboardInterrupt("simulated crash")


# --- A Hugging Face Hub cache on disk, read offline (timm and transformers checkpoints). ---

TINY_BIT_CONFIG = dict(depths=[2, 1, 1, 1], embedding_size=32, hidden_sizes=[128, 256, 512, 1024], num_groups=8)


def offline_hub(monkeypatch, cache):
    """Points huggingface_hub at the cache folder `cache` (created) and forbids network access; returns `cache`.

    huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE from the environment once, when
    `huggingface_hub.constants` is imported, and `hf_hub_download` then looks the module attributes up at
    call time; keras_bit passes no `cache_dir`, so patching the attributes is what takes effect in this
    process (the environment variables are set too, for anything started from here).
    """
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def tiny_weights(width=1, classes=10, seed=0):
    """A random official-layout dict of the TINY architecture (random head of `classes`)."""
    return reference.random_checkpoint(TINY["block_units"], width=width, base=TINY["base_width"], classes=classes,
                                       seed=seed)


def hub_repo(cache, repo_id, files, revision="main"):
    """Writes a model repository into a Hugging Face cache folder, laid out as huggingface_hub does.

    `models--<owner>--<name>/blobs/<digest>` holds the contents, `refs/<revision>` the commit and
    `snapshots/<commit>/<file>` links to the blob. `files` maps a file name to a dict (`.json`: written as
    JSON; `.safetensors`: arrays written with `safetensors.numpy.save_file`) or to bytes.

    Returns:
        file name -> its path in the snapshot (what `hf_hub_download` returns).
    """
    import hashlib
    import json
    import pathlib

    from safetensors.numpy import save_file

    folder = pathlib.Path(cache) / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / revision).write_text(commit)
    paths = {}
    for name, content in files.items():
        staging = folder / "blobs" / "incoming"
        if name.endswith(".safetensors") and isinstance(content, dict):
            # save_file writes each array's buffer as is (a transposed view would be stored untransposed).
            save_file({k: np.ascontiguousarray(v) for k, v in content.items()}, str(staging))
        else:
            staging.write_bytes(json.dumps(content).encode() if isinstance(content, dict) else content)
        blob = folder / "blobs" / hashlib.sha256(staging.read_bytes()).hexdigest()
        staging.replace(blob)
        link = folder / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(pathlib.Path("..", "..", "blobs", blob.name))
        paths[name] = str(link)
    return paths


def timm_config(architecture="resnetv2_50x1_bit", num_classes=21843, size=224):
    """A timm config.json as timm writes it for its BiT uploads."""
    return {
        "architecture": architecture, "num_classes": num_classes, "num_features": 2048,
        "pretrained_cfg": {"tag": "goog_in21k", "custom_load": True, "input_size": [3, size, size],
                           "fixed_input_size": False, "interpolation": "bilinear", "crop_pct": 0.875,
                           "crop_mode": "center", "mean": [0.5] * 3, "std": [0.5] * 3, "num_classes": num_classes,
                           "pool_size": [size // 32] * 2, "first_conv": "stem.conv", "classifier": "head.fc"},
    }


def bit_config(classes=10, **overrides):
    """A transformers BitConfig (config.json of BitForImageClassification), tiny unless `overrides` say otherwise."""
    config = {
        "architectures": ["BitForImageClassification"], "model_type": "bit", "num_channels": 3,
        "layer_type": "preactivation", "global_padding": None, "embedding_dynamic_padding": False,
        "hidden_act": "relu", "width_factor": 1, "output_stride": 32, "drop_path_rate": 0.0,
        "id2label": {str(i): f"class_{i}" for i in range(classes)},
        "label2id": {f"class_{i}": i for i in range(classes)},
        **TINY_BIT_CONFIG,
    }
    config.update(overrides)
    return config


# --- Checks shared by the weight-format tests. ---


def relative_error(a, b):
    """max |a - b| / max |b|."""
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def assert_refused(model, load, message):
    """`load()` raises ValueError matching `message` and leaves every weight of `model` as it was."""
    import pytest

    before = [w.numpy().copy() for w in model.weights]
    with pytest.raises(ValueError, match=message) as info:
        load()
    for old, variable in zip(before, model.weights):
        np.testing.assert_array_equal(old, variable.numpy(), err_msg=f"{variable.path} changed by a refused load")
    return info.value


def randomize(model, seed=0):
    """Gives every weight of `model` random values (so that a zero-initialised head shows when overwritten)."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        variable.assign(rng.normal(size=variable.shape).astype(variable.dtype))
    return model


DEFECTS = ("missing", "unexpected", "nan", "int")


def with_defect(tensors, defect, key, extra):
    """A copy of the state dict `tensors` with one defect, and the regex the strict loader's error must match.

    `defect` is one of DEFECTS: `key` removed, the `(name, array)` pair `extra` added, a NaN in `key`, or `key`
    stored as int32.
    """
    import re

    tensors = dict(tensors)
    if defect == "missing":
        del tensors[key]
        return tensors, rf"1 missing keys: {re.escape(key)}"
    if defect == "unexpected":
        tensors[extra[0]] = extra[1]
        return tensors, rf"1 unexpected keys: {re.escape(extra[0])}"
    if defect == "nan":
        tensors[key] = tensors[key].copy()
        tensors[key].flat[tensors[key].size // 2] = np.nan
        return tensors, rf"key '{re.escape(key)}' contains NaN or infinite values"
    tensors[key] = tensors[key].astype(np.int32)
    return tensors, rf"key '{re.escape(key)}' has dtype int32, expected floating point"


def assert_safetensors_refused(path, tensors, message):
    """Writes `tensors` to `path`; loading it into a tiny 10-class model fails naming `path`, assigning nothing."""
    from safetensors.numpy import save_file

    save_file(tensors, str(path))
    model = tiny_model(classes=10)
    error = assert_refused(model, lambda: keras_bit.load_weights(model, path), message)
    assert str(path) in str(error)


# --- Exports: a tiny classifier whose outputs depend on the input, and images to feed it. ---

EXPORT_CLASSES = [f"class_{i}" for i in range(5)]


# File name and runtime of each export format (conftest's `classifier_exports`).
EXPORT_FILES = {"litert": "model.tflite", "onnx": "model.onnx", "openvino": "model.xml",
                "tf_saved_model": "saved_model"}
EXPORT_RUNTIMES = {"litert": "ai_edge_litert", "onnx": "onnxruntime", "openvino": "openvino",
                   "tf_saved_model": "tensorflow"}


def export_classifier(tmp_path, **kwargs):
    """A tiny 5-class model with a random head (so outputs vary with the input), loaded from an .npz."""
    tiny_checkpoint(tmp_path / "classifier.npz", classes=5, seed=4)
    return tiny_model(weights=str(tmp_path / "classifier.npz"), **kwargs)


def uint8_images(rng, n, height, width):
    return rng.integers(0, 256, size=(n, height, width, 3), dtype=np.uint8)


def keras_probabilities(model, images, size=TINY_SIZE):
    """The Keras model on uint8 `images` resized (bilinear, float) to `size`: what every export must return."""
    import tensorflow as tf

    x = tf.image.resize(tf.cast(images, tf.float32), (size, size))
    return model.predict(keras_bit.preprocess_input(x.numpy()), verbose=0)


def encode(image, fmt, **options):
    """`image` (uint8 HxWx3) encoded by Pillow as `fmt` (JPEG at quality 95, 4:4:4 unless told)."""
    import io

    from PIL import Image

    if fmt == "JPEG":
        options = {"quality": 95, "subsampling": 0, **options}
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **options)
    return buffer.getvalue()


# --- The installed `keras-bit` command, as a shell runs it. ---


def installed_command(*argv, cwd=None, timeout=300, env=None):
    """Runs this interpreter's `keras-bit` console script with `argv`; returns the CompletedProcess (text).

    `env`: variables set on top of this process's environment. Skips the test when the script is not installed.
    """
    import os
    import shutil
    import subprocess
    import sys

    import pytest

    beside = os.path.join(os.path.dirname(sys.executable), "keras-bit")  # this interpreter's, not another's
    command = beside if os.path.exists(beside) else shutil.which("keras-bit")
    if command is None:
        pytest.skip("the keras-bit console script is not installed")
    return subprocess.run([command, *map(str, argv)], capture_output=True, text=True, errors="replace", cwd=cwd,
                          timeout=timeout, env={**os.environ, **(env or {})})


def cli_in_process(*argv, capsys):
    """`keras_bit.cli.main(argv)` in this process, as a CompletedProcess like `installed_command`'s (a console
    script start costs seconds: keep `installed_command` for what only a real process shows)."""
    import subprocess

    from keras_bit import cli

    try:
        code = cli.main(list(map(str, argv)))
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err)


def assert_cli_error(proc, command, *fragments):
    """`proc` (see `installed_command`) ended with exit status 2 and one stderr line naming each fragment."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    assert lines[0].startswith(f"keras-bit {command}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# --- Run folders held by another process (keras_bit.train.run_lock). ---

_HOLDER = (
    "import sys\n"
    "from keras_bit.train.run_lock import hold\n"
    "with hold(sys.argv[1]):\n"
    "    print('held', flush=True)\n"
    "    sys.stdin.readline()\n"  # until told to end
)


class HeldElsewhere:
    """`with HeldElsewhere(run_dir) as proc:` a separate process holds `run_dir`'s lock until the block ends.

    `proc.pid` is the holder's pid; `kill()` ends it with SIGKILL (the OS then drops the lock, the file stays).
    """

    def __init__(self, run_dir):
        self.run_dir = run_dir

    def __enter__(self):
        import subprocess
        import sys

        self.proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(self.run_dir)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"
        return self.proc

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.communicate("\n", timeout=60)
        return False


def hub_lacks(monkeypatch, *filenames):
    """Makes `huggingface_hub.hf_hub_download` answer as the Hub does for files a repository lacks (HTTP 404).

    With HF_HUB_OFFLINE=1 a file missing from the cache is "not cached", never "not in the repository"; this
    stands for the online answer.
    """
    import importlib

    import huggingface_hub
    from huggingface_hub import errors

    download = huggingface_hub.hf_hub_download
    http = importlib.import_module(errors.Response.__module__.split(".")[0])  # the Response class's HTTP library

    def hub(repo_id, filename, **kwargs):
        if filename in filenames:
            url = f"https://huggingface.co/{repo_id}/resolve/main/{filename}"
            raise errors.RemoteEntryNotFoundError(
                "404 Client Error: Entry Not Found", response=http.Response(404, request=http.Request("HEAD", url)))
        return download(repo_id, filename, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)


def torch_saved(state):
    """The bytes `torch.save(state)` writes (a zip of data.pkl and the tensor storages); needs PyTorch."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()
