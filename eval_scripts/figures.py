"""Charts of run results, for a paper and for the report: accuracy against k, per subset, per task.

    python -m eval_scripts.report RUN_DIR [RUN_DIR ...] --figures DIR

writes every chart as ``DIR/<name>.svg``, ``.pdf`` and ``.png`` (300 dpi); the report's page shows the same
charts. The charts say what they show in words (axis labels such as "images per question, k" and
"accuracy (%)", legends such as "probability mixing"), carry 95% interval bars (from the results, or computed
from the samples: :mod:`eval_scripts.intervals`), mark zero-height bars with a line and a "0", and survive
greyscale printing: each series has its own marker, line style or hatch as well as a colour of the Okabe-Ito
colour-blind-safe palette. Drawn with matplotlib's Agg backend; text stays text in the SVG and PDF.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from eval_scripts.cli import EvalError
from eval_scripts.registry import subset_values
from eval_scripts.results import Comparison, TaskRun, item_scores, number

PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#000000", "#F0E442")
MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*")
LINES = ("-", "--", "-.", ":")
HATCHES = ("", "///", "...", "xxx", "\\\\\\", "+++", "ooo", "---")
K_LABEL = "images per question, k"
PNG_DPI = 300
FORMATS = ("svg", "pdf", "png")
RC = {"svg.fonttype": "none", "pdf.fonttype": 42, "font.size": 9, "axes.spines.top": False,
      "axes.spines.right": False, "hatch.linewidth": 0.6}


def metric_words(metric: str) -> str:
    """An axis label in words for a headline metric name."""
    words = {"acc": "accuracy", "f1": "F1", "exact_match": "exact match", "em": "exact match"}
    return f"{words.get(str(metric).lower(), 'accuracy' if str(metric) in ('-', 'mean') else str(metric))} (%)"


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _top(values) -> float:
    """The top of a percentage axis: a little above the largest value or interval end (10 to 105)."""
    return min(105.0, max([10.0, *(1.12 * v for v in values if v is not None)]))


def _yerr(value: float, iv: dict | None) -> tuple[float, float]:
    if not iv:
        return 0.0, 0.0
    return max(0.0, value - iv["low"]), max(0.0, iv["high"] - value)


def k_figure(series: dict[str, list[tuple[int, float, dict | None]]], ylabel: str, title: str = ""):
    """Lines of a metric against k (k = 0: text only), one per series, with interval bars."""
    plt = _pyplot()
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(5.0, 3.2))
        ks = sorted({k for points in series.values() for k, _, _ in points})
        tops = []
        for i, (name, points) in enumerate(series.items()):
            xs, ys = [k for k, _, _ in points], [v for _, v, _ in points]
            errs = list(zip(*(_yerr(v, iv) for _, v, iv in points)))
            tops += [v + e for v, e in zip(ys, errs[1])]
            ax.errorbar(xs, ys, yerr=errs, label=name, color=PALETTE[i % len(PALETTE)],
                        marker=MARKERS[i % len(MARKERS)], linestyle=LINES[i % len(LINES)], capsize=3,
                        markersize=5, linewidth=1.4, markeredgecolor="black", markeredgewidth=0.5)
        ax.set_xticks(ks, ["text\nonly" if k == 0 else str(k) for k in ks])
        ax.set_ylim(0, _top(tops))
        ax.set_xlabel(K_LABEL)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
        if title:
            ax.set_title(title)
        fig.tight_layout()
    return fig


def bar_figure(groups: list[str], series: dict[str, dict[str, tuple[float, dict | None]]], xlabel: str,
               ylabel: str, title: str = ""):
    """Grouped bars ``series[name][group] = (value, interval)`` with interval bars; a zero-height bar is drawn
    as a thick line at 0 with a "0" above it."""
    plt = _pyplot()
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(groups) * max(1, len(series)) ** 0.5 + 2.5), 3.2))
        width = 0.8 / max(len(series), 1)
        tops = []
        for i, (name, per) in enumerate(series.items()):
            xs = [j + (i - (len(series) - 1) / 2) * width for j, g in enumerate(groups) if g in per]
            vals = [per[g][0] for g in groups if g in per]
            errs = list(zip(*(_yerr(*per[g]) for g in groups if g in per))) or [[], []]
            tops += [v + e for v, e in zip(vals, errs[1])]
            ax.bar(xs, vals, width, yerr=errs, label=name, color=PALETTE[i % len(PALETTE)],
                   hatch=HATCHES[i % len(HATCHES)], edgecolor="black", linewidth=0.7, capsize=2,
                   error_kw={"elinewidth": 0.8})
            for x, v in zip(xs, vals):
                if v == 0:
                    ax.plot([x - width / 2, x + width / 2], [0, 0], color="black", linewidth=2.5, clip_on=False,
                            solid_capstyle="butt")
                    ax.annotate("0", (x, 0), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=7)
        ax.set_xticks(range(len(groups)), groups, fontsize=8)
        ax.set_ylim(0, _top(tops))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        if title:
            ax.set_title(title)
        fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------- from runs
def run_name(run: TaskRun) -> str:
    return f"{run.label} (k = {run.k})" if run.uses_images else f"{run.label} (text only)"


def _subset_intervals(run: TaskRun, records: list[dict] | None, metric: str) -> dict[str, dict]:
    from eval_scripts.intervals import interval_of  # numpy: not imported for --help

    per: dict[str, list[dict]] = {}
    for r in records or []:
        if isinstance(r.get("subset"), str):
            per.setdefault(r["subset"], []).append(r)
    return {s: interval_of(list(item_scores(rs, metric).values())) for s, rs in per.items() if rs}


def _subsets(task: str, metrics) -> dict[str, float]:
    try:
        values = subset_values(task, metrics) if isinstance(metrics, dict) else {}
    except (AttributeError, TypeError, ValueError, KeyError):
        return {}
    return {str(s): n for s, v in values.items() if (n := number(v)) is not None}


def subset_series(c: Comparison) -> dict[str, dict[str, tuple[float, dict | None]]]:
    """``{series: {subset: (value, interval)}}`` of one task: the baseline (or the focus run's own text-only
    predictions), then every run given."""
    out: dict[str, dict[str, tuple[float, dict | None]]] = {}
    runs = ([c.baseline] if c.baseline is not None and c.baseline not in c.runs else []) + c.runs
    focus = c.focus
    if c.baseline is None and focus.uses_images and (tm := focus.text_only_metrics()):
        text = list(c.text_only_of(focus).values())
        ivs = _subset_intervals(focus, text, focus.headline_value()[0])
        out["text only (the image run's own)"] = {s: (v, ivs.get(s)) for s, v in _subsets(c.task, tm).items()}
    for run in runs:
        ivs = _subset_intervals(run, run.samples, run.headline_value()[0])
        out[run_name(run)] = {s: (v, ivs.get(s)) for s, v in _subsets(c.task, run.metrics).items()}
    return {k: v for k, v in out.items() if v}


def task_series(comparisons: list[Comparison]) -> dict[str, dict[str, tuple[float, dict | None]]]:
    """``{series: {task: (value, interval)}}``: text only, then each image run (by position among the runs)."""
    out: dict[str, dict[str, tuple[float, dict | None]]] = {"text only": {}}
    for c in comparisons:
        images = [r for r in c.runs if r.uses_images and r is not c.baseline]
        for run in images:
            value = run.headline_value()[1]
            if value is not None:
                out.setdefault(run_name(run), {})[c.task] = (value, run.interval())
        if images:
            text, iv = c.text_only_headline(images[-1]), c.text_only_interval(images[-1])
            if text is not None:
                out["text only"][c.task] = (text, iv)
    return {k: v for k, v in out.items() if v}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "task"


def figures(comparisons: list[Comparison]) -> list[tuple[str, str, object]]:
    """Every chart of these comparisons: ``(file stem, description, figure)``."""
    out = []
    k_series = {}
    for c in comparisons:
        for label, points in c.k_series().items():
            k_series[f"{c.task}: {label}" if len(comparisons) > 1 else label] = points
    if k_series:
        metric = metric_words(comparisons[0].focus.headline_value()[0])
        out.append(("accuracy_vs_k", "accuracy against the number of images k", k_figure(k_series, metric)))
    for c in comparisons:
        series = subset_series(c)
        if series:
            groups = list(dict.fromkeys(s for per in series.values() for s in per))
            metric = metric_words(c.focus.headline_value()[0])
            out.append((f"{_safe(c.task)}_per_subset", f"{c.task} per subset",
                        bar_figure(groups, series, "subset", metric, f"{c.task} per subset")))
    per_task = task_series(comparisons)
    if per_task and len(per_task) > 1:
        tasks = [c.task for c in comparisons if any(c.task in per for per in per_task.values())]
        out.append(("per_task", "text only and fused per task",
                    bar_figure(tasks, per_task, "task", "headline metric (%)", "text only and fused per task")))
    return out


MANIFEST = ".report-figures.json"  # in a --figures folder: the files this tool wrote there, with their sha256
MAX_MANIFEST_BYTES = 2**20


def check_figures_dir(path) -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise EvalError(f"--figures {path} exists and is not a folder")
    return path


def _written_here(folder: Path) -> dict[str, str]:
    """The manifest of ``folder``: file name -> sha256 of what this tool last wrote there ({} if none)."""
    import json

    from models.bounded_read import read_bounded

    try:
        data = read_bounded(folder / MANIFEST, MAX_MANIFEST_BYTES, lambda size: "too large")
        found = json.loads(data) if data else {}
    except (OSError, ValueError):
        return {}
    if not isinstance(found, dict):
        return {}
    return {k: v for k, v in found.items() if isinstance(k, str) and isinstance(v, str)}


def _sha256(path: Path) -> str | None:
    import hashlib

    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def check_figures_writable(folder, stems, force: bool = False) -> None:
    """Refuse, before anything is written, to replace a chart file of ``folder`` this tool did not write (or
    that was changed since): one line naming it, unless ``force``."""
    folder = check_figures_dir(folder)
    if force or not folder.is_dir():
        return
    ours = _written_here(folder)
    for stem in stems:
        for fmt in FORMATS:
            path = folder / f"{stem}.{fmt}"
            if not (path.exists() or path.is_symlink()):
                continue
            if path.is_symlink() or not path.is_file() or ours.get(path.name) != _sha256(path):
                raise EvalError(f"{path} exists and was not written by this report (or was changed since); "
                                "pass --force or another --figures folder")


def save_figure(fig, folder: Path, stem: str, close: bool = True) -> list[Path]:
    """``fig`` as ``folder/stem.svg``, ``.pdf`` and ``.png`` (300 dpi), each written whole or not at all."""
    import matplotlib.pyplot as plt

    written = []
    try:
        for fmt in FORMATS:
            path = folder / f"{stem}.{fmt}"
            tmp = path.with_name(path.name + ".tmp")
            try:
                with plt.rc_context(RC):
                    fig.savefig(tmp, format=fmt, dpi=PNG_DPI, bbox_inches="tight",
                                metadata={"Date": None} if fmt in ("svg", "pdf") else None)
                os.replace(tmp, path)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise EvalError(f"{path}: cannot write ({e.strerror or e})") from None
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            written.append(path)
    finally:
        if close:
            plt.close(fig)
    return written


def write_figures(charts: list[tuple[str, str, object]], folder, close: bool = True) -> list[Path]:
    """The charts of :func:`figures` under ``folder`` (created), in every format; the paths written."""
    folder = check_figures_dir(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EvalError(f"--figures {folder}: cannot create ({e.strerror or e})") from None
    written = []
    try:
        for stem, _, fig in charts:
            written += save_figure(fig, folder, stem, close=close)
    finally:  # what was written is remembered as this tool's, so that the next report may replace it
        if written:
            import json

            from models import write_behind

            ours = {**_written_here(folder), **{p.name: _sha256(p) for p in written}}
            try:
                write_behind.write_atomic(folder / MANIFEST, json.dumps(ours, indent=1, sort_keys=True).encode())
            except OSError:
                pass  # the charts are written; the next report will ask for --force
    return written
