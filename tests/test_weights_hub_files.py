"""Hub repositories without model.safetensors: `pytorch_model.bin` (torch's weights-only loader) and Keras files.

The .bin tests that write or read a pickle need PyTorch (the torch backend venv: KERAS_BACKEND=torch); they are
skipped where it is missing. The no-torch path is simulated by making `import torch` fail.
"""

import contextlib
import os
import re
import sys
import zipfile

import keras
import numpy as np
import pytest

import keras_bit
import reference
from helpers import (
    bit_config, hub_lacks, hub_repo, images, offline_hub, randomize, relative_error, timm_config, tiny_model,
    tiny_weights, torch_saved,
)
from keras_bit.backend import BackendError
from keras_bit.weights import hub_files, sources, torch_bin

pytestmark = pytest.mark.backend_agnostic  # .ci/backend runs these on JAX and PyTorch

REPO = "someone/bit-bin"
R50 = (3, 4, 6, 3)
NEEDS_TORCH = "writing and reading pytorch_model.bin needs PyTorch (.ci/backend torch runs these, KERAS_BACKEND=torch)"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty, offline Hugging Face cache."""
    return offline_hub(monkeypatch, tmp_path / "hf_cache")


@pytest.fixture
def torch():
    return pytest.importorskip("torch", reason=NEEDS_TORCH)


def _state(torch, tensors):
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}


def _fetched(handle):
    return sources.fetch(sources.resolve_source(handle))


def _outputs_equal(a, b, x):
    np.testing.assert_array_equal(a.predict(x, verbose=0), b.predict(x, verbose=0))
    for wa, wb in zip(a.weights, b.weights):
        np.testing.assert_array_equal(wa.numpy(), wb.numpy(), err_msg=wa.path)


def test_transformers_bin_repo_equals_its_safetensors(hub, torch, rng):
    """A .bin-only transformers repo (like google/bit-50 main) loads what the same tensors as safetensors do."""
    d = tiny_weights(seed=5)  # a random head of 10 classes
    tensors = reference.to_transformers(d)
    hub_repo(hub, REPO, {"config.json": bit_config(), "pytorch_model.bin": torch_saved(_state(torch, tensors))})
    hub_repo(hub, "someone/bit-st", {"config.json": bit_config(), "model.safetensors": tensors})
    source = _fetched(f"hf://{REPO}")
    assert (source.format, source.classes, os.path.basename(source.path)) == ("transformers", 10, "pytorch_model.bin")
    from_bin = tiny_model(weights=f"hf://{REPO}", classifier_activation=None)
    from_st = tiny_model(weights="hf://someone/bit-st", classifier_activation=None)
    x = images(rng)
    _outputs_equal(from_bin, from_st, x)
    assert relative_error(from_bin.predict(x, verbose=0), reference.forward(d, x, groups=8)) <= 1e-5


def test_timm_bin_repo_equals_its_safetensors(hub, torch):
    """timm layout (an R50x1 with a random 10-class head, at 64 px); bfloat16 tensors load as safetensors' do."""
    d = reference.random_checkpoint(R50, classes=10, seed=6)
    tensors = reference.to_timm(d)
    tensors["stem.conv.weight"] = tensors["stem.conv.weight"].astype(np.float16)  # dtypes other than float32 too
    state = _state(torch, tensors)
    state["norm.weight"] = state["norm.weight"].to(torch.bfloat16)
    config = timm_config(num_classes=10)
    hub_repo(hub, "timm/bin", {"config.json": config, "pytorch_model.bin": torch_saved(state)})
    tensors["norm.weight"] = state["norm.weight"].float().numpy()  # bf16 values are exact in float32
    hub_repo(hub, "timm/st", {"config.json": config, "model.safetensors": tensors})
    assert _fetched("hf://timm/bin").format == "timm"
    model = keras_bit.BiTM_R50x1(weights="hf://timm/bin", input_shape=(64, 64, 3), classifier_activation=None)
    assert model.output_shape == (None, 10) and np.any(model.get_layer("head").kernel.numpy())
    from_bin = [w.numpy().copy() for w in model.weights]
    randomize(model)  # so that a variable the second load skipped shows
    keras_bit.load_weights(model, "hf://timm/st")  # one R50 build: the safetensors load into the same model
    for value, variable in zip(from_bin, model.weights):
        np.testing.assert_array_equal(value, variable.numpy(), err_msg=variable.path)


def test_local_bin_with_fmt(tmp_path, torch, rng):
    d = tiny_weights(seed=7)
    path = tmp_path / "pytorch_model.bin"
    torch.save(_state(torch, reference.to_transformers(d)), path)
    model = tiny_model(classes=10, classifier_activation=None)
    keras_bit.load_weights(model, path, fmt="transformers")
    x = images(rng)
    assert relative_error(model.predict(x, verbose=0), reference.forward(d, x, groups=8)) <= 1e-5


def test_online_repo_without_safetensors_uses_the_bin(hub, torch, monkeypatch):
    """The Hub answers 404 for model.safetensors: the .bin is downloaded instead."""
    d = tiny_weights(seed=8)
    hub_repo(hub, REPO, {"config.json": bit_config(),
                         "pytorch_model.bin": torch_saved(_state(torch, reference.to_transformers(d)))})
    hub_lacks(monkeypatch, "model.safetensors")
    assert _fetched(f"hf://{REPO}").path.endswith("pytorch_model.bin")


@contextlib.contextmanager
def _without_torch(monkeypatch):
    """`import torch` raises ImportError in this block (Keras' torch backend imported it already, and keeps it)."""
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "torch", None)
        yield


def test_bin_without_torch_says_what_to_do(hub, monkeypatch, tmp_path):
    """Without PyTorch the .bin is not even downloaded: a Keras file of the repository loads instead, if any."""
    hub_repo(hub, REPO, {"config.json": bit_config(), "pytorch_model.bin": b"PK\x03\x04 not read"})
    hub_lacks(monkeypatch, "model.safetensors")
    with _without_torch(monkeypatch), pytest.raises(
            BackendError, match=r"hf://someone/bit-bin has no model.safetensors, only pytorch_model.bin; .*"
                                r"pip install torch.*'hf://someone/bit-bin@refs/pr/<N>'"):
        _fetched(f"hf://{REPO}")
    tiny_model(classes=10).save_weights(tmp_path / "model.weights.h5")
    hub_repo(hub, "someone/both", {"config.json": bit_config(), "pytorch_model.bin": b"PK\x03\x04 not read",
                                   "model.weights.h5": (tmp_path / "model.weights.h5").read_bytes()})
    with _without_torch(monkeypatch):
        assert _fetched("hf://someone/both").path.endswith("model.weights.h5")
    assert sources.parse_hub_handle("hf://google/bit-50@refs/pr/3") == ("google/bit-50", "refs/pr/3")


class _WritesAFile:
    """Unpickled, this would create a file: what a malicious pickle does (any code at all)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def _hostile_states(torch, tmp_path):
    good = _state(torch, reference.to_transformers(tiny_weights()))
    key = "bit.encoder.stages.1.layers.0.norm2.weight"
    nan = dict(good)
    nan[key] = good[key].clone()
    nan[key][3] = float("nan")
    marker = tmp_path / "written-by-the-pickle"
    return marker, {
        "code": ({**good, key: _WritesAFile(str(marker))}, r"UnpicklingError"),
        "not a tensor": ({**good, key: [1.0, 2.0]}, rf"key '{key}' holds a list, not a tensor"),
        "nan": (nan, rf"key '{key}' contains NaN or infinite values"),
        "int": ({**good, key: good[key].int()}, rf"key '{key}' has dtype int32, expected floating point"),
        "sparse": ({**good, key: good[key].to_sparse()}, rf"key '{key}' is a torch.sparse_coo cpu tensor"),
        "not a dict": (list(good.values()), r"holds a list, not a state dict"),
        "nested": ({"state_dict": good}, r"key 'state_dict' holds a dict, not a tensor"),
    }


@pytest.mark.parametrize("defect", ["code", "not a tensor", "nan", "int", "sparse", "not a dict", "nested"])
def test_hostile_bin_refused(hub, torch, tmp_path, defect):
    marker, cases = _hostile_states(torch, tmp_path)
    state, message = cases[defect]
    paths = hub_repo(hub, REPO, {"config.json": bit_config(), "pytorch_model.bin": torch_saved(state)})
    model = randomize(tiny_model(classes=10))
    before = [w.numpy().copy() for w in model.weights]
    with pytest.raises(ValueError, match=message) as info:
        keras_bit.load_weights(model, f"hf://{REPO}")
    assert paths["pytorch_model.bin"] in str(info.value) or os.path.realpath(paths["pytorch_model.bin"]) in str(
        info.value)
    assert not marker.exists()  # the pickle's code never ran
    for old, variable in zip(before, model.weights):
        np.testing.assert_array_equal(old, variable.numpy())


def test_bin_linking_outside_the_cache_refused(hub, torch, tmp_path):
    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes(torch_saved(_state(torch, reference.to_transformers(tiny_weights()))))
    paths = hub_repo(hub, REPO, {"config.json": bit_config(), "pytorch_model.bin": b"replaced"})
    os.remove(paths["pytorch_model.bin"])
    os.symlink(outside, paths["pytorch_model.bin"])
    with pytest.raises(ValueError, match=r"the cached pytorch_model.bin at .* leads outside the repository's cache"):
        tiny_model(weights=f"hf://{REPO}")


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_bin_reader_refuses_devices_and_garbage(tmp_path, torch):
    link = tmp_path / "pytorch_model.bin"
    link.symlink_to("/dev/zero")
    with pytest.raises(ValueError, match=r"is a device, not a regular file"):
        torch_bin.Reader(link)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x80\x02}q\x00." * 10)  # a bare pickle, not torch.save's zip
    with pytest.raises(ValueError, match=re.escape(str(garbage))):
        torch_bin.Reader(garbage)


def _keras_repo_files(tmp_path, model, form):
    """What `keras.saving.save_model(model, "hf://...")` uploads (a folder), or one `.keras` archive."""
    if form == "model.keras":
        model.save(tmp_path / "model.keras")
        return {"model.keras": (tmp_path / "model.keras").read_bytes(), "config.json": {"class_name": "Functional",
                                                                                        "config": {}}}
    folder = tmp_path / "saved"
    keras.saving.save_model(model, folder, zipped=False)
    return {name: (folder / name).read_bytes() for name in ("config.json", "metadata.json", "model.weights.h5")}


@pytest.mark.parametrize("form", ["model.weights.h5", "model.keras"])
def test_keras_format_repo(hub, tmp_path, rng, form):
    published = randomize(tiny_model(classes=10, classifier_activation=None), seed=3)
    hub_repo(hub, REPO, _keras_repo_files(tmp_path, published, form))
    source = _fetched(f"hf://{REPO}")
    assert (os.path.basename(source.path), source.classes) == (form, 10)
    _outputs_equal(tiny_model(weights=f"hf://{REPO}", classifier_activation=None), published, images(rng))


def test_keras_archive_without_weights_named(hub, tmp_path):
    path = tmp_path / "model.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", "{}")
        archive.writestr("../model.weights.h5", b"outside")
    hub_repo(hub, REPO, {"config.json": {"class_name": "Functional", "config": {}}, "model.keras": path.read_bytes()})
    with pytest.raises(ValueError, match=r"Keras archive .*model.keras has 0 model.weights.h5 members"):
        tiny_model(weights=f"hf://{REPO}")


@pytest.mark.parametrize("present,chosen", [
    (("model.safetensors", "pytorch_model.bin", "model.weights.h5", "model.keras"), "model.safetensors"),
    (("pytorch_model.bin", "model.weights.h5", "model.keras"), "pytorch_model.bin"),
    (("model.weights.h5", "model.keras"), "model.weights.h5"),
])
def test_preference_order(hub, tmp_path, monkeypatch, present, chosen):
    """safetensors, then the PyTorch pickle, then Keras' files; the ones after the chosen one are never opened."""
    if chosen == "pytorch_model.bin":
        pytest.importorskip("torch", reason=NEEDS_TORCH)
    tensors = reference.to_transformers(tiny_weights())
    valid = {"model.safetensors": tensors}
    if chosen == "pytorch_model.bin":
        import torch

        valid["pytorch_model.bin"] = torch_saved(_state(torch, tensors))
    if chosen == "model.weights.h5":
        tiny_model(classes=10).save_weights(tmp_path / "model.weights.h5")
        valid["model.weights.h5"] = (tmp_path / "model.weights.h5").read_bytes()
    files = {name: valid.get(name, b"garbage, never read") for name in present}
    hub_repo(hub, REPO, {"config.json": bit_config(), **files})
    if chosen == "pytorch_model.bin":
        source = _fetched(f"hf://{REPO}")
    else:
        with _without_torch(monkeypatch):  # never needed
            source = _fetched(f"hf://{REPO}")
    assert os.path.basename(source.path) == chosen and source.classes == 10


def test_repo_with_nothing_loadable_lists_the_names(hub, monkeypatch):
    hub_repo(hub, REPO, {"config.json": bit_config(), "README.md": b"# no weights", "flax_model.msgpack": b"x"})
    with pytest.raises(keras_bit.DownloadError, match=r"model.safetensors, (pytorch_model.bin, )?model.weights.h5, "
                                                      r"model.keras not in the cache.*HF_HUB_OFFLINE"):
        tiny_model(weights=f"hf://{REPO}")  # offline: missing from the cache, maybe not from the Hub (the .bin is
        # looked for only where PyTorch is installed)
    hub_lacks(monkeypatch, *hub_files.WEIGHTS)
    with pytest.raises(ValueError, match=r"hf://someone/bit-bin holds no weights file keras_bit reads \(looked for "
                                         r"model.safetensors, pytorch_model.bin, model.weights.h5, model.keras\)"):
        tiny_model(weights=f"hf://{REPO}")


def _published_repo(hub, tmp_path, model, fmt, only=None):
    """The files `keras_bit.save_pretrained(model, ..., format=fmt)` writes (or those in `only`), as a Hub
    repository in the cache."""
    folder = keras_bit.save_pretrained(model, tmp_path / fmt, fmt)
    files = {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)
             if os.path.isfile(os.path.join(folder, name)) and (only is None or name in only)}
    hub_repo(hub, REPO, files)
    return sorted(files)


@pytest.mark.parametrize("fmt", ["keras", "transformers"])
def test_keras_bit_published_forms_load_back(hub, tmp_path, rng, fmt):
    """What keras_bit publishes (`push_to_hub` uploads these files) loads back through hf:// exactly."""
    published = randomize(tiny_model(classes=10, classifier_activation=None), seed=9)
    names = _published_repo(hub, tmp_path, published, fmt)
    source = _fetched(f"hf://{REPO}")
    expected = {"keras": ("model.weights.h5", "keras"), "transformers": ("model.safetensors", "transformers")}[fmt]
    assert (os.path.basename(source.path), source.format) == expected and source.classes == 10, names
    _outputs_equal(tiny_model(weights=f"hf://{REPO}", classifier_activation=None), published, images(rng))


def test_keras_bit_config_architecture_checked_before_the_weights(hub, tmp_path):
    _published_repo(hub, tmp_path, tiny_model(classes=10), "keras", only=("config.json",))  # weights not fetched
    with pytest.raises(ValueError, match=r"hf://someone/bit-bin holds a BiT with block_units=\(2, 1, 1, 1\).*"
                                         r"the model asks for block_units=\(2, 1, 2, 1\)"):
        keras_bit.ResNetV2((2, 1, 2, 1), base_width=32, groups=8, weights=f"hf://{REPO}")
