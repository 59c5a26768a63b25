"""Shared fixtures. The Keras cache is redirected to a temporary folder before Keras is
imported, so no test reads or writes ~/.keras and none can use a file a developer
downloaded by hand."""

import os
import tempfile

os.environ["KERAS_HOME"] = tempfile.mkdtemp(prefix="keras_bit_tests_keras_home_")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.pop("KERAS_BIT_BASE_URL", None)

import gc  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Each test starts with float32 and an empty Keras session, and frees its models."""
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")
    keras.backend.clear_session()
    gc.collect()
    # What survives a test (modules, TensorFlow's state, session fixtures) moves to the permanent generation, so
    # the next test's collection walks only the objects created since: 0.2-0.4 s a test otherwise (~1000 tests).
    gc.freeze()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def keras_home():
    return os.environ["KERAS_HOME"]


@pytest.fixture(scope="session")
def interrupted_run(tmp_path_factory):
    """A tiny fine-tune (10 steps, a backup every 2) killed after 3 batches, trained once per session: its folder
    holds a backup but no model. Copy it (`copy_run`) before resuming or changing it."""
    from helpers import Crash, run_finetune

    root = tmp_path_factory.mktemp("interrupted")
    with pytest.raises(KeyboardInterrupt):
        run_finetune(root, "r", steps=10, checkpoint_every=2, callbacks=[Crash(after_batches=3)])
    keras.backend.clear_session()
    return root / "r"


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A tiny fine-tune (5 steps) run to the end once per session, exported to `exports/` beside it: `(run folder,
    FinetuneResult)`. Copy the folder (`copy_run`) before starting it again; never change `exports/`."""
    from helpers import run_finetune

    root = tmp_path_factory.mktemp("finished")
    result = run_finetune(root, "r", steps=5, export_dir=root / "exports")
    keras.backend.clear_session()
    return root / "r", result


@pytest.fixture(scope="session")
def classifier_exports(tmp_path_factory):
    """`helpers.export_classifier` exported once per session in each format whose runtime is installed (class names
    `EXPORT_CLASSES`, top 3): format -> path. Read them or copy them; never change them."""
    import importlib.util

    from helpers import EXPORT_CLASSES, EXPORT_FILES, EXPORT_RUNTIMES, export_classifier
    from keras_bit.export import export_model

    folder = tmp_path_factory.mktemp("classifier_exports")
    model = export_classifier(folder)
    paths = {fmt: export_model(model, folder / name, fmt, class_names=EXPORT_CLASSES, top_k=3)
             for fmt, name in EXPORT_FILES.items() if importlib.util.find_spec(EXPORT_RUNTIMES[fmt]) is not None}
    keras.backend.clear_session()
    return paths


_AGNOSTIC_MARK = "pytestmark = pytest.mark.backend_agnostic"


def pytest_ignore_collect(collection_path, config):
    """On JAX and PyTorch (no TensorFlow installed) only the modules marked `backend_agnostic` are imported.

    A `-m` selection deselects tests only after their module is imported, and the other modules import
    TensorFlow (or keras_bit's TensorFlow-only parts) at the top.
    """
    if keras.backend.backend() == "tensorflow" or collection_path.suffix != ".py":
        return None
    if not collection_path.name.startswith("test_"):
        return None
    return _AGNOSTIC_MARK not in collection_path.read_text(encoding="utf-8") or None
