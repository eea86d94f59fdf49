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
import math
import os
from dataclasses import dataclass
from pathlib import Path

from eval_scripts.cli import EvalError
from eval_scripts.registry import headline, metrics_from_samples
from models.options import SHARED, keys

FLIPS = ("fixed", "broke", "unchanged")
MAX_RESULT_BYTES = 16 * 2**20  # a <task>.json: metrics, config and counters (a few KB in practice)
MAX_SAMPLES_BYTES = 2 * 2**30  # a <task>_samples.jsonl: one line per example
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
            "correct": record["text_only_prediction"] == record.get("answer")}
    if "text_only_prediction_norm" in record:
        view.update(prediction_norm=record["text_only_prediction_norm"],
                    correct_norm=record["text_only_prediction_norm"] == record.get("answer"))
    return view


def read_bounded(path: Path, limit: int, root: Path) -> str:
    """The text of ``path``, a regular file inside ``root`` (symlinks resolved) of at most ``limit`` bytes; one
    :class:`EvalError` naming the path otherwise. At most ``limit + 1`` bytes are ever read."""
    real = path.resolve()
    if not real.is_relative_to(root.resolve()):
        raise EvalError(f"{path}: a link out of the run folder {root} (to {real}); refused")
    if real.exists() and not real.is_file():  # a FIFO or a device would block or never end
        raise EvalError(f"{path}: not a regular file; refused")
    try:
        with open(real, "rb") as f:
            if not os.path.isfile(real):
                raise EvalError(f"{path}: not a regular file; refused")
            data = f.read(limit + 1)
    except OSError as e:
        raise EvalError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(data) > limit:
        raise EvalError(f"{path}: larger than a file of its kind can be ({limit // 2**20} MiB); refused")
    return data.decode("utf-8", errors="replace")


def read_samples(path: Path, root: Path) -> list[dict]:
    """The rows of a samples file (bounded, inside ``root``); a line cut short by a killed run is skipped."""
    rows = []
    for line in read_bounded(path, MAX_SAMPLES_BYTES, root).splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def number(value) -> float | None:
    """``value`` as a finite float, or None when it is not a number (hostile or missing fields)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def recorded_interval(block, key) -> dict | None:
    """A recorded ``{"low", "high", ...}`` interval with numeric bounds, else None."""
    iv = block.get(key) if isinstance(block, dict) else None
    if not isinstance(iv, dict) or number(iv.get("low")) is None or number(iv.get("high")) is None:
        return None
    return {**iv, "low": number(iv["low"]), "high": number(iv["high"]), "value": number(iv.get("value"))}


def item_scores(records: list[dict], metric: str) -> dict[str, float]:
    """One score in [0, 1] per item, by item id: ``f1``/``exact_match`` for generation tasks, else
    ``correct``; the templates of one question (ids ``question/tN``) average into one item."""
    per: dict[str, list[float]] = {}
    for r in records:
        v = number(r.get(metric)) if metric in ("f1", "exact_match") else None
        if v is None:
            v = 1.0 if r.get("correct") is True else 0.0
        elif v > 1.0:
            v = v / 100.0
        rid = str(r.get("id"))
        item = rid.rsplit("/", 1)[0] if "template" in r and "/" in rid else rid
        per.setdefault(item, []).append(min(max(v, 0.0), 1.0))
    return {i: sum(v) / len(v) for i, v in per.items()}


@dataclass(eq=False)
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
        return self.config.get("generate_images") is True and self._k() > 0

    def _k(self) -> int:
        k = self.config.get("k")
        return k if isinstance(k, int) and not isinstance(k, bool) and k > 0 else 0

    @property
    def k(self) -> int:
        """Images per input; 0 for a text-only run."""
        return self._k() if self.uses_images else 0

    def describe(self) -> dict[str, str]:
        """What made the images, from the recorded config: image source, generator (or index), vision encoder."""
        cfg = self.config
        if not self.uses_images:
            return {"source": "–", "generator": "–", "encoder": "–"}
        source = str(cfg.get("image_source") or "generate")
        made_by = cfg.get("image_index") if source == "retrieve" else cfg.get("image_generator")
        encoder = cfg.get("vision_encoder")
        return {"source": source, "generator": str(made_by or "–"), "encoder": str(encoder or "–")}

    def headline_value(self) -> tuple[str, float | None]:
        metric, value = self.headline()
        return str(metric), number(value)

    def interval(self) -> dict | None:
        """The 95% interval of the headline metric (percent): recorded in ``<task>.json``, else from the samples."""
        metric, _ = self.headline_value()
        recorded = recorded_interval(self.result.get("intervals"), metric)
        if recorded is not None:
            return recorded
        from eval_scripts.intervals import interval_of  # numpy: not imported for --help

        scores = item_scores(self.samples or [], metric)
        return interval_of(list(scores.values())) if scores else None

    @property
    def label(self) -> str:
        return self.run_dir.name

    def headline(self) -> tuple[str, float | None]:
        try:
            return headline(self.task, self.metrics)
        except (AttributeError, TypeError, ValueError, KeyError):
            return "-", None  # metrics of an unexpected shape

    def by_id(self) -> dict[str, dict]:
        return {str(r["id"]): r for r in self.samples or []}

    def text_only_metrics(self) -> dict | None:
        """Metrics of the text-only predictions its samples hold (image runs), else None."""
        views = [text_only_view(r) for r in self.samples or []]
        if not views or any(v is None for v in views):
            return None
        try:
            return metrics_from_samples(self.task, self.config, views)
        except (KeyError, ZeroDivisionError, TypeError, ValueError, AttributeError):
            return None


def load_run_dir(path) -> dict[str, TaskRun]:
    """``{task: TaskRun}`` of every result file in a run directory; a directory without any is an
    :class:`EvalError`. Only files inside the folder are read (links out of it are refused), each within
    its size limit; a result's samples are the ``<name>_samples.jsonl`` beside its ``<name>.json``, whatever
    the result file says."""
    path = Path(path)
    if not path.is_dir():
        raise EvalError(f"{path} is not a directory")
    runs: dict[str, TaskRun] = {}
    for file in sorted(path.glob("*.json")):
        if file.name.endswith(".run.json") or ".stats" in file.name:
            continue
        samples_path = path / f"{file.stem}_samples.jsonl"
        text = read_bounded(file, MAX_RESULT_BYTES, path)
        try:
            result = json.loads(text)
        except ValueError as e:
            if samples_path.is_file():
                raise EvalError(f"{file}: not a readable result file ({e})") from None
            continue
        if not (isinstance(result, dict) and isinstance(result.get("task"), str)
                and isinstance(result.get("metrics"), dict) and isinstance(result.get("config"), dict)):
            continue  # suite.json and other files
        samples = read_samples(samples_path, path) if samples_path.is_file() or samples_path.is_symlink() else None
        if samples is not None and any("id" not in r for r in samples):
            raise EvalError(f"{samples_path}: a line without an example id")
        runs[result["task"]] = TaskRun(path, result["task"], result, samples)
    if not runs:
        raise EvalError(f"{path} holds no result files (<task>.json beside <task>_samples.jsonl, which an eval "
                        "script writes when a task finishes)")
    return runs


@dataclass(eq=False)
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
        """The text-only value of ``run``'s headline metric: the baseline's, or from its samples, or the
        ``text_only`` metrics its result file records."""
        if run is self.baseline or not run.uses_images:
            return None
        if self.baseline is not None:
            return self.baseline.headline_value()[1]
        metrics = run.text_only_metrics()
        if not metrics and isinstance(run.result.get("text_only"), dict):
            metrics = run.result["text_only"].get("metrics")
        if not isinstance(metrics, dict):
            return None
        try:
            return number(headline(run.task, metrics)[1])
        except (AttributeError, TypeError, ValueError, KeyError):
            return None

    def _text_only_scores(self, run: TaskRun) -> dict[str, float]:
        return item_scores(list(self.text_only_of(run).values()), run.headline_value()[0])

    def text_only_interval(self, run: TaskRun) -> dict | None:
        """The 95% interval (percent) of ``run``'s text-only value."""
        if run is self.baseline or not run.uses_images:
            return None
        if self.baseline is not None:
            return self.baseline.interval()
        recorded = run.result.get("text_only")
        if isinstance(recorded, dict) and (iv := recorded_interval(recorded.get("intervals"),
                                                                   run.headline_value()[0])):
            return iv
        from eval_scripts.intervals import interval_of

        scores = self._text_only_scores(run)
        return interval_of(list(scores.values())) if scores else None

    def gain(self, run: TaskRun) -> dict | None:
        """Fused minus text-only (percentage points) with its paired 95% interval: recorded in the result file
        (against the run's own text-only predictions), else a paired bootstrap over the items both scored."""
        if run is self.baseline or not run.uses_images:
            return None
        if id(run) in self._gains:
            return self._gains[id(run)]
        out = None
        if self.baseline is None:
            out = recorded_interval(run.result.get("gain"), run.headline_value()[0])
            out = out if out is not None and out.get("value") is not None else None
        if out is None:
            from eval_scripts.intervals import gain_of

            fused, text = item_scores(run.samples or [], run.headline_value()[0]), self._text_only_scores(run)
            common = [i for i in fused if i in text]
            out = gain_of([fused[i] for i in common], [text[i] for i in common]) if common else None
        self._gains[id(run)] = out
        return out

    def __post_init__(self):
        self._gains: dict[int, dict | None] = {}

    def k_series(self) -> dict[str, list[tuple[int, float, dict | None]]]:
        """Accuracy against k: ``{series label: [(k, value, interval)]}``, one series per group of image runs
        that differ only in k (labelled in words by their mixing rule and image source), with k = 0 the
        text-only run that matches them or else their own text-only predictions; series of < 2 points dropped."""
        runs = ([self.baseline] if self.baseline is not None and self.baseline not in self.runs else []) + self.runs
        text = [r for r in runs if not r.uses_images]
        groups: list[list[TaskRun]] = []
        for r in (r for r in runs if r.uses_images):
            group = next((g for g in groups if same_but_k(g[0].config, r.config)), None)
            group.append(r) if group is not None else groups.append([r])
        out: dict[str, list[tuple[int, float, dict | None]]] = {}
        for group in groups:
            points = {r.k: (r.headline_value()[1], r.interval()) for r in group}
            match = next((t for t in text if same_but_k(t.config, group[0].config)), None)
            if match is not None:
                points[0] = (match.headline_value()[1], match.interval())
            else:
                own = Comparison(self.task, [min(group, key=lambda r: r.k)], None)
                points[0] = (own.text_only_headline(own.runs[0]), own.text_only_interval(own.runs[0]))
            series = sorted((k, v, iv) for k, (v, iv) in points.items() if v is not None)
            if len(series) >= 2:
                label = series_label(group[0].config)
                out[label if label not in out else f"{label} ({group[0].label})"] = series
        return out


MIX_WORDS = {"probs": "probability mixing", "logits": "logit mixing"}
SOURCE_WORDS = {"generate": "generated images", "retrieve": "retrieved images"}


def series_label(config: dict) -> str:
    """A series of image runs named in words: its mixing rule and image source."""
    mix, source = config.get("mix"), config.get("image_source") or "generate"
    mix = MIX_WORDS.get(mix, f"{mix} mixing" if mix else "mixing not recorded")
    return f"{mix}, {SOURCE_WORDS.get(source, f'{source} images')}"


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
    run_dirs = list(dict.fromkeys(Path(d).resolve() for d in run_dirs))  # a folder given twice counts once
    loaded = [load_run_dir(d) for d in run_dirs]
    tasks = list(loaded[0])
    for d, runs in zip(run_dirs[1:], loaded[1:]):
        if set(runs) != set(tasks):
            raise EvalError(f"runs of different tasks cannot be compared: {run_dirs[0]} holds "
                            f"{', '.join(sorted(tasks))}; {d} holds {', '.join(sorted(runs))}")
    base = None
    if baseline_dir is not None:
        same = [i for i, d in enumerate(run_dirs) if d == Path(baseline_dir).resolve()]
        base = loaded[same[0]] if same else load_run_dir(baseline_dir)  # the baseline given as a run too: one run
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
