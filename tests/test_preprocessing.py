"""preprocess_input on NumPy, backend tensors and symbolic inputs (every backend), and inputs it refuses."""

import warnings

import keras
import numpy as np
import pytest

import keras_bit

pytestmark = pytest.mark.backend_agnostic  # .ci/backend runs these on JAX and PyTorch


def test_preprocess_numpy_uint8_and_float_without_mutation():
    pixels = np.array([[0, 51, 127, 255]], np.uint8)
    out = keras_bit.preprocess_input(pixels)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, pixels / 127.5 - 1, rtol=1e-6)
    floats = np.array([0.0, 127.5, 255.0], np.float64)
    out = keras_bit.preprocess_input(floats)
    assert out.dtype == np.float64 and out.tolist() == [-1.0, 0.0, 1.0]
    assert floats.tolist() == [0.0, 127.5, 255.0]  # input untouched (keras.applications edits in place)


def test_preprocess_tensors_and_symbolic():
    out = keras_bit.preprocess_input(keras.ops.convert_to_tensor(np.array([[0, 255]], np.uint8)))
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    assert keras.ops.convert_to_numpy(out).tolist() == [[-1.0, 1.0]]
    inputs = keras.Input((4, 4, 3), dtype="uint8")
    model = keras.Model(inputs, keras_bit.preprocess_input(inputs))
    np.testing.assert_allclose(model(np.full((1, 4, 4, 3), 255, np.uint8)), 1.0)


# --- Inputs outside the [0, 255] contract (issue 22, property 5) ---

def _quiet(x):
    """preprocess_input(x), failing on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return keras_bit.preprocess_input(x)


def test_every_in_range_input_is_accepted_silently():
    for x in (np.array([0, 255], np.uint16), np.array([0, 255], np.int64), [0, 128, 255], np.int8(100),
              np.array([0.0, 255.0], np.float16), 7, 12.5, np.zeros((0, 4, 4, 3), np.int32)):
        out = _quiet(x)
        np.testing.assert_allclose(out, np.asarray(x, "float64") / 127.5 - 1, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("x,kind,message", [
    (np.array([0, 256], np.uint16), ValueError, r"this uint16 input holds values in \[0, 256\]: convert 16-bit"),
    (np.array([[0, 65535]], np.uint16), ValueError, r"holds values in \[0, 65535\]"),
    (np.array([-1, 3]), ValueError, r"this int64 input holds values in \[-1, 3\]: negative values are not pixels"),
    (np.array([0, 300], np.int32), ValueError, r"\[0, 300\]"),
    (np.array([0.0, np.nan, 3.0], np.float32), ValueError, r"non-finite pixels \(NaN or infinity\) in a float32"),
    (np.array([np.inf]), ValueError, r"non-finite pixels"),
    (np.array([-np.inf, 1.0], np.float16), ValueError, r"non-finite pixels"),
    (np.array([True, False]), TypeError, r"Received: x of dtype bool \(shape \(2,\)\)"),
    (True, TypeError, r"dtype bool"),
    (np.array(["255"]), TypeError, r"dtype str"),
    (np.array([1, 2], dtype=object), TypeError, r"dtype object"),
    ([[1, 2], [3]], ValueError, r"`preprocess_input` could not make an array of `x` \(setting an array"),
    (np.array([1 + 2j]), TypeError, r"dtype complex128"),
    (np.array(["2024-01-01"], "datetime64[D]"), TypeError, r"dtype datetime64"),
])
def test_numpy_inputs_outside_the_contract_are_refused(x, kind, message):
    with pytest.raises(kind, match=message):
        keras_bit.preprocess_input(x)


@pytest.mark.parametrize("x,where", [
    (np.array([-1.0, 0.0, 1.0], np.float32), r"\[-1, 1\]"),  # preprocessed twice
    (np.array([0.0, 1000.0]), r"\[0, 1000\]"),
    (np.array([-3.5, 258.0]), r"\[-3.5, 258\]"),  # a bicubic overshoot: warned, still mapped
])
def test_float_values_outside_0_255_are_mapped_with_a_warning(x, where):
    with pytest.warns(UserWarning, match=r"maps pixels in \[0, 255\] to \[-1, 1\]; this input holds values in "
                      + where):
        out = keras_bit.preprocess_input(x)
    np.testing.assert_allclose(out, x / 127.5 - 1, rtol=1e-6)


def test_tensor_dtypes_are_checked_without_reading_values():
    with pytest.raises(TypeError, match=r"dtype bool"):
        keras_bit.preprocess_input(keras.ops.convert_to_tensor(np.array([True, False])))
    with pytest.raises(TypeError, match=r"dtype bool"):
        keras_bit.preprocess_input(keras.Input((4, 4, 3), dtype="bool"))
    # A uint16 tensor is mapped as is: reading an eager tensor back would stall the device on every call.
    wide = keras.ops.convert_to_tensor(np.array([0, 510], np.uint16))
    assert keras.ops.convert_to_numpy(_quiet(wide)).tolist() == [-1.0, 3.0]
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        with pytest.raises(TypeError, match=r"dtype string"):
            keras_bit.preprocess_input(tf.constant(["a"]))
        traced = tf.function(keras_bit.preprocess_input)  # tf.data / serving: a graph tensor, dtype checked only
        assert traced(tf.constant([0, 255], tf.uint8)).numpy().tolist() == [-1.0, 1.0]
