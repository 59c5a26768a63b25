"""The README's presets table is the registry's, so the documentation cannot drift from the data."""

import pathlib

import pytest

from keras_bit import presets

pytestmark = pytest.mark.backend_agnostic  # .ci/backend runs these on JAX and PyTorch


def test_readme_presets_table_is_generated_from_the_registry():
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    assert presets.markdown_table() in readme, "regenerate the README table with keras_bit.presets.markdown_table()"
