"""The registry of published checkpoints (`keras_bit.presets`): a contract over every preset."""

import re

import pytest

import keras_bit
from keras_bit import presets
from keras_bit.models.bit import check_weights

pytestmark = pytest.mark.backend_agnostic  # .ci/backend runs these on JAX and PyTorch

ALL = list(presets.PRESETS.values())
VTAB_TASKS = {
    "caltech101", "diabetic_retinopathy", "dtd", "oxford_flowers102", "oxford_iiit_pet", "resisc45", "sun397",
    "cifar100", "eurosat", "patch_camelyon", "smallnorb-elevation", "svhn", "dsprites-orientation",
    "smallnorb-azimuth", "clevr-distance", "clevr-count", "dmlab", "kitti-distance", "dsprites-xpos",
}
VTAB_MODELS = {"BiT-M-R50x1", "BiT-M-R101x1", "BiT-M-R50x3", "BiT-M-R101x3", "BiT-M-R152x4"}
TIMM_ID = re.compile(r"timm/resnetv2_(?P<depth>50|101|152)x(?P<width>[1-4])_bit\.(?P<tag>goog_[a-z0-9_]+)")


def _vtab(p):
    return p.weights.startswith("vtab/")


def test_registry_keys_and_identity():
    assert len(ALL) == len({(p.model, p.weights) for p in ALL}) == 307 + 48  # + the TF Hub experts
    for key, p in presets.PRESETS.items():
        assert key == (p.model, p.weights)
        assert p.model in presets.MODEL_NAMES


def _problems(p):
    """What is wrong with one preset (empty when nothing)."""
    if p.bucket_path is None:  # published on Kaggle Models only (the experts): loaded from its first handle
        return [] if p.kaggle and p.weights.startswith("expert/") and p.classes is None else ["no file"]
    checks = {
        "bucket_path is a relative .npz": p.bucket_path.endswith(".npz") and not p.bucket_path.startswith("/"),
        "url under BASE_URL": p.url.startswith(presets.BASE_URL) and "//" not in p.url[len("https://"):],
        "flat cache filename": "/" not in p.filename and p.filename.endswith(".npz"),
        "architecture from the name": p.architecture == presets.ARCHITECTURES[p.model.rsplit("-", 1)[1]],
        "classes": (p.classes is None if _vtab(p)
                    else p.classes in (presets.IMAGENET_CLASSES, presets.IMAGENET21K_CLASSES)),
        "resolution": p.resolution is None if _vtab(p) else p.resolution in (160, 224, 384, 480),
        "size": p.size is None or (isinstance(p.size, int) and p.size > 0),
        "sha256": p.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", p.sha256) is not None,
    }
    return [name for name, ok in checks.items() if not ok]


def test_every_preset_is_well_formed():
    """One test over all 355 (a test each would spend minutes in the per-test Keras reset)."""
    bad = {f"{p.model}:{p.weights}": _problems(p) for p in ALL}
    assert {k: v for k, v in bad.items() if v} == {}
    for p in ALL:
        check_weights(p.model, p.weights)  # every name resolves, without downloading
    broken = presets.Preset("BiT-M-R50x1", "x", "a broken row", 7, 100, bucket_path="/x.h5", sha256="abc")
    assert _problems(broken) == ["bucket_path is a relative .npz", "url under BASE_URL", "flat cache filename",
                                 "classes", "resolution", "sha256"]


def test_files_are_distinct():
    files = [p for p in ALL if p.bucket_path]
    assert len({p.bucket_path for p in files}) == len(files) == len(ALL) - 48
    assert len({p.filename for p in files}) == len(files)  # no two presets share a cache file


def test_upstream_and_finetuned_files():
    for model in presets.MODEL_NAMES:
        upstream = presets.PRESETS[(model, presets.FAMILIES[model[:5]])]
        assert upstream.bucket_path == f"{model}.npz"
        assert upstream.classes == (presets.IMAGENET21K_CLASSES if model.startswith("BiT-M") else 1000)
    for arch in presets.ARCHITECTURES:
        assert presets.PRESETS[(f"BiT-M-{arch}", "imagenet")].bucket_path == f"BiT-M-{arch}-ILSVRC2012.npz"
        assert (f"BiT-S-{arch}", "imagenet21k") not in presets.PRESETS


def test_vtab_releases():
    vtab = [p for p in ALL if _vtab(p)]
    assert len(vtab) == 285 == 19 * 5 * 3
    assert {p.model for p in vtab} == VTAB_MODELS  # none for R152x2, none for BiT-S
    assert set(presets.VTAB_TASKS) == VTAB_TASKS and len(presets.VTAB_TASKS) == 19
    for p in vtab:
        task, run = re.fullmatch(r"vtab/(.+)/run([012])", p.weights).groups()
        assert task in VTAB_TASKS
        assert p.bucket_path == f"vtab/{p.model}-run{run}-{task}.npz"
    assert presets.PRESETS[("BiT-M-R50x1", "vtab/smallnorb-elevation/run0")].url == (
        "https://storage.googleapis.com/bit_models/vtab/BiT-M-R50x1-run0-smallnorb-elevation.npz")


def test_distillation_files():
    teachers = {p.weights: p for p in presets.list_presets("BiT-M-R152x2") if "teacher" in p.weights}
    assert {p.bucket_path for p in teachers.values()} == {"distill/R152x2_T_224.npz", "distill/R152x2_T_384.npz"}
    assert {p.resolution for p in teachers.values()} == {224, 384}
    students = [p for p in presets.list_presets("BiT-M-R50x1") if "distilled" in p.weights]
    assert {p.bucket_path for p in students} == {"distill/R50x1_224.npz", "distill/R50x1_160.npz"}


def test_hub_ids_match_the_architecture():
    for p in ALL:
        for repo in p.hub:
            if repo == "google/bit-50":
                assert (p.model, p.weights) == ("BiT-M-R50x1", "imagenet")
                continue
            match = TIMM_ID.fullmatch(repo)
            assert match, repo
            arch = presets.ARCHITECTURES[f"R{match['depth']}x{match['width']}"]
            assert arch == p.architecture and p.model.startswith("BiT-M"), (repo, p)
            expected = {"imagenet21k": "goog_in21k", "imagenet": "goog_in21k_ft_in1k",
                        "imagenet-distilled-224": "goog_distilled_in1k",
                        "imagenet-teacher-224": "goog_teacher_in21k_ft_in1k",
                        "imagenet-teacher-384": "goog_teacher_in21k_ft_in1k_384"}[p.weights]
            assert match["tag"] == expected, (repo, p)
    hubbed = {repo for p in ALL for repo in p.hub}
    assert "timm/resnetv2_152x2_bit.goog_teacher_in21k_ft_in1k_384" in hubbed and "google/bit-50" in hubbed
    assert len(hubbed) == 16  # 6 in21k + 6 ft_in1k + distilled + 2 teachers + google/bit-50


def test_presets_module_is_callable_and_filters():
    assert keras_bit.presets() == ALL
    assert keras_bit.presets.PRESETS is presets.PRESETS
    assert [p.weights for p in keras_bit.presets("BiT-S-R50x1")] == ["imagenet"]
    assert {p.model for p in keras_bit.presets("BiT-M-R152x2")} == {"BiT-M-R152x2"}
    assert len(keras_bit.presets("BiT-M-R50x1")) == 3 + 1 + 57 + 48  # 21k, ft, 2 distilled; 19 x 3 VTAB; experts
    with pytest.raises(ValueError, match=r"Unknown BiT model name.*Received: model_name='BiT-L-R50x1'"):
        keras_bit.presets("BiT-L-R50x1")


def test_weights_names_default_first():
    assert presets.weights_names("BiT-S-R50x1") == ["imagenet"]
    names = presets.weights_names("BiT-M-R50x1")
    assert names[0] == "imagenet21k" and "vtab/clevr-count" in names and "vtab/clevr-count/run1" not in names
    assert not any(n.startswith("vtab/") for n in presets.weights_names("BiT-M-R152x2"))


def test_vtab_name_resolves_without_download():
    check_weights("BiT-M-R50x1", "vtab/smallnorb-elevation")
    check_weights("BiT-M-R50x1", "vtab/dsprites-xpos/run2")
    assert presets.find("BiT-M-R50x1", "vtab/smallnorb-elevation").weights == "vtab/smallnorb-elevation/run0"
    assert presets.find("BiT-M-R50x1", "vtab/smallnorb-elevation/run3") is None


@pytest.mark.parametrize("model,weights", [
    ("BiT-M-R152x2", "vtab/caltech101"), ("BiT-S-R50x1", "vtab/caltech101"),
    ("BiT-M-R50x1", "vtab/nope"), ("BiT-M-R50x1", "vtab/caltech101/run3"), ("BiT-M-R50x1", "imagenet-1k"),
])
def test_unpublished_names_refused(model, weights):
    with pytest.raises(ValueError, match=rf"Received: weights={weights!r}"):
        check_weights(model, weights)


@pytest.mark.parametrize("model,weights", [("BiT-M-R152x2", "vtab/caltech101"), ("BiT-M-R50x1", "vtab/nope")])
def test_unpublished_vtab_name_lists_valid_names(model, weights):
    valid = "'imagenet-teacher-384'" if model == "BiT-M-R152x2" else "'vtab/caltech101'"
    with pytest.raises(ValueError, match=rf"Unknown `weights` name. Expected one of .*{valid}"):
        check_weights(model, weights)


def test_mirror_base_url(monkeypatch):
    monkeypatch.setenv(presets.BASE_URL_ENV, "file:///srv/bit")
    assert presets.PRESETS[("BiT-S-R50x1", "imagenet")].url == "file:///srv/bit/BiT-S-R50x1.npz"


# Issue 23: TF Hub / Kaggle Models. The 48 experts as TF Hub names them (collection google/experts/bit/1).
TFHUB_EXPERTS = set("""
abstraction angiosperm animal arthropod artifact bird carnivore chordate clothing commodity consumer_goods container
conveyance covering device entity equipment flower food foodstuff herb implement instrument instrumentality
invertebrate living_thing mammal matter natural_object nutrient nutriment object organism part physical_entity
placental plant relation solid spermatophyte structure substance tree vascular_plant vehicle vertebrate whole
woody_plant""".split())
KAGGLE_ID = re.compile(r"google/bit/tensorFlow2/(?P<family>[sm])-r(?P<depth>50|101|152)x(?P<width>[1-4])"
                       r"(?P<head>-ilsvrc2012-classification|-imagenet21k-classification)?/1")


def test_experts_are_feature_vectors_on_kaggle():
    experts = [p for p in ALL if p.weights.startswith("expert/")]
    assert {p.weights[len("expert/"):] for p in experts} == TFHUB_EXPERTS and len(experts) == 48
    for p in experts:
        subtree = p.weights[len("expert/"):]
        assert (p.model, p.classes, p.bucket_path, p.url, p.hub) == ("BiT-M-R50x1", None, None, None, ())
        assert p.kaggle == (f"google/experts-bit/tensorFlow2/r50x1-in21k-{subtree.replace('_', '-')}/1",)
        check_weights(p.model, p.weights)  # resolves without downloading
    assert "expert/bird" in presets.weights_names("BiT-M-R50x1")


def test_kaggle_handles_match_the_preset():
    """Each TF Hub architecture's presets name their Kaggle modules: the one with this head first, then (for the
    upstream checkpoints) the feature-vector module; R152x2 was never on TF Hub."""
    for p in ALL:
        if p.weights.startswith("expert/"):
            continue
        if p.weights not in ("imagenet", "imagenet21k") or p.model.endswith("R152x2"):
            assert p.kaggle == (), p
            continue
        matches = [KAGGLE_ID.fullmatch(h) for h in p.kaggle]
        assert all(matches) and len(matches) == (1 if (p.model[:5], p.weights) == ("BiT-M", "imagenet") else 2), p
        head, features = matches[0], matches[1:]
        assert f"BiT-{head['family'].upper()}-R{head['depth']}x{head['width']}" == p.model
        expected = "-imagenet21k-classification" if p.weights == "imagenet21k" else "-ilsvrc2012-classification"
        assert head["head"] == expected and all(m["head"] is None for m in features), p
    assert len({h for p in ALL for h in p.kaggle}) == 5 * 5 + 48  # S: 2 each, M: 3 each; and the experts


def test_markdown_table_lists_kaggle_handles_and_folds_experts():
    table = presets.markdown_table()
    assert "`kaggle://google/bit/tensorFlow2/m-r50x1/1`" in table
    assert table.count("expert/") == 1 and "r50x1-in21k-<subtree>" in table
    assert all(line.count("|") == 9 for line in table.splitlines())
