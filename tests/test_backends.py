"""keras_bit/__init__.py and keras_bit/backend.py: lazy imports, TensorFlow only where it is needed, no backend.

Each check runs in a fresh interpreter (this one, `sys.executable`) with KERAS_BACKEND set, because
`sys.modules` of the test process already holds whatever other tests imported. A backend whose
package is not installed here is skipped, so the file passes in the TensorFlow, JAX and PyTorch
environments alike.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import keras_bit

pytestmark = pytest.mark.backend_agnostic  # .ci/backend runs these on JAX and PyTorch

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


@pytest.mark.slow  # another process (a Python start with TensorFlow: seconds)
def test_import_under_tensorflow_is_lazy():
    code = """
import json, sys
import keras_bit
print(json.dumps(sorted(m for m in sys.modules if m.startswith(("keras_bit.train", "keras_bit.export")))))
"""
    assert _run("tensorflow", code) == []


# --- `pip install keras-bit` without a backend extra (issue 22, property 5) ---

def _without(tmp_path, package):
    """A folder for PYTHONPATH in which `import <package>` fails as it does when the package is not installed."""
    folder = tmp_path / "blocked"
    (folder / package).mkdir(parents=True)
    (folder / package / "__init__.py").write_text(
        f"raise ModuleNotFoundError(\"No module named '{package}'\", name={package!r})\n")
    return folder


def _env(tmp_path, blocked, **extra):
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", KERAS_HOME=str(tmp_path / "keras_home"),
               PYTHONPATH=os.pathsep.join([str(blocked), ROOT, os.environ.get("PYTHONPATH", "")]), **extra)
    return env


@pytest.mark.parametrize("backend,package", [("tensorflow", "tensorflow"), ("jax", "jax"), ("torch", "torch")])
def test_import_without_the_backend_names_the_extra(tmp_path, backend, package):
    code = ("import json\ntry:\n    import keras_bit\nexcept ImportError as e:\n"
            "    print(json.dumps([type(e).__name__, str(e), type(e.__cause__).__name__]))\n")
    env = _env(tmp_path, _without(tmp_path, package), KERAS_BACKEND=backend)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    kind, message, cause = json.loads(run.stdout.strip().splitlines()[-1])
    assert (kind, cause) == ("BackendError", "ModuleNotFoundError")
    assert message.startswith(f"keras_bit needs a Keras backend: Keras is set to use {backend!r} "
                              f"(KERAS_BACKEND={backend}), which is not installed. "
                              f'Install it with pip install "keras-bit[{backend}]" (or '), message
    assert all(f'"keras-bit[{extra}]"' in message for extra in ("tensorflow", "jax", "torch"))


def test_backend_chosen_in_keras_json_is_named(tmp_path):
    (tmp_path / "keras_home").mkdir()
    (tmp_path / "keras_home" / "keras.json").write_text(json.dumps({"backend": "jax"}))
    code = "try:\n    import keras_bit\nexcept ImportError as e:\n    print(e)\n"
    run = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path, _without(tmp_path, "jax")),
                         capture_output=True, text=True, timeout=300)
    keras_json = tmp_path / "keras_home" / "keras.json"
    assert f"Keras is set to use 'jax' (\"backend\" in {keras_json}), which is not installed" in run.stdout, run
    assert 'pip install "keras-bit[jax]"' in run.stdout


def _command():
    beside = os.path.join(os.path.dirname(sys.executable), "keras-bit")  # this interpreter's command
    return beside if os.path.exists(beside) else shutil.which("keras-bit")


@pytest.mark.parametrize("backend,expected", [
    ("jax", r'Keras is set to use \'jax\' \(KERAS_BACKEND=jax\), which is not installed\. Install it with pip '
            r'install "keras-bit\[jax\]"'),
    ("nonsense", r"Keras is set to use 'nonsense' \(KERAS_BACKEND=nonsense\), which is not a Keras backend"),
])
def test_installed_command_without_a_backend_is_one_line_exit_2(tmp_path, backend, expected):
    if _command() is None:
        pytest.skip("the keras-bit command is not installed")
    env = _env(tmp_path, _without(tmp_path, "jax"), KERAS_BACKEND=backend)
    run = subprocess.run([_command(), "presets"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keras-bit: error: "), run.stderr
    assert re.search(expected, lines[0]), lines[0]
