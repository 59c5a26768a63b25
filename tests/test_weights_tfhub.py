"""TF2 SavedModels of BiT (TF Hub / Kaggle Models): variables read by name without running the graph, loaded
strictly. The modules here are built with `tf.saved_model.save` from variables carrying the authors' TF2 names."""

import os
import shutil
import sys
import types

import numpy as np
import pytest
import tensorflow as tf

import keras_bit
import reference
from helpers import assert_refused, images, relative_error, tiny_model, tiny_weights
from keras_bit import presets
from keras_bit.backend import BackendError
from keras_bit.weights import sources, tfhub
from keras_bit.weights.download import DownloadError

HANDLE = "google/bit/tensorFlow2/m-tiny/1"
GRAPH_BYTES = "SavedModel graph"


def published(d, head="dense", scope="resnet"):
    """The variables of a TF Hub BiT module holding the official tensors `d`: bit_tf2's names (no ":0"), the head
    a Dense (in, out) ("dense"), a 1x1 conv as in the .npz ("conv2d"), or none (None: a feature-vector module)."""
    out = {}
    for key, value in d.items():
        name = (scope + "/" if scope else "") + key[len("resnet/"):]
        if key.startswith("resnet/head/"):
            if head is None:
                continue
            if head == "dense":
                name = name.replace("head/conv2d/", "head/dense/")
                value = value[0, 0] if value.ndim == 4 else value
        out[name] = value
    return out


def save_module(folder, variables, signature=False):
    """A SavedModel of a `tf.Module` holding `variables` (name -> array); with `signature`, a traced function
    that rescales [0, 1] images as the published modules do, so that the graph references the variables."""
    module = tf.Module()
    module.bit = [tf.Variable(np.asarray(v), name=k) for k, v in variables.items()]
    if signature:
        first = module.bit[0]
        module.__call__ = tf.function(lambda x: tf.reduce_mean(2.0 * x - 1.0) * tf.reduce_sum(first),
                                      input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    tf.saved_model.save(module, str(folder))
    return str(folder)


def _layer(**variables):
    layer = tf.Module()
    for name, value in variables.items():
        setattr(layer, name, tf.Variable(np.asarray(value), name=name))  # tf_keras 2.21's names: not unique
    return layer


def _sequential(*layers):
    sequential = tf.Module()
    for i, layer in enumerate(layers):
        setattr(sequential, f"layer_with_weights-{i}", layer)
    return sequential


def save_bit_tf2(folder, d):
    """A SavedModel with the object structure of the authors' ResnetV2 (bit_tf2/models.py attributes, Keras'
    Sequential tracking "layer_with_weights-<n>") inside a module, its variables named only "kernel", "gamma", ..."""
    conv = lambda key: _layer(kernel=d[f"{key}/standardized_conv2d/kernel"])  # noqa: E731
    gn = lambda key: _layer(gamma=d[f"{key}/group_norm/gamma"], beta=d[f"{key}/group_norm/beta"])  # noqa: E731
    model = tf.Module()
    model._root = _sequential(conv("resnet/root_block"))
    model._blocks = []
    for b in range(1, 5):
        units = []
        for u in range(1, 1 + sum(k.startswith(f"resnet/block{b}/") and k.endswith("/a/group_norm/gamma") for k in d)):
            p = f"resnet/block{b}/unit{u:02d}"
            unit = tf.Module()
            unit._unit_a, unit._unit_a_conv = _sequential(gn(f"{p}/a")), conv(f"{p}/a")
            unit._unit_b, unit._unit_c = (_sequential(gn(f"{p}/{x}"), conv(f"{p}/{x}")) for x in "bc")
            if f"{p}/a/proj/standardized_conv2d/kernel" in d:
                unit._proj = conv(f"{p}/a/proj")
            units.append(unit)
        model._blocks.append(_sequential(*units))
    model._pre_head = [gn("resnet")]
    model._head = _layer(kernel=d["resnet/head/conv2d/kernel"][0, 0], bias=d["resnet/head/conv2d/bias"])
    module = tf.Module()
    module.model = model
    tf.saved_model.save(module, str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def weights():
    return tiny_weights(classes=10, seed=3)


@pytest.fixture(scope="module")
def modules(tmp_path_factory, weights):
    """The published module kinds, each saved once: classification (Dense head), feature vector, 1x1-conv head
    under another model scope."""
    root = tmp_path_factory.mktemp("tfhub")
    return {
        "classification": save_module(root / "classification", published(weights), signature=True),
        "feature_vector": save_module(root / "feature_vector", published(weights, head=None)),
        "conv_head": save_module(root / "conv_head", published(weights, head="conv2d", scope="resnet50")),
        "bit_tf2": save_bit_tf2(root / "bit_tf2", weights),
    }


def _copy(modules, kind, tmp_path):
    return shutil.copytree(modules[kind], tmp_path / kind)


def test_bit_tf2_object_paths_name_the_variables(modules, weights):
    """TF's own names are not unique in a bit_tf2 SavedModel ("gamma" in every unit): the object paths name them."""
    with tfhub.Reader(modules["bit_tf2"]) as reader:
        assert set(reader.keys()) == set(published(weights))


def test_duplicate_names_refused(tmp_path):
    folder = save_module(tmp_path / "twice", {"resnet/group_norm/gamma": np.ones(4, np.float32)})
    module = tf.saved_model.load(folder)  # a second variable of the same name, saved beside the first
    module.again = tf.Variable(np.ones(4, np.float32), name="resnet/group_norm/gamma")
    tf.saved_model.save(module, str(tmp_path / "twice2"))
    with pytest.raises(ValueError, match=r"variable name 'resnet/group_norm/gamma' is empty or used twice"):
        tfhub.Reader(str(tmp_path / "twice2"))


def test_names_come_from_the_object_graph(modules, weights):
    with tfhub.Reader(modules["classification"]) as reader:
        assert set(reader.keys()) == set(published(weights))
        assert reader.info("resnet/head/dense/kernel") == ((1024, 10), "float32")
        np.testing.assert_array_equal(reader.read("resnet/group_norm/gamma"), weights["resnet/group_norm/gamma"])


@pytest.mark.parametrize("kind", ["classification", "conv_head", "bit_tf2"])
def test_classification_module_parity(modules, weights, rng, kind):
    model = tiny_model(classes=10, classifier_activation=None)
    keras_bit.load_weights(model, modules[kind])
    x = images(rng)
    assert relative_error(model.predict(x, verbose=0), reference.forward(weights, x, groups=8)) <= 1e-5
    built = tiny_model(weights=modules[kind], classifier_activation=None)  # the class count from the module
    assert built.output_shape == (None, 10)
    assert relative_error(built.predict(x, verbose=0), reference.forward(weights, x, groups=8)) <= 1e-5


def test_feature_vector_module_equals_the_npz(modules, weights, tmp_path, rng):
    np.savez(tmp_path / "same.npz", **weights)
    from_npz = tiny_model(weights=str(tmp_path / "same.npz"), include_top=False)
    model = tiny_model(weights=modules["feature_vector"], include_top=False)
    for a, b in zip(from_npz.weights, model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    x = images(rng)
    assert relative_error(model.predict(x, verbose=0), reference.forward(weights, x, groups=8, features=True)) <= 1e-5
    assert sources.resolve_source(modules["feature_vector"]).classes is None
    assert sources.resolve_source(modules["classification"]).classes == 10


def test_feature_vector_module_into_a_model_with_a_head(modules):
    model = tiny_model(classes=10)
    assert_refused(model, lambda: keras_bit.load_weights(model, modules["feature_vector"]),
                   r"missing keys: resnet/head/dense/bias.*feature-vector module \(no head\)")
    keras_bit.load_weights(model, modules["feature_vector"], load_head=False)
    headless = tiny_model(weights=modules["classification"], include_top=False)  # a module's head is skippable
    assert headless.output_shape[-1] == 1024


@pytest.mark.parametrize("defect,message", [
    ("missing", r"1 missing keys: resnet/block1/unit02/b/group_norm/beta"),
    ("unexpected", r"1 unexpected keys: resnet/global_step"),
    ("shape", r"key 'resnet/block1/unit02/b/group_norm/beta' has shape \(3,\)"),
    ("nan", r"key 'resnet/block1/unit02/b/group_norm/beta' contains NaN"),
])
def test_bad_variables_refused_nothing_assigned(tmp_path, weights, defect, message):
    variables = published(weights)
    key = "resnet/block1/unit02/b/group_norm/beta"
    if defect == "missing":
        del variables[key]
    elif defect == "unexpected":
        variables["resnet/global_step"] = np.zeros((), np.float32)
    elif defect == "shape":
        variables[key] = np.zeros(3, np.float32)
    else:
        variables[key] = np.full_like(variables[key], np.nan)
    folder = save_module(tmp_path / "bad", variables)
    model = tiny_model(classes=10)
    error = assert_refused(model, lambda: keras_bit.load_weights(model, folder), message)
    assert folder in str(error)


def _link(path, elsewhere):
    """Moves `path` to the folder `elsewhere` and leaves a link to it in its place."""
    target = os.path.join(elsewhere, os.path.basename(path))
    os.rename(path, target)
    os.symlink(target, path)


@pytest.mark.parametrize("defect,file,message", [
    ("delete", "variables/variables.index", "checkpoint index .*variables.index is missing"),
    ("delete", "variables/variables.data-00000-of-00001", r"checkpoint shards .* are missing"),
    ("delete", "saved_model.pb", "SavedModel graph .*saved_model.pb is missing"),
    ("link", "variables/variables.data-00000-of-00001", "checkpoint shard .*variables.data-00000-of-00001 is a link"),
    ("link", "variables/variables.index", "checkpoint index .*variables.index is a link"),
    ("link", "saved_model.pb", "SavedModel graph .*saved_model.pb is a link"),
    ("garbage", "saved_model.pb", "Could not read checkpoint .*saved_model.pb"),
    ("garbage", "variables/variables.index", "Could not read checkpoint .*variables.index"),
])
def test_hostile_files_refused(modules, tmp_path, defect, file, message):
    folder = _copy(modules, "classification", tmp_path)
    path = os.path.join(folder, file)
    if defect == "delete":
        os.remove(path)
    elif defect == "link":
        _link(path, tmp_path)
    else:
        with open(path, "wb") as f:
            f.write(b"\x08\x01garbage" * 8)
    model = tiny_model(classes=10)
    assert_refused(model, lambda: keras_bit.load_weights(model, folder), message)


def test_graph_size_bounded_and_folder_links_refused(modules, tmp_path, monkeypatch):
    folder = _copy(modules, "feature_vector", tmp_path)
    monkeypatch.setattr(tfhub, "MAX_GRAPH_BYTES", 1000)
    with pytest.raises(ValueError, match=rf"{GRAPH_BYTES} .*saved_model.pb is \d+ bytes; at most 1000"):
        sources.resolve_source(str(folder))
    monkeypatch.undo()
    os.rename(folder / "variables", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", folder / "variables")
    with pytest.raises(ValueError, match="variables is a link"):
        sources.resolve_source(str(folder))
    with pytest.raises(ValueError, match=r"`weights` must be the path to .*Received: weights=.*elsewhere"):
        sources.resolve_source(str(tmp_path / "elsewhere"))  # neither saved_model.pb nor variables/: no SavedModel


@pytest.mark.parametrize("value,handle", [
    ("kaggle://google/bit/tensorFlow2/m-r50x1/1", "google/bit/tensorFlow2/m-r50x1/1"),
    ("kaggle://google/bit/tensorFlow2/m-r50x1", "google/bit/tensorFlow2/m-r50x1"),
    ("https://www.kaggle.com/models/google/bit/TensorFlow2/s-r50x3-ilsvrc2012-classification/1",
     "google/bit/TensorFlow2/s-r50x3-ilsvrc2012-classification/1"),
    ("https://www.kaggle.com/models/google/bit/frameworks/tensorFlow2/variations/m-r50x1/versions/1"
     "?tfhub-redirect=true", "google/bit/tensorFlow2/m-r50x1/1"),
    ("bit.npz", None), (None, None),
])
def test_kaggle_handles(value, handle):
    assert tfhub.kaggle_handle(value) == handle


@pytest.mark.parametrize("value", ["kaggle://google/bit", "kaggle://google/bit/tensorFlow2/../1",
                                   "kaggle://google/bit/tensorFlow2/m-r50x1/0", "kaggle://a/b/c/d/e/f"])
def test_malformed_kaggle_handles_refused(value):
    with pytest.raises(ValueError, match=rf"A Kaggle Models handle is .*Received: weights={value!r}"):
        sources.resolve_source(value)


@pytest.fixture
def kagglehub(monkeypatch):
    """A kagglehub whose `model_download` answers from a dict handle -> folder (or exception), as its cache does."""
    fake = types.SimpleNamespace(answers={}, calls=[])

    def model_download(handle, path=None, **kwargs):
        fake.calls.append((handle, path, kwargs))
        answer = fake.answers[handle]
        if isinstance(answer, Exception):
            raise answer
        return answer

    fake.model_download = model_download
    monkeypatch.setitem(sys.modules, "kagglehub", fake)
    return fake


def test_kaggle_handle_through_kagglehub(kagglehub, modules, weights, rng):
    kagglehub.answers[HANDLE] = modules["classification"]
    model = tiny_model(weights=f"kaggle://{HANDLE}", classifier_activation=None)
    x = images(rng)
    assert relative_error(model.predict(x, verbose=0), reference.forward(weights, x, groups=8)) <= 1e-5
    # Never forced: a versioned handle kagglehub has cached is read from its cache, without network.
    assert kagglehub.calls == [(HANDLE, None, {})]
    keras_bit.load_weights(model, f"kaggle://{HANDLE}")
    assert sources.resolve_source(f"kaggle://{HANDLE}").path is None  # resolving downloads nothing
    assert len(kagglehub.calls) == 2


class _Response:
    status_code = 404


def test_kaggle_offline_and_unknown(kagglehub):
    kagglehub.answers["google/bit/tensorFlow2/m-tiny"] = ConnectionError("Max retries exceeded")  # no network
    kagglehub.answers[HANDLE] = type("HTTPError", (Exception,), {"response": _Response()})("404 Not Found")
    model = tiny_model(classes=10)
    with pytest.raises(DownloadError, match=r"kaggle://google/bit/tensorFlow2/m-tiny \(ConnectionError.*"
                                            r"KAGGLEHUB_CACHE.*with its version"):
        keras_bit.load_weights(model, "kaggle://google/bit/tensorFlow2/m-tiny")
    with pytest.raises(ValueError, match=rf"kaggle://{HANDLE}: no such Kaggle model variation"):
        keras_bit.load_weights(model, f"kaggle://{HANDLE}")


def test_kagglehub_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "kagglehub", None)  # import kagglehub now raises ImportError
    with pytest.raises(BackendError, match=r"needs the 'kagglehub' package: pip install 'keras-bit\[kaggle\]'"):
        tiny_model(weights=f"kaggle://{HANDLE}")


def test_tensorflow_needed_to_read(monkeypatch, modules):
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(BackendError, match=r"Reading a TF Hub / Kaggle SavedModel needs the 'tensorflow' package"):
        tfhub.Reader(modules["feature_vector"])


def test_expert_preset_loads_from_kaggle(kagglehub, modules, weights):
    """An expert is a feature-vector module on Kaggle only: resolved without download, fetched through kagglehub."""
    preset = presets.PRESETS[("BiT-M-R50x1", "expert/bird")]
    source = sources.resolve_source("expert/bird", "BiT-M-R50x1")
    assert (source.format, source.kaggle, source.path, source.classes) == (
        "tfhub", "google/experts-bit/tensorFlow2/r50x1-in21k-bird/1", None, None)
    assert kagglehub.calls == []
    kagglehub.answers[preset.kaggle[0]] = modules["feature_vector"]
    fetched = sources.fetch(source)
    assert fetched.path == modules["feature_vector"] and fetched.classes is None
    model = tiny_model(include_top=False)
    sources.load_source(model, fetched, load_head=False)
    np.testing.assert_array_equal(model.get_layer("post_gn").gamma.numpy(), weights["resnet/group_norm/gamma"])
