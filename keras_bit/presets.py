"""BiT architectures and every published checkpoint, as data.

Everything that distinguishes one named BiT model or one published set of
weights from another lives here: the builders have no per-model code and the
loaders no per-checkpoint code. `presets()` lists the registry.

Sources: the BiT authors' README (github.com/google-research/big_transfer)
for the bucket files, timm's pretrained configs for the Hub copies.
"""

import dataclasses
import os
import sys
import types

BASE_URL = "https://storage.googleapis.com/bit_models/"
# Set to a mirror (`https://...`, `file:///...`) holding the same file names to download from there.
BASE_URL_ENV = "KERAS_BIT_BASE_URL"

IMAGENET21K_CLASSES = 21843
IMAGENET_CLASSES = 1000
UPSTREAM_RESOLUTION = 224
# BiT-HyperRule trains ILSVRC-2012 (images larger than 96x96) at 480 px.
FINETUNED_RESOLUTION = 480


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A BiT ResNetV2: units per block and width multiplier."""

    block_units: tuple
    width_factor: int

    @property
    def spec(self):
        """`(block_units, width_factor, base_width, groups)`: the authors' root width 64, 32 GroupNorm groups."""
        return (self.block_units, self.width_factor, 64, 32)


# Units per block of each depth.
DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
ARCHITECTURES = {
    f"R{depth}x{width}": Architecture(DEPTHS[depth], width)
    for depth, width in ((50, 1), (50, 3), (101, 1), (101, 3), (152, 2), (152, 4))
}

# Upstream data set of each family and the `weights=` name its constructors default to.
FAMILIES = {"BiT-S": "imagenet", "BiT-M": "imagenet21k"}
MODEL_NAMES = tuple(f"{family}-{arch}" for family in FAMILIES for arch in ARCHITECTURES)


@dataclasses.dataclass(frozen=True)
class Preset:
    """One published checkpoint: what it is, how to feed it, and where it is published.

    Attributes:
        model: the architecture it loads into, e.g. "BiT-M-R50x1".
        weights: its `weights=` name for that model, e.g. "imagenet21k".
        description: what the weights were trained on.
        classes: head size, or None when only the file says (VTAB releases).
        resolution: the square input size it was trained / evaluated at, or
            None where not published.
        bucket_path: file in the authors' bucket (relative to `BASE_URL`).
        hub: Hugging Face Hub repositories publishing the same weights.
        size: file size in bytes, where established; checked on download.
        sha256: file digest, where established; checked on download.
        head_activation: what the head was trained with, so what its scores
            mean: "sigmoid" for the ImageNet-21k upstream heads (one binary
            classifier per label, as the labels are multi-label; the authors in
            google-research/big_transfer#26), "softmax" for the single-label
            ILSVRC-2012 and VTAB heads.
        kaggle: Kaggle Models handles (kagglehub form, `kaggle://` +
            handle for `weights=`) of the authors' TF2 SavedModels of the
            same weights (formerly TF Hub `google/bit/...`): the module with
            this head first, then the feature-vector module. A preset without
            `bucket_path` (the experts) loads from the first.
    """

    model: str
    weights: str
    description: str
    classes: int = None
    resolution: int = UPSTREAM_RESOLUTION
    bucket_path: str = None
    hub: tuple = ()
    size: int = None
    sha256: str = None
    head_activation: str = "softmax"
    kaggle: tuple = ()

    @property
    def url(self):
        """The bucket file's URL; None for a preset published only on Kaggle Models."""
        return base_url() + self.bucket_path if self.bucket_path else None

    @property
    def filename(self):
        """Name of the file in the cache (None without a bucket file)."""
        return self.bucket_path.replace("/", "-") if self.bucket_path else None

    @property
    def architecture(self):
        return ARCHITECTURES[self.model.rsplit("-", 1)[1]]


def base_url():
    """The BiT bucket, or the mirror named by `$KERAS_BIT_BASE_URL`, ending with `/`."""
    url = os.environ.get(BASE_URL_ENV) or BASE_URL
    return url if url.endswith("/") else url + "/"


def _timm(arch, tag):
    depth, width = arch[1:].split("x")
    return f"timm/resnetv2_{depth}x{width}_bit.{tag}"


# The 19 VTAB-1k tasks, spelled as in the authors' release (vtab/<model>-run<k>-<task>.npz), README order.
VTAB_TASKS = (
    "caltech101", "diabetic_retinopathy", "dtd", "oxford_flowers102", "oxford_iiit_pet", "resisc45", "sun397",
    "cifar100", "eurosat", "patch_camelyon", "smallnorb-elevation", "svhn", "dsprites-orientation",
    "smallnorb-azimuth", "clevr-distance", "clevr-count", "dmlab", "kitti-distance", "dsprites-xpos",
)
# The models with VTAB-1k releases (BiT-M only, no R152x2), three runs each.
VTAB_MODELS = ("BiT-M-R50x1", "BiT-M-R101x1", "BiT-M-R50x3", "BiT-M-R101x3", "BiT-M-R152x4")
VTAB_RUNS = (0, 1, 2)

# TF Hub's BiT architectures (google/collections/bit/1: no R152x2), and its 48 experts: BiT-M-R50x1 fine-tuned on
# one ImageNet-21k subtree each (Puigcerver et al., arXiv 2009.13239), feature vectors only, named as in the TF Hub
# collection google/collections/experts/bit/1 (tensorflow/tfhub.dev assets/docs/google/models/experts/bit/r50x1/in21k/).
TFHUB_ARCHITECTURES = ("R50x1", "R50x3", "R101x1", "R101x3", "R152x4")
EXPERT_SUBTREES = (
    "abstraction", "angiosperm", "animal", "arthropod", "artifact", "bird", "carnivore", "chordate", "clothing",
    "commodity", "consumer_goods", "container", "conveyance", "covering", "device", "entity", "equipment", "flower",
    "food", "foodstuff", "herb", "implement", "instrument", "instrumentality", "invertebrate", "living_thing",
    "mammal", "matter", "natural_object", "nutrient", "nutriment", "object", "organism", "part", "physical_entity",
    "placental", "plant", "relation", "solid", "spermatophyte", "structure", "substance", "tree", "vascular_plant",
    "vehicle", "vertebrate", "whole", "woody_plant",
)


def _kaggle(family, arch, head=None):
    """The Kaggle Models handles of a TF Hub BiT module (none for R152x2): `head` "ilsvrc2012" or "imagenet21k" for
    the classification module (first), then the feature-vector one (upstream weights only)."""
    if arch not in TFHUB_ARCHITECTURES:
        return ()
    variation = f"{family[-1].lower()}-{arch.lower()}"
    features = (f"google/bit/tensorFlow2/{variation}/1",)
    if head is None:
        return features
    classification = (f"google/bit/tensorFlow2/{variation}-{head}-classification/1",)
    return classification + (features if (family, head) in (("BiT-S", "ilsvrc2012"), ("BiT-M", "imagenet21k")) else ())


def _expert_kaggle(subtree):
    """Kaggle handle of TF Hub's google/experts/bit/r50x1/in21k/<subtree>/1, spelled by the rule Kaggle applied to
    google/bit/m-r50x1/ilsvrc2012_classification/1 (-> google/bit/tensorFlow2/m-r50x1-ilsvrc2012-classification/1)
    and google/experts/bert/pubmed/2 (-> google/experts-bert/tensorFlow2/pubmed/2); not checked against Kaggle."""
    return f"google/experts-bit/tensorFlow2/r50x1-in21k-{subtree.replace('_', '-')}/1"


def kaggle_handle(preset):
    """The Kaggle Models handle a preset without a bucket file loads from (its first), else None."""
    return preset.kaggle[0] if preset.kaggle else None


def _build_registry():
    table = []
    for arch in ARCHITECTURES:
        table.append(Preset(f"BiT-S-{arch}", "imagenet", "ILSVRC-2012 (BiT-S upstream)", IMAGENET_CLASSES,
                            bucket_path=f"BiT-S-{arch}.npz", kaggle=_kaggle("BiT-S", arch, "ilsvrc2012")))
        table.append(Preset(f"BiT-M-{arch}", "imagenet21k", "ImageNet-21k (BiT-M upstream)", IMAGENET21K_CLASSES,
                            bucket_path=f"BiT-M-{arch}.npz", hub=(_timm(arch, "goog_in21k"),),
                            head_activation="sigmoid", kaggle=_kaggle("BiT-M", arch, "imagenet21k")))
        # The authors fine-tuned at 480 px (BiT-HyperRule); timm evaluates these at 448 (R152x4: 480).
        hub = (_timm(arch, "goog_in21k_ft_in1k"),) + (("google/bit-50",) if arch == "R50x1" else ())
        table.append(Preset(f"BiT-M-{arch}", "imagenet", "ImageNet-21k, fine-tuned on ILSVRC-2012",
                            IMAGENET_CLASSES, FINETUNED_RESOLUTION, bucket_path=f"BiT-M-{arch}-ILSVRC2012.npz",
                            hub=hub, kaggle=_kaggle("BiT-M", arch, "ilsvrc2012")))
    # R50x1 students distilled on ILSVRC-2012 from the BiT-M-R152x2 teacher (Beyer et al., arXiv 2106.05237),
    # and the teachers.
    for size in (224, 160):
        hub = (_timm("R50x1", "goog_distilled_in1k"),) if size == 224 else ()
        table.append(Preset("BiT-M-R50x1", f"imagenet-distilled-{size}", f"distilled from BiT-M-R152x2 at {size} px",
                            IMAGENET_CLASSES, size, bucket_path=f"distill/R50x1_{size}.npz", hub=hub))
    for size, tag in ((224, "goog_teacher_in21k_ft_in1k"), (384, "goog_teacher_in21k_ft_in1k_384")):
        table.append(Preset("BiT-M-R152x2", f"imagenet-teacher-{size}", f"distillation teacher at {size} px",
                            IMAGENET_CLASSES, size, bucket_path=f"distill/R152x2_T_{size}.npz",
                            hub=(_timm("R152x2", tag),)))
    for model in VTAB_MODELS:
        for run in VTAB_RUNS:
            for task in VTAB_TASKS:
                table.append(Preset(model, f"vtab/{task}/run{run}", f"VTAB-1k {task}, run {run}", resolution=None,
                                    bucket_path=f"vtab/{model}-run{run}-{task}.npz"))
    for subtree in EXPERT_SUBTREES:  # feature vectors (no head), on Kaggle Models only; input size not published
        table.append(Preset("BiT-M-R50x1", f"expert/{subtree}", f"ImageNet-21k, fine-tuned on its {subtree!r} subtree",
                            resolution=None, kaggle=(_expert_kaggle(subtree),)))
    return {(p.model, p.weights): p for p in table}


# (model name, weights name) -> Preset
PRESETS = _build_registry()


def list_presets(model=None):
    """Every published checkpoint, optionally only those of one model (also `keras_bit.presets(model)`).

    Args:
        model: None, or a name from `MODEL_NAMES`.

    Returns:
        A list of `Preset`.

    Example:
        >>> [p.weights for p in keras_bit.presets("BiT-S-R50x1")]
        ['imagenet']
    """
    if model is not None:
        split_model_name(model)
    return [p for p in PRESETS.values() if model in (None, p.model)]


def weights_names(model, fold=False):
    """The `weights=` names published for `model`, its default first, VTAB runs folded; `fold`: also one
    "vtab/<task>" for the 19 tasks and one "expert/<subtree>" for the 48 experts (for messages)."""
    names = []
    for p in list_presets(model):
        name = p.weights.rsplit("/run", 1)[0] if p.weights.startswith("vtab/") else p.weights
        if fold and name.startswith(("vtab/", "expert/")):
            name = "vtab/<task>" if name.startswith("vtab/") else "expert/<subtree>"
        if name not in names:
            names.append(name)
    return names


def weights_names_text(model):
    """The `weights=` names of `model` for an error message: None, the names, and the folded VTAB / expert ones
    with where their parts are listed."""
    names = [repr(n) for n in (None, *weights_names(model, fold=True))]
    patterns = {"'vtab/<task>'": f"'vtab/<task>' (a task of presets.VTAB_TASKS, e.g. 'vtab/{VTAB_TASKS[0]}')",
                "'expert/<subtree>'": "'expert/<subtree>' (a subtree of presets.EXPERT_SUBTREES, e.g. "
                                      f"'expert/{EXPERT_SUBTREES[0]}')"}
    return ", ".join(patterns.get(n, n) for n in names)


def find(model, weights):
    """The `Preset` named by `weights` for `model` ("vtab/<task>" means run 0), else None."""
    if not isinstance(weights, str):
        return None
    if weights.startswith("vtab/") and weights.count("/") == 1:
        weights += "/run0"
    return PRESETS.get((model, weights))


def markdown_table():
    """The registry as the README's Markdown table (one row per model and name; VTAB runs and tasks folded)."""
    rows = ["| model | `weights=` | trained on | classes | head | px | also on the Hugging Face Hub "
            "| also on Kaggle Models (TF2 SavedModel) |", "|---|---|---|---|---|---|---|---|"]
    for model in MODEL_NAMES:
        vtab = [p for p in list_presets(model) if p.weights.startswith("vtab/")]
        experts = [p for p in list_presets(model) if p.weights.startswith("expert/")]
        for p in list_presets(model):
            if p.weights.startswith(("vtab/", "expert/")):
                continue
            hub = ", ".join(f"`hf://{h}`" for h in p.hub) or "-"
            kaggle = ", ".join(f"`kaggle://{h}`" for h in p.kaggle) or "-"
            rows.append(f"| {model} | `{p.weights}` | {p.description} | {p.classes} | {p.head_activation} "
                        f"| {p.resolution} | {hub} | {kaggle} |")
        if vtab:
            rows.append(f"| {model} | `vtab/<task>[/run<k>]` | VTAB-1k: {len(VTAB_TASKS)} tasks x runs "
                        f"{VTAB_RUNS[0]}-{VTAB_RUNS[-1]} | from the file | softmax | - | - | - |")
        if experts:
            rows.append(f"| {model} | `expert/<subtree>` | ImageNet-21k subtree experts: {len(experts)} subtrees "
                        "(`presets.EXPERT_SUBTREES`) | no head | - | - | - | "
                        f"`kaggle://{_expert_kaggle('<subtree>')}` |")
    return "\n".join(rows)


def split_model_name(model_name):
    """Returns `(family, architecture)` for a name such as `"BiT-M-R50x1"`.

    Raises:
        ValueError: if the name is not one of `MODEL_NAMES`.
    """
    if model_name not in MODEL_NAMES:
        raise ValueError(
            f"Unknown BiT model name. Expected one of {', '.join(MODEL_NAMES)}. "
            f"Received: model_name={model_name!r}"
        )
    family, arch = model_name.rsplit("-", 1)
    return family, arch


class _PresetsModule(types.ModuleType):
    """This module, callable: `keras_bit.presets()` lists the registry, `keras_bit.presets.PRESETS` is the data."""

    def __call__(self, model=None):
        return list_presets(model)


sys.modules[__name__].__class__ = _PresetsModule
