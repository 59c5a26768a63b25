"""The 19 VTAB-1k tasks as data: tfds builder, splits, label rule and class count of each (TensorFlow-free table).

Each `Task` row says which tfds builder the standard protocol reads, which tfds
split strings make its VTAB-1k splits (`train800`, `val200`, `train800val200`
and the `test` split it is scored on), how a tfds example's features become a
class label, and how many classes there are. Task names are spelled as in the
authors' BiT VTAB release (`keras_bit.presets.VTAB_TASKS`).

Where tfds ships no validation split, the protocol carves one out of another
split at a fixed percentage of its size, and `val200` is the first 200
examples of that part, so it never overlaps `train800` (caltech101: 90% of
3060 training images -> `train[2754:2954]`; smallnorb: the first half of tfds
"test"). Offsets are written out per task, as plain tfds split strings.

Label rules are written once, against a NumPy-like namespace: `Task.label`
runs them with NumPy on one example's feature dict, `Task.tf_map` with
`tf.experimental.numpy` inside a `tf.data` pipeline.

Source (facts only): google-research/task_adaptation at d7630d3 (2021-03-22),
`task_adaptation/data/*.py` (builder names and versions, `tfds_splits`,
split percentages, `*_preprocess_fn` / `*_pp` label rules, `num_classes`),
`task_adaptation/data/*_test.py` (the tfds split sizes the offsets come
from), `scripts/run_all_tasks.sh` (which task variant each of the 19 is).
Groups: Zhai et al., "The Visual Task Adaptation Benchmark", arXiv 1910.04867.

Example:
    >>> t = task("clevr-count")
    >>> t.tfds_spec, t.val200, t.num_classes
    ('clevr:3.*.*', 'train[63000:63200]', 8)
    >>> t.label({"objects": {"size": [0, 1, 1, 0, 1]}})
    2
"""

import dataclasses
import difflib
import math

import numpy as np

NATURAL = ("caltech101", "cifar100", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397")
SPECIALIZED = ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy")
STRUCTURED = ("clevr-count", "clevr-distance", "dmlab", "kitti-distance", "dsprites-xpos", "dsprites-orientation",
              "smallnorb-azimuth", "smallnorb-elevation")
# The groups VTAB reports a mean for, in its order.
GROUPS = {"natural": NATURAL, "specialized": SPECIALIZED, "structured": STRUCTURED}

# Bin edges: an example falls in bin i when edges[i] < value <= edges[i + 1] (the protocol's strict `edges < value`).
CLEVR_DEPTH_EDGES = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)
KITTI_VEHICLE_DEPTH_EDGES = (-100.0, 8.0, 20.0, 999.0)
KITTI_NO_VEHICLE_DEPTH = 1000.0  # stands in for "no vehicle": past the last edge, so the 4th class
KITTI_VEHICLE_TYPES = 3  # tfds kitti `objects/type` ids 0, 1, 2: Car, Van, Truck


# --- label rules: `features` is one tfds example's feature dict, `xp` is numpy or tf.experimental.numpy ---

def _class_label(features, xp):
    return xp.asarray(features["label"])


def _attribute(key):
    def rule(features, xp):
        return xp.asarray(features[key])
    rule.feature = key
    return rule


def _grouped_attribute(key, original, classes):
    """Neighbouring values of an `original`-class attribute grouped into `classes` bins.

    The protocol computes floor(value / (original / classes)) in float32; for
    integer values below `original` that equals (value * classes) // original.
    """
    def rule(features, xp):
        return xp.asarray(features[key]) * classes // original
    rule.feature = key
    return rule


def _bin(value, edges, xp):
    """Index i of the bin edges[i] < value <= edges[i + 1] (edges ascending)."""
    edges = xp.asarray(edges, dtype=value.dtype)
    return xp.sum(xp.asarray(edges < value, dtype="int64")) - 1


def _clevr_count(features, xp):
    """Number of objects minus 3 (CLEVR scenes hold 3 to 10)."""
    return xp.size(xp.asarray(features["objects"]["size"])) - 3


def _clevr_distance(features, xp):
    """Depth of the closest object (smallest `pixel_coords` z), binned by `CLEVR_DEPTH_EDGES`."""
    depth = xp.asarray(features["objects"]["pixel_coords"], dtype="float32")[:, 2]
    return _bin(xp.min(depth), CLEVR_DEPTH_EDGES, xp)


def _kitti_distance(features, xp):
    """Depth of the closest car, van or truck (`location` z, metres), binned; no vehicle is the last class."""
    objects = features["objects"]
    depth = xp.asarray(objects["location"], dtype="float32")[:, 2]
    vehicle = xp.asarray(objects["type"]) < KITTI_VEHICLE_TYPES
    far = xp.asarray([KITTI_NO_VEHICLE_DEPTH], dtype="float32")
    closest = xp.min(xp.concatenate([xp.where(vehicle, depth, far), far]))
    return _bin(closest, KITTI_VEHICLE_DEPTH_EDGES, xp)


_class_label.feature = "label"
_clevr_count.feature = "objects/size"
_clevr_distance.feature = "objects/pixel_coords"
_kitti_distance.feature = "objects/location, objects/type"


# --- image rules: the protocol gives every task 3-channel images in [0, 255] ---

def _gray_to_rgb(image, xp):
    return xp.tile(image, (1, 1, 3))


def _binary_to_rgb(image, xp):
    """dSprites pixels are 0 or 1."""
    return xp.tile(image, (1, 1, 3)) * 255


@dataclasses.dataclass(frozen=True)
class Task:
    """One VTAB-1k task.

    Attributes:
        name: as in `keras_bit.presets.VTAB_TASKS`.
        group: "natural", "specialized" or "structured".
        tfds_name: tfds builder name, with its config where it has one.
        version: tfds version pattern the protocol asks for.
        num_classes: classes of the label `label` gives.
        val200: tfds split string of the 200 validation examples.
        test: tfds split string the task is scored on.
        test_size: examples in `test`, as the protocol's tests state them.
        label_rule: `rule(features, xp) -> label`, `xp` numpy or tf.experimental.numpy.
        protocol_name: the task's spelling in task_adaptation (`--dataset`).
        image_rule: `rule(image, xp) -> image` making 3-channel [0, 255] images, or None.
        train800: tfds split string of the 800 training examples.
    """

    name: str
    group: str
    tfds_name: str
    version: str
    num_classes: int
    val200: str
    test: str
    test_size: int
    label_rule: object = dataclasses.field(repr=False)
    protocol_name: str
    image_rule: object = dataclasses.field(default=None, repr=False)
    train800: str = "train[:800]"

    @property
    def tfds_spec(self):
        """`name[/config]:version`, as `tfds.builder` and `tfds.load` take it."""
        return f"{self.tfds_name}:{self.version}"

    @property
    def train800val200(self):
        """The 1000 examples VTAB-1k trains the final model on: `train800` then `val200`."""
        return f"{self.train800}+{self.val200}"

    @property
    def splits(self):
        """The VTAB-1k split names -> tfds split strings."""
        return {"train800": self.train800, "val200": self.val200, "train800val200": self.train800val200,
                "test": self.test}

    @property
    def label_feature(self):
        """The tfds feature(s) the label is read from."""
        return self.label_rule.feature

    def label(self, features):
        """The class label of one tfds example (its feature dict, NumPy / Python values), checked in range.

        Raises:
            ValueError: a feature the rule reads is missing, or the label is not in [0, num_classes).
        """
        try:
            value = self.label_rule(features, np)
        except (KeyError, TypeError, IndexError) as error:
            raise ValueError(f"VTAB task {self.name!r}: cannot read the label from feature(s) "
                             f"{self.label_feature!r} of the example: {error!r}") from None
        value = int(value)
        if not 0 <= value < self.num_classes:
            raise ValueError(f"VTAB task {self.name!r}: label {value} from feature(s) {self.label_feature!r} "
                             f"is outside [0, {self.num_classes}).")
        return value

    def tf_map(self):
        """A `tf.data` map function: tfds example dict -> {"image": uint8 HxWx3, "label": int64}.

        Out-of-range labels fail the pipeline (a `tf.debugging` check), as `label` refuses them.

        Example:
            >>> import tensorflow_datasets as tfds
            >>> t = task("smallnorb-azimuth")
            >>> ds = tfds.load(t.tfds_spec, split=t.train800).map(t.tf_map())  # needs the data prepared
        """
        import tensorflow as tf
        import tensorflow.experimental.numpy as tnp

        def map_example(features):
            label = tf.cast(self.label_rule(features, tnp), tf.int64)
            message = f"VTAB task {self.name!r}: label outside [0, {self.num_classes})"
            with tf.control_dependencies([
                    tf.debugging.assert_non_negative(label, message=message),
                    tf.debugging.assert_less(label, tf.constant(self.num_classes, tf.int64), message=message)]):
                label = tf.identity(label)
            image = features["image"]
            if self.image_rule is not None:
                image = tf.cast(self.image_rule(image, tnp), tf.uint8)
            return {"image": image, "label": label}

        return map_example


def _row(name, group, tfds_name, version, num_classes, val200, test, test_size, label_rule=_class_label,
         protocol_name=None, image_rule=None):
    return Task(name=name, group=group, tfds_name=tfds_name, version=version, num_classes=num_classes,
                val200=val200, test=test, test_size=test_size, label_rule=label_rule,
                protocol_name=protocol_name or name, image_rule=image_rule)


# Carved validation parts start at: caltech101 90% of 3060 = 2754; cifar100 90% of 50000; svhn 90% of 73257 = 65931;
# oxford_iiit_pet 80% of 3680 = 2944; eurosat 60% of 27000; resisc45 60% of 31500; clevr 90% of 70000;
# dsprites 80% of 737280 = 589824 (test: the last 10%). smallnorb's validation is the first half of tfds "test".
TASKS = (
    _row("caltech101", "natural", "caltech101", "3.*.*", 102, "train[2754:2954]", "test", 6084),
    _row("cifar100", "natural", "cifar100", "3.*.*", 100, "train[45000:45200]", "test", 10000,
         protocol_name="cifar(num_classes=100)"),
    _row("dtd", "natural", "dtd", "3.*.*", 47, "validation[:200]", "test", 1880),
    _row("oxford_flowers102", "natural", "oxford_flowers102", "2.*.*", 102, "validation[:200]", "test", 6149),
    # tfds >= 4.9 builds only oxford_iiit_pet 4.0.0 ("fix corrupt images"), so "3.*.*" no longer resolves there.
    _row("oxford_iiit_pet", "natural", "oxford_iiit_pet", "3.*.*", 37, "train[2944:3144]", "test", 3669),
    _row("svhn", "natural", "svhn_cropped", "3.*.*", 10, "train[65931:66131]", "test", 26032),
    _row("sun397", "natural", "sun397/tfds", "4.*.*", 397, "validation[:200]", "test", 21750),
    _row("patch_camelyon", "specialized", "patch_camelyon", "2.*.*", 2, "validation[:200]", "test", 32768),
    _row("eurosat", "specialized", "eurosat/rgb", "2.*.*", 10, "train[16200:16400]", "train[21600:]", 5400),
    _row("resisc45", "specialized", "resisc45", "3.*.*", 45, "train[18900:19100]", "train[25200:]", 6300),
    _row("diabetic_retinopathy", "specialized", "diabetic_retinopathy_detection/btgraham-300", "3.*.*", 5,
         "validation[:200]", "test", 42670, protocol_name='diabetic_retinopathy(config="btgraham-300")'),
    _row("clevr-count", "structured", "clevr", "3.*.*", 8, "train[63000:63200]", "validation", 15000,
         _clevr_count, 'clevr(task="count_all")'),
    _row("clevr-distance", "structured", "clevr", "3.*.*", 6, "train[63000:63200]", "validation", 15000,
         _clevr_distance, 'clevr(task="closest_object_distance")'),
    _row("dmlab", "structured", "dmlab", "2.0.1", 6, "validation[:200]", "test", 22735),
    _row("kitti-distance", "structured", "kitti", "3.1.0", 4, "validation[:200]", "test", 711,
         _kitti_distance, 'kitti(task="closest_vehicle_distance")'),
    _row("dsprites-xpos", "structured", "dsprites", "2.*.*", 16, "train[589824:590024]", "train[663552:]", 73728,
         _grouped_attribute("label_x_position", 32, 16),
         'dsprites(predicted_attribute="label_x_position",num_classes=16)', _binary_to_rgb),
    _row("dsprites-orientation", "structured", "dsprites", "2.*.*", 16, "train[589824:590024]", "train[663552:]",
         73728, _grouped_attribute("label_orientation", 40, 16),
         'dsprites(predicted_attribute="label_orientation",num_classes=16)', _binary_to_rgb),
    _row("smallnorb-azimuth", "structured", "smallnorb", "2.*.*", 18, "test[:200]", "test[50%:]", 12150,
         _attribute("label_azimuth"), 'smallnorb(predicted_attribute="label_azimuth")', _gray_to_rgb),
    _row("smallnorb-elevation", "structured", "smallnorb", "2.*.*", 9, "test[:200]", "test[50%:]", 12150,
         _attribute("label_elevation"), 'smallnorb(predicted_attribute="label_elevation")', _gray_to_rgb),
)
_BY_NAME = {t.name: t for t in TASKS}
# Other spellings a user may try (tfds builder, task_adaptation name) -> the task to suggest; never accepted as is.
_HINTS = {**{t.tfds_name.split("/")[0]: t.name for t in reversed(TASKS)},
          **{t.protocol_name: t.name for t in TASKS}, **{n: n for n in _BY_NAME}}


def task(name):
    """The VTAB-1k task called `name` (as in `keras_bit.presets.VTAB_TASKS`).

    Raises:
        ValueError: `name` is not one of the 19 (the message names them, and the closest).
    """
    if isinstance(name, str) and name in _BY_NAME:
        return _BY_NAME[name]
    close = difflib.get_close_matches(str(name), _HINTS, n=1)
    hint = f" Did you mean {_HINTS[close[0]]!r}?" if close else ""
    raise ValueError(f"Unknown VTAB task: name={name!r}.{hint} Valid names: {', '.join(sorted(_BY_NAME))}.")


def group_means(results):
    """VTAB's summary of 19 task scores: the mean of each group's tasks and the mean of all 19.

    The overall mean is over the 19 tasks (not over the three group means), as
    VTAB reports it.

    Args:
        results: mapping task name -> score (e.g. top-1 accuracy), one for every task.

    Returns:
        dict with "natural", "specialized", "structured" and "mean".

    Raises:
        ValueError: an unknown or missing task, or a score that is not a finite number.

    Example:
        >>> group_means(dict.fromkeys(_BY_NAME, 0.5))["mean"]
        0.5
    """
    for name in results:
        task(name)
    missing = [name for name in _BY_NAME if name not in results]
    if missing:
        raise ValueError(f"results: no score for VTAB task(s) {', '.join(missing)}; VTAB means need all 19.")
    scores = {}
    for name, score in results.items():
        if isinstance(score, bool) or not isinstance(score, (int, float, np.integer, np.floating)) \
                or not math.isfinite(score):
            raise ValueError(f"results[{name!r}]: expected a finite number, received {score!r}.")
        scores[name] = float(score)
    means = {group: math.fsum(scores[n] for n in names) / len(names) for group, names in GROUPS.items()}
    means["mean"] = math.fsum(scores.values()) / len(scores)
    return means
