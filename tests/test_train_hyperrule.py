import keras
import numpy as np
import pytest

from keras_bit.train import hyperrule
from keras_bit.train.hyperrule import (
    BiTSchedule,
    get_lr,
    get_mixup,
    get_resolution,
    get_schedule,
    scale_schedule,
    scaled_lr,
)


@pytest.mark.parametrize(
    "size,expected",
    [
        ((32, 32), (160, 128)),
        ((95, 96), (160, 128)),
        ((96, 96), (512, 480)),
        ((500, 375), (512, 480)),
        ((8, 8), (160, 128)),
    ],
)
def test_resolution_rule(size, expected):
    assert get_resolution(size) == expected


@pytest.mark.parametrize(
    "n,expected",
    [
        (1, (100, 200, 300, 400, 500)),
        (19_999, (100, 200, 300, 400, 500)),
        (20_000, (500, 3000, 6000, 9000, 10000)),
        (499_999, (500, 3000, 6000, 9000, 10000)),
        (500_000, (500, 6000, 12000, 18000, 20000)),
        (1_281_167, (500, 6000, 12000, 18000, 20000)),
    ],
)
def test_schedule_by_dataset_size(n, expected):
    assert get_schedule(n) == expected


def test_mixup_rule():
    assert get_mixup(19_999) == 0.0 and get_mixup(20_000) == 0.1 and get_mixup(10**6) == 0.1


def test_lr_scaling():
    assert scaled_lr(512) == 0.003
    assert scaled_lr(64) == pytest.approx(0.003 / 8)
    assert scaled_lr(4096, base_lr=0.01) == pytest.approx(0.08)
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer. Received: batch_size=0"):
        scaled_lr(0)


def test_get_lr_matches_the_authors_boundaries():
    # N < 20k: warm-up over 100 steps, /10 after 200, 300, 400 (strictly), end at 500.
    assert get_lr(0, 1000) == 0.0
    assert get_lr(50, 1000) == pytest.approx(0.0015)
    assert get_lr(99, 1000) == pytest.approx(0.003 * 0.99)
    assert get_lr(100, 1000) == 0.003
    assert get_lr(200, 1000) == 0.003  # decays only once the step is past the support
    assert get_lr(201, 1000) == pytest.approx(0.0003)
    assert get_lr(301, 1000) == pytest.approx(0.00003)
    assert get_lr(401, 1000) == pytest.approx(0.000003)
    assert get_lr(499, 1000) == pytest.approx(0.000003)
    assert get_lr(500, 1000) is None
    assert get_lr(3001, 50_000) == pytest.approx(0.0003)
    assert get_lr(12001, 10**6) == pytest.approx(0.00003)


@pytest.mark.parametrize("n", [1000, 50_000, 10**6])
def test_keras_schedule_equals_pure_function(n):
    supports = get_schedule(n)
    schedule = BiTSchedule(0.003, supports)
    edges = {0, 1, supports[-1] - 1, supports[-1], supports[-1] + 7}
    steps = sorted(edges | {s + d for s in supports for d in (-1, 0, 1)})
    got = keras.ops.convert_to_numpy(schedule(np.array(steps)))
    expected = [get_lr(s, n) or 0.0 for s in steps]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)


def test_schedule_serializes():
    schedule = BiTSchedule(0.01, (10, 20, 30, 40, 50))
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert isinstance(restored, BiTSchedule) and restored.get_config() == {
        "base_lr": 0.01, "supports": [10, 20, 30, 40, 50], "accumulation_steps": 1
    }
    optimizer = keras.optimizers.SGD(schedule, momentum=0.9)
    clone = keras.optimizers.SGD.from_config(optimizer.get_config())
    assert clone.learning_rate.numpy() == 0.0  # step 0 of the warm-up


def test_schedule_rejects_bad_supports():
    with pytest.raises(ValueError, match=r"`supports` must be 5 strictly increasing positive step counts"):
        BiTSchedule(0.003, (100, 100, 300, 400, 500))
    with pytest.raises(ValueError, match="`base_lr` must be positive"):
        BiTSchedule(0.0, (1, 2, 3, 4, 5))


@pytest.mark.parametrize(
    "supports,steps,expected",
    [
        ((100, 200, 300, 400, 500), 50, (10, 20, 30, 40, 50)),
        ((500, 3000, 6000, 9000, 10000), 100, (5, 30, 60, 90, 100)),
        ((100, 200, 300, 400, 500), 5, (1, 2, 3, 4, 5)),
        ((500, 3000, 6000, 9000, 10000), 7, (1, 2, 4, 6, 7)),
        ((100, 200, 300, 400, 500), 1000, (200, 400, 600, 800, 1000)),
    ],
)
def test_scale_schedule(supports, steps, expected):
    assert scale_schedule(supports, steps) == expected


def test_scale_schedule_rejects_too_few_steps():
    with pytest.raises(ValueError, match=r"`steps` must be an integer >= 5 .*Received: steps=4"):
        scale_schedule((100, 200, 300, 400, 500), 4)


def test_invalid_dataset_size():
    with pytest.raises(ValueError, match="`dataset_size` must be a positive integer. Received: dataset_size=0"):
        hyperrule.get_schedule(0)


def test_schedule_counts_optimizer_updates_under_accumulation():
    # Keras passes the micro-batch counter: with 4 micro-batches per update, micro-step 4j..4j+3 is step j.
    plain, accumulated = BiTSchedule(0.003, (10, 20, 30, 40, 50)), BiTSchedule(0.003, (10, 20, 30, 40, 50), 4)
    micro = np.arange(0, 220)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(accumulated(micro)), keras.ops.convert_to_numpy(plain(micro // 4)), rtol=1e-7
    )
