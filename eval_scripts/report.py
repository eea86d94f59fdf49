"""See the results: one self-contained HTML page (and a Markdown summary) of any run directories.

    python -m eval_scripts.report RUN_DIR [RUN_DIR ...] [--baseline RUN_DIR] [--out report.html] \\
        [--max_examples N]

Works on whatever the eval scripts (or the suite) wrote under ``<output_dir>/<run_name>``: one task
or several, one run or several. Several run directories must hold the same tasks.

The page has a summary table (task, metric, value, text-only value and difference, k, mix mode,
model and checkpoint, flip counts), an accuracy-vs-k chart when the runs differ only in k, a
per-subset chart, and per task the examples of the last image run given: the prompt, the
candidates with their fused and text-only scores, the prediction and the answer, and the k images
(embedded thumbnails) with their CLIP weights and image prompts. Buttons filter the examples that
the images *fixed* (text-only wrong, fused right), *broke* or left *unchanged*; pages of 50.

Text-only answers come from ``--baseline`` (a text-only run of the same tasks), else from a
text-only run among the RUN_DIRs, else from the ``text_only_prediction`` an image run records.
The page needs no network (inline style, script and pictures). Each example takes at most 50 KB
(thumbnails shrink to fit); ``--max_examples`` (default 200, 0 for all) caps the examples shown
per task, flips first. ``report.md`` (beside ``--out``) holds the tables in Markdown.
Images are found through the run's recorded ``image_root`` (:mod:`eval_scripts.image_paths`), from any
working directory; those not found are counted in one line (on the page and the terminal) saying where
the report looked.
"""
from __future__ import annotations

import html
from pathlib import Path

from eval_scripts.cli import EvalError, run_main
from models.options import Option
from eval_scripts.image_paths import KEY as IMAGE_ROOT, SampleImages
from eval_scripts.records import write_atomic
from eval_scripts.report_media import k_plot, subset_chart, thumbnail
from eval_scripts.results import FLIPS, Comparison, TaskRun, compare
from eval_scripts.registry import headline, subset_values

MARK_HTML = '<meta name="generator" content="late-fusion eval_scripts.report">'
MARK_MD = "<!-- written by python -m eval_scripts.report -->"
EXAMPLE_BUDGET = 50_000  # bytes of HTML per example shown
THUMB_SIZES = (128, 96, 64, 48)
TEXT_CHARS = 12_000  # longest prompt or candidate shown whole (the rest is cut, so an example fits its budget)
DEFAULT_MAX_EXAMPLES = 200
PAGE_SIZE = 50


OPTIONS = (
    Option("baseline", metavar="RUN_DIR", path=True, group="report", help="a text-only run of the same tasks"),
    Option("out", path=True, group="report", help="HTML file to write (default: RUN_DIR/report.html of the first)"),
    Option("max_examples", kind="int", low=0, default=DEFAULT_MAX_EXAMPLES, group="report",
           help="examples shown per task, flips first (0: all)"),
    Option("force", kind="flag", default=False, record=False, group="report",
           help="overwrite --out even if this tool did not write it"),
)


def parse_args(argv=None):
    from models.options import OptionsParser, build_parser, parse

    p = OptionsParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (<output_dir>/<run_name>)")
    return parse(OPTIONS, argv, parser=build_parser(OPTIONS, parser=p), raise_errors=True)


# ---------------------------------------------------------------------------------------------- helpers
def esc(value) -> str:
    return html.escape(str(value), quote=True)


def clip_text(value, limit: int = TEXT_CHARS) -> str:
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]} … ({len(text) - limit} more characters)"


def fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def signed(value) -> str:
    return "–" if value is None else f"{value:+.2f}"


def short_path(value) -> str:
    """The last two parts of a path or hub id (the whole one goes in a tooltip)."""
    if not value:
        return "–"
    parts = str(value).rstrip("/").split("/")
    return "/".join(parts[-2:])


def run_label(run: TaskRun) -> str:
    return f"{run.label} (k={run.k})" if run.uses_images else f"{run.label} (text-only)"


def summary_rows(comparisons: list[Comparison]) -> list[dict]:
    """One row per task and run: what the summary tables show."""
    rows = []
    for c in comparisons:
        runs = ([c.baseline] if c.baseline is not None and c.baseline not in c.runs else []) + c.runs
        for run in runs:
            metric, value = run.headline()
            text = c.text_only_headline(run)
            cfg = run.config
            rows.append({
                "task": c.task, "run": run.label, "baseline": run is c.baseline, "k": run.k,
                "mix": cfg.get("mix") if run.uses_images else "–", "model": cfg.get("model_name"),
                "checkpoint": cfg.get("pretrained_model") if run.uses_images else None, "metric": metric,
                "value": value, "text_only": text, "delta": None if text is None or value is None else value - text,
                "n": len(run.samples) if run.samples is not None else run.result.get("counts", {}).get("examples"),
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
    cands = rec.get("candidates") or []
    if isinstance(key, int) and not isinstance(key, bool) and 0 <= key < len(cands):
        return f"option {key}: {cands[key]}"
    return str(key)


def _mark(ok) -> str:
    return "" if ok is None else (" <span class='ok'>✓</span>" if ok else " <span class='bad'>✗</span>")


def _candidates(rec: dict, text: dict | None, lower_wins: bool) -> str:
    cands = rec.get("candidates")
    if not cands:
        return ""
    scores, tscores = rec.get("scores") or [], (text or {}).get("scores") or []
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
    if not images:
        return []
    if isinstance(images[0], list):
        paths = [[im.get("path") for im in opt] for opt in images]
        if all(p == paths[0] for p in paths):
            return [("every option", images[0])]
        return [(f"option {j}", opt) for j, opt in enumerate(images)]
    return [("", images)]


def _images(images, size: int, files: SampleImages | None = None) -> str:
    """The thumbnails of a record's images; ``files`` resolves their paths (the run's image root)."""
    files = files if files is not None else SampleImages(".")
    out, seen = [], set()
    for label, group in _image_groups(images):
        figs = []
        for i, im in enumerate(group):
            path = str(im.get("path", ""))
            if path in seen:
                continue
            seen.add(path)
            prompt, weight = str(im.get("prompt", "")), im.get("weight")
            shown = prompt if len(prompt) <= 70 else prompt[:70] + "…"
            caption = f"w = {fmt(weight)}<br><span class='ip'>{esc(shown)}</span>"
            found = files.resolve(im.get("path"))
            uri = thumbnail(str(found), size) if found is not None else None
            pic = (f"<img src='{uri}' alt='image {i + 1}' title='{esc(prompt)}'>" if uri
                   else f"<div class='noimg' title='{esc(path)}'>image not found</div>")
            figs.append(f"<figure>{pic}<figcaption>{caption}</figcaption></figure>")
        if figs:
            out.append(f"<div class='imgs'>{'<b>' + esc(label) + '</b> ' if label else ''}{''.join(figs)}</div>")
    return "".join(out)


def example_card(rec: dict, flip: str | None, text: dict | None, others: list[tuple[str, dict]],
                 lower_wins: bool, files: SampleImages | None = None) -> str:
    """One example as an ``<article>``, with thumbnails shrunk until it fits the budget."""
    meta = " · ".join(f"{k} {esc(rec[k])}" for k in ("subset", "set", "template", "protocol") if k in rec)
    badge = f"<span class='flip {flip}'>{flip}</span>" if flip else ""
    parts = [f"<header><b>{esc(rec['id'])}</b> <small>{meta}</small> {badge}</header>",
             f"<pre class='prompt'>{esc(clip_text(rec.get('prompt', '')))}</pre>"]
    answer = rec["answer"] if "answer" in rec else rec.get("answers")
    answer = " | ".join(map(str, answer)) if isinstance(answer, list) else _choice(rec, answer)
    line = [f"fused: <b>{esc(_choice(rec, rec.get('prediction')))}</b>{_mark(rec.get('correct'))}"]
    if "f1" in rec:
        line.append(f"EM {fmt(rec.get('exact_match'))} · F1 {fmt(rec.get('f1'))}")
    if text is not None:
        line.append(f"text-only: <b>{esc(_choice(rec, text.get('prediction')))}</b>{_mark(text.get('correct'))}")
    line.append(f"answer: <b>{esc(answer)}</b>")
    parts.append("<p>" + " · ".join(line) + "</p>")
    parts.append(_candidates(rec, text, lower_wins))
    if others:
        parts.append("<p class='others'>" + " · ".join(f"{esc(name)}: {esc(_choice(o, o.get('prediction')))}"
                                                      f"{_mark(o.get('correct'))}" for name, o in others) + "</p>")
    attrs = f"class='ex' data-flip='{flip or 'none'}'"
    card = ""
    for size in THUMB_SIZES:
        card = f"<article {attrs}>{''.join(parts)}{_images(rec.get('images'), size, files)}</article>"
        if len(card.encode("utf-8")) <= EXAMPLE_BUDGET:
            break
    return card


def task_section(c: Comparison, max_examples: int, notes: list[str] | None = None) -> tuple[str, int]:
    """The examples of one task's focus run; returns the HTML and how many were shown. A line on images
    not found is added to the section and to ``notes``."""
    run = c.focus
    files = SampleImages(run.run_dir, run.result.get(IMAGE_ROOT))
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
    cards = [example_card(r, flips.get(str(r["id"])), text.get(str(r["id"])),
                          [(name, o[str(r["id"])]) for name, o in others if str(r["id"]) in o], lower_wins, files)
             for r in shown]
    missing = files.missing_line()
    if missing:
        note += f"<p class='missing'>{esc(missing)}</p>"
        if notes is not None:
            notes.append(f"{c.task} ({run.label}): {missing}")
    html_ = (f"<section class='task' id='task-{esc(c.task)}'><h2>{esc(c.task)}: {esc(run_label(run))}</h2>"
             f"<p class='src'>text-only answers: {source}. ▶ fused prediction, ▷ text-only prediction, "
             f"green row: the answer.</p>{note}<div class='filters'>{''.join(buttons)}</div>"
             f"<div class='pager'><button class='prev'>◀</button> <span class='pageinfo'></span> "
             f"<button class='next'>▶</button></div><div class='cards'>{''.join(cards)}</div></section>")
    return html_, len(shown)


# ---------------------------------------------------------------------------------------------- page
STYLE = """body{font-family:system-ui,sans-serif;max-width:1150px;margin:auto;padding:0 12px;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}
.summary td.num{text-align:right}.ok{color:#070;font-weight:bold}.bad{color:#b00;font-weight:bold}
article.ex{border:1px solid #ccc;border-radius:6px;margin:10px 0;padding:8px}
pre.prompt{white-space:pre-wrap;max-height:180px;overflow:auto;background:#f6f6f6;padding:6px;margin:6px 0}
.cands tr.ans{background:#dfd}.flip{padding:1px 6px;border-radius:8px;font-size:12px;color:#fff}
.flip.fixed{background:#080}.flip.broke{background:#b00}.flip.unchanged{background:#888}
figure{display:inline-block;margin:3px;text-align:center;font-size:11px;width:134px;vertical-align:top}
figure img{max-width:128px;max-height:128px}.ip{color:#555}.noimg{width:128px;height:64px;background:#eee}
.filters button.on{font-weight:bold}.others{font-size:13px;color:#333}.src{font-size:13px;color:#555}"""

SCRIPT = """document.querySelectorAll('section.task').forEach(function(sec){
var cards=[].slice.call(sec.querySelectorAll('article.ex')),filter='all',page=0,per=%d;
var info=sec.querySelector('.pageinfo');
function draw(){var vis=cards.filter(function(c){return filter==='all'||c.dataset.flip===filter;});
var pages=Math.max(1,Math.ceil(vis.length/per));if(page>=pages){page=pages-1;}
cards.forEach(function(c){c.hidden=true;});
vis.slice(page*per,(page+1)*per).forEach(function(c){c.hidden=false;});
info.textContent='page '+(page+1)+' of '+pages+' ('+vis.length+' examples)';
sec.querySelectorAll('button[data-filter]').forEach(function(b){b.className=b.dataset.filter===filter?'on':'';});}
sec.querySelectorAll('button[data-filter]').forEach(function(b){
b.onclick=function(){filter=b.dataset.filter;page=0;draw();};});
sec.querySelector('.prev').onclick=function(){if(page>0){page--;draw();}};
sec.querySelector('.next').onclick=function(){page++;draw();};
draw();});""" % PAGE_SIZE


def summary_table(rows: list[dict]) -> str:
    head = ("<tr><th>task</th><th>run</th><th>k</th><th>mix</th><th>model</th><th>checkpoint</th><th>metric</th>"
            "<th>value</th><th>text-only</th><th>Δ</th><th>n</th><th>fixed</th><th>broke</th><th>unchanged</th></tr>")
    body = []
    for r in rows:
        f = r["flips"] or {}
        run = esc(r["run"]) + (" <small>(baseline)</small>" if r["baseline"] else "")
        body.append(
            f"<tr><td>{esc(r['task'])}</td><td>{run}</td><td class='num'>{r['k'] or 'text-only'}</td>"
            f"<td>{esc(r['mix'])}</td><td title='{esc(r['model'])}'>{esc(short_path(r['model']))}</td>"
            f"<td title='{esc(r['checkpoint'] or '')}'>{esc(short_path(r['checkpoint']))}</td>"
            f"<td>{esc(r['metric'])}</td>"
            f"<td class='num'>{fmt(r['value'])}</td><td class='num'>{fmt(r['text_only'])}</td>"
            f"<td class='num'>{signed(r['delta'])}</td><td class='num'>{r['n'] if r['n'] is not None else '–'}</td>"
            + "".join(f"<td class='num'>{f.get(name, '–')}</td>" for name in FLIPS) + "</tr>")
    return f"<table class='summary'>{head}{''.join(body)}</table>"


def charts(comparisons: list[Comparison]) -> list[str]:
    """``<img>`` tags of the accuracy-vs-k chart (runs differing only in k) and per-subset charts."""
    out = []
    series = {c.task: s for c in comparisons if (s := c.k_series())}
    if series:
        out.append(f"<img class='chart' src='{k_plot(series, 'metric (%)')}' alt='metric against k'>")
    for c in comparisons:
        values: dict[str, dict[str, float]] = {}
        if c.baseline is not None and c.baseline not in c.runs:
            values[run_label(c.baseline)] = subset_values(c.task, c.baseline.metrics)
        for run in c.runs:
            values[run_label(run)] = subset_values(c.task, run.metrics)
        focus = c.focus
        if c.baseline is None and focus.uses_images and (tm := focus.text_only_metrics()):
            values = {"text-only (from samples)": subset_values(c.task, tm), **values}
        values = {k: v for k, v in values.items() if v}
        if values:
            metric = headline(c.task, c.focus.metrics)[0]
            uri = subset_chart(c.task, values, metric)
            out.append(f"<img class='chart' src='{uri}' alt='{esc(c.task)} per subset'>")
    return out


def render_html(comparisons: list[Comparison], max_examples: int, title: str,
                notes: list[str] | None = None) -> tuple[str, dict[str, int]]:
    rows = summary_rows(comparisons)
    sections, shown = [], {}
    for c in comparisons:
        section, n = task_section(c, max_examples, notes)
        sections.append(section)
        shown[c.task] = n
    pics = charts(comparisons)
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>{MARK_HTML}<title>{esc(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>"
            f"<h2>Summary</h2>{summary_table(rows)}"
            "<p><small>value: the task's headline metric (%); text-only: the same without images (the baseline "
            "run, or the image run's own text-only predictions); fixed / broke / unchanged: examples whose "
            "correctness the images changed.</small></p>"
            + (f"<h2>Charts</h2>{''.join(pics)}" if pics else "") + "".join(sections)
            + f"<script>{SCRIPT}</script></body></html>\n")
    return page, shown


def render_markdown(comparisons: list[Comparison], title: str) -> str:
    rows = summary_rows(comparisons)
    lines = [MARK_MD, f"# {title}", "",
             "| task | run | k | mix | model | checkpoint | metric | value | text-only | Δ | n | fixed | broke "
             "| unchanged |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = r["flips"] or {}
        lines.append("| " + " | ".join([
            r["task"], r["run"] + (" (baseline)" if r["baseline"] else ""), str(r["k"] or "text-only"), str(r["mix"]),
            short_path(r["model"]), short_path(r["checkpoint"]), r["metric"], fmt(r["value"]), fmt(r["text_only"]),
            signed(r["delta"]), str(r["n"] if r["n"] is not None else "–"),
            *(str(f.get(name, "–")) for name in FLIPS)]) + " |")
    for c in comparisons:
        runs = ([c.baseline] if c.baseline is not None and c.baseline not in c.runs else []) + c.runs
        per = {run_label(r): subset_values(c.task, r.metrics) for r in runs}
        subsets = list(dict.fromkeys(s for v in per.values() for s in v))
        if not subsets:
            continue
        lines += ["", f"## {c.task} per subset ({headline(c.task, c.focus.metrics)[0]})", "",
                  "| subset | " + " | ".join(per) + " |", "|---|" + "---|" * len(per)]
        lines += ["| " + " | ".join([s, *(fmt(v.get(s)) for v in per.values())]) + " |" for s in subsets]
    return "\n".join(lines) + "\n"


def _check_writable(path: Path, mark: str, force: bool) -> None:
    if path.exists() and not force:
        head = path.read_text(encoding="utf-8", errors="replace")[:4096] if path.is_file() else ""
        if mark not in head:
            raise EvalError(f"{path} exists and was not written by this report; pass --force or another --out")


def main(argv=None) -> dict:
    args = parse_args(argv)
    comparisons = compare(args.run_dirs, args.baseline)
    out = Path(args.out) if args.out else Path(args.run_dirs[0]) / "report.html"
    md = out.with_suffix(".md")
    _check_writable(out, MARK_HTML, args.force)
    _check_writable(md, MARK_MD, args.force)
    title = "Late-fusion report: " + ", ".join(Path(d).name for d in args.run_dirs)
    notes: list[str] = []
    page, shown = render_html(comparisons, args.max_examples, title, notes)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, page)
    write_atomic(md, render_markdown(comparisons, title))
    total = sum(shown.values())
    for line in notes:
        print(f"report: {line}")
    print(f"report: {out} ({len(page.encode('utf-8')) / 1024:.0f} KB, {total} examples shown); summary: {md}")
    return {"html": str(out), "md": str(md), "shown": shown,
            "flips": {c.task: {r.label: c.flip_counts(r) for r in c.runs if r is not c.baseline} for c in comparisons}}


if __name__ == "__main__":
    run_main(main)
