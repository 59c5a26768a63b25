"""BiT architectures and published checkpoints, as data.

Everything that distinguishes one named BiT model from another lives here, so
that the builder in `resnet_v2.py` has no per-model code.
"""

import dataclasses
import os
import re

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


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One published `.npz` file of the BiT authors."""

    path: str  # relative to BASE_URL
    classes: int = None  # None: read from the file's head once downloaded
    resolution: int = None  # None: the builder's default input size

    @property
    def url(self):
        return base_url() + self.path

    @property
    def filename(self):
        return self.path.replace("/", "-")


def base_url():
    """The BiT bucket, or the mirror named by `$KERAS_BIT_BASE_URL`, ending with `/`."""
    url = os.environ.get(BASE_URL_ENV) or BASE_URL
    return url if url.endswith("/") else url + "/"


ARCHITECTURES = {
    "R50x1": Architecture((3, 4, 6, 3), 1),
    "R50x3": Architecture((3, 4, 6, 3), 3),
    "R101x1": Architecture((3, 4, 23, 3), 1),
    "R101x3": Architecture((3, 4, 23, 3), 3),
    "R152x2": Architecture((3, 8, 36, 3), 2),
    "R152x4": Architecture((3, 8, 36, 3), 4),
}

# Upstream data set of each family and the `weights=` name its constructors default to.
FAMILIES = {"BiT-S": "imagenet", "BiT-M": "imagenet21k"}

MODEL_NAMES = tuple(f"{family}-{arch}" for family in FAMILIES for arch in ARCHITECTURES)


def _published_checkpoints():
    table = {}
    for arch in ARCHITECTURES:
        table[f"BiT-S-{arch}"] = {
            "imagenet": Checkpoint(f"BiT-S-{arch}.npz", IMAGENET_CLASSES, UPSTREAM_RESOLUTION),
        }
        table[f"BiT-M-{arch}"] = {
            "imagenet21k": Checkpoint(
                f"BiT-M-{arch}.npz", IMAGENET21K_CLASSES, UPSTREAM_RESOLUTION
            ),
            "imagenet": Checkpoint(
                f"BiT-M-{arch}-ILSVRC2012.npz", IMAGENET_CLASSES, FINETUNED_RESOLUTION
            ),
        }
    # R50x1 students distilled from a BiT-M-R152x2 teacher on ILSVRC-2012 (Beyer et al., arXiv 2106.05237).
    for size in (224, 160):
        table["BiT-M-R50x1"][f"imagenet-distilled-{size}"] = Checkpoint(
            f"distill/R50x1_{size}.npz", IMAGENET_CLASSES, size
        )
    return table


# model name -> {weights name -> Checkpoint}
CHECKPOINTS = _published_checkpoints()


# `weights="vtab/<task>"` or `"vtab/<task>/run<k>"`: the authors' VTAB-1k fine-tuned models,
# `vtab/<model>-run<k>-<task>.npz` (e.g. vtab/BiT-M-R50x1-run0-caltech101.npz); head size read from the file.
VTAB_WEIGHTS = re.compile(r"vtab/(?P<task>[a-z0-9_]+)(?:/run(?P<run>[0-9]+))?")
VTAB_HELP = "'vtab/<task>' or 'vtab/<task>/run<k>' (e.g. 'vtab/caltech101')"


def vtab_checkpoint(model_name, weights):
    """The VTAB-1k checkpoint named by `weights` ("vtab/caltech101", "vtab/dtd/run2"), else None."""
    match = VTAB_WEIGHTS.fullmatch(weights) if isinstance(weights, str) else None
    if match is None:
        return None
    return Checkpoint(f"vtab/{model_name}-run{int(match['run'] or 0)}-{match['task']}.npz")


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
