"""No import circle among keras_bit's modules: the graph of every import statement, function-level ones included."""

import ast
import pathlib

import keras_bit

PACKAGE_ROOT = pathlib.Path(keras_bit.__file__).parent


def _modules():
    """Module name -> source path, for every .py file under keras_bit/."""
    modules = {}
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _known(name, modules):
    """The longest prefix of dotted `name` that is a keras_bit module, or None."""
    parts = name.split(".")
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts) or None


def _imports(name, path, modules):
    """The keras_bit modules `name` imports: `import`, `from ... import` (relative too, at any depth) and
    `importlib.import_module("literal")`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(_known(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from pkg import submodule` depends on the submodule, not on pkg
                found.add(_known(f"{base}.{alias.name}", modules) or _known(base, modules))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            found.add(_known(node.args[0].value, modules))
    found.discard(None)
    found.discard(name)
    return found


def import_graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def find_cycle(graph):
    """One import circle as a list `[a, b, ..., a]`, or None (iterative depth-first search)."""
    state = {}  # name -> "open" while on the current path, "done" once every path from it is explored
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = "open"
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = "done"
                stack.pop()
            elif state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = "open"
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_cycle_finder_finds_a_cycle():
    """Negative control: a deliberate circle is found and named, a diamond is not a circle."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None


def test_the_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    # keras_bit.train.sources.load imports the tfds source inside a function, only when a tfds name is given.
    assert "keras_bit.train.sources.tfds" in graph["keras_bit.train.sources.load"]
    assert "keras_bit.train.sources.base" in graph["keras_bit.train.pipeline"]
    assert len(graph) > 30


def test_no_import_cycle_among_keras_bit_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "Import circle among keras_bit modules: " + " -> ".join(cycle)
