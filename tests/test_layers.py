"""The project's layers, read from its imports without running any module.

Every ``import`` and ``from ... import`` in the project's code (module level, inside functions, inside
``try``; not under ``if TYPE_CHECKING:``, which never runs) is resolved to the project module it loads.
From that graph:

* no import cycle among the project's modules;
* the layers point one way: ``data/`` imports nothing of ``models/``, ``eval_scripts/`` or the entry
  points; ``models/`` nothing of ``eval_scripts/`` or the entry points; ``eval_scripts/`` nothing of the
  entry points (``train.py``, ``demo.py``, ``benchmarks/``);
* nothing outside ``tests/`` imports ``tests/``;
* no ``from X import _private`` from a module of another package.

Imports made by name at run time (``importlib.import_module(spec.script)``) are not seen.
"""
from __future__ import annotations

import ast
import functools
import textwrap
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("data", "models", "eval_scripts", "benchmarks")  # folders of project code
SCRIPTS = ("train.py", "demo.py")  # entry points at the top
ENTRY_POINTS = ("train", "demo", "benchmarks")
# what each layer may not import (the layers above it)
FORBIDDEN = {"data": ("models", "eval_scripts", *ENTRY_POINTS),
             "models": ("eval_scripts", *ENTRY_POINTS),
             "eval_scripts": ENTRY_POINTS}
# private imports still present on this branch that another branch removes; each entry must still be
# there (the test says when one is gone, so that the allowance goes with it)
KNOWN_PRIVATE: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Import:
    importer: str  # module that imports
    target: str  # module it loads (dotted), inside or outside the project
    name: str | None  # the attribute taken by ``from target import name``; None for a module
    line: int


def module_names(root: Path, packages=PACKAGES, scripts=SCRIPTS) -> dict[str, Path]:
    """``{dotted module name: file}`` of the project's code under ``root``."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for script in scripts:
        if (root / script).is_file():
            found[Path(script).stem] = root / script
    return found


def _under_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every import node that can run: all of them but those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _under_type_checking(node):
            children = node.orelse
        stack.extend(children)


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """The imports of one file, each resolved to the module it loads.

    A script folder without ``__init__.py`` (``benchmarks/``) imports its siblings by bare name
    (``from bench_utils import ...``: the script's folder is ``sys.path[0]``); those resolve to the sibling.
    """
    is_package = path.name == "__init__.py"
    here = module.split(".") if is_package else module.split(".")[:-1]
    tops = {name.split(".")[0] for name in modules}

    def absolute(name: str) -> str:
        top = name.split(".")[0]
        if top not in tops and (path.parent / f"{top}.py").is_file() and here:
            return ".".join([*here, name])
        return name

    out = []
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [Import(module, absolute(alias.name), None, node.lineno) for alias in node.names]
            continue
        if node.level:
            base = here[:len(here) - (node.level - 1)] if node.level > 1 else here
            target = ".".join([*base, node.module] if node.module else base)
        else:
            target = absolute(node.module)
        for alias in node.names:
            sub = f"{target}.{alias.name}"
            if sub in modules:  # ``from pkg import module``
                out.append(Import(module, sub, None, node.lineno))
            else:
                out.append(Import(module, target, alias.name, node.lineno))
    return out


def project_module(name: str, modules: dict[str, Path]) -> str | None:
    """The project module that ``import name`` loads last (the longest prefix that is one), or None."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


@functools.cache
def all_imports(root: Path = REPO) -> tuple[dict[str, Path], list[Import]]:
    """The project's modules and every import they make (read once per test session)."""
    modules = module_names(root)
    return modules, [imp for name, path in modules.items() for imp in imports_of(name, path, modules)]


def import_graph(modules: dict[str, Path], imports: list[Import]) -> dict[str, set[str]]:
    graph = {name: set() for name in modules}
    for imp in imports:
        target = project_module(imp.target, modules)
        if target is not None and target != imp.importer:
            graph[imp.importer].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None when it has none (depth-first, in name order)."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path, on_path = [start], {start}
        pending = [iter(sorted(graph.get(start, ())))]
        while pending:
            nxt = next(pending[-1], None)
            if nxt is None:
                done.add(path[-1])
                on_path.discard(path.pop())
                pending.pop()
            elif nxt in on_path:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in done:
                path.append(nxt)
                on_path.add(nxt)
                pending.append(iter(sorted(graph.get(nxt, ()))))
    return None


def _layer(module: str) -> str:
    return module.split(".")[0]


def _package(module: str, modules: dict[str, Path]) -> str:
    return module if modules[module].name == "__init__.py" else module.rpartition(".")[0]


def _where(imp: Import, modules: dict[str, Path], root: Path) -> str:
    what = f"{imp.target}.{imp.name}" if imp.name else imp.target
    return f"{modules[imp.importer].relative_to(root).as_posix()}:{imp.line} imports {what}"


def upward_imports(modules: dict[str, Path], imports: list[Import], root: Path = REPO) -> list[str]:
    """Imports of a layer above the importer's (:data:`FORBIDDEN`)."""
    return [_where(imp, modules, root) for imp in imports
            if _layer(imp.target) in FORBIDDEN.get(_layer(imp.importer), ())]


def imports_of_tests(modules: dict[str, Path], imports: list[Import], root: Path = REPO) -> list[str]:
    return [_where(imp, modules, root) for imp in imports if _layer(imp.target) == "tests"]


def private_imports(modules: dict[str, Path], imports: list[Import], root: Path = REPO) -> dict[tuple[str, str], str]:
    """``{(importer, target.name): where}`` of each ``from target import _name`` from another package."""
    found = {}
    for imp in imports:
        if (imp.name and imp.name.startswith("_") and not imp.name.startswith("__")
                and project_module(imp.target, modules) == imp.target
                and _package(imp.target, modules) != _package(imp.importer, modules)):
            found[(imp.importer, f"{imp.target}.{imp.name}")] = _where(imp, modules, root)
    return found


# ------------------------------------------------------------------------------------------- the project
def test_no_import_cycle():
    modules, imports = all_imports()
    assert len(modules) > 40 and "models.fusion.causal" in modules and "train" in modules
    cycle = find_cycle(import_graph(modules, imports))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layers_point_one_way():
    assert upward_imports(*all_imports()) == []


def test_nothing_outside_tests_imports_tests():
    assert imports_of_tests(*all_imports()) == []


def test_no_private_import_across_packages():
    private = private_imports(*all_imports())
    assert sorted(private[k] for k in set(private) - KNOWN_PRIVATE) == []
    assert KNOWN_PRIVATE <= set(private), f"fixed, drop from KNOWN_PRIVATE: {sorted(KNOWN_PRIVATE - set(private))}"


# ------------------------------------------------------------------------------------------- the walker
def test_find_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"z"}, "z": {"y"}}) == ["y", "z", "y"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({}) is None


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))


def test_walker_finds_each_kind_of_leak(tmp_path):
    """A tiny tree with one of each: the cycle this project once had (a base module that builds its
    subclass inside a function), an upward import, an import of tests/, a private name across packages."""
    _write(tmp_path, {
        "models/__init__.py": "",
        "models/fusion/__init__.py": "",
        "models/fusion/base.py": """
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                from models.fusion.typing_only import T
            def build(kind):
                from .sub import Sub
                return Sub()
            """,
        "models/fusion/sub.py": "from models.fusion.base import build as _b\nfrom . import helpers\n",
        "models/fusion/helpers.py": "import models.fusion.leaf\n",
        "models/fusion/leaf.py": "",
        "models/fusion/typing_only.py": "import models.fusion.base\n",
        "benchmarks/run.py": "from bench_utils import x\nfrom tests.zoo import y\n",
        "benchmarks/bench_utils.py": "from data.captions import _Strings\n",
        "data/__init__.py": "",
        "data/captions.py": "from models.fusion import base\n",
    })
    modules, imports = all_imports(tmp_path)
    graph = import_graph(modules, imports)
    assert graph["models.fusion.base"] == {"models.fusion.sub"}  # not typing_only: TYPE_CHECKING never runs
    assert graph["models.fusion.sub"] == {"models.fusion.base", "models.fusion.helpers"}
    assert graph["models.fusion.helpers"] == {"models.fusion.leaf"}
    assert graph["benchmarks.run"] == {"benchmarks.bench_utils"}
    assert graph["data.captions"] == {"models.fusion.base"}
    assert find_cycle(graph) == ["models.fusion.base", "models.fusion.sub", "models.fusion.base"]
    assert upward_imports(modules, imports, tmp_path) == ["data/captions.py:1 imports models.fusion.base"]
    assert imports_of_tests(modules, imports, tmp_path) == ["benchmarks/run.py:2 imports tests.zoo.y"]
    # ``_b`` is an alias of a public name; ``_Strings`` is private and comes from another package
    assert private_imports(modules, imports, tmp_path) == {
        ("benchmarks.bench_utils", "data.captions._Strings"): "benchmarks/bench_utils.py:1 imports data.captions._Strings"}
