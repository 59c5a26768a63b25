"""keras_bit/__init__.py and keras_bit/backend.py: lazy imports, TensorFlow only where it is needed.

Each check runs in a fresh interpreter (this one, `sys.executable`) with KERAS_BACKEND set, because
`sys.modules` of the test process already holds whatever other tests imported. A backend whose
package is not installed here is skipped, so the file passes in the TensorFlow, JAX and PyTorch
environments alike.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

import keras_bit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(keras_bit.__file__)))
OTHER_BACKENDS = ["jax", "torch"]


def _run(backend, code):
    """Runs `code` under KERAS_BACKEND=`backend`; returns the JSON it prints last."""
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed in this environment")
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


# TensorFlow itself, and keras_bit's TensorFlow programs (which would import it where it is installed).
TF_MODULES = ("sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tf_keras', 'tensorflow_datasets')"
              " or m.startswith(('keras_bit.train', 'keras_bit.export', 'keras_bit.predict')))")


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_import_and_model_api_do_not_import_tensorflow(backend):
    code = f"""
import json, sys
import keras_bit
steps = {{"import keras_bit": {TF_MODULES}}}
for name in ("BiTM_R50x1", "load_weights", "preprocess_input"):
    getattr(keras_bit, name)
    steps["keras_bit." + name] = {TF_MODULES}
assert len(keras_bit.presets()) > 0
steps["keras_bit.presets()"] = {TF_MODULES}
import keras
print(json.dumps([keras.backend.backend(), steps]))
"""
    active, steps = _run(backend, code)
    assert active == backend
    assert steps == {step: [] for step in steps} and len(steps) == 5, steps


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
@pytest.mark.parametrize("name", ["finetune", "export_saved_model", "export_model"])
def test_tensorflow_features_raise_backend_error(backend, name):
    code = f"""
import json
import keras_bit
errors = []
for attempt in range(2):  # a second use fails the same way (no half-imported module left behind)
    try:
        keras_bit.{name}
    except keras_bit.BackendError as e:
        errors.append([type(e).__name__, isinstance(e, ImportError), str(e)])
try:
    from keras_bit import {name}
except ImportError as e:
    errors.append([type(e).__name__, isinstance(e, keras_bit.BackendError), str(e)])
print(json.dumps(errors))
"""
    errors = _run(backend, code)
    assert len(errors) == 3, errors
    for kind, is_import_error, message in errors:
        assert (kind, is_import_error) == ("BackendError", True)
        assert "KERAS_BACKEND=tensorflow" in message and repr(backend) in message, message


def test_import_under_tensorflow_is_lazy():
    code = """
import json, sys
import keras_bit
print(json.dumps(sorted(m for m in sys.modules if m.startswith(("keras_bit.train", "keras_bit.export")))))
"""
    assert _run("tensorflow", code) == []
