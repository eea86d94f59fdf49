"""Per-item outcomes of a task's sample records, and what the results file says about them: a 95% interval
for every headline metric, the text-only metrics an image run's own text-only predictions give, and the gain
of fused over text-only with its paired interval (:mod:`eval_scripts.intervals`).

An *outcome* is one number per scored item, a fraction whose plain mean is the metric:

* candidate tasks (commonsense sets, BoolQ): ``correct`` (0 or 1) per question (``correct_norm`` for
  ``acc_norm``); the text-only outcome compares ``text_only_prediction`` with the answer;
* per-template tables (ImageNetVC subsets, object-commonsense sets): the mean of ``correct`` over a question's
  templates, so the item resampled is the question, not the template row. ImageNetVC's ``overall`` (a macro
  average over subsets) weights each question by ``N / (S * n_subset)`` (N questions, S subsets) so that the
  mean of the weighted outcomes is the macro average;
* SQuAD: ``exact_match`` and ``f1`` per question, also per answerable/unanswerable group; QuAC: ``f1`` over
  the questions whose human F1 reaches 0.4 (as the official scorer), ``exact_match`` over all. Their text-only
  outcomes are ``text_only_exact_match`` and ``text_only_f1`` where the records hold them.

:func:`summarize` returns what :meth:`eval_scripts.records.RunRecords.finish` adds to ``<task>.json``, keyed as
``metrics`` is: ``intervals`` (``{key: {"low", "high", "method", "n"}}``, percent), and for records holding
text-only predictions ``text_only`` (``{"metrics": {key: value}, "intervals": {...}}``) and ``gain``
(``{key: {"value", "low", "high", "method", "n"}}``, percentage points, paired bootstrap). A key whose metric is
a table of per-template accuracies (``metrics["color"]``) gets the interval of its ``mean``; a key whose value
is a group of metrics (SQuAD's ``metrics["answerable"]``) gets a dict of intervals by metric name.
"""
from __future__ import annotations

from typing import Sequence

from eval_scripts.intervals import gain_of, interval_of

Path = tuple[str, ...]  # a metric's place in ``metrics``: ("acc",), ("color",), ("answerable", "f1")
Pair = tuple[list[float], "list[float] | None"]  # (fused or only outcomes, text-only outcomes or None)
QUAC_MIN_HUMAN_F1 = 0.4


def _family(task: str) -> str:
    """The kind of records a result's task name has (its result family's kind)."""
    for prefix in ("imagenetvc", "object_commonsense", "squad", "quac"):
        if task == prefix or task.startswith(prefix + "_"):
            return prefix
    return "candidates"


def _text_correct(record: dict, field: str = "text_only_prediction") -> float | None:
    return None if field not in record else float(record[field] == record["answer"])


def _pair(fused: list[float], text: list[float | None]) -> Pair:
    return fused, (None if not text or any(t is None for t in text) else [float(t) for t in text])


def weighted(parts: Sequence[Sequence[float]]) -> list[float]:
    """The outcomes of several parts (subsets, or a group's tasks) as one list whose plain mean is the mean of
    the parts' means: each part's outcomes scaled by ``N / (P * n_part)``."""
    parts = [list(p) for p in parts if len(p)]
    total = sum(len(p) for p in parts)
    return [v * total / (len(parts) * len(p)) for p in parts for v in p]


def _macro(pairs: Sequence[Pair]) -> Pair:
    fused = weighted([p[0] for p in pairs])
    texts = [p[1] for p in pairs]
    return fused, (None if any(t is None for t in texts) else weighted(texts))


def _template_tables(records: list[dict], key: str) -> dict[Path, Pair]:
    """Per question (its id without ``/t<template>``): the mean of ``correct`` over its templates."""
    by_part: dict[str, dict[str, list[dict]]] = {}
    for r in records:
        by_part.setdefault(r[key], {}).setdefault(str(r["id"]).rsplit("/t", 1)[0], []).append(r)
    out: dict[Path, Pair] = {}
    for part, questions in by_part.items():
        fused, text = [], []
        for rows in questions.values():
            fused.append(sum(float(r["correct"]) for r in rows) / len(rows))
            t = [_text_correct(r) for r in rows]
            text.append(None if any(x is None for x in t) else sum(t) / len(t))
        out[(part,)] = _pair(fused, text)
    return out


def _generation(records: list[dict], quac: bool) -> dict[Path, Pair]:
    def scores(rows, name):
        return _pair([float(r[name]) for r in rows], [r.get(f"text_only_{name}") for r in rows])
    out = {("exact_match",): scores(records, "exact_match")}
    if quac:
        from eval_scripts.metrics import quac_human_f1

        kept = [r for r in records if quac_human_f1(r["answers"]) >= QUAC_MIN_HUMAN_F1]
        if kept:
            out[("f1",)] = scores(kept, "f1")
        return out
    out[("f1",)] = scores(records, "f1")
    groups = {"answerable": [r for r in records if not r.get("is_impossible")],
              "unanswerable": [r for r in records if r.get("is_impossible")]}
    if all(groups.values()):
        for name, rows in groups.items():
            out[(name, "exact_match")] = scores(rows, "exact_match")
            out[(name, "f1")] = scores(rows, "f1")
    return out


def item_outcomes(task: str, records: list[dict]) -> dict[Path, Pair]:
    """Every metric's per-item outcomes (see the module docstring), by its place in ``metrics``."""
    family = _family(task)
    needed = {"imagenetvc": ("subset", "correct"), "object_commonsense": ("set", "correct"),
              "squad": ("exact_match", "f1"), "quac": ("exact_match", "f1", "answers")}.get(family, ("correct",))
    if not records or not all(all(k in r for k in needed) for r in records):
        return {}  # records of another shape (a task no script declares): no outcomes to draw on
    if family == "imagenetvc":
        out = _template_tables(records, "subset")
        out[("overall",)] = _macro(list(out.values()))
        return out
    if family == "object_commonsense":
        return _template_tables(records, "set")
    if family in ("squad", "quac"):
        return _generation(records, quac=family == "quac")
    out = {("acc",): _pair([float(r["correct"]) for r in records], [_text_correct(r) for r in records])}
    if all("correct_norm" in r for r in records):
        out[("acc_norm",)] = _pair([float(r["correct_norm"]) for r in records],
                                   [_text_correct(r, "text_only_prediction_norm") for r in records])
    return out


def headline_outcomes(task: str, records: list[dict]) -> Pair | None:
    """The per-item outcomes of the number the paper reports for the task (its headline): ImageNetVC's
    ``overall``, the object-commonsense sets' macro average, ``acc``, SQuAD's ``exact_match``, QuAC's ``f1``."""
    outcomes = item_outcomes(task, records)
    family = _family(task)
    if family == "object_commonsense":
        return _macro(list(outcomes.values())) if outcomes else None
    path = {"imagenetvc": ("overall",), "squad": ("exact_match",), "quac": ("f1",)}.get(family, ("acc",))
    return outcomes.get(path)


def _put(tree: dict, path: Path, value) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _mean_percent(values: list[float]) -> float:
    return 100 * sum(values) / len(values)


def summarize(task: str, metrics: dict, records: list[dict]) -> dict:
    """What ``<task>.json`` gains (see the module docstring): ``intervals``, and with text-only predictions in
    every record, ``text_only`` and ``gain``. Only metrics that ``metrics`` holds are covered."""
    outcomes = {p: pair for p, pair in item_outcomes(task, records).items() if p[0] in metrics and pair[0]}
    intervals, text_metrics, text_intervals, gains = {}, {}, {}, {}
    for path, (fused, text) in outcomes.items():
        _put(intervals, path, interval_of(fused))
        if text is not None:
            _put(text_metrics, path, _mean_percent(text))
            _put(text_intervals, path, interval_of(text))
            _put(gains, path, gain_of(fused, text))
    out: dict = {"intervals": intervals}
    if gains:
        out["text_only"] = {"metrics": text_metrics, "intervals": text_intervals}
        out["gain"] = gains
    return out
