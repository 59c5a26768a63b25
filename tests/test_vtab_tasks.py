"""The VTAB-1k task table against numbers written here from the protocol (google-research/task_adaptation)."""

import math
import re

import numpy as np
import pytest

from keras_bit import presets
from keras_bit import vtab
from keras_bit.vtab import GROUPS, TASKS, group_means, task

pytestmark = pytest.mark.backend_agnostic

# Class counts: task_adaptation/data/<dataset>_test.py (`num_classes=`), clevr.py / kitti.py `_TASK_DICT`,
# and scripts/run_all_tasks.sh (dsprites grouped to 16 classes).
CLASSES = {
    "caltech101": 102, "cifar100": 100, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37, "svhn": 10,
    "sun397": 397, "patch_camelyon": 2, "eurosat": 10, "resisc45": 45, "diabetic_retinopathy": 5,
    "clevr-count": 8, "clevr-distance": 6, "dmlab": 6, "kitti-distance": 4, "dsprites-xpos": 16,
    "dsprites-orientation": 16, "smallnorb-azimuth": 18, "smallnorb-elevation": 9,
}
# Where val200 starts: (tfds split, its size in task_adaptation/data/<dataset>_test.py, the protocol's train percent
# in <dataset>.py); tasks whose tfds data has a validation split start at its first example.
CARVED = {
    "caltech101": ("train", 3060, 90), "cifar100": ("train", 50000, 90), "oxford_iiit_pet": ("train", 3680, 80),
    "svhn": ("train", 73257, 90), "eurosat": ("train", 27000, 60), "resisc45": ("train", 25200 + 6300, 60),
    "clevr-count": ("train", 70000, 90), "clevr-distance": ("train", 70000, 90),
    "dsprites-xpos": ("train", 737280, 80), "dsprites-orientation": ("train", 737280, 80),
    "smallnorb-azimuth": ("test", 24300, 0), "smallnorb-elevation": ("test", 24300, 0),
}
# The scored split and its size (<dataset>_test.py `test=`): eurosat / resisc45 keep the last 20% of tfds "train",
# dsprites the last 10%, smallnorb the second half of tfds "test", clevr scores on tfds "validation".
TEST = {
    "caltech101": ("test", 6084), "cifar100": ("test", 10000), "dtd": ("test", 1880),
    "oxford_flowers102": ("test", 6149), "oxford_iiit_pet": ("test", 3669), "svhn": ("test", 26032),
    "sun397": ("test", 21750), "patch_camelyon": ("test", 32768), "eurosat": ("train[21600:]", 27000 - 21600),
    "resisc45": ("train[25200:]", 31500 - 25200), "diabetic_retinopathy": ("test", 42670),
    "clevr-count": ("validation", 15000), "clevr-distance": ("validation", 15000), "dmlab": ("test", 22735),
    "kitti-distance": ("test", 711), "dsprites-xpos": ("train[663552:]", 73728),
    "dsprites-orientation": ("train[663552:]", 73728), "smallnorb-azimuth": ("test[50%:]", 12150),
    "smallnorb-elevation": ("test[50%:]", 12150),
}
# tfds builders (<dataset>.py `tfds.builder(...)`).
TFDS = {
    "svhn": "svhn_cropped:3.*.*", "sun397": "sun397/tfds:4.*.*", "eurosat": "eurosat/rgb:2.*.*",
    "diabetic_retinopathy": "diabetic_retinopathy_detection/btgraham-300:3.*.*", "clevr-count": "clevr:3.*.*",
    "dmlab": "dmlab:2.0.1", "kitti-distance": "kitti:3.1.0", "dsprites-xpos": "dsprites:2.*.*",
    "smallnorb-elevation": "smallnorb:2.*.*", "caltech101": "caltech101:3.*.*",
}
_SLICE = re.compile(r"^(\w+)\[(\d*):(\d*)\]$")


def _slices(split):
    """tfds split string of absolute slices -> [(split name, start, stop)]."""
    parts = []
    for part in split.split("+"):
        match = _SLICE.match(part)
        assert match, part
        parts.append((match[1], int(match[2] or 0), int(match[3])))
    return parts


def test_every_released_task_is_defined_once():
    names = [t.name for t in TASKS]
    assert sorted(names) == sorted(presets.VTAB_TASKS) and len(set(names)) == 19
    assert sorted(n for group in GROUPS.values() for n in group) == sorted(presets.VTAB_TASKS)
    assert {g: len(n) for g, n in GROUPS.items()} == {"natural": 7, "specialized": 4, "structured": 8}
    assert all(t.name in GROUPS[t.group] for t in TASKS)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_class_counts(name):
    assert task(name).num_classes == CLASSES[name]


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_vtab_1k_splits(name):
    t = task(name)
    train, val = _slices(t.train800), _slices(t.val200)
    split, _, percent = CARVED.get(name, ("validation", None, 0))
    offset = CARVED[name][1] * percent // 100 if name in CARVED else 0
    assert train == [("train", 0, 800)]
    assert val == [(split, offset, offset + 200)]
    assert _slices(t.train800val200) == train + val
    assert sum(stop - start for _, start, stop in _slices(t.train800val200)) == 1000
    assert split != "train" or offset >= 800  # the validation part never overlaps train800
    assert t.splits == {"train800": t.train800, "val200": t.val200, "train800val200": t.train800val200,
                        "test": t.test}
    assert (t.test, t.test_size) == TEST[name]


@pytest.mark.parametrize("name", sorted(TFDS))
def test_tfds_builders(name):
    assert task(name).tfds_spec == TFDS[name]


def _clevr(depths):
    return {"objects": {"size": [0] * len(depths), "pixel_coords": [[1.0, 2.0, d] for d in depths]}}


def test_clevr_count_is_objects_minus_three():
    t = task("clevr-count")
    assert [t.label(_clevr([5.0] * n)) for n in (3, 5, 10)] == [0, 2, 7]
    for n in (2, 11):
        with pytest.raises(ValueError, match="clevr-count.*outside"):
            t.label(_clevr([5.0] * n))


@pytest.mark.parametrize("depth,label", [
    (1e-3, 0), (8.0, 0), (8.01, 1), (8.5, 1), (8.51, 2), (9.0, 2), (9.01, 3), (9.5, 3), (9.51, 4), (10.0, 4),
    (10.01, 5), (99.0, 5), (100.0, 5)])
def test_clevr_distance_bins(depth, label):
    t = task("clevr-distance")
    assert t.label(_clevr([depth])) == label
    assert t.label(_clevr([150.0, depth, 120.0])) == label  # the closest object decides


@pytest.mark.parametrize("depth", [0.0, 100.5])
def test_clevr_distance_outside_the_bins_is_refused(depth):
    with pytest.raises(ValueError, match="clevr-distance"):
        task("clevr-distance").label(_clevr([depth]))


def _kitti(objects):
    """objects: [(tfds type id, depth z)]."""
    return {"objects": {"type": np.array([k for k, _ in objects], np.int64).reshape(-1),
                        "location": np.array([[0.5, 1.0, z] for _, z in objects], np.float32).reshape(-1, 3)}}


@pytest.mark.parametrize("objects,label", [
    ([(0, 2.0)], 0), ([(1, 8.0)], 0), ([(2, 8.01)], 1), ([(0, 20.0)], 1), ([(0, 20.01)], 2), ([(0, 998.0)], 2),
    ([(0, 999.0)], 2), ([], 3), ([(3, 2.0), (7, 3.0)], 3), ([(3, 2.0), (2, 25.0), (0, 30.0)], 2)])
def test_kitti_closest_vehicle_bins(objects, label):
    # types 0..2 are Car, Van, Truck; 3 Pedestrian and 7 Misc do not count
    assert task("kitti-distance").label(_kitti(objects)) == label


def test_dsprites_groups_neighbouring_values():
    xpos, orientation = task("dsprites-xpos"), task("dsprites-orientation")
    # the protocol's rule, float32 floor division by original / 16 classes (task_adaptation/data/dsprites.py)
    assert [xpos.label({"label_x_position": v}) for v in range(32)] == \
        [int(np.floor(np.float32(v) / np.float32(2.0))) for v in range(32)]
    assert [orientation.label({"label_orientation": v}) for v in range(40)] == \
        [int(np.floor(np.float32(v) / np.float32(2.5))) for v in range(40)]
    assert [orientation.label({"label_orientation": v}) for v in (0, 2, 3, 4, 5, 39)] == [0, 0, 1, 1, 2, 15]
    assert xpos.label({"label_x_position": 31}) == 15
    with pytest.raises(ValueError, match="dsprites-xpos"):
        xpos.label({"label_x_position": 32})


def test_attribute_and_class_labels():
    assert task("smallnorb-azimuth").label({"label_azimuth": 17, "label_elevation": 2}) == 17
    assert task("smallnorb-elevation").label({"label_azimuth": 17, "label_elevation": 8}) == 8
    assert task("diabetic_retinopathy").label({"label": np.int64(4)}) == 4
    assert task("dmlab").label_feature == "label" and task("smallnorb-azimuth").label_feature == "label_azimuth"
    for name, features in [("smallnorb-azimuth", {"label_azimuth": 18}), ("smallnorb-elevation",
                           {"label_elevation": 9}), ("diabetic_retinopathy", {"label": 5}), ("svhn", {"label": -1})]:
        with pytest.raises(ValueError, match=f"{name}.*outside"):
            task(name).label(features)
    with pytest.raises(ValueError, match="'dmlab'.*'label'"):
        task("dmlab").label({"image": 0})
    with pytest.raises(ValueError, match="kitti-distance"):
        task("kitti-distance").label({"objects": {}})


def test_image_rules_make_rgb_0_255():
    gray = np.arange(4, dtype=np.uint8).reshape(2, 2, 1)
    rgb = task("smallnorb-azimuth").image_rule(gray, np)
    assert rgb.shape == (2, 2, 3) and (rgb == gray).all()
    binary = np.array([[[0], [1]]], np.uint8)
    assert task("dsprites-xpos").image_rule(binary, np).tolist() == [[[0, 0, 0], [255, 255, 255]]]
    assert task("cifar100").image_rule is None


def test_group_means_by_hand():
    results = dict(zip(vtab.NATURAL, (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)))
    results.update(zip(vtab.SPECIALIZED, (0.2, 0.4, 0.6, 0.8)))
    results.update(dict.fromkeys(vtab.STRUCTURED, 0.3))
    means = group_means(results)
    assert means.keys() == {"natural", "specialized", "structured", "mean"}
    assert math.isclose(means["natural"], 0.4) and math.isclose(means["specialized"], 0.5)
    assert math.isclose(means["structured"], 0.3)
    assert math.isclose(means["mean"], 7.2 / 19)  # of the 19 tasks, not (0.4 + 0.5 + 0.3) / 3


def test_group_means_refuses_bad_tables():
    full = dict.fromkeys(presets.VTAB_TASKS, 70.0)
    with pytest.raises(ValueError, match="no score.*dmlab"):
        group_means({k: v for k, v in full.items() if k != "dmlab"})
    with pytest.raises(ValueError, match="clevr_count.*clevr-count"):
        group_means({**full, "clevr_count": 1.0})
    for bad in (float("nan"), float("inf"), True, "70", None):
        with pytest.raises(ValueError, match="results\\['svhn'\\]"):
            group_means({**full, "svhn": bad})


@pytest.mark.parametrize("name,hint", [("clevr_count", "clevr-count"), ("svhn_cropped", "svhn"),
                                       ("Caltech101", "caltech101"), ("", None), (None, None)])
def test_unknown_names_are_refused(name, hint):
    with pytest.raises(ValueError, match="Unknown VTAB task") as info:
        task(name)
    assert "smallnorb-elevation" in str(info.value)  # the valid names are listed
    if hint:
        assert f"Did you mean {hint!r}" in str(info.value)


def test_tf_map_matches_label_in_tf_data():
    tf = pytest.importorskip("tensorflow")
    cases = [("kitti-distance", _kitti(objects)) for objects in ([], [(3, 2.0)], [(0, 8.01), (1, 30.0)])]
    cases += [("clevr-distance", _clevr([9.2, 12.0])), ("clevr-count", _clevr([5.0] * 7)),
              ("dsprites-orientation", {"label_orientation": np.int64(37)})]
    for name, features in cases:
        image = np.ones((2, 3, 1), np.uint8)
        ds = tf.data.Dataset.from_tensors({**features, "image": image}).map(task(name).tf_map())
        (out,) = list(ds.as_numpy_iterator())
        assert out["label"].dtype == np.int64 and out["label"] == task(name).label(features), name
        assert out["image"].shape == ((2, 3, 3) if name.startswith("dsprites") else (2, 3, 1))
    with pytest.raises(tf.errors.InvalidArgumentError, match="clevr-count.*outside"):
        bad = tf.data.Dataset.from_tensors({**_clevr([5.0] * 2), "image": image}).map(task("clevr-count").tf_map())
        list(bad)


def test_tf_map_on_mocked_tfds_dsprites():
    pytest.importorskip("tensorflow")
    tfds = pytest.importorskip("tensorflow_datasets")
    t = task("dsprites-orientation")
    with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
        raw = tfds.load(t.tfds_spec, split=t.train800)
    pairs = list(raw.map(lambda ex: (ex["label_orientation"], t.tf_map()(ex))).as_numpy_iterator())
    assert len(pairs) == 16 and len({int(v) for v, _ in pairs}) > 1
    for value, out in pairs:
        assert out["label"] == int(np.floor(np.float32(value) / np.float32(2.5)))  # 40 orientations -> 16 classes
        assert out["image"].shape == (64, 64, 3) and out["image"].dtype == np.uint8
