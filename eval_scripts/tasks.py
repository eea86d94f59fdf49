"""The benchmarks as the suite and the report see them: the script that runs each one, the name of
its result files, the metric the paper reports for it, and the paper's group it counts in.

Metrics (percentages), and why:

* ImageNetVC (group **VC**): accuracy, the mean over the 5 prompt templates of the macro average
  over the subsets run (``metrics.overall.mean``), as the paper reports ImageNetVC;
* commonsense sets (group **CR**): accuracy (``acc``): the released protocol's perplexity choice,
  or the harness protocol's log-likelihood choice with ``--protocol harness``;
* BoolQ: accuracy; SQuAD 2.0: exact match; QuAC: F1 (group **RC**). A group value is the plain
  mean of its tasks' values; reading-comprehension groups in this line of work (LLaMA's) average
  SQuAD exact match, QuAC F1 and BoolQ accuracy, and we follow that;
* object commonsense (the paper's Table 1, no group): accuracy per set, the mean over its templates.

The text-only view of an image run (:func:`text_only_view`) re-scores its samples with their
``text_only_prediction`` through the script's own metric function.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from data.benchmarks import COMMONSENSE_TESTSETS

GROUPS = {"VC": "visual commonsense", "CR": "commonsense reasoning", "RC": "reading comprehension"}


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark of the suite."""

    name: str                   # the suite's name for it (``--tasks``)
    script: str                 # the eval script's module
    argv: tuple = ()            # flags that select it within its script
    group: str | None = None    # VC / CR / RC, or None
    folders: tuple = ()         # its folder names under a ``--data_root`` (else the script's default data)

    @property
    def module(self):
        return importlib.import_module(self.script)

    def result_name(self, args) -> str:
        """The name of its result files (``<name>.json``) for parsed ``args``."""
        module = self.module
        return module.task_name(args) if hasattr(module, "task_name") else module.TASK


_CR_FOLDERS = {"piqa": ("piqa",), "siqa": ("siqa", "socialiqa"), "arc": ("arc",), "arc_easy": ("arc",),
               "arc_challenge": ("arc",), "obqa": ("obqa", "openbookqa"), "cqa": ("commonsenseqa", "cqa"),
               "hs": ("hellaswag", "hs"), "winogrande": ("winogrande",)}

TASKS: dict[str, TaskSpec] = {
    "imagenetvc": TaskSpec("imagenetvc", "eval_scripts.imagenetVC", group="VC", folders=("imagenetvc",)),
    "object_commonsense": TaskSpec("object_commonsense", "eval_scripts.object_commonsense",
                                   folders=("object_commonsense", "valm")),
    **{name: TaskSpec(name, "eval_scripts.commonsenseQA", ("--testset", name), "CR", _CR_FOLDERS[name])
       for name in COMMONSENSE_TESTSETS},
    "boolq": TaskSpec("boolq", "eval_scripts.boolq", group="RC", folders=("boolq",)),
    "squad": TaskSpec("squad", "eval_scripts.squad", group="RC", folders=("squad_v2", "squad")),
    "quac": TaskSpec("quac", "eval_scripts.quac", group="RC", folders=("quac",)),
}
DEFAULT_SUITE = ("imagenetvc", "object_commonsense", "piqa", "siqa", "arc_easy", "obqa", "boolq", "squad", "quac")


def family(result_task: str) -> str | None:
    """The script family of a result file's ``task`` name: imagenetvc, object_commonsense,
    commonsense, boolq, squad or quac (None for a name no script writes)."""
    for prefix in ("imagenetvc", "object_commonsense", "commonsense", "boolq", "squad", "quac"):
        if result_task == prefix or result_task.startswith(prefix + "_"):
            return prefix
    return None


# ---------------------------------------------------------------------------------------------- metrics
HEADLINE = {"imagenetvc": "acc", "object_commonsense": "acc", "commonsense": "acc", "boolq": "acc",
            "squad": "exact_match", "quac": "f1"}


def headline(result_task: str, metrics: dict) -> tuple[str, float | None]:
    """``(metric name, value)``: the number the paper reports for this task (see the module
    docstring); object commonsense gives the mean over its sets. Other tasks: ``acc``, ``f1`` or
    ``exact_match``, whichever the metrics hold first."""
    fam = family(result_task)
    if fam == "imagenetvc":
        return "acc", metrics.get("overall", {}).get("mean")
    if fam == "object_commonsense":
        sets = subset_values(result_task, metrics)
        return "acc", (sum(sets.values()) / len(sets)) if sets else None
    name = HEADLINE.get(fam)
    if name is None:
        name = next((k for k in ("acc", "f1", "exact_match") if isinstance(metrics.get(k), (int, float))), None)
    return name or "-", metrics.get(name) if name else None


def subset_values(result_task: str, metrics: dict) -> dict[str, float]:
    """The headline metric per subset (ImageNetVC subsets, object-commonsense sets, SQuAD's
    answerable/unanswerable questions), for the per-subset chart; {} when there are none."""
    fam = family(result_task)
    if fam in ("imagenetvc", "object_commonsense"):
        return {k: v["mean"] for k, v in metrics.items() if k != "overall" and isinstance(v, dict) and "mean" in v}
    if fam == "squad":
        return {k: metrics[k]["exact_match"] for k in ("answerable", "unanswerable")
                if isinstance(metrics.get(k), dict)}
    return {}


def text_only_view(record: dict) -> dict | None:
    """A sample record as the text-only prediction would have made it (``prediction`` and
    ``correct`` replaced), or None when the record holds no text-only prediction."""
    if "text_only_prediction" not in record:
        return None
    view = {**record, "prediction": record["text_only_prediction"], "scores": record.get("text_only_scores"),
            "correct": record["text_only_prediction"] == record["answer"]}
    if "text_only_prediction_norm" in record:
        view.update(prediction_norm=record["text_only_prediction_norm"],
                    correct_norm=record["text_only_prediction_norm"] == record["answer"])
    return view


def metrics_from_samples(result_task: str, config: dict, records: list[dict]) -> dict | None:
    """A task's metrics recomputed from sample records by its script's own metric function (used
    on the text-only view of an image run); None for tasks without one (generation tasks)."""
    fam = family(result_task)
    if not records:
        return None
    if fam == "imagenetvc":
        from eval_scripts.imagenetVC import metrics_from
        return metrics_from(_by(records, "subset"))
    if fam == "object_commonsense":
        from eval_scripts.object_commonsense import set_metrics
        return {s: set_metrics(s, rows, None) for s, rows in _by(records, "set").items()}
    if fam == "commonsense":
        from eval_scripts.commonsenseQA import metrics_from
        return metrics_from(records, records[0].get("protocol", config.get("protocol", "released")))
    if fam == "boolq":
        from eval_scripts.boolq import metrics_from
        return metrics_from(records)
    return None


def _by(records: list[dict], key: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r[key], []).append(r)
    return out
