"""Reading what the eval scripts wrote, for reports: the task runs of a run directory, which runs
compare, and the examples the images fixed, broke or left unchanged.

A run directory (``<output_dir>/<run_name>``) holds one ``<task>.json`` per task run in it, each
beside its ``<task>_samples.jsonl`` (see :mod:`eval_scripts.records`).

Flips: an example is *fixed* when the text-only prediction is wrong and the fused one right,
*broken* the other way round, and *unchanged* when both are right or both wrong. The text-only
prediction comes from a text-only run of the same task (paired by example id) or, failing that,
from the image run's own ``text_only_prediction``. Generation tasks (SQuAD, QuAC) record none, so
they need a text-only run; ``correct`` there is exact match.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from eval_scripts.cli import EvalError
from eval_scripts.records import read_jsonl_rows
from eval_scripts.registry import headline, metrics_from_samples
from models.options import SHARED, keys

FLIPS = ("fixed", "broke", "unchanged")
# config keys that do not change what a run computes (how it ran, where it wrote), and those that matter only
# when images are fused: read from the option declarations
COSMETIC = tuple(o.name for o in SHARED.values() if not (o.results or o.data))
IMAGE_ONLY = keys(SHARED.values(), "images_only")


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


@dataclass
class TaskRun:
    """One task's results in one run directory."""

    run_dir: Path
    task: str
    result: dict
    samples: list[dict] | None  # None when the samples file is missing

    @property
    def config(self) -> dict:
        return self.result.get("config", {})

    @property
    def metrics(self) -> dict:
        return self.result.get("metrics", {})

    @property
    def uses_images(self) -> bool:
        return bool(self.config.get("generate_images")) and int(self.config.get("k") or 0) > 0

    @property
    def k(self) -> int:
        """Images per input; 0 for a text-only run."""
        return int(self.config.get("k") or 0) if self.uses_images else 0

    @property
    def label(self) -> str:
        return self.run_dir.name

    def headline(self) -> tuple[str, float | None]:
        return headline(self.task, self.metrics)

    def by_id(self) -> dict[str, dict]:
        return {str(r["id"]): r for r in self.samples or []}

    def text_only_metrics(self) -> dict | None:
        """Metrics of the text-only predictions its samples hold (image runs), else None."""
        views = [text_only_view(r) for r in self.samples or []]
        if not views or any(v is None for v in views):
            return None
        try:
            return metrics_from_samples(self.task, self.config, views)
        except (KeyError, ZeroDivisionError, TypeError, ValueError):
            return None


def load_run_dir(path) -> dict[str, TaskRun]:
    """``{task: TaskRun}`` of every result file in a run directory; a directory without any is an
    :class:`EvalError`."""
    path = Path(path)
    if not path.is_dir():
        raise EvalError(f"{path} is not a directory")
    runs: dict[str, TaskRun] = {}
    for file in sorted(path.glob("*.json")):
        if file.name.endswith(".run.json") or ".stats" in file.name:
            continue
        try:
            result = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            if (path / f"{file.stem}_samples.jsonl").is_file():
                raise EvalError(f"{file}: not a readable result file ({e})") from None
            continue
        if not (isinstance(result, dict) and isinstance(result.get("task"), str)
                and isinstance(result.get("metrics"), dict) and isinstance(result.get("config"), dict)):
            continue  # suite.json and other files
        samples_path = path / f"{result['task']}_samples.jsonl"
        samples = read_jsonl_rows(samples_path) if samples_path.is_file() else None
        if samples is not None and any(not isinstance(r, dict) or "id" not in r for r in samples):
            raise EvalError(f"{samples_path}: a line without an example id")
        runs[result["task"]] = TaskRun(path, result["task"], result, samples)
    if not runs:
        raise EvalError(f"{path} holds no result files (<task>.json beside <task>_samples.jsonl, which an eval "
                        "script writes when a task finishes)")
    return runs


@dataclass
class Comparison:
    """The runs of one task side by side: ``runs`` in the order given, and the text-only
    ``baseline`` their flips are counted against (None: each image run's own text-only predictions)."""

    task: str
    runs: list[TaskRun]
    baseline: TaskRun | None

    @property
    def focus(self) -> TaskRun:
        """The run whose examples are shown: the last image run given (else the last run)."""
        images = [r for r in self.runs if r.uses_images and r is not self.baseline]
        return (images or self.runs)[-1]

    def text_only_of(self, run: TaskRun) -> dict[str, dict]:
        """The text-only record of each example of ``run``, by id ({} when none is known)."""
        if self.baseline is not None and run is not self.baseline:
            return self.baseline.by_id()
        if run.uses_images:
            views = {str(r["id"]): text_only_view(r) for r in run.samples or []}
            return {i: v for i, v in views.items() if v is not None}
        return {}

    def flips(self, run: TaskRun) -> dict[str, str | None]:
        """Each example's flip (``fixed``, ``broke``, ``unchanged``), or None where the text-only
        answer is unknown."""
        text = self.text_only_of(run) if run is not self.baseline else {}
        out = {}
        for r in run.samples or []:
            t = text.get(str(r["id"]))
            out[str(r["id"])] = None if t is None else flip(bool(t.get("correct")), bool(r.get("correct")))
        return out

    def flip_counts(self, run: TaskRun) -> dict[str, int] | None:
        flips = self.flips(run)
        if not flips or all(f is None for f in flips.values()):
            return None
        return {name: sum(f == name for f in flips.values()) for name in FLIPS}

    def text_only_headline(self, run: TaskRun) -> float | None:
        """The text-only value of ``run``'s headline metric: the baseline's, or from its samples."""
        if run is self.baseline or not run.uses_images:
            return None
        if self.baseline is not None:
            return self.baseline.headline()[1]
        metrics = run.text_only_metrics()
        return headline(run.task, metrics)[1] if metrics else None

    def k_series(self) -> list[tuple[int, float]] | None:
        """``[(k, value)]`` when the runs differ only in k (a text-only run counts as k = 0, and so do
        the text-only predictions of a lone image run); None otherwise or with fewer than 2 points."""
        runs = list(self.runs)
        if self.baseline is not None and self.baseline not in runs:
            runs.insert(0, self.baseline)
        if not all(same_but_k(runs[0].config, r.config) for r in runs[1:]):
            return None
        points = {r.k: r.headline()[1] for r in runs}
        if 0 not in points and len(runs) == 1 and runs[0].text_only_metrics():
            points[0] = headline(runs[0].task, runs[0].text_only_metrics())[1]
        points = {k: v for k, v in points.items() if v is not None}
        return sorted(points.items()) if len(points) >= 2 else None


def flip(text_correct: bool, fused_correct: bool) -> str:
    if fused_correct and not text_correct:
        return "fixed"
    if text_correct and not fused_correct:
        return "broke"
    return "unchanged"


def same_but_k(a: dict, b: dict) -> bool:
    """Whether two run configs differ at most in k (and in how or where they ran)."""
    image_runs = bool(a.get("generate_images")) and bool(b.get("generate_images"))
    skip = set(COSMETIC) | ({"k"} if image_runs else set(IMAGE_ONLY))
    keys = (set(a) | set(b)) - skip
    return all(a.get(key) == b.get(key) for key in keys)


def compare(run_dirs: list, baseline_dir=None) -> list[Comparison]:
    """The comparisons, one per task, of the given run directories (and a text-only baseline).

    Every directory must hold the same tasks (one comparison cannot mix tasks), and a baseline
    must hold each of them. Without ``baseline_dir``, a text-only run among the directories serves
    as the baseline of its task.
    """
    loaded = [load_run_dir(d) for d in run_dirs]
    tasks = list(loaded[0])
    for d, runs in zip(run_dirs[1:], loaded[1:]):
        if set(runs) != set(tasks):
            raise EvalError(f"runs of different tasks cannot be compared: {run_dirs[0]} holds "
                            f"{', '.join(sorted(tasks))}; {d} holds {', '.join(sorted(runs))}")
    base = load_run_dir(baseline_dir) if baseline_dir is not None else None
    if base is not None and not set(tasks) <= set(base):
        missing = sorted(set(tasks) - set(base))
        raise EvalError(f"runs of different tasks cannot be compared: the baseline {baseline_dir} has no "
                        f"{', '.join(missing)} results")
    comparisons = []
    for task in tasks:
        runs = [r[task] for r in loaded]
        baseline = base[task] if base is not None else next((r for r in runs if not r.uses_images), None)
        if baseline is not None and all(r is baseline or not r.uses_images for r in runs) and base is None:
            baseline = None  # only text-only runs: nothing to count flips against
        comparisons.append(Comparison(task, runs, baseline))
    return comparisons
