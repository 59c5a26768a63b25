"""keras_bit.models.resnet_v2: output stride (dilation) against the NumPy oracle, shapes, features, builder purity."""

import ast
import inspect
import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_bit
import reference
from helpers import TINY, TINY_SIZE, images, tiny_checkpoint, tiny_model
from keras_bit.models import resnet_v2

pytestmark = pytest.mark.backend_agnostic  # .ci/backend runs these on JAX and PyTorch

# Two units in blocks 3 and 4, so the later-unit dilations (2 and 4) are used too: in TINY, blocks 3 and 4
# have a single unit, whose dilation is the first-unit rule (1 at output stride 16, 2 in block 4 at 8).
DEEP = dict(block_units=(1, 1, 2, 2), base_width=32, groups=8)
CHANNELS = (32, 128, 256, 512, 1024)  # stem, blocks 1-4 at base_width 32
EXPECTED_PLANS = {  # (stride, first-unit dilation, later-unit dilation) per block, timm's rule
    32: ((1, 1, 1), (2, 1, 1), (2, 1, 1), (2, 1, 1)),
    16: ((1, 1, 1), (2, 1, 1), (2, 1, 1), (1, 1, 2)),
    8: ((1, 1, 1), (2, 1, 1), (1, 1, 2), (1, 2, 4)),
}
FEATURE_STRIDES = {32: (2, 4, 8, 16, 32), 16: (2, 4, 8, 16, 16), 8: (2, 4, 8, 8, 8)}


def _rel_error(got, expected):
    assert got.shape == expected.shape
    return np.abs(got - expected).max() / np.abs(expected).max()


def _logits_and_features(model, x):
    """The model's logits and its final GN-ReLU map (the input of the head), from one model."""
    both = keras.Model(model.input, [model.output, model.get_layer("post_relu").output])
    return both.predict(x, verbose=0)


def _halvings(size, times):
    for _ in range(times):
        size = math.ceil(size / 2)  # every stride-2 window here is symmetric-padded: ceil, odd sizes too
    return size


@pytest.mark.parametrize("output_stride", sorted(EXPECTED_PLANS))
def test_block_plan_values(output_stride):
    assert resnet_v2.block_plan(output_stride) == EXPECTED_PLANS[output_stride]
    assert reference.stage_dilations(output_stride) == EXPECTED_PLANS[output_stride]
    assert resnet_v2.block_plan() == EXPECTED_PLANS[32]


@pytest.mark.parametrize("output_stride", [8, 16])
def test_layers_follow_block_plan(output_stride):
    model = resnet_v2.build_resnet_v2(**DEEP, include_top=False, input_shape=(None, None, 3),
                                      output_stride=output_stride)
    for b, (stride, first, later) in enumerate(EXPECTED_PLANS[output_stride], start=1):
        for u, rate in ((1, first), (2, later))[:DEEP["block_units"][b - 1]]:
            conv = model.get_layer(f"block{b}_unit{u:02d}_b_conv")
            assert conv.strides == ((stride, stride) if u == 1 else (1, 1)), conv.name
            assert conv.dilation_rate == (rate, rate), conv.name
            assert conv.padding == "valid"
            # Symmetric zero padding = dilation keeps a stride-1 dilated 3x3 size-preserving.
            assert model.get_layer(f"block{b}_unit{u:02d}_b_pad").padding == ((rate, rate), (rate, rate))
        assert model.get_layer(f"block{b}_unit01_a_proj_conv").strides == (stride, stride)
        assert model.get_layer(f"block{b}_unit01_a_proj_conv").dilation_rate == (1, 1)


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_tiny_output_stride_matches_numpy_reference(tmp_path, rng, output_stride):
    """float32 Keras vs the float64 oracle (relative max error <= 1e-5), loaded with ResNetV2(weights=path)."""
    d = tiny_checkpoint(tmp_path / "tiny.npz", classes=10, seed=output_stride)
    x = images(rng)
    model = tiny_model(weights=str(tmp_path / "tiny.npz"), classifier_activation=None, output_stride=output_stride)
    logits, features = _logits_and_features(model, x)
    assert _rel_error(logits, reference.forward(d, x, groups=8, output_stride=output_stride)) <= 1e-5
    expected = reference.forward(d, x, groups=8, features=True, output_stride=output_stride)
    assert features.shape[1:3] == (TINY_SIZE // output_stride,) * 2
    assert _rel_error(features, expected) <= 1e-5


@pytest.mark.parametrize("output_stride", [8, 16])
def test_deep_dilation_matches_numpy_reference(tmp_path, rng, output_stride):
    """Later units at dilation 2 and 4, loaded into a built model with keras_bit.load_weights."""
    d = reference.random_checkpoint(DEEP["block_units"], base=DEEP["base_width"], classes=10, seed=3)
    np.savez(tmp_path / "deep.npz", **d)
    x = images(rng, size=48)  # block 4 at 6x6 (stride 8): dilation 4 still reaches inside
    model = keras_bit.ResNetV2(**DEEP, weights=None, classes=10, classifier_activation=None,
                               input_shape=(48, 48, 3), output_stride=output_stride)
    keras_bit.load_weights(model, str(tmp_path / "deep.npz"))
    logits, features = _logits_and_features(model, x)
    assert _rel_error(logits, reference.forward(d, x, groups=8, output_stride=output_stride)) <= 1e-5
    assert _rel_error(features, reference.forward(d, x, groups=8, features=True, output_stride=output_stride)) <= 1e-5


@pytest.mark.parametrize("config,size", [(TINY, TINY_SIZE), (DEEP, 48)])
def test_reference_catches_wrong_dilation(tmp_path, rng, monkeypatch, config, size):
    """Negative controls at output stride 8: the same weights through a wrong dilation rule must disagree."""
    d = reference.random_checkpoint(config["block_units"], base=config["base_width"], classes=10, seed=4)
    np.savez(tmp_path / "w.npz", **d)
    x = images(rng, size=size)
    model = keras_bit.ResNetV2(**config, weights=str(tmp_path / "w.npz"), classifier_activation=None,
                               input_shape=(size, size, 3), output_stride=8)
    logits, features = _logits_and_features(model, x)
    right = reference.stage_dilations
    assert _rel_error(logits, reference.forward(d, x, groups=8, output_stride=8)) <= 1e-5
    wrong_rules = {
        # HF's preactivation layer: strides dropped, no dilation at all.
        "no dilation": lambda os: tuple((s, 1, 1) for s, _, _ in right(os)),
        # First units dilated like the rest (ignoring timm's first_dilation).
        "first unit dilated": lambda os: tuple((s, r, r) for s, _, r in right(os)),
    }
    for rule, plan in wrong_rules.items():
        monkeypatch.setattr(reference, "stage_dilations", plan)
        assert _rel_error(logits, reference.forward(d, x, groups=8, output_stride=8)) > 1e-3, rule
        assert _rel_error(features, reference.forward(d, x, groups=8, features=True, output_stride=8)) > 1e-3, rule


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_output_spatial_sizes(output_stride):
    halvings = int(math.log2(output_stride))
    model = tiny_model(include_top=False, input_shape=None, output_stride=output_stride)
    for size in (32, 33, 47, 64, 97, 100):
        expected = (1, _halvings(size, halvings), _halvings(size + 6, halvings), 1024)
        assert tuple(model.compute_output_shape((1, size, size + 6, 3))) == expected, size
    # One run as well (each new input size costs an XLA compile on JAX): odd height and width.
    assert model.predict(np.zeros((1, 47, 53, 3), "float32"), verbose=0).shape == (
        1, _halvings(47, halvings), _halvings(53, halvings), 1024)
    static = tiny_model(include_top=False, input_shape=(65, 41, 3), output_stride=output_stride)
    assert static.output_shape == (None, _halvings(65, halvings), _halvings(41, halvings), 1024)


def test_parameter_count_unchanged_by_output_stride():
    d = reference.random_checkpoint(TINY["block_units"], base=TINY["base_width"], classes=10)
    checkpoint_params = sum(v.size for v in d.values())  # the official layout, counted independently
    models = {os: tiny_model(classes=10, output_stride=os) for os in (8, 16, 32)}
    assert {m.count_params() for m in models.values()} == {checkpoint_params}
    shapes = {os: [(w.path, tuple(w.shape)) for w in m.weights] for os, m in models.items()}
    assert shapes[8] == shapes[16] == shapes[32]


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_feature_model_shapes_and_info(output_stride):
    model = tiny_model(include_top=False, input_shape=None, output_stride=output_stride)
    features = keras_bit.feature_model(model, out_indices=(0, 1, 2, 3, 4))
    names = ["root_block_conv", "block1_out", "block2_out", "block3_out", "block4_out"]
    assert features.feature_info == [
        {"index": i, "name": n, "channels": c, "stride": s}
        for i, (n, c, s) in enumerate(zip(names, CHANNELS, FEATURE_STRIDES[output_stride]))
    ]
    assert keras_bit.feature_info(model) == features.feature_info
    for size in (64, 97):
        outs = features.predict(np.zeros((1, size, size, 3), "float32"), verbose=0)
        assert [o.shape for o in outs] == [
            (1, math.ceil(size / s), math.ceil(size / s), c) for s, c in zip(FEATURE_STRIDES[output_stride], CHANNELS)
        ]
    picked = keras_bit.feature_model(model, out_indices=[4, 0])  # order kept
    assert [(f["index"], f["channels"], f["stride"]) for f in picked.feature_info] == [
        (4, 1024, FEATURE_STRIDES[output_stride][4]), (0, 32, 2)
    ]
    assert [tuple(o.shape) for o in picked.outputs] == [(None, None, None, 1024), (None, None, None, 32)]


def test_feature_model_bad_out_indices():
    model = tiny_model(include_top=False, input_shape=None, output_stride=16)
    for out_indices in [(), [5], [-1], [True], (1, "2"), "1", None, 4]:
        with pytest.raises(ValueError, match=r"`out_indices` must be a non-empty sequence of indices in 0\.\.4 "
                                             r"\(0: stem, 1-4: blocks\)\. Received: out_indices="):
            keras_bit.feature_model(model, out_indices=out_indices)


@pytest.mark.parametrize("output_stride", [4, 64, 0, True, "16", None])
def test_bad_output_stride(output_stride):
    with pytest.raises(ValueError, match=r"`output_stride` must be one of \(8, 16, 32\)\. Received: output_stride="):
        resnet_v2.build_resnet_v2(**TINY, input_shape=(64, 64, 3), output_stride=output_stride)


def test_builder_knows_nothing_about_weights():
    params = inspect.signature(resnet_v2.build_resnet_v2).parameters
    assert not {"weights", "cache_dir", "model_name"} & set(params)
    assert params["output_stride"].kind is inspect.Parameter.KEYWORD_ONLY and params["output_stride"].default == 32
    imported = set()
    for node in ast.walk(ast.parse(inspect.getsource(resnet_v2))):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    assert not [m for m in imported if m.startswith(("keras_bit.weights", "keras_bit.presets"))], imported
    assert not {"keras_bit.models.bit", "keras_bit.presets", "keras_bit.weights"} & imported


@pytest.mark.slow  # another process (a Python start with TensorFlow: seconds)
def test_builder_imports_no_weights_module_in_a_fresh_process():
    code = (
        "import json, sys\n"
        "from keras_bit.models import resnet_v2\n"
        "resnet_v2.build_resnet_v2((1, 1, 1, 1), base_width=32, groups=8, input_shape=(64, 64, 3), classes=3)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('keras_bit'))))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(keras_bit.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
               KERAS_BACKEND=keras.backend.backend())
    run = subprocess.run([sys.executable, "-c", code], env=env, check=False, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    modules = json.loads(run.stdout.strip().splitlines()[-1])
    assert "keras_bit.models.resnet_v2" in modules
    assert not [m for m in modules if m.startswith(("keras_bit.weights", "keras_bit.presets", "keras_bit.models.bit"))]


@pytest.mark.parametrize("case", ["out_indices=[1.0]", "output_stride=16.0"])
def test_float_arguments_are_rejected(case):
    if case == "out_indices=[1.0]":
        with pytest.raises(ValueError, match=r"`out_indices` must be"):  # today: TypeError from list indexing
            keras_bit.feature_model(tiny_model(include_top=False, input_shape=None), out_indices=[1.0])
    else:
        with pytest.raises(ValueError, match=r"`output_stride` must be one of"):  # today: builds
            resnet_v2.build_resnet_v2(**TINY, input_shape=(64, 64, 3), output_stride=16.0)


# --- Arguments as Keras takes them (issue 22, property 5) ---

NUMPY_TINY = dict(block_units=np.array([2, 1, 1, 1]), base_width=np.int32(32), groups=np.int64(8),
                  width_factor=np.int64(1))


def test_numpy_integers_and_sequences_build_the_same_model():
    """np.int64 / np.int32 sizes and array / range sequences, as Keras takes them; configs hold plain ints."""
    plain = resnet_v2.build_resnet_v2(**TINY, input_shape=[64, 64, 3], classes=10, output_stride=16)
    numpy = resnet_v2.build_resnet_v2(**NUMPY_TINY, input_shape=np.array([64, 64, 3]), classes=np.int64(10),
                                      output_stride=np.int32(16))
    mixed = resnet_v2.build_resnet_v2([np.int8(2), 1, 1, 1], base_width=32, groups=8,
                                      input_shape=(np.int64(64), 64, np.int32(3)), classes=10, output_stride=16)
    # A NumPy integer left in a layer config would make these fail (json cannot write np.int64).
    assert json.loads(numpy.to_json()) == json.loads(plain.to_json()) == json.loads(mixed.to_json())
    assert numpy.output_shape == (None, 10) and numpy.count_params() == plain.count_params()
    units = resnet_v2.check_architecture_args(range(1, 5), np.int64(2), 32, np.int32(8))
    assert units == ((1, 2, 3, 4), 2, 32, 8, 32) and all(type(u) is int for u in units[0])


def test_feature_model_takes_any_integer_sequence():
    model = tiny_model(include_top=False, input_shape=None)
    expected = keras_bit.feature_model(model, out_indices=(1, 2, 3, 4)).feature_info
    for out_indices in (range(1, 5), np.arange(1, 5), [np.int64(1), np.int32(2), 3, np.int8(4)]):
        features = keras_bit.feature_model(model, out_indices=out_indices)
        assert features.feature_info == expected
        assert all(type(f["index"]) is int for f in features.feature_info)
    for out_indices in (np.array([1.0, 2.0]), np.array([[1, 2]]), {1, 2}, iter([1, 2]), range(0), [np.True_]):
        with pytest.raises(ValueError, match=r"`out_indices` must be a non-empty sequence of indices in 0\.\.4"):
            keras_bit.feature_model(model, out_indices=out_indices)


BAD_ARGUMENTS = [  # (keyword, values, message): each refused before anything is built
    ("input_shape", [(224.0, 224, 3), ("224", 224, 3), (-64, 64, 3), (0, 64, 3), (True, 64, 3), (64, 64.0, 3),
                     (np.float32(64), 64, 3)], r"Input height and width must be None or integers >= 32. Received: "),
    ("input_shape", ["64,64,3", b"abc", {64, 3, 5}, np.zeros((3, 1), int), (64, 64, 3, 1), iter((64, 64, 3)), 64],
     r"`input_shape` must be a tuple of 3 values \(height, width, channels\)"),
    ("input_shape", [(64, 64, c) for c in (0, -3, 3.0, True, None, "3")],
     r"The channel count in `input_shape` must be a positive integer"),
    ("block_units", [(True, 1, 1, 1), (1.0, 1, 1, 1), "1111", np.ones((2, 2), int), {1, 2, 3, 4}, (1, 1, 1, 0),
                     (1, 1, 1, -1), (1, 1, 1, None), 4], r"`block_units` must be a sequence of 4 positive integers"),
    ("width_factor", [0, 1.0, True, np.float64(1), "1"], r"`width_factor` must be a positive integer"),
    ("classes", [0, -1, 2.0, True, np.True_, "10"], r"`classes` must be a positive integer"),
    ("pooling", ["AVG", "mean", 1, ["avg"], True, np.array(["avg", "max"])],
     r"`pooling` must be one of \(None, 'avg', 'max'\)"),
    ("name", [123, "", "a/b", None, b"model"], r"`name` must be a non-empty string without '/'. Received: name="),
    ("include_top", [1, "True", None, np.int64(1)], r"`include_top` must be True or False"),
]


@pytest.mark.parametrize("keyword,values,message", BAD_ARGUMENTS, ids=[case[0] for case in BAD_ARGUMENTS])
def test_bad_arguments_are_refused_before_building(keyword, values, message, monkeypatch):
    built = []
    monkeypatch.setattr(resnet_v2, "_backbone", lambda *a: built.append(a))  # reaching it would be a bug
    for value in values:
        kwargs = dict(TINY, input_shape=(64, 64, 3), include_top=keyword != "pooling")
        kwargs[keyword] = value
        with pytest.raises(ValueError, match=message):
            resnet_v2.build_resnet_v2(**kwargs)
    assert not built


def test_huge_sizes_are_refused_before_anything_is_allocated():
    cases = [
        (dict(classes=10**9), r"the head \(classes\) would hold 1,024,000,000,000 weights \(3815 GiB in float32\)"),
        (dict(width_factor=10**4), r"the block-4 3x3 convolution \(width\) would hold"),
        (dict(input_shape=(64, 64, 10**8), include_top=False), r"the stem convolution \(input channels\) would hold"),
        (dict(block_units=(1, 1, 10**9, 1)), r"`block_units` asks for 1000000003 units in all, beyond 1000"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            resnet_v2.build_resnet_v2(**{**TINY, "input_shape": (64, 64, 3), **kwargs})
    resnet_v2.check_architecture_args((1, 1, resnet_v2.MAX_UNITS - 3, 1), 1, 32, 8)  # the bound itself is allowed


def test_size_bound_is_per_variable_and_exact():
    root = 32
    most = resnet_v2.MAX_VARIABLE_ELEMENTS // (32 * root)  # the largest head the bound allows at this width
    resnet_v2.check_sizes(1, root, 3, most)
    with pytest.raises(ValueError, match=r"the head \(classes\)"):
        resnet_v2.check_sizes(1, root, 3, most + 1)
    resnet_v2.check_sizes(1, root, None, None)  # unknown input depth, no head
    largest_bit = 32 * 64 * 4 * 21843  # R152x4's 21k head: far inside
    assert largest_bit < resnet_v2.MAX_VARIABLE_ELEMENTS / 10


def test_classes_without_the_head_is_refused_none_is_fine():
    with pytest.raises(ValueError, match=r"`classes` sizes the classification head, which include_top=False leaves "
                                         r"out\. .*Received: classes=10, include_top=False"):
        resnet_v2.build_resnet_v2(**TINY, include_top=False, classes=10)
    assert resnet_v2.build_resnet_v2(**TINY, include_top=False, classes=None).output_shape == (None, None, None, 1024)
    assert resnet_v2.build_resnet_v2(**TINY, input_shape=(64, 64, 3)).output_shape == (None, 1000)  # the default
    model = resnet_v2.build_resnet_v2(**TINY, include_top=np.bool_(False), pooling=np.str_("max"))
    assert model.output_shape == (None, 1024) and model.layers[-1].name == "max_pool"


@pytest.mark.parametrize("activation", ["softmax", keras.activations.softmax])
def test_one_class_softmax_is_refused(activation):
    with pytest.raises(ValueError, match=r"A softmax over one class is always 1\.0: for a binary "
                                         r".*classifier_activation='sigmoid'"):
        resnet_v2.build_resnet_v2(**TINY, input_shape=(64, 64, 3), classes=1, classifier_activation=activation)


def test_one_class_sigmoid_head_says_something(rng):
    model = resnet_v2.build_resnet_v2(**TINY, input_shape=(64, 64, 3), classes=np.int64(1),
                                      classifier_activation="sigmoid")
    head = model.get_layer("head")
    head.set_weights([rng.normal(scale=0.02, size=w.shape).astype("float32") for w in head.get_weights()])  # not 0
    scores = model.predict(images(rng, n=4), verbose=0)
    assert scores.shape == (4, 1) and np.all((scores > 0) & (scores < 1)) and np.ptp(scores) > 1e-4
