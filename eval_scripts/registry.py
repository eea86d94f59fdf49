"""The benchmarks the suite and the report know: every :class:`~eval_scripts.benchmark.Benchmark`
declared by a module of the ``eval_scripts`` package, found by scanning the package (no list kept
here), and what a result file's task name says through them.

Discovery reads each module's source first and imports only those that assign ``BENCHMARKS`` at
top level, so the modules that load torch at import (the harness adapter, the runtime) are never
imported by it. The declarations are then checked: unique names, unique result families, a known
group, a headline metric. A result file's ``task`` (``commonsense_piqa_harness``, ``boolq``,
``squad_v1.1``) belongs to the declaration whose ``results`` family is its longest prefix.

Metrics (percentages), as the declarations say and the paper reports them:

* ImageNetVC (group **VC**): accuracy, the mean over the 5 prompt templates of the macro average
  over the subsets run (``metrics.overall.mean``);
* commonsense sets (group **CR**): accuracy (``acc``): the released protocol's perplexity choice,
  or the harness protocol's log-likelihood choice with ``--protocol harness``;
* BoolQ: accuracy; SQuAD 2.0: exact match; QuAC: F1 (group **RC**). A group value is the plain
  mean of its tasks' values; reading-comprehension groups in this line of work (LLaMA's) average
  SQuAD exact match, QuAC F1 and BoolQ accuracy, and we follow that;
* object commonsense (the paper's Table 1, no group): accuracy per set, the mean over its templates.
"""
from __future__ import annotations

import ast
import importlib
import pkgutil
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from eval_scripts.benchmark import GROUPS, Benchmark

PACKAGE = "eval_scripts"
DECLARATION = "BENCHMARKS"


class DeclarationError(Exception):
    """A benchmark declaration the registry cannot use (a mistake in the code, not in the input)."""


def _assigns_declaration(path: Path) -> bool:
    """Whether a module's source assigns ``BENCHMARKS`` at top level (read, not imported)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return False
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == DECLARATION for t in targets):
            return True
    return False


def declaring_modules(package: str = PACKAGE) -> list[str]:
    """The modules of ``package`` (every folder of its ``__path__``) that declare benchmarks, by name."""
    pkg = importlib.import_module(package)
    found = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        path = Path(info.module_finder.path) / f"{info.name}.py"
        if not info.ispkg and _assigns_declaration(path):
            found.append(f"{package}.{info.name}")
    return found


def discover(modules: Iterable[str]) -> dict[str, Benchmark]:
    """``{name: Benchmark}`` of the declarations of ``modules`` (imported), in their order, checked."""
    out: dict[str, Benchmark] = {}
    for name in modules:
        declared = getattr(importlib.import_module(name), DECLARATION, None)
        if not isinstance(declared, tuple) or not declared:
            raise DeclarationError(f"{name}.{DECLARATION} must be a non-empty tuple of Benchmark")
        for b in declared:
            if not isinstance(b, Benchmark):
                raise DeclarationError(f"{name}.{DECLARATION} holds {b!r}, not a Benchmark")
            if b.name in out:
                raise DeclarationError(f"benchmark {b.name!r} is declared by both {out[b.name].script} and {name}")
            out[b.name] = replace(b, script=name)
    check(out.values())
    return out


def check(benchmarks: Iterable[Benchmark]) -> None:
    """Raise :class:`DeclarationError` unless every declaration is usable (see the module docstring)."""
    families: dict[str, str] = {}
    for b in benchmarks:
        where = f"benchmark {b.name!r} ({b.script})"
        if not b.name or not b.results or not b.metric:
            raise DeclarationError(f"{where}: a name, a result family (results=) and a headline metric are required")
        if b.results in families:
            raise DeclarationError(f"{where}: result family {b.results!r} is also {families[b.results]!r}'s")
        families[b.results] = b.name
        if b.group is not None and b.group not in GROUPS:
            raise DeclarationError(f"{where}: unknown group {b.group!r}; choose one of {', '.join(GROUPS)} or None")
        if not all(isinstance(x, tuple) and all(isinstance(s, str) for s in x) for x in (b.argv, b.folders)):
            raise DeclarationError(f"{where}: argv and folders are tuples of strings")


@lru_cache(maxsize=1)
def benchmarks() -> dict[str, Benchmark]:
    """Every benchmark the eval scripts declare, by suite name."""
    return discover(declaring_modules())


def names() -> tuple[str, ...]:
    return tuple(benchmarks())


def for_result(result_task: str) -> Benchmark | None:
    """The declaration a result file's ``task`` name belongs to (its longest result family), or None."""
    matches = [b for b in benchmarks().values() if b.writes(result_task)]
    return max(matches, key=lambda b: len(b.results)) if matches else None


def headline(result_task: str, metrics: dict) -> tuple[str, float | None]:
    """``(metric name, value)``: the number the paper reports for a result; for a task no script
    declares, ``acc``, ``f1`` or ``exact_match``, whichever the metrics hold first."""
    b = for_result(result_task)
    if b is not None:
        return b.headline(metrics)
    name = next((k for k in ("acc", "f1", "exact_match") if isinstance(metrics.get(k), (int, float))), None)
    return (name, metrics[name]) if name else ("-", None)


def subset_values(result_task: str, metrics: dict) -> dict[str, float]:
    """The headline metric per subset, for the per-subset chart; {} when there are none."""
    b = for_result(result_task)
    return b.subset_values(metrics) if b is not None else {}


def metrics_from_samples(result_task: str, config: dict, records: list[dict]) -> dict | None:
    """A result's metrics recomputed from sample records by its script's own metric function;
    None for tasks without one (generation tasks) or without records."""
    b = for_result(result_task)
    return b.metrics_from_samples(config, records) if b is not None else None
