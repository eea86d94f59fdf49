"""See the results: one self-contained HTML page (and a Markdown summary) of any run directories.

    python -m eval_scripts.report RUN_DIR [RUN_DIR ...] [--baseline RUN_DIR] [--out report.html] \\
        [--markdown report.md] [--max_examples N] [--figures DIR]

Works on whatever the eval scripts (or the suite) wrote under ``<output_dir>/<run_name>``: one task
or several, one run or several. Several run directories must hold the same tasks.

The page has a summary table (per task and run: image source, generator or index, vision encoder, k, mix
mode, model and checkpoint, the metric, text-only, fused and their gain, each with its 95% interval, and the
flip counts), charts (accuracy against k, per subset, per task: :mod:`eval_scripts.figures`), and per task an
example browser with one page per image run (a selector picks the run): the prompt, the candidates with their
fused and text-only scores, the prediction and the answer, and the k images (embedded thumbnails) with their
CLIP weights and image prompts. Buttons filter the examples that the images *fixed* (text-only wrong, fused
right), *broke* or left *unchanged*; pages of 50.

Text-only answers come from ``--baseline`` (a text-only run of the same tasks), else from a text-only run
among the RUN_DIRs, else from the ``text_only_prediction`` an image run records. The baseline is shown once
(also when it is given as a run too) and never compared with itself. Intervals come from ``<task>.json``
where it records them, else they are computed from the samples (:mod:`eval_scripts.intervals`).

Every value shown comes from files that may be hostile: all of it is escaped (HTML and Markdown), pictures are
embedded only from inside the run's image root (:mod:`eval_scripts.report_media`), files are read within a
size limit and only inside the run folders. ``--out`` names the HTML page (``.html``), ``--markdown`` the
Markdown summary (``.md``; default: ``--out`` with ``.md``); a name of the other kind is refused.
``--figures DIR`` also writes every chart as SVG, PDF and 300-dpi PNG; a same-named file there that this
tool did not write (``DIR/.report-figures.json`` lists what it wrote) is replaced only with ``--force``.
The page needs no network. Each
example takes at most 50 KB (thumbnails shrink to fit); ``--max_examples`` (default 200, 0 for all) caps the
examples shown per task and run, flips first.
"""
from __future__ import annotations

import html
import os
import re
import sys
from pathlib import Path

from eval_scripts import figures as charts_mod
from eval_scripts.cli import EvalError, run_main
from eval_scripts.image_paths import SampleImages
from eval_scripts.report_media import MediaLog, png_uri, thumbnail, verified
from eval_scripts.results import FLIPS, Comparison, TaskRun, compare, number
from models.options import Option

MARK_HTML = '<meta name="generator" content="late-fusion eval_scripts.report">'
MARK_MD = "<!-- written by python -m eval_scripts.report -->"
EXAMPLE_BUDGET = 50_000  # bytes of HTML per example shown
THUMB_SIZES = (128, 96, 64, 48)
TEXT_CHARS = 12_000  # longest prompt or candidate shown whole (the rest is cut, so an example fits its budget)
FIELD_CHARS = 300  # longest config value or label shown in the summary
DEFAULT_MAX_EXAMPLES = 200
PAGE_SIZE = 50
HTML_SUFFIXES, MD_SUFFIXES = (".html", ".htm"), (".md", ".markdown")


OPTIONS = (
    Option("baseline", metavar="RUN_DIR", path=True, group="report", help="a text-only run of the same tasks"),
    Option("out", path=True, group="report",
           help="the HTML page to write, .html (default: RUN_DIR/report.html of the first)"),
    Option("markdown", path=True, group="report", help="the Markdown summary to write, .md (default: --out with .md)"),
    Option("figures", metavar="DIR", path=True, group="report",
           help="also write every chart to DIR as SVG, PDF and PNG (300 dpi)"),
    Option("max_examples", kind="int", low=0, default=DEFAULT_MAX_EXAMPLES, group="report",
           help="examples shown per task and run, flips first (0: all)"),
    Option("force", kind="flag", default=False, record=False, group="report",
           help="overwrite --out/--markdown and the --figures charts even if this tool did not write them"),
)


def parse_args(argv=None):
    from models.options import OptionsParser, build_parser, parse

    p = OptionsParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (<output_dir>/<run_name>)")
    return parse(OPTIONS, argv, parser=build_parser(OPTIONS, parser=p), raise_errors=True)


# ---------------------------------------------------------------------------------------------- helpers
def esc(value) -> str:
    return html.escape(str(value), quote=True)


def md(value) -> str:
    """A value as one Markdown table cell: no line breaks, ``|`` and link brackets escaped, no raw HTML."""
    text = re.sub(r"[\r\n\t\v\f\u2028\u2029]+", " ", str(value))
    text = html.escape(text, quote=False).replace("\\", "\\\\")
    for ch in "|[]`":
        text = text.replace(ch, "\\" + ch)
    return text


def clip_text(value, limit: int = TEXT_CHARS) -> str:
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]} … ({len(text) - limit} more characters)"


def fmt(value, digits: int = 2) -> str:
    value = number(value)
    return "–" if value is None else f"{value:.{digits}f}"


def signed(value) -> str:
    value = number(value)
    return "–" if value is None else f"{value:+.2f}"


def count(value) -> str:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else "–"


def interval(iv: dict | None) -> str:
    """``(low to high)`` of an interval in percent, or "" when there is none."""
    if not iv or number(iv.get("low")) is None or number(iv.get("high")) is None:
        return ""
    return f"({iv['low']:.1f} to {iv['high']:.1f})"


def with_interval(value, iv, sign: bool = False) -> str:
    text = signed(value) if sign else fmt(value)
    return f"{text} {interval(iv)}".strip() if text != "–" else text


def short_path(value) -> str:
    """The last two parts of a path or hub id (the whole one goes in a tooltip)."""
    if not value or value == "–":
        return "–"
    parts = clip_text(value, FIELD_CHARS).rstrip("/").split("/")
    return "/".join(parts[-2:])


def run_label(run: TaskRun) -> str:
    return f"{run.label} (k={run.k})" if run.uses_images else f"{run.label} (text-only)"


def shown_runs(c: Comparison) -> list[TaskRun]:
    """The runs of a comparison as the summary lists them: the baseline once, first, then the others."""
    return ([c.baseline] if c.baseline is not None else []) + [r for r in c.runs if r is not c.baseline]


def summary_rows(comparisons: list[Comparison]) -> list[dict]:
    """One row per task and run: what the summary tables show."""
    rows = []
    for c in comparisons:
        for run in shown_runs(c):
            metric, value = run.headline_value()
            text = c.text_only_headline(run)
            cfg = run.config
            gain = c.gain(run)
            samples_n = len(run.samples) if run.samples is not None else None
            counts = run.result.get("counts") if isinstance(run.result.get("counts"), dict) else {}
            rows.append({
                "task": c.task, "run": run.label, "baseline": run is c.baseline, "k": run.k,
                **run.describe(),
                "mix": cfg.get("mix") if run.uses_images else "–", "model": cfg.get("model_name"),
                "checkpoint": cfg.get("pretrained_model") if run.uses_images else None, "metric": metric,
                "value": value, "interval": run.interval(), "text_only": text,
                "text_interval": c.text_only_interval(run),
                "gain": gain, "n": samples_n if samples_n is not None else counts.get("examples"),
                "flips": c.flip_counts(run) if run is not c.baseline else None,
            })
    return rows


def select_examples(records: list[dict], flips: dict, limit: int) -> list[dict]:
    """At most ``limit`` records (0: all), the flipped ones first, in their file order."""
    if not limit or len(records) <= limit:
        return records
    flipped = [r for r in records if flips.get(str(r["id"])) in ("fixed", "broke")]
    keep = {id(r) for r in flipped[:limit]}
    for r in records:
        if len(keep) >= limit:
            break
        keep.add(id(r))
    return [r for r in records if id(r) in keep]


# ---------------------------------------------------------------------------------------------- examples
def _choice(rec: dict, key) -> str:
    """A prediction or answer as text: option indices name their option."""
    cands = rec.get("candidates") if isinstance(rec.get("candidates"), list) else []
    if isinstance(key, int) and not isinstance(key, bool) and 0 <= key < len(cands):
        return f"option {key}: {clip_text(cands[key], TEXT_CHARS // 4)}"
    return clip_text(key, TEXT_CHARS // 4)


def _mark(ok) -> str:
    return "" if ok is None else (" <span class='ok'>✓</span>" if ok is True else " <span class='bad'>✗</span>")


def _list(value) -> list:
    return value if isinstance(value, list) else []


def _candidates(rec: dict, text: dict | None, lower_wins: bool) -> str:
    cands = _list(rec.get("candidates"))
    if not cands:
        return ""
    scores, tscores = _list(rec.get("scores")), _list((text or {}).get("scores"))
    index_based = isinstance(rec.get("prediction"), int) and not isinstance(rec.get("prediction"), bool)
    head = "score" + (" (perplexity: lower wins)" if lower_wins else "")
    rows = [f"<tr><th></th><th>candidate</th><th>fused {head}</th><th>text-only</th></tr>"]
    for j, cand in enumerate(cands):
        key = j if index_based else cand
        marks = ("▶" if key == rec.get("prediction") else "") + \
            ("▷" if text and key == text.get("prediction") else "")
        cls = " class='ans'" if key == rec.get("answer") else ""
        sc = fmt(scores[j], 3) if j < len(scores) else "–"
        ts = fmt(tscores[j], 3) if j < len(tscores) else "–"
        rows.append(f"<tr{cls}><td>{marks}</td><td>{esc(clip_text(cand, TEXT_CHARS // 4))}</td><td>{sc}</td>"
                    f"<td>{ts}</td></tr>")
    return "<table class='cands'>" + "".join(rows) + "</table>"


def _image_groups(images) -> list[tuple[str, list[dict]]]:
    """Images as ``(label, records)`` groups: one group, or one per option (commonsense sets)."""
    images = _list(images)
    if not images:
        return []
    if isinstance(images[0], list):
        opts = [[im for im in _list(opt) if isinstance(im, dict)] for opt in images]
        paths = [[im.get("path") for im in opt] for opt in opts]
        if all(p == paths[0] for p in paths):
            return [("every option", opts[0])]
        return [(f"option {j}", opt) for j, opt in enumerate(opts)]
    return [("", [im for im in images if isinstance(im, dict)])]


class Pictures:
    """The pictures of one run: recorded paths checked against the run's image root, refusals counted."""

    def __init__(self, run: TaskRun, log: MediaLog):
        self.files = SampleImages.of_result(run.run_dir, run.result)
        self.log, self.seen = log, set()

    def uri(self, path, size: int, sha256=None) -> tuple[str | None, str]:
        real, problem = self.files.find(path)
        if real is not None and self.files.kind == "index" and not verified(real, sha256):
            real, problem = None, "unverified"
        if problem == "missing":
            self.log.look(self.files.places)
        if real is not None:
            uri, problem = thumbnail(real, size)
            if uri:
                return uri, ""
        key = (str(path), problem)
        if key not in self.seen:  # one count per picture, however many sizes were tried
            self.seen.add(key)
            self.log[problem] += 1
        return None, {"missing": "image not found", "outside": "image outside the run's image root",
                      "too large": "image too large to show",
                      "unverified": "not the image the run recorded"}.get(problem, "image unreadable")


def _images(images, size: int, pictures: Pictures) -> str:
    out, seen = [], set()
    for label, group in _image_groups(images):
        figs = []
        for i, im in enumerate(group):
            path = im.get("path", "")
            if str(path) in seen:
                continue
            seen.add(str(path))
            prompt = clip_text(im.get("prompt", ""), 1000)
            shown = prompt if len(prompt) <= 70 else prompt[:70] + "…"
            caption = f"w = {fmt(im.get('weight'))}<br><span class='ip'>{esc(shown)}</span>"
            uri, why = pictures.uri(path, size, im.get("sha256"))
            pic = (f"<img src='{uri}' alt='image {i + 1}' title='{esc(prompt)}'>" if uri
                   else f"<div class='noimg' title='{esc(clip_text(path, 500))}'>{why}</div>")
            figs.append(f"<figure>{pic}<figcaption>{caption}</figcaption></figure>")
        if figs:
            out.append(f"<div class='imgs'>{'<b>' + esc(label) + '</b> ' if label else ''}{''.join(figs)}</div>")
    return "".join(out)


def example_card(rec: dict, flip: str | None, text: dict | None, others: list[tuple[str, dict]],
                 lower_wins: bool, pictures: Pictures) -> str:
    """One example as an ``<article>``, with thumbnails shrunk until it fits the budget."""
    meta = " · ".join(f"{k} {esc(clip_text(rec[k], 200))}" for k in ("subset", "set", "template", "protocol")
                      if k in rec)
    badge = f"<span class='flip {flip}'>{flip}</span>" if flip else ""
    parts = [f"<header><b>{esc(clip_text(rec['id'], 500))}</b> <small>{meta}</small> {badge}</header>",
             f"<pre class='prompt'>{esc(clip_text(rec.get('prompt', '')))}</pre>"]
    answer = rec["answer"] if "answer" in rec else rec.get("answers")
    answer = " | ".join(map(str, answer)) if isinstance(answer, list) else _choice(rec, answer)
    line = [f"fused: <b>{esc(_choice(rec, rec.get('prediction')))}</b>{_mark(rec.get('correct'))}"]
    if "f1" in rec:
        line.append(f"EM {fmt(rec.get('exact_match'))} · F1 {fmt(rec.get('f1'))}")
    if text is not None:
        line.append(f"text-only: <b>{esc(_choice(rec, text.get('prediction')))}</b>{_mark(text.get('correct'))}")
    line.append(f"answer: <b>{esc(clip_text(answer, TEXT_CHARS // 4))}</b>")
    parts.append("<p>" + " · ".join(line) + "</p>")
    parts.append(_candidates(rec, text, lower_wins))
    if others:
        parts.append("<p class='others'>" + " · ".join(f"{esc(name)}: {esc(_choice(o, o.get('prediction')))}"
                                                      f"{_mark(o.get('correct'))}" for name, o in others) + "</p>")
    attrs = f"class='ex' data-flip='{flip or 'none'}'"
    card = ""
    for size in THUMB_SIZES:
        card = f"<article {attrs}>{''.join(parts)}{_images(rec.get('images'), size, pictures)}</article>"
        if len(card.encode("utf-8")) <= EXAMPLE_BUDGET:
            break
    return card


def browsed_runs(c: Comparison) -> list[TaskRun]:
    """The runs whose examples a task's browser shows: every image run given (not the baseline), else the last."""
    images = [r for r in c.runs if r.uses_images and r is not c.baseline]
    return images or [c.runs[-1]]


def run_browser(c: Comparison, run: TaskRun, index: int, max_examples: int, log: MediaLog) -> tuple[str, int]:
    """The examples of one run of a task, with its filters and pager; returns the HTML and how many were shown."""
    records = run.samples or []
    flips = c.flips(run)
    text = c.text_only_of(run)
    others = [(run_label(o), o.by_id()) for o in c.runs if o is not run and o is not c.baseline]
    shown = select_examples(records, flips, max_examples)
    lower_wins = any(r.get("protocol") == "released" for r in records[:1])
    counts = {name: sum(f == name for f in flips.values()) for name in FLIPS}
    buttons = [f"<button data-filter='all'>all ({len(records)})</button>"]
    if any(f is not None for f in flips.values()):
        buttons += [f"<button data-filter='{name}'>{name} ({counts[name]})</button>" for name in FLIPS]
    note = ""
    if run.samples is None:
        note = "<p>No samples file: only the summary is known.</p>"
    elif len(shown) < len(records):
        note = (f"<p>Showing {len(shown)} of {len(records)} examples (flips first); "
                "<code>--max_examples 0</code> shows all.</p>")
    source = ("the baseline run" if c.baseline is not None and run is not c.baseline
              else "the run's own text-only predictions" if text else "none recorded")
    pictures = Pictures(run, log)
    cards = [example_card(r, flips.get(str(r["id"])), text.get(str(r["id"])),
                          [(name, o[str(r["id"])]) for name, o in others if str(r["id"]) in o], lower_wins, pictures)
             for r in shown]
    d = run.describe()
    about = (f"k = {run.k}, {esc(clip_text(run.config.get('mix'), 50))} mixing, {esc(clip_text(d['source'], 50))} "
             f"images from {esc(short_path(d['generator']))}" if run.uses_images else "text only")
    html_ = (f"<div class='browser' data-run='{index}' data-label='{esc(run_label(run))}'"
             f"{' hidden' if index else ''}><h3>{esc(run_label(run))}: {about}</h3>"
             f"<p class='src'>text-only answers: {source}. ▶ fused prediction, ▷ text-only prediction, "
             f"green row: the answer.</p>{note}<div class='filters'>{''.join(buttons)}</div>"
             f"<div class='pager'><button class='prev'>◀</button> <span class='pageinfo'></span> "
             f"<button class='next'>▶</button></div><div class='cards'>{''.join(cards)}</div></div>")
    return html_, len(shown)


def task_section(c: Comparison, max_examples: int, log: MediaLog) -> tuple[str, dict[str, int]]:
    """A task's example browser: a run selector and one browser per image run; returns the HTML and how many
    examples each run shows."""
    runs = browsed_runs(c)
    parts, shown = [], {}
    for i, run in enumerate(runs):
        part, n = run_browser(c, run, i, max_examples, log)
        parts.append(part)
        shown[run.label] = n
    options = "".join(f"<option value='{i}'>{esc(run_label(r))}</option>" for i, r in enumerate(runs))
    selector = (f"<p><label>run: <select class='runsel'>{options}</select></label> "
                f"<small>({len(runs)} run{'s' if len(runs) > 1 else ''})</small></p>")
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", c.task)[:80]
    return (f"<section class='task' id='task-{slug}'><h2>{esc(c.task)}: examples</h2>{selector}"
            f"{''.join(parts)}</section>"), shown


# ---------------------------------------------------------------------------------------------- page
STYLE = """body{font-family:system-ui,sans-serif;max-width:1250px;margin:auto;padding:0 12px;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}
.summary td.num{text-align:right;white-space:nowrap}.ok{color:#070;font-weight:bold}.bad{color:#b00;font-weight:bold}
article.ex{border:1px solid #ccc;border-radius:6px;margin:10px 0;padding:8px}
pre.prompt{white-space:pre-wrap;max-height:180px;overflow:auto;background:#f6f6f6;padding:6px;margin:6px 0}
.cands tr.ans{background:#dfd}.flip{padding:1px 6px;border-radius:8px;font-size:12px;color:#fff}
.flip.fixed{background:#0072B2}.flip.broke{background:#D55E00}.flip.unchanged{background:#777}
figure{display:inline-block;margin:3px;text-align:center;font-size:11px;width:134px;vertical-align:top}
figure img{max-width:128px;max-height:128px}.ip{color:#555}.noimg{width:128px;height:64px;background:#eee}
img.chart{max-width:100%;margin:6px}
.filters button.on{font-weight:bold}.others{font-size:13px;color:#333}.src{font-size:13px;color:#555}"""

SCRIPT = """document.querySelectorAll('section.task').forEach(function(sec){
var browsers=[].slice.call(sec.querySelectorAll('div.browser')),sel=sec.querySelector('select.runsel');
if(sel){sel.onchange=function(){browsers.forEach(function(b){b.hidden=b.dataset.run!==sel.value;});};}
browsers.forEach(function(br){
var cards=[].slice.call(br.querySelectorAll('article.ex')),filter='all',page=0,per=%d;
var info=br.querySelector('.pageinfo');
function draw(){var vis=cards.filter(function(c){return filter==='all'||c.dataset.flip===filter;});
var pages=Math.max(1,Math.ceil(vis.length/per));if(page>=pages){page=pages-1;}
cards.forEach(function(c){c.hidden=true;});
vis.slice(page*per,(page+1)*per).forEach(function(c){c.hidden=false;});
info.textContent='page '+(page+1)+' of '+pages+' ('+vis.length+' examples)';
br.querySelectorAll('button[data-filter]').forEach(function(b){b.className=b.dataset.filter===filter?'on':'';});}
br.querySelectorAll('button[data-filter]').forEach(function(b){
b.onclick=function(){filter=b.dataset.filter;page=0;draw();};});
br.querySelector('.prev').onclick=function(){if(page>0){page--;draw();}};
br.querySelector('.next').onclick=function(){page++;draw();};
draw();});});""" % PAGE_SIZE

COLUMNS = ("task", "run", "k", "mix", "image source", "generator / index", "vision encoder", "model", "checkpoint",
           "metric", "text-only (95% CI)", "fused (95% CI)", "gain (95% CI)", "n", *FLIPS)


def _cells(r: dict) -> list[str]:
    """A summary row's cells as plain text (escaped by the caller for its format)."""
    f = r["flips"] or {}
    gain = r["gain"] or {}
    baseline = r["baseline"]
    text = with_interval(r["value"], r["interval"]) if baseline or not r["k"] else \
        with_interval(r["text_only"], r["text_interval"])
    fused = "–" if baseline or not r["k"] else with_interval(r["value"], r["interval"])
    return [clip_text(r["task"], FIELD_CHARS), clip_text(r["run"], FIELD_CHARS) + (" (baseline)" if baseline else ""),
            str(r["k"] or "text-only"), clip_text(r["mix"], FIELD_CHARS),
            clip_text(r["source"], FIELD_CHARS), short_path(r["generator"]), short_path(r["encoder"]),
            short_path(r["model"]),
            short_path(r["checkpoint"]), clip_text(r["metric"], FIELD_CHARS), text, fused,
            with_interval(gain.get("value"), gain, sign=True), count(r["n"]), *(count(f.get(name)) for name in FLIPS)]


def summary_table(rows: list[dict]) -> str:
    head = "<tr>" + "".join(f"<th>{esc(c)}</th>" for c in COLUMNS) + "</tr>"
    titles = {5: "generator", 6: "encoder", 7: "model", 8: "checkpoint"}
    body = []
    for r in rows:
        cells = _cells(r)
        tds = []
        for i, cell in enumerate(cells):
            title = f" title='{esc(clip_text(r[titles[i]] or '', FIELD_CHARS * 2))}'" if i in titles else ""
            cls = " class='num'" if i >= 10 or i == 2 else ""
            tds.append(f"<td{cls}{title}>{esc(cell)}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    return f"<table class='summary'>{head}{''.join(body)}</table>"


def chart_figures(comparisons: list[Comparison]) -> list[tuple[str, str, object]]:
    """The charts (:func:`eval_scripts.figures.figures`): the page shows them and ``--figures`` writes them."""
    return charts_mod.figures(comparisons)


def render_html(comparisons: list[Comparison], max_examples: int, title: str, charts: list | None = None,
                log: MediaLog | None = None) -> tuple[str, dict[str, dict[str, int]]]:
    log = MediaLog() if log is None else log
    rows = summary_rows(comparisons)
    sections, shown = [], {}
    for c in comparisons:
        section, n = task_section(c, max_examples, log)
        sections.append(section)
        shown[c.task] = n
    charts = chart_figures(comparisons) if charts is None else charts
    pics = [f"<img class='chart' src='{png_uri(fig)}' alt='{esc(about)}'>" for _, about, fig in charts]
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>{MARK_HTML}<title>{esc(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>"
            f"<h2>Summary</h2>{summary_table(rows)}"
            "<p><small>text-only, fused: the task's headline metric (%) without and with images (text-only from "
            "the baseline run, or the image run's own text-only predictions), with its 95% interval; gain: fused "
            "minus text-only in points, with its paired-bootstrap 95% interval; fixed / broke / unchanged: "
            "examples whose correctness the images changed.</small></p>"
            + (f"<h2>Charts</h2>{''.join(pics)}" if pics else "") + "".join(sections)
            + f"<script>{SCRIPT}</script></body></html>\n")
    return page, shown


def render_markdown(comparisons: list[Comparison], title: str) -> str:
    rows = summary_rows(comparisons)
    lines = [MARK_MD, f"# {md(title)}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(md(cell) for cell in _cells(r)) + " |" for r in rows]
    for c in comparisons:
        per = {run_label(r): charts_mod._subsets(c.task, r.metrics) for r in shown_runs(c)}
        subsets = list(dict.fromkeys(s for v in per.values() for s in v))
        if not subsets:
            continue
        lines += ["", f"## {md(c.task)} per subset ({md(c.focus.headline_value()[0])})", "",
                  "| subset | " + " | ".join(md(name) for name in per) + " |", "|---|" + "---|" * len(per)]
        lines += ["| " + " | ".join([md(s), *(fmt(v.get(s)) for v in per.values())]) + " |" for s in subsets]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- writing
def _check_writable(path: Path, mark: str, force: bool) -> None:
    if (path.exists() or path.is_symlink()) and not force:
        head = ""
        if path.is_file():
            try:
                with open(path, "rb") as f:
                    head = f.read(4096).decode("utf-8", errors="replace")
            except OSError as e:
                raise EvalError(f"{path}: cannot read ({e.strerror or e})") from None
        if mark not in head:
            raise EvalError(f"{path} exists and was not written by this report; pass --force or another --out")


def output_paths(args) -> tuple[Path, Path]:
    """The HTML page and the Markdown summary to write: never one name for both, each of its own kind."""
    out = Path(args.out) if args.out else Path(args.run_dirs[0]) / "report.html"
    if out.suffix.lower() not in HTML_SUFFIXES:
        raise EvalError(f"--out {out}: --out names the HTML page (.html); the Markdown summary goes to --markdown")
    md_path = Path(args.markdown) if args.markdown else out.with_suffix(".md")
    if md_path.suffix.lower() not in MD_SUFFIXES:
        raise EvalError(f"--markdown {md_path}: the Markdown summary's name ends in .md")
    return out, md_path


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_outputs(files: list[tuple[Path, str]]) -> None:
    """Write each ``(path, text)`` to a temporary file beside it, then move them all into place; on any error
    every temporary file is removed and the error names its path."""
    tmps: list[Path] = []
    try:
        for path, text in files:
            tmp = path.with_name(path.name + ".tmp")
            tmps.append(tmp)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                _write_text(tmp, text)
            except OSError as e:
                raise EvalError(f"{path}: cannot write ({e.strerror or e})") from None
        for (path, _), tmp in zip(files, tmps):
            try:
                os.replace(tmp, path)
            except OSError as e:
                raise EvalError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        for tmp in tmps:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass


def main(argv=None) -> dict:
    args = parse_args(argv)
    out, md_path = output_paths(args)
    if args.figures is not None:
        charts_mod.check_figures_dir(args.figures)
    comparisons = compare(args.run_dirs, args.baseline)
    _check_writable(out, MARK_HTML, args.force)
    _check_writable(md_path, MARK_MD, args.force)
    title = "Late-fusion report: " + ", ".join(Path(d).name for d in args.run_dirs)
    log = MediaLog()
    charts = chart_figures(comparisons)
    if args.figures is not None:
        charts_mod.check_figures_writable(args.figures, [stem for stem, _, _ in charts], args.force)
    figure_files = charts_mod.write_figures(charts, args.figures, close=False) if args.figures is not None else []
    page, shown = render_html(comparisons, args.max_examples, title, charts, log)
    write_outputs([(out, page), (md_path, render_markdown(comparisons, title))])
    for line in log.warnings():
        print(line, file=sys.stderr)
    total = sum(n for per in shown.values() for n in per.values())
    print(f"report: {out} ({len(page.encode('utf-8')) / 1024:.0f} KB, {total} examples shown); summary: {md_path}"
          + (f"; figures: {args.figures} ({len(figure_files)} files)" if figure_files else ""))
    return {"html": str(out), "md": str(md_path), "shown": {task: sum(per.values()) for task, per in shown.items()},
            "shown_by_run": shown, "figures": [str(p) for p in figure_files],
            "warnings": log.warnings(),
            "flips": {c.task: {r.label: c.flip_counts(r) for r in c.runs if r is not c.baseline} for c in comparisons}}


if __name__ == "__main__":
    run_main(main)
