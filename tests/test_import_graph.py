"""The import graph of the ``mixkv`` package: no cycle anywhere (every import counts, module
level or inside a function), and no module imports another module's private names.

A submodule importing one of its own ancestor packages is not an edge (Python initialises the
parents first; the package's ``__init__`` importing its children is the usual layout)."""

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mixkv"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: Set[str]):
    """(imported modules of the package, [(module, private name)] imported from another
    module)."""
    top = name.split(".")[0]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    targets, private = set(), []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names if a.name.split(".")[0] == top)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != top:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                targets.add(sub if sub in modules else target)
                if sub not in modules and alias.name.startswith("_") and target != name:
                    private.append((target, alias.name))
    return targets, private


def import_graph(root: Path = PACKAGE):
    paths = {_module_name(p, root): p for p in root.rglob("*.py")}
    edges: Dict[str, Set[str]] = {}
    private = {}
    for name, path in paths.items():
        targets, private[name] = _imports(path, name, set(paths))
        edges[name] = {t for t in targets
                       if t in paths and t != name and not name.startswith(t + ".")}
    return edges, private


def cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def test_no_import_cycle_in_mixkv():
    edges, _ = import_graph()
    assert "mixkv.hf.model" in edges and edges["mixkv.hf.patch"]   # the graph was read
    found = cycles(edges)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_module_imports_another_modules_private_names():
    _, private = import_graph()
    offenders = [f"{module} imports {name} from {source}"
                 for module, names in private.items() for source, name in names]
    assert not offenders, "\n".join(offenders)


def test_hf_model_imports_nothing_else_from_the_shim():
    edges, _ = import_graph()
    assert not {t for t in edges["mixkv.hf.model"] if t.startswith("mixkv.hf")}


@pytest.mark.parametrize("source, expected", [
    ({"a/__init__.py": "", "a/x.py": "from . import y\n", "a/y.py": "def f():\n    from .x import g\n"},
     [["a.x", "a.y", "a.x"]]),
    ({"a/__init__.py": "from . import x\n", "a/x.py": "import a\nfrom .y import h\n", "a/y.py": ""},
     []),
])
def test_the_check_finds_a_cycle_through_a_function_level_import(tmp_path, source, expected):
    for rel, text in source.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    edges, _ = import_graph(tmp_path / "a")
    assert cycles(edges) == expected


def _private_attributes(path: Path):
    """(private names a module defines: functions, classes, assigned names and attributes;
    [(line, expression)] of its private attribute reads on anything but self / cls)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    defined, used = set(), []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            defined.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and \
                not node.attr.startswith("__") and \
                not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            used.append((node.lineno, node.attr, ast.unparse(node)))
    return defined, used


def private_calls(root: Path = PACKAGE) -> List[str]:
    """Private attributes one module of the package reads that another module defines (and it
    does not): one module reaching into another's internals. Other libraries' private names
    (``sys._getframe``) are not the package's business here."""
    modules = {_module_name(p, root): _private_attributes(p) for p in root.rglob("*.py")}
    found = []
    for name, (defined, used) in sorted(modules.items()):
        for line, attr, expression in used:
            owners = [other for other, (theirs, _) in modules.items()
                      if other != name and attr in theirs]
            if attr not in defined and owners:
                found.append(f"{name}:{line} reads {expression} ({attr} is defined in "
                             f"{', '.join(sorted(owners))})")
    return found


def test_no_module_reads_another_modules_private_attributes():
    found = private_calls()
    assert not found, "\n".join(found)


def test_the_check_finds_a_private_call_into_another_module(tmp_path):
    package = tmp_path / "a"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "x.py").write_text("class Layer:\n    def _rows(self):\n        return 1\n")
    (package / "y.py").write_text("import sys\n\ndef f(layer):\n"
                                  "    return layer._rows(), sys._getframe(0)\n")
    assert private_calls(package) == ["a.y:4 reads layer._rows (_rows is defined in a.x)"]
