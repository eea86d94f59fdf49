"""What a benchmark is to the suite and the report: a :class:`Benchmark` declaration.

Each eval script declares the benchmarks it runs at module level, next to its code, as
``BENCHMARKS = (Benchmark(...), ...)`` (``commonsenseQA.py`` declares one per test set);
:mod:`eval_scripts.registry` finds them by scanning the package, so adding a benchmark is adding
one script, with no list to edit elsewhere. A script that declares benchmarks provides
``OPTIONS`` (its option declarations, :mod:`models.options`), optionally ``resolve(args) -> args`` (settings
that depend on others, e.g. its default data folder) and ``evaluate(args, runtime=None)``: the suite
parses each task's flags with its ``OPTIONS`` and ``resolve``, and calls ``evaluate``.

The declaration says how the script is selected (``argv``), where its data is under a
``--data_root`` (``folders``), the name of its result files (``results``, ``task_name``), the
metric the paper reports for it (``metric``, ``headline_value``) and the paper's group it counts
in, its per-subset values for the report's charts (``subsets``), and how its metrics are
recomputed from sample records (``from_samples``, used on the text-only view of an image run).
Its functions read plain dicts, so a declaration imports no torch (``--help`` stays light).

Adding a benchmark: write ``eval_scripts/<name>.py`` with the names above, its metric
function, a ``task_name(args)`` when its result name depends on flags, a ``__main__`` block, and
``BENCHMARKS`` after the metric code. The suite's ``--tasks``, its summary and the report then know
it; a script also provides ``load_data(args)`` (the data ``evaluate(args, runtime, data)`` scores: the
suite reads every task's data before its first task runs); ``tests/test_registry.py`` checks the declaration and ``tests/test_imports.py`` its ``--help``.
"""
from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from typing import Callable

# the paper's groups of benchmarks (Table 4); a group's value is the plain mean of its benchmarks' headlines
GROUPS = {"VC": "visual commonsense", "CR": "commonsense reasoning", "RC": "reading comprehension"}


@dataclass(frozen=True)
class Benchmark:
    """One benchmark of the suite, declared by the eval script that runs it."""

    name: str                    # the suite's name for it (``--tasks``)
    results: str                 # its result files' family: ``<results>.json`` or ``<results>_<...>.json``
    metric: str                  # the name of the metric the paper reports
    group: str | None = None     # a key of GROUPS, or None (counted in no group)
    argv: tuple[str, ...] = ()   # flags that select it within its script
    folders: tuple[str, ...] = ()  # its folder names under a ``--data_root`` (else the script's default data)
    # the result file name for parsed args; None: always ``results``
    task_name: Callable[[argparse.Namespace], str] | None = None
    # the headline value from a result's metrics; None: ``metrics[metric]``
    headline_value: Callable[[dict], float | None] | None = None
    # the headline metric per subset, for per-subset charts; None: no subsets
    subsets: Callable[[dict], dict[str, float]] | None = None
    # metrics recomputed from sample records (``(config, records) -> metrics``); None: not recomputable
    from_samples: Callable[[dict, list[dict]], dict] | None = None
    # the table of data/paper_numbers.json that holds its published numbers per subset, if any
    paper_table: str | None = None
    # whether its script also runs a masked LM (fill-mask); False: it needs a causal LM (the suite checks first)
    masked_lm: bool = False
    script: str = ""             # the module that declares it (filled in by the registry)

    @property
    def module(self):
        """The eval script's module (``make_parser``, ``check_args``, ``evaluate``)."""
        return importlib.import_module(self.script)

    def result_name(self, args: argparse.Namespace) -> str:
        """The name of its result files (``<name>.json``) for parsed ``args``."""
        return self.task_name(args) if self.task_name is not None else self.results

    def writes(self, result_task: str) -> bool:
        """Whether a result file's ``task`` name is of this benchmark's family."""
        return result_task == self.results or result_task.startswith(self.results + "_")

    def headline(self, metrics: dict) -> tuple[str, float | None]:
        """``(metric name, value)``: the number the paper reports, from a result's metrics."""
        if self.headline_value is not None:
            return self.metric, self.headline_value(metrics)
        return self.metric, metrics.get(self.metric)

    def subset_values(self, metrics: dict) -> dict[str, float]:
        return self.subsets(metrics) if self.subsets is not None else {}

    def metrics_from_samples(self, config: dict, records: list[dict]) -> dict | None:
        if self.from_samples is None or not records:
            return None
        return self.from_samples(config, records)


def template_means(metrics: dict) -> dict[str, float]:
    """The ``mean`` of every subset of a per-template table (ImageNetVC, object commonsense), leaving
    out ``overall``."""
    return {k: v["mean"] for k, v in metrics.items() if k != "overall" and isinstance(v, dict) and "mean" in v}


def records_by(records: list[dict], key: str) -> dict[str, list[dict]]:
    """Sample records grouped by one of their fields, in first-seen order."""
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r[key], []).append(r)
    return out
