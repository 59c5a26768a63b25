"""keras_bit.publish: save_pretrained / push_to_hub / `keras-bit push`, read back by keras_bit, timm and transformers.

Every round trip uses random weights and a random head (a zero head makes every output the same). The timm and
transformers checks run where torch and those libraries are installed (CI's PyTorch backend step), on one R50x1
each (timm names only the published architectures) at 64 px.
"""

import importlib.util
import json
import os
import sys
import types

import keras
import numpy as np
import pytest

import keras_bit
from helpers import TINY, TINY_SIZE, hub_repo, images, offline_hub, randomize, tiny_model
from keras_bit import cli, publish
from keras_bit.train.run_dir import RunDir

pytestmark = pytest.mark.backend_agnostic

CLASSES = 5
NAMES = ["daisy", "dandelion", "rose", "sunflower", "tulip"]
R50_SIZE = 64


def random_model(model, seed=0):
    """Random weights everywhere; the head scaled by 1/sqrt(fan-in) so that logits are O(1), as trained ones are."""
    randomize(model, seed)
    head = model.get_layer("head")
    head.kernel.assign(head.kernel.numpy() / np.sqrt(head.kernel.shape[0]))
    return model


@pytest.fixture
def tiny():
    return random_model(tiny_model(classes=CLASSES, classifier_activation=None))


def logits(model, x):
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)), np.float64)


def assert_same_logits(actual, expected, atol, library="keras_bit"):
    """max |actual - expected| <= atol, for logits that vary (constant ones would let a wrong layout pass)."""
    assert np.std(expected) > 0.1 and np.abs(expected[0] - expected[1]).max() > 1e-2
    difference = float(np.abs(actual - expected).max())
    print(f"{library}: max |logit difference| {difference:.2e} (logits std {np.std(expected):.2f})")
    assert difference <= atol
    return difference


def files(folder):
    return sorted(os.listdir(folder))


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def hub_files(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in files(folder)}


# --- keras_bit reads back what it wrote. ---


def test_transformers_form_reads_back_through_hf_handle(tiny, tmp_path, monkeypatch, rng):
    folder = publish.save_pretrained(tiny, tmp_path / "out", "transformers", class_names=NAMES)
    assert files(folder) == ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    hub_repo(offline_hub(monkeypatch, tmp_path / "hub"), "me/tiny-bit", hub_files(folder))
    back = keras_bit.ResNetV2(weights="hf://me/tiny-bit", classifier_activation=None,
                              input_shape=(TINY_SIZE, TINY_SIZE, 3), **TINY)
    x = images(rng)
    assert_same_logits(logits(back, x), logits(tiny, x), 1e-5)
    config = read_json(os.path.join(folder, "config.json"))
    assert config["id2label"] == {str(i): n for i, n in enumerate(NAMES)} and config["label2id"]["rose"] == 2
    assert (config["depths"], config["embedding_size"], config["num_groups"]) == ([2, 1, 1, 1], 32, 8)
    assert config["global_padding"] is None and config["layer_type"] == "preactivation"


def test_keras_form_rebuilds_from_its_config_and_loads(tiny, tmp_path, rng):
    folder = publish.save_pretrained(tiny, tmp_path / "out", "keras", class_names=NAMES)
    assert files(folder) == ["README.md", "config.json", "model.keras", "model.weights.h5"]
    config = read_json(os.path.join(folder, "config.json"))
    assert "architecture" not in config  # keras_bit's hub reader takes that key for timm's
    assert config["class_names"] == NAMES and config["preprocessing"]["input_range"] == [-1.0, 1.0]
    rebuilt = keras_bit.ResNetV2(weights=os.path.join(folder, "model.weights.h5"), **config["model_config"])
    loaded = keras.saving.load_model(os.path.join(folder, "model.keras"))
    x = images(rng)
    assert_same_logits(logits(rebuilt, x), logits(tiny, x), 1e-5)
    assert_same_logits(logits(loaded, x), logits(tiny, x), 1e-5)


@pytest.mark.parametrize("weights_file", ["model.weights.h5", "model.keras"])
def test_keras_form_reads_back_through_hf_handle(tiny, tmp_path, monkeypatch, rng, weights_file):
    folder = publish.save_pretrained(tiny, tmp_path / "out", "keras")
    uploaded = {name: data for name, data in hub_files(folder).items() if name in ("config.json", weights_file)}
    hub_repo(offline_hub(monkeypatch, tmp_path / "hub"), "me/tiny-keras", uploaded)
    back = keras_bit.ResNetV2(weights="hf://me/tiny-keras", classifier_activation=None, **TINY)
    assert back.input_shape[1:3] == (TINY_SIZE, TINY_SIZE)  # the size config.json states
    x = images(rng)
    assert_same_logits(logits(back, x), logits(tiny, x), 1e-5)


def test_a_headless_model_publishes_its_backbone(tmp_path, monkeypatch, rng):
    backbone = randomize(tiny_model(include_top=False, pooling="avg"))
    folder = publish.save_pretrained(backbone, tmp_path / "out", "transformers")
    config = read_json(os.path.join(folder, "config.json"))
    assert config["architectures"] == ["BitModel"] and "id2label" not in config
    hub_repo(offline_hub(monkeypatch, tmp_path / "hub"), "me/tiny-backbone", hub_files(folder))
    back = keras_bit.ResNetV2(weights="hf://me/tiny-backbone", include_top=False, pooling="avg", **TINY)
    x = images(rng)
    assert_same_logits(logits(back, x), logits(backbone, x), 1e-5)
    with pytest.raises(ValueError, match="`class_names` names classes, but model .* has no head"):
        publish.save_pretrained(backbone, tmp_path / "named", "keras", class_names=NAMES)


def test_timm_form_needs_an_architecture_timm_names(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"format='timm' needs an architecture timm names .*block_units=\[2, 1, 1, 1"):
        publish.save_pretrained(tiny, tmp_path / "out", "timm")
    assert not os.path.exists(tmp_path / "out") and not os.listdir(tmp_path)


@pytest.fixture(scope="module")
def r50():
    """One random BiT-R50x1 (10 classes, logits) at 64 px, shared by the R50 round trips of this module."""
    model = keras_bit.BiT("BiT-M-R50x1", weights=None, classes=10, classifier_activation=None,
                          input_shape=(R50_SIZE, R50_SIZE, 3))
    return random_model(model, seed=3)


def test_timm_form_reads_back_through_hf_handle(r50, tmp_path, monkeypatch, rng):
    folder = publish.save_pretrained(r50, tmp_path / "out", "timm")
    config = read_json(os.path.join(folder, "config.json"))
    assert (config["architecture"], config["num_classes"], config["num_features"]) == ("resnetv2_50x1_bit", 10, 2048)
    assert config["pretrained_cfg"]["input_size"] == [3, R50_SIZE, R50_SIZE]
    assert (config["pretrained_cfg"]["crop_pct"], config["pretrained_cfg"]["crop_mode"]) == (1.0, "squash")
    hub_repo(offline_hub(monkeypatch, tmp_path / "hub"), "me/r50-bit", hub_files(folder))
    back = keras_bit.BiT("BiT-M-R50x1", weights="hf://me/r50-bit", classifier_activation=None)
    assert back.input_shape[1:3] == (R50_SIZE, R50_SIZE)  # the size timm's config states
    x = images(rng, size=R50_SIZE)
    assert_same_logits(logits(back, x), logits(r50, x), 1e-5)


# --- timm and transformers read it (where installed). ---


def _torch_library(name):
    """Imports `name` beside CPU torch. PyPI's torchvision wheel is CUDA-linked: its C++ operators do not load
    beside CPU torch, and its meta / autograd registrations then fail at import; timm and transformers need
    neither, so empty modules stand in for those two."""
    pytest.importorskip("torch")
    if importlib.util.find_spec("torchvision") is not None:
        for stub in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
            sys.modules.setdefault(stub, types.ModuleType(stub))
    return pytest.importorskip(name)


def _torch_logits(torch_model, x):
    import torch

    with torch.no_grad():
        out = torch_model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
    return getattr(out, "logits", out).double().numpy()


def test_timm_loads_the_timm_form(r50, tmp_path, rng):
    timm = _torch_library("timm")
    folder = publish.save_pretrained(r50, tmp_path / "out", "timm")
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()  # the path hf-hub:<repo> takes
    x = images(rng, size=R50_SIZE)
    assert_same_logits(_torch_logits(model, x), logits(r50, x), 1e-4, "timm")
    config = timm.data.resolve_data_config({}, model=model)
    assert tuple(config["input_size"]) == (3, R50_SIZE, R50_SIZE)
    assert (config["crop_pct"], config["crop_mode"], config["interpolation"]) == (1.0, "squash", "bilinear")
    assert tuple(config["mean"]) == tuple(config["std"]) == (0.5, 0.5, 0.5)


def test_transformers_loads_the_transformers_form(r50, tmp_path, rng):
    transformers = _torch_library("transformers")
    folder = publish.save_pretrained(r50, tmp_path / "out", "transformers")
    model = transformers.BitForImageClassification.from_pretrained(folder).eval()
    x = images(rng, size=R50_SIZE)
    assert_same_logits(_torch_logits(model, x), logits(r50, x), 1e-4, "transformers")
    # The processor maps uint8 pixels to [-1, 1] as keras_bit does (an image already at the size: no resampling).
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    pixels = rng.integers(0, 256, size=(R50_SIZE, R50_SIZE, 3), dtype=np.uint8)
    values = processor(pixels, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(values, keras_bit.preprocess_input(pixels), atol=1e-6)


# --- The folder: atomic, refusals, model card. ---


def fake_run(tmp_path, model, names=NAMES):
    """A finished run folder as `keras_bit.finetune` leaves it (settings, metrics, results, model.keras)."""
    run = RunDir(tmp_path / "run")
    os.makedirs(run.path)
    run.write_settings({"model": "BiT-M-R50x1", "weights": "imagenet21k", "data": "tf_flowers", "batch_size": 8,
                        "steps": 20, "resolution": [80, 64], "base_lr": 0.003, "mixup": 0.0, "seed": 0,
                        "train_examples": 50, "eval_examples": 10, "class_names": names})
    run.write_metrics([{"step": 20, "loss": 0.5, "accuracy": 0.8, "learning_rate": 0.001, "val_loss": 0.4,
                        "val_accuracy": 0.9, "val_top5_accuracy": 1.0}])
    matrix = (np.eye(len(names), dtype=int) * 2).tolist()
    run.write_results({"steps": 20, "eval": {"loss": 0.4, "accuracy": 0.9, "top5_accuracy": 1.0, "examples": 10},
                       "confusion_matrix": matrix, "class_names": names})
    run.save_model(model)
    return run


def test_model_card_states_the_run(tiny, tmp_path):
    run = fake_run(tmp_path, tiny)
    folder = publish.save_pretrained(tiny, tmp_path / "out", "transformers", run_dir=run.path, repo_id="me/flowers")
    text = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
    assert text.startswith("---\nlibrary_name: transformers\nlicense: apache-2.0\n")
    for fact in ("Upstream weights: imagenet21k", "Data: tf_flowers", "Steps: 20", "top-1 accuracy 0.9000",
                 "top-5 accuracy 1.0000", "on 10 examples", "2: rose", "64x64", "[-1, 1]", "Apache-2.0",
                 'from_pretrained("me/flowers")', f"Parameters: {tiny.count_params():,}"):
        assert fact in text, fact
    config = read_json(os.path.join(folder, "config.json"))
    assert config["id2label"]["4"] == "tulip"  # the run's class names
    assert read_json(os.path.join(folder, "preprocessor_config.json"))["size"] == {"height": 64, "width": 64}


def test_a_folder_is_replaced_whole_or_not_at_all(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="not empty; pass overwrite=True"):
        publish.save_pretrained(tiny, out, "keras")

    def broken(path, tensors):
        open(path, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(publish.formats, "write_safetensors", broken)
    with pytest.raises(OSError, match="disk full"):
        publish.save_pretrained(tiny, out, "transformers", overwrite=True)
    assert files(out) == ["old.txt"] and files(tmp_path) == ["out"]  # the old folder, no temporary left
    monkeypatch.undo()
    publish.save_pretrained(tiny, out, "transformers", overwrite=True)
    assert "old.txt" not in files(out) and "model.safetensors" in files(out) and files(tmp_path) == ["out"]


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(format="onnx"), ValueError, r"`format` must be one of 'timm', 'transformers', 'keras'\. Received: "
                                      "format='onnx'"),
    (dict(class_names=["a"]), ValueError, r"`class_names`: 1 names for 5 classes"),
    (dict(class_names=["a"] * 5), ValueError, "must be distinct"),
    (dict(image_size=0), ValueError, r"`image_size` must be a positive integer\. Received: image_size=0"),
    (dict(image_size="big"), ValueError, r"`image_size` must be a positive integer or \(height, width\)"),
    (dict(run_dir="missing"), ValueError, r"`run_dir` is not a folder"),
    (dict(overwrite="yes"), ValueError, r"`overwrite` must be True or False"),
])
def test_argument_errors_name_the_argument(tiny, tmp_path, kwargs, error, message):
    kwargs = {"format": "transformers", **kwargs}
    with pytest.raises(error, match=message):
        publish.save_pretrained(tiny, tmp_path / "out", **kwargs)
    assert not os.path.exists(tmp_path / "out")


def test_refuses_other_models_and_non_folders(tiny, tmp_path):
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="dense")])
    with pytest.raises(ValueError, match="`model` must be a BiT built by keras_bit"):
        publish.save_pretrained(other, tmp_path / "out")
    with pytest.raises(TypeError, match="`model` must be a keras.Model"):
        publish.save_pretrained("model.keras", tmp_path / "out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="`folder` must be a folder"):
        publish.save_pretrained(tiny, tmp_path / "file")
    with pytest.raises(ValueError, match="The parent of `folder` does not exist"):
        publish.save_pretrained(tiny, tmp_path / "no" / "out")


# --- push_to_hub, without network. ---


class FakeApi:
    """huggingface_hub.HfApi's create_repo / upload_folder, recording what would be sent."""

    calls = []

    def __init__(self, token=None, library_name=None, library_version=None):
        FakeApi.calls.append(("init", token, library_name))

    def create_repo(self, repo_id, private=None, exist_ok=False):
        FakeApi.calls.append(("create_repo", repo_id, private, exist_ok))
        return types.SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id, folder_path, revision=None, create_pr=False, commit_message=None):
        sent = {name: open(os.path.join(folder_path, name), "rb").read() for name in files(folder_path)}
        FakeApi.calls.append(("upload_folder", repo_id, sent, commit_message))
        return types.SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")


@pytest.fixture
def fake_api(monkeypatch):
    import huggingface_hub

    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return FakeApi


def test_push_to_hub_uploads_what_save_pretrained_writes(tiny, tmp_path, fake_api):
    commit = publish.push_to_hub(tiny, "me/flowers", "transformers", class_names=NAMES, private=True, token="t")
    assert commit.commit_url == "https://huggingface.co/me/flowers/commit/0"
    (_, token, library), create, (_, repo, sent, message) = fake_api.calls
    assert (token, library) == ("t", "keras_bit") and create == ("create_repo", "me/flowers", True, True)
    assert repo == "me/flowers" and message.startswith("Add transformers model (keras_bit ")
    assert sorted(sent) == ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    assert json.loads(sent["config.json"])["id2label"]["0"] == "daisy"
    assert b'from_pretrained("me/flowers")' in sent["README.md"]


def test_push_to_hub_checks_everything_before_creating_the_repo(tiny, fake_api):
    with pytest.raises(ValueError, match=r"`repo_id` must be a Hugging Face repository 'owner/name'"):
        publish.push_to_hub(tiny, "no-owner", "keras")
    with pytest.raises(ValueError, match="format='timm' needs an architecture"):
        publish.push_to_hub(tiny, "me/x", "timm")
    assert fake_api.calls == []


def test_push_to_hub_reports_a_refusal_in_one_line(tiny, fake_api, monkeypatch):
    from huggingface_hub import errors

    def refuse(self, repo_id, **kwargs):
        response = types.SimpleNamespace(headers={}, status_code=403, request=None)
        raise errors.HfHubHTTPError("403 Forbidden: no write access to me/x\nmore detail", response=response)

    monkeypatch.setattr(FakeApi, "create_repo", refuse)
    with pytest.raises(OSError, match=r"refused the upload to me/x: 403 Forbidden: no write access to me/x$"):
        publish.push_to_hub(tiny, "me/x", "keras")


# --- keras-bit push. ---


def test_cli_push_save_only_and_upload(tiny, tmp_path, fake_api, capsys):
    run = fake_run(tmp_path, tiny)
    out = tmp_path / "published"
    assert cli.main(["push", run.path, "me/flowers", "--format", "keras", "--save-only", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert files(out) == ["README.md", "config.json", "model.keras", "model.weights.h5"]
    assert "top-1 accuracy 0.9000" in (out / "README.md").read_text()
    assert cli.main(["push", run.path, "me/flowers", "--format", "transformers", "--private"]) == 0
    assert capsys.readouterr().out.strip() == "https://huggingface.co/me/flowers/commit/0"
    assert fake_api.calls[1] == ("create_repo", "me/flowers", True, True)


@pytest.mark.parametrize("argv, message", [
    (["--format", "keras", "--overwrite"], "--overwrite: only used with --save-only"),
    (["--format", "keras", "--save-only", "x", "--private"], "--private: not used with --save-only"),
    (["--format", "timm"], "format='timm' needs an architecture timm names"),
])
def test_cli_push_user_errors_are_one_line(tiny, tmp_path, fake_api, capsys, argv, message):
    run = fake_run(tmp_path, tiny)
    assert cli.main(["push", run.path, "me/flowers", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"keras-bit push: error: {message}") and err.count("\n") == 1, err
    assert fake_api.calls == []


def test_cli_push_needs_a_finished_run(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert cli.main(["push", str(tmp_path / "run"), "me/x", "--format", "keras"]) == 2
    assert "model.keras not found: a run writes model.keras when it finishes" in capsys.readouterr().err
    assert cli.main(["push", str(tmp_path / "run"), "bad repo", "--format", "keras"]) == 2
    assert "`repo_id` must be a Hugging Face repository" in capsys.readouterr().err


def test_a_finetuned_model_card_says_what_it_outputs_and_where_it_started(tiny, tmp_path):
    import keras

    # What `finetune` saves: a logits head, then a softmax layer named "probabilities".
    finetuned = keras.Model(tiny.input, keras.layers.Activation("softmax", name="probabilities")(tiny.output))
    run = fake_run(tmp_path, finetuned)
    settings = run.read_settings()
    run.write_settings({**settings, "weights": None})  # a run from random initialisation records None
    folder = publish.save_pretrained(finetuned, tmp_path / "out", "transformers", run_dir=run.path)
    text = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
    assert "the Keras model it was published from: softmax probabilities" in text
    assert "Upstream weights: none (trained from a random initialisation)" in text
    assert read_json(os.path.join(folder, "config.json"))["problem_type"] == "single_label_classification"
    assert all(os.stat(os.path.join(folder, f)).st_mode & 0o044 for f in os.listdir(folder))  # readable by others


def test_cli_push_names_a_save_only_folder_that_cannot_be_made(tiny, tmp_path, capsys):
    run = fake_run(tmp_path, tiny)
    target = tmp_path / "no" / "such" / "folder"
    assert cli.main(["push", run.path, "me/x", "--format", "keras", "--save-only", str(target)]) == 2
    err = capsys.readouterr().err
    assert err == f"keras-bit push: error: --save-only {target}: the folder it goes in, {target.parent}, does not " \
                  "exist\n"
