"""The package's dependency rules, read from the source (every import, also inside functions).

The runtime test that blocks TensorFlow only sees imports that run; an import inside a rarely
used function (a TensorRT device check, bench's Keras backend) would slip past it. These tests
read every ``import`` statement of the package with :mod:`ast` instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "transfer"

#: packages that must stay installable and importable without TensorFlow, and what they may not import
LOWER = ("data", "runtime", "serve")
FORBIDDEN = ("transfer.trainer", "transfer.analysis", "transfer.export", "transfer.models",
             "tensorflow", "keras", "tf2onnx", "tf_keras")


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


#: parsed files: the checks below follow the same modules from many starting points (a file's
#: text does not change while the tests run)
_TREES: dict[Path, ast.AST] = {}


def _tree(path: Path) -> ast.AST:
    if path not in _TREES:
        _TREES[path] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return _TREES[path]


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in a file; ``from X import y`` gives X.y when
    X.y is a module of the package, else X."""
    tree = _tree(path)
    me = _module_name(path)
    base_parts = me.split(".") if _is_package(path) else me.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base_parts[: len(base_parts) - (node.level - 1)]
                mod = ".".join(parts + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.append((node.lineno, sub if _exists(sub) else mod))
    return out


def _exists(module: str) -> bool:
    if not module.startswith("transfer."):
        return False
    p = SRC.parent.joinpath(*module.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _files():
    return sorted(SRC.rglob("*.py"))


def test_the_reader_sees_imports_inside_functions(tmp_path):
    """The checker itself: a function-level import of TensorFlow in a runtime-like file is found."""
    f = SRC / "runtime" / "trt_runner.py"
    found = {m for _, m in imports_of(f)}
    assert "transfer.runtime.devices" in found  # imported inside TrtRunner.__init__
    assert "transfer.bundle" in found


@pytest.mark.parametrize("package", LOWER)
def test_lower_packages_import_nothing_above_them(package):
    folder = SRC / package
    if not folder.is_dir():
        pytest.skip(f"transfer.{package} is not in this build")
    bad = []
    for f in sorted(folder.rglob("*.py")):
        for line, mod in imports_of(f):
            if any(mod == x or mod.startswith(x + ".") for x in FORBIDDEN):
                bad.append(f"{f.relative_to(SRC.parent)}:{line} imports {mod}")
    assert not bad, "transfer." + package + " must not import " + ", ".join(FORBIDDEN) + ":\n" + "\n".join(bad)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for f in _files():
        me = _module_name(f)
        graph.setdefault(me, set())
        for _, mod in imports_of(f):
            if mod.startswith("transfer") and mod != me and _exists(mod) or mod == "transfer":
                graph[me].add(mod)
    cycles = _strongly_connected(graph)
    assert not cycles, "modules that import each other (directly or in a circle): " + "; ".join(
        " -> ".join(sorted(c)) for c in cycles)


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm; returns the components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def package_of(module: str) -> str:
    """The package a module belongs to: ``transfer.export.api`` -> ``transfer.export``; a module at
    the top of the package (``transfer.bundle``) is its own unit."""
    parts = module.split(".")
    return ".".join(parts[:2])


def package_graph() -> dict[str, set[str]]:
    """Which package imports which (every import, also inside functions)."""
    graph: dict[str, set[str]] = {}
    for f in _files():
        me = package_of(_module_name(f))
        graph.setdefault(me, set())
        for _, mod in imports_of(f):
            if mod.startswith("transfer.") and _exists(mod) and package_of(mod) != me:
                graph[me].add(package_of(mod))
    return graph


def test_no_package_cycles():
    """No two packages (or top-level modules) import each other, directly or in a circle: each
    package sits below the ones that use it (``classical_heads`` below ``analysis`` and ``export``)."""
    graph = package_graph()
    cycles = _strongly_connected(graph)
    detail = []
    for c in cycles:
        for a in sorted(c):
            detail += [f"{a} -> {b}" for b in sorted(graph[a] & c)]
    assert not cycles, "packages that import each other: " + "; ".join(detail)


def test_the_package_graph_sees_export_above_analysis():
    """The checker itself: export uses analysis (to fit a missing head), so analysis must not use export."""
    graph = package_graph()
    assert "transfer.analysis" in graph["transfer.export"]
    assert "transfer.classical_heads" in graph["transfer.analysis"]


def test_module_names_are_used_once():
    """A module's file name says which module it is: no two modules share a basename (``__init__``
    aside), so ``heads`` or ``options`` in a traceback or a review means one file."""
    seen: dict[str, list[str]] = {}
    for f in _files():
        if f.name != "__init__.py":
            seen.setdefault(f.stem, []).append(str(f.relative_to(SRC.parent)))
    twice = {k: v for k, v in seen.items() if len(v) > 1}
    assert not twice, "module names used more than once: " + "; ".join(
        f"{k}: {', '.join(v)}" for k, v in sorted(twice.items()))


def test_cycle_finder_finds_a_cycle():
    assert _strongly_connected({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [{"a", "b"}]


# -- imports at the top of files; packages importable without TensorFlow -----------------------

#: packages every module of which imports without TensorFlow (it is imported inside functions):
#: a Ray driver or ``transfer train --help`` does not load it
TF_FREE_AT_IMPORT = ("trainer",)
_HEAVY_CALLS = ("import_tensorflow", "import_keras")


def _outside_functions(tree: ast.AST):
    """The nodes of ``tree`` that run when the module is imported (not inside a function body)."""
    stack = list(ast.iter_child_nodes(tree))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack += node.decorator_list if not isinstance(node, ast.Lambda) else []
            continue
        yield node
        stack += list(ast.iter_child_nodes(node))


def module_level_imports(path: Path) -> set[str]:
    """The modules a file imports when it is imported (as :func:`imports_of` names them)."""
    tree = _tree(path)
    lines = {n.lineno for n in _outside_functions(tree) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return {mod for line, mod in imports_of(path) if line in lines}


def _calls_at_import(path: Path) -> list[str]:
    tree = _tree(path)
    return [n.func.id if isinstance(n.func, ast.Name) else n.func.attr for n in _outside_functions(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, (ast.Name, ast.Attribute))
            and (n.func.id if isinstance(n.func, ast.Name) else n.func.attr) in _HEAVY_CALLS]


def _path_of(module: str) -> Path | None:
    p = SRC.parent.joinpath(*module.split("."))
    return p.with_suffix(".py") if p.with_suffix(".py").is_file() else (p / "__init__.py" if p.is_dir() else None)


#: heavy optional libraries: a module that imports one of them when it is imported may itself be
#: imported inside a function (TensorFlow, TensorRT, Ray, the HTTP stack of ``serve``)
HEAVY = ("tensorflow", "keras", "tf_keras", "tf2onnx", "tensorrt", "ray", "fastapi", "uvicorn", "starlette")
#: the command line imports a command's library only when the command runs (``transfer --help`` and
#: ``transfer infer`` stay fast and TensorFlow-free), so its imports of the library are inside functions
LAZY_BY_DESIGN = ("transfer.cli", "transfer.commands")


def heavy_at_import(module: str, _seen: set | None = None) -> set[str]:
    """The heavy libraries importing ``module`` loads (following the package's module-level imports)."""
    seen = _seen if _seen is not None else set()
    if module in seen:
        return set()
    seen.add(module)
    path = _path_of(module)
    if path is None:
        return set()
    out = {"tensorflow"} if _calls_at_import(path) else set()
    parts = module.split(".")
    for i in range(2, len(parts)):  # the packages above it run their __init__ first
        out |= heavy_at_import(".".join(parts[:i]), seen)
    for dep in module_level_imports(path):
        if dep.startswith("transfer"):
            out |= heavy_at_import(dep, seen)
        elif dep.split(".")[0] in HEAVY:
            out.add(dep.split(".")[0])
    return out


def test_package_imports_are_at_the_top():
    """A file's header tells what it depends on: the package's own modules are imported at the top,
    except a module that loads a heavy optional library (imported where it is used) and the CLI."""
    bad = []
    for f in _files():
        me = _module_name(f)
        if any(me == x or me.startswith(x + ".") for x in LAZY_BY_DESIGN):
            continue
        top = module_level_imports(f)
        for line, mod in imports_of(f):
            if mod.startswith("transfer") and mod not in top and not heavy_at_import(mod):
                bad.append(f"{f.relative_to(SRC.parent)}:{line} imports {mod} inside a function")
    assert not bad, "import the package's own modules at the top of the file:\n" + "\n".join(bad)


def test_the_top_import_check_allows_a_lazy_keras_module():
    """The checker itself: models/layers.py imports Keras when imported, so it may be imported late."""
    assert heavy_at_import("transfer.models.layers") == {"tensorflow"}
    assert {"fastapi"} <= heavy_at_import("transfer.serve.app")
    assert not heavy_at_import("transfer.bundle")


@pytest.mark.parametrize("package", TF_FREE_AT_IMPORT)
def test_package_imports_without_tensorflow(package):
    """Follows every import that runs at import time, through the package: none reaches TensorFlow."""
    bad = []
    for f in sorted((SRC / package).rglob("*.py")):
        seen, todo = set(), [(_module_name(f), [])]
        while todo:
            mod, via = todo.pop()
            if mod in seen:
                continue
            seen.add(mod)
            path = _path_of(mod)
            if path is None:
                continue
            chain = via + [mod]
            for call in _calls_at_import(path):
                bad.append(f"{' -> '.join(chain)} calls {call}() at import")
            for dep in module_level_imports(path):
                if dep.split(".")[0] in ("tensorflow", "keras", "tf_keras", "tf2onnx"):
                    bad.append(f"{' -> '.join(chain)} imports {dep}")
                elif dep.startswith("transfer"):
                    todo.append((dep, chain))
    assert not bad, "imported when the module is imported:\n" + "\n".join(sorted(set(bad)))


def test_the_import_time_reader_sees_a_module_level_tensorflow_call(tmp_path):
    """The checker itself: a module-level ``import_keras()`` is found, one inside a function is not."""
    f = tmp_path / "m.py"
    f.write_text("from transfer._lazy import import_keras\nkeras = import_keras()\n"
                 "def later():\n    return import_keras()\n")
    assert _calls_at_import(f) == ["import_keras"]
