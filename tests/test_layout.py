"""The package's shape stays readable: small modules in train/, short functions everywhere (STYLE.md habit 9)."""

import ast
import pathlib

import pytest

import keras_bit

PACKAGE_ROOT = pathlib.Path(keras_bit.__file__).parent
MAX_TRAIN_MODULE_LINES = 410
MAX_FUNCTION_CODE_LINES = 60


def code_lines(function, lines):
    """Lines of code in `function`'s body: no docstring, blank lines or comment-only lines."""
    body = function.body
    first = body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        start = first.end_lineno + 1
    else:
        start = first.lineno
    return sum(1 for text in lines[start - 1:function.end_lineno] if text.strip() and not text.strip().startswith("#"))


def test_code_lines_counts_code_only():
    source = 'def f():\n    """Doc.\n\n    More."""\n    # why\n    x = 1\n\n    return x\n'
    function = ast.parse(source).body[0]
    assert code_lines(function, source.splitlines()) == 2


@pytest.mark.parametrize("path", sorted(PACKAGE_ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE_ROOT)))
def test_functions_are_short(path):
    source = path.read_text()
    lines = source.splitlines()
    long = [(node.name, code_lines(node, lines)) for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and code_lines(node, lines) > MAX_FUNCTION_CODE_LINES]
    assert not long, f"{path}: functions over {MAX_FUNCTION_CODE_LINES} lines of code: {long}"


def test_train_modules_are_small():
    sizes = {str(p.relative_to(PACKAGE_ROOT)): len(p.read_text().splitlines())
             for p in (PACKAGE_ROOT / "train").rglob("*.py")}
    assert sizes and not {p: n for p, n in sizes.items() if n > MAX_TRAIN_MODULE_LINES}
