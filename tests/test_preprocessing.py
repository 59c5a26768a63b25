"""preprocess_input on NumPy, backend tensors and symbolic inputs (every backend)."""

import keras
import numpy as np

import keras_bit


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
