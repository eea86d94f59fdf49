"""eval_scripts/report.py on hostile run folders: every value escaped (checked by parsing the page), pictures only
from inside the run's image root, no file read outside the run folder, bounded reads, a bomb image a placeholder,
outputs of one kind each, no temporary file left after a full disk; and the example browser per image run, the
baseline shown once, and the figures (SVG, PDF, 300-dpi PNG) of ``--figures``."""
import errno
import hashlib
import json
import os
import re
import struct
import xml.etree.ElementTree as ET
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from eval_scripts import report, results
from eval_scripts.cli import run_main

PAYLOADS = ("<script>alert(1)</script>", "\"><img src=x onerror=alert(2)>", "'><svg onload=alert(3)>",
            "javascript:alert(4)", "a|b\nc|d\r\n| --- |", "[x](javascript:alert(5))", "\x00<script>nul</script>")
TYPED = ({"<script>": ["<b>x</b>"]}, ["<i>a</i>", 1], 12345, None, True, 1e308)  # not strings where strings go
OWN_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "small", "table", "tr", "th",
            "td", "section", "label", "select", "option", "div", "button", "span", "article", "header", "b", "pre",
            "code", "figure", "figcaption", "img", "br", "script"}
OWN_ATTRS = {"charset", "name", "content", "lang", "class", "id", "title", "src", "alt", "data-run", "data-label",
             "hidden", "value", "data-filter", "data-flip"}


class Tags(HTMLParser):
    """Every tag, attribute, script body and text of a page."""

    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.scripts, self.text = [], [], [], []
        self._script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v) for k, v in attrs]
        self._script = tag == "script"

    def handle_endtag(self, tag):
        self._script = False

    def handle_data(self, data):
        (self.scripts if self._script else self.text).append(data)


def parse_page(path) -> Tags:
    page = Tags()
    page.feed(Path(path).read_text(encoding="utf-8"))
    page.close()
    return page


def assert_inert(path):
    """Nothing from the data became markup: only the report's own tags and attributes, one script (its own),
    no event handler, every picture a data: URI, no javascript: anywhere in an attribute."""
    page = parse_page(path)
    assert set(page.tags) <= OWN_TAGS, set(page.tags) - OWN_TAGS
    assert {k for _, k, _ in page.attrs} <= OWN_ATTRS, {k for _, k, _ in page.attrs} - OWN_ATTRS
    assert page.tags.count("script") == 1 and "".join(page.scripts) == report.SCRIPT
    for tag, key, value in page.attrs:
        assert not key.startswith("on")
        assert "javascript:" not in (value or "").lower() or key in ("title", "data-label", "alt"), (tag, key, value)
        if key == "src":
            assert value.startswith("data:image/"), value
        if key in ("class", "data-flip", "data-filter", "data-run", "value"):
            assert re.fullmatch(r"[\w -]*", value or ""), (key, value)
    return page


def md_cells(line: str) -> int:
    return len(re.split(r"(?<!\\)\|", line.strip())) - 2


def assert_md_shape(path):
    """Every table row of the Markdown has its header's number of cells; no raw tag or link came through."""
    text = Path(path).read_text(encoding="utf-8")
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")):
            width = md_cells(line)
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                assert md_cells(lines[j]) == width, lines[j]
                j += 1
        assert line.startswith(("|", "#", "<!-- written by")) or not line.strip(), line  # no stray line
    assert "<script" not in text and "<img" not in text and "<svg" not in text
    assert not re.search(r"(?<!\\)\]\(javascript:", text)  # an escaped bracket makes no link


def png(path: Path, size=(40, 30), color="red") -> str:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return str(path)


def bomb(path: Path, side: int = 20000) -> str:
    """A PNG whose header says side x side pixels (a few bytes on disk)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return str(path)


def write_run(folder: Path, task: str, result: dict, rows: list[dict] | None, stem: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    stem = stem or task
    (folder / f"{stem}.json").write_text(json.dumps({"task": task, **result}))
    if rows is not None:
        (folder / f"{stem}_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def vc_rows(n_questions: int, correct, text_correct, images=None) -> list[dict]:
    """ImageNetVC-shaped sample rows: ``n_questions`` colour questions x 5 templates."""
    rows = []
    for q in range(n_questions):
        for t in range(5):
            ok, tok = correct(q, t), text_correct(q, t)
            rows.append({"id": f"color-q{q}/t{t}", "subset": "color" if q % 2 else "shape", "template": t,
                         "prompt": f"What colour is q{q}?", "candidates": ["red", "blue"], "scores": [1.0, 0.5],
                         "prediction": "red" if ok else "blue", "answer": "red", "correct": ok,
                         "text_only_prediction": "red" if tok else "blue", "text_only_scores": [0.2, 0.4],
                         "images": images(q) if images else []})
    return rows


def vc_metrics(rows: list[dict]) -> dict:
    from eval_scripts.imagenetVC import metrics_from
    from eval_scripts.benchmark import records_by

    return metrics_from(records_by(rows, "subset"))


def vc_run(folder: Path, k: int, mix: str, rows: list[dict], **config) -> Path:
    cfg = {"model_name": "lm", "generate_images": k > 0, "k": k or 1, "mix": mix, "image_source": "generate",
           "image_generator": "toyworld", "vision_encoder": "tiny-clip", "image_cache": str(folder.parent / "cache"),
           **config}
    return write_run(folder, "imagenetvc", {"metrics": vc_metrics(rows), "config": cfg,
                                            "counts": {"examples": len(rows)}}, rows)


@pytest.fixture()
def no_charts(monkeypatch):
    """Tests of what the page embeds or writes skip drawing the charts (the figure tests draw them)."""
    monkeypatch.setattr(report, "chart_figures", lambda comparisons: [])


def fails(argv, capsys, message) -> str:
    with pytest.raises(SystemExit) as e:
        run_main(report.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    return err[0]


# ---------------------------------------------------------------------------------------------- markup
def hostile_files(root: Path, payload: str, with_samples: bool) -> Path:
    """A run folder (itself named with markup where a file name can hold it) whose every field is ``payload``."""
    name = payload if isinstance(payload, str) else "typed"
    folder = root / ("run" + re.sub(r"[/\n\r\x00]", "", name))
    img = png(root / "cache" / "ok.png")
    rec = {"id": payload, "prompt": payload, "candidates": [payload, f"{payload}2"], "scores": [payload, 1.0],
           "prediction": payload, "answer": payload, "answers": [payload], "correct": payload, "subset": payload,
           "set": payload, "template": payload, "protocol": payload, "f1": payload, "exact_match": payload,
           "text_only_prediction": payload, "text_only_scores": [payload],
           "images": [{"path": payload, "prompt": payload, "weight": payload},
                      {"path": img, "prompt": payload, "weight": 0.5}]}
    cfg = {key: payload for key in ("model_name", "pretrained_model", "mix", "image_source", "image_generator",
                                    "vision_encoder", "image_index", "protocol", "split")}
    cfg.update(generate_images=True, k=2, image_cache=str(root / "cache"))
    interval = {"low": payload, "high": payload, "method": payload, "n": payload}
    key = str(payload)
    result = {"metrics": {key: payload, "acc": payload, "overall": payload}, "config": cfg,
              "counts": {"examples": payload}, "intervals": {"acc": interval, key: interval},
              "text_only": {"metrics": {key: payload}, "intervals": {key: interval}},
              "gain": {"acc": {**interval, "value": payload}}, "image_root": {"path": payload, "kind": payload}}
    write_run(folder, payload if isinstance(payload, str) else "typed", result, [rec] if with_samples else None,
              stem="hostile")
    return folder


@pytest.mark.parametrize("with_samples", [True, False], ids=["samples", "samples missing"])
@pytest.mark.parametrize("payload", PAYLOADS)
def test_markup_in_every_field_stays_text(tmp_path, payload, with_samples):
    folder = hostile_files(tmp_path, payload, with_samples)
    out = tmp_path / "r.html"
    report.main([str(folder), "--out", str(out)])
    page = assert_inert(out)
    text = "".join(page.text)
    assert payload.replace("\r\n", "\n").split("\n")[0] in text  # shown, as text
    assert_md_shape(out.with_suffix(".md"))


@pytest.mark.parametrize("with_samples", [True, False], ids=["samples", "samples missing"])
@pytest.mark.parametrize("payload", TYPED, ids=repr)
def test_fields_of_the_wrong_type_are_shown_or_left_out_not_a_traceback(tmp_path, payload, with_samples):
    folder = hostile_files(tmp_path, payload, with_samples)
    out = tmp_path / "r.html"
    report.main([str(folder), "--out", str(out)])
    assert_inert(out)
    assert_md_shape(out.with_suffix(".md"))


def test_the_baseline_given_as_a_run_too_is_one_run_with_markup(tmp_path):
    payload = PAYLOADS[1]
    folder = hostile_files(tmp_path, payload, True)
    out = tmp_path / "b.html"
    report.main([str(folder), str(folder), "--baseline", str(folder), "--out", str(out)])
    assert_inert(out)
    assert_md_shape(out.with_suffix(".md"))


# ---------------------------------------------------------------------------------------------- pictures
IMAGE_CASES = {  # name: (how the samples file names it, what the page shows)
    "inside the root": ("inside", "img"),
    "absolute path elsewhere": ("private", "outside"),
    "dot-dot out of the root": ("dotdot", "outside"),
    "link leaving the root": ("link", "outside"),
    "decompression bomb": ("bomb", "too large"),
    "missing file": ("missing", "missing"),
}


@pytest.mark.parametrize("layout", ["legacy", "image_root"])
@pytest.mark.parametrize("case", IMAGE_CASES)
def test_pictures_only_from_inside_the_image_root(tmp_path, case, layout, capsys, no_charts):
    kind, expected = IMAGE_CASES[case]
    run_dir = tmp_path / "out" / "run"
    cache = tmp_path / "out" / "images"
    private = png(tmp_path / "private" / "private.png", color="blue")
    inside = png(cache / "a" / "inside.png")
    (cache / "a").mkdir(parents=True, exist_ok=True)
    os.symlink(private, cache / "a" / "link.png")
    bomb(cache / "a" / "bomb.png")
    relative = layout == "image_root"
    names = {"inside": "a/inside.png" if relative else inside, "private": private,
             "dotdot": "../../private/private.png" if relative
             else str(cache / ".." / ".." / "private" / "private.png"),
             "link": "a/link.png" if relative else str(cache / "a" / "link.png"),
             "bomb": "a/bomb.png" if relative else str(cache / "a" / "bomb.png"),
             "missing": "a/none.png" if relative else str(cache / "a" / "none.png")}
    # as a retrieval run records them: each image with the sha256 of its bytes (an index root shows only those)
    target = cache / str(names[kind]) if relative else Path(names[kind])
    digest = {"sha256": hashlib.sha256(target.read_bytes()).hexdigest()} if relative and target.is_file() else {}
    rows = vc_rows(2, lambda q, t: True, lambda q, t: False,
                   images=lambda q: [{"path": names[kind], "prompt": "p", "weight": 0.5, **digest}])
    extra = {"image_cache": "/"} if relative else {"image_cache": str(cache)}  # a legacy root; / is no root
    vc_run(run_dir, 1, "probs", rows, **extra)
    if relative:
        result = json.loads((run_dir / "imagenetvc.json").read_text())
        result["image_root"] = {"path": "../images", "absolute": str(cache), "kind": "index"}  # any name inside
        (run_dir / "imagenetvc.json").write_text(json.dumps(result))
    out = tmp_path / "r.html"
    info = report.main([str(run_dir), "--out", str(out)])
    page = assert_inert(out)
    card_imgs = [v for tag, k, v in page.attrs if tag == "img" and k == "src" and "image/png" not in v]
    err = capsys.readouterr().err.strip().splitlines()
    if expected == "img":
        assert len(card_imgs) == 10 and not err and not info["warnings"]
        return
    assert card_imgs == []
    private_uri = report.thumbnail(Path(private), 128)[0]
    assert private_uri not in out.read_text()
    # one warning for the kind, counting the one picture (named by all 10 rows, counted once per picture)
    assert len(err) == 1 and err[0].startswith("warning: 1 image ")
    assert err[0].startswith(f"warning: 1 image {report_media_reason(expected)}")
    assert err[0].endswith("; placeholders shown")
    # a missing picture's line also says where the report looked (the run's image root)
    assert ("; looked in " in err[0]) == (expected == "missing")


@pytest.mark.parametrize("kind", ["cache", "index", "index, no digests", "index, wrong digests", "images", None])
def test_a_recorded_root_shows_only_what_the_run_can_vouch_for(tmp_path, kind, capsys, no_charts):
    """A <task>.json may name any folder as its image root. As a cache it shows only the cache's own
    xx/<sha256>.png files (not the folder's other pictures); as an image collection only files whose bytes have
    the sha256 the run recorded (which a hostile file cannot know for someone's private pictures); an unknown
    kind names no root at all."""
    run_dir, root = tmp_path / "out" / "run", tmp_path / "photos"
    cached = "ab/" + "ab" * 32 + ".png"
    png(root / cached)
    png(root / "holiday" / "me.png", color="blue")

    def digest(name):
        if kind == "index, no digests":
            return {}
        data = (root / name).read_bytes() + (b"x" if kind == "index, wrong digests" else b"")
        return {"sha256": hashlib.sha256(data).hexdigest()}
    rows = vc_rows(2, lambda q, t: True, lambda q, t: False,
                   images=lambda q: [{"path": cached, "prompt": "p", "weight": 0.5, **digest(cached)},
                                     {"path": "holiday/me.png", "prompt": "p", "weight": 0.5,
                                      **digest("holiday/me.png")}])
    vc_run(run_dir, 1, "probs", rows)
    result = json.loads((run_dir / "imagenetvc.json").read_text())
    result["image_root"] = {"path": "../../photos", "absolute": str(root), "kind": (kind or "").split(",")[0] or None}
    (run_dir / "imagenetvc.json").write_text(json.dumps(result))
    out = tmp_path / "r.html"
    report.main([str(run_dir), "--out", str(out)])
    text = out.read_text()
    shown = {name: report.thumbnail((root / name).resolve(), 128)[0] in text for name in (cached, "holiday/me.png")}
    none = {cached: False, "holiday/me.png": False}
    assert shown == {"cache": {cached: True, "holiday/me.png": False}, "index": {cached: True, "holiday/me.png": True},
                     "index, no digests": none, "index, wrong digests": none, "images": none, None: none}[kind]
    capsys.readouterr()


def report_media_reason(kind):
    from eval_scripts.report_media import REASONS

    return REASONS[kind]


def test_a_root_of_slash_or_home_is_no_root(tmp_path):
    from eval_scripts.image_paths import SampleImages

    def roots(result):
        files = SampleImages.of_result(tmp_path, result)
        return files.roots, files.legacy

    assert roots({"config": {"image_cache": "/"}}) == ([], True)
    assert roots({"config": {"image_cache": str(Path.home())}}) == ([], True)
    assert roots({"image_root": {"path": "../../../../../../../.."}}) == ([], False)  # no kind: malformed
    assert roots({"image_root": {"path": "../../../../../../../..", "kind": "index"}}) == ([], False)
    assert roots({"config": {"image_cache": str(tmp_path)}}) == ([tmp_path.resolve()], True)


# ---------------------------------------------------------------------------------------------- files read
def test_no_samples_file_is_read_outside_the_run_folder(tmp_path):
    """A results file naming ``task: ../../secret`` still gets only the samples beside it (here: none)."""
    secret = [{"id": "SECRET-ROW", "prompt": "SECRET", "correct": True, "prediction": "x", "answer": "x"}]
    (tmp_path / "secret_samples.jsonl").write_text(json.dumps(secret[0]) + "\n")
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "..%2F..%2Fsecret_samples.jsonl").write_text("")
    folder = write_run(tmp_path / "a" / "b" / "run", "../../../secret", {"metrics": {"acc": 1.0},
                       "config": {"model_name": "m"}}, None, stem="t")
    out = tmp_path / "r.html"
    report.main([str(folder), "--out", str(out)])
    assert "SECRET" not in out.read_text() and "No samples file" in out.read_text()


LINK_CASES = {  # name: (which file is a link, where to, the message)
    "samples link out of the folder": ("t_samples.jsonl", "outside.jsonl", "a link out of the run folder"),
    "results link out of the folder": ("t.json", "outside.json", "a link out of the run folder"),
    "samples link to /dev/zero": ("t_samples.jsonl", "/dev/zero", "a link out of the run folder"),
}


@pytest.mark.parametrize("case", LINK_CASES)
def test_links_out_of_the_run_folder_are_refused(tmp_path, capsys, case):
    name, target, message = LINK_CASES[case]
    folder = tmp_path / "run"
    write_run(folder, "t", {"metrics": {"acc": 1.0}, "config": {"model_name": "m"}},
              [{"id": "1", "correct": True, "prediction": "a", "answer": "a"}], stem="t")
    target = Path(target) if target.startswith("/") else tmp_path / target
    if not target.is_absolute() or not target.exists():
        target.write_text((folder / name).read_text())
    (folder / name).unlink()
    os.symlink(target, folder / name)
    err = fails([str(folder), "--out", str(tmp_path / "r.html")], capsys, message)
    assert str(folder / name) in err
    assert not (tmp_path / "r.html").exists()


def test_a_fifo_named_like_a_result_is_refused(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    os.mkfifo(folder / "t.json")
    err = fails([str(folder), "--out", str(tmp_path / "r.html")], capsys, "not a regular file")
    assert str(folder / "t.json") in err


SIZE_CASES = {"results file": ("MAX_RESULT_BYTES", "t.json"), "samples file": ("MAX_SAMPLES_BYTES", "t_samples.jsonl")}


@pytest.mark.parametrize("case", SIZE_CASES)
def test_files_above_their_size_limit_are_refused(tmp_path, capsys, monkeypatch, case):
    limit, name = SIZE_CASES[case]
    folder = write_run(tmp_path / "run", "t", {"metrics": {"acc": 1.0}, "config": {"model_name": "m"}},
                       [{"id": str(i), "correct": True, "prediction": "a", "answer": "a", "prompt": "x" * 100}
                        for i in range(50)], stem="t")
    monkeypatch.setattr(results, limit, (folder / name).stat().st_size - 1)
    err = fails([str(folder), "--out", str(tmp_path / "r.html")], capsys, "larger than a file of its kind")
    assert str(folder / name) in err


# ---------------------------------------------------------------------------------------------- outputs
@pytest.fixture()
def small_run(tmp_path, no_charts):
    rows = vc_rows(2, lambda q, t: q == 0, lambda q, t: False)
    return vc_run(tmp_path / "k1", 1, "probs", rows)


OUT_CASES = {  # name: (argv after the run, message)
    "--out names a Markdown file": (["--out", "{d}/r.md"], "--out names the HTML page"),
    "--markdown names an HTML file": (["--out", "{d}/r.html", "--markdown", "{d}/r.html"], "ends in .md"),
    "--out without a suffix": (["--out", "{d}/r"], "--out names the HTML page"),
    "--figures names a file": (["--out", "{d}/r.html", "--figures", "{d}/notes.txt"], "is not a folder"),
}


@pytest.mark.parametrize("case", OUT_CASES)
def test_outputs_of_the_wrong_kind_are_refused_before_anything_is_written(tmp_path, small_run, capsys, case):
    argv, message = OUT_CASES[case]
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "r.md").write_text("my markdown")
    fails([str(small_run), *(a.format(d=tmp_path) for a in argv)], capsys, message)
    assert (tmp_path / "r.md").read_text() == "my markdown" and (tmp_path / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "r.html").exists() and not list(tmp_path.glob("*.tmp"))


def test_markdown_goes_where_markdown_says(tmp_path, small_run):
    info = report.main([str(small_run), "--out", str(tmp_path / "page.html"), "--markdown", str(tmp_path / "s.md")])
    assert info["md"] == str(tmp_path / "s.md") and (tmp_path / "s.md").read_text().startswith(report.MARK_MD)
    assert (tmp_path / "page.html").read_text().startswith("<!doctype html>")


@pytest.mark.parametrize("which", [0, 1], ids=["html write", "markdown write"])
def test_a_full_disk_is_one_line_naming_the_path_and_leaves_no_temporary_file(tmp_path, small_run, capsys,
                                                                           monkeypatch, which):
    real, calls = report._write_text, []

    def full(path, text):
        calls.append(path)
        if len(calls) - 1 == which:
            path.write_text(text[:10])  # a part written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, text)

    monkeypatch.setattr(report, "_write_text", full)
    out = tmp_path / "r.html"
    err = fails([str(small_run), "--out", str(out)], capsys, "No space left on device")
    assert str([out, out.with_suffix(".md")][which]) in err
    assert not list(tmp_path.glob("*.tmp")) and not out.exists() and not out.with_suffix(".md").exists()


# ---------------------------------------------------------------------------------------------- browse, figures
@pytest.fixture()
def k_runs(tmp_path):
    """A text-only run and k = 1, 2 under both mixing rules (the images fix item 0 and more with k)."""
    base = vc_run(tmp_path / "base", 0, "probs", vc_rows(6, lambda q, t: False, lambda q, t: False),
                  generate_images=False)
    runs = {"base": base}
    for mix in ("probs", "logits"):
        for k in (1, 2):
            rows = vc_rows(6, lambda q, t, k=k: q < k + (mix == "probs"), lambda q, t: False)
            runs[f"{mix}_k{k}"] = vc_run(tmp_path / f"{mix}_k{k}", k, mix, rows)
    return runs


def test_one_browser_per_image_run_and_the_baseline_once(tmp_path, k_runs):
    out = tmp_path / "r.html"
    image_runs = [k_runs[n] for n in ("probs_k1", "probs_k2", "logits_k1", "logits_k2")]
    info = report.main([*map(str, image_runs), str(k_runs["base"]), "--baseline", str(k_runs["base"]),
                        "--out", str(out)])
    page = assert_inert(out)
    labels = [v for tag, k, v in page.attrs if tag == "div" and k == "data-label"]
    assert labels == [f"{p.name} (k={p.name[-1]})" for p in image_runs]
    options = [v for tag, k, v in page.attrs if tag == "option" and k == "value"]
    assert options == ["0", "1", "2", "3"]
    assert set(info["flips"]["imagenetvc"]) == {p.name for p in image_runs}  # the baseline: no flips against itself
    assert info["flips"]["imagenetvc"]["probs_k2"] == {"fixed": 15, "broke": 0, "unchanged": 15}
    md_rows = [line for line in out.with_suffix(".md").read_text().splitlines() if line.startswith("| imagenetvc")]
    assert len(md_rows) == 5 and sum("| base (baseline) |" in r for r in md_rows) == 1
    base_row = next(r for r in md_rows if "(baseline)" in r)
    assert base_row.rstrip(" |").endswith("| – | – | –")  # no 0/0/N flips of the baseline against itself
    cells = [c.strip() for c in re.split(r"(?<!\\)\|", next(r for r in md_rows if "| probs_k2 |" in r))[1:-1]]
    row = dict(zip(report.COLUMNS, cells))
    assert row["image source"] == "generate" and row["generator / index"] == "toyworld"
    assert row["vision encoder"] == "tiny-clip" and row["k"] == "2" and row["mix"] == "probs"
    # text-only 0 of 6 questions: the exact binomial interval of 0/6 is (0, 45.9); fused 3 of 6: (11.8, 88.2)
    assert row["text-only (95% CI)"] == "0.00 (0.0 to 45.9)" and row["fused (95% CI)"] == "50.00 (11.8 to 88.2)"
    assert row["gain (95% CI)"].startswith("+50.00 (") and float(row["gain (95% CI)"].split("(")[1].split()[0]) > 0


def test_figures_are_written_as_svg_pdf_and_300_dpi_png_with_words(tmp_path, k_runs):
    from PIL import Image

    folder = tmp_path / "figs"
    runs = [k_runs[n] for n in ("base", "probs_k1", "probs_k2", "logits_k1", "logits_k2")]
    info = report.main([*map(str, runs), "--out", str(tmp_path / "r.html"), "--figures", str(folder)])
    stems = {Path(p).stem for p in info["figures"]}
    assert stems == {"accuracy_vs_k", "imagenetvc_per_subset", "per_task"}
    for stem in stems:
        for fmt in ("svg", "pdf", "png"):
            assert (folder / f"{stem}.{fmt}").is_file(), (stem, fmt)
        assert (folder / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
        with Image.open(folder / f"{stem}.png") as im:
            assert min(im.info["dpi"]) >= 299.5
        svg = ET.parse(folder / f"{stem}.svg").getroot()
        words = " ".join(t for el in svg.iter() for t in (el.text or "",))
        assert "accuracy (%)" in words or "headline metric (%)" in words, stem
    k_words = " ".join(el.text or "" for el in ET.parse(folder / "accuracy_vs_k.svg").getroot().iter())
    assert "images per question, k" in k_words and "accuracy (%)" in k_words
    assert "probability mixing" in k_words and "logit mixing" in k_words and "--mix" not in k_words
    assert not list(folder.glob("*.tmp"))
    # the page shows the same charts
    assert (tmp_path / "r.html").read_text().count("class='chart'") == 3


def test_figures_never_replace_a_chart_this_tool_did_not_write(tmp_path, k_runs, capsys):
    """--figures into a folder: our own charts are replaced by the next report; a same-named file of the user's (or
    one of ours edited since) is refused in one line before anything is written, unless --force."""
    folder, out = tmp_path / "figs", tmp_path / "r.html"
    runs = [str(k_runs[n]) for n in ("base", "probs_k1", "probs_k2")]
    report.main([*runs, "--out", str(out), "--figures", str(folder)])
    report.main([*runs, "--out", str(out), "--figures", str(folder)])  # ours: replaced without --force
    (folder / "per_task.svg").write_text("<svg>my edit</svg>")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "accuracy_vs_k.png").write_bytes(b"my own chart")
    for target, name in ((folder, "per_task.svg"), (mine, "accuracy_vs_k.png")):
        before = {p.name: p.read_bytes() for p in target.iterdir()}
        fails([*runs, "--out", str(tmp_path / "other.html"), "--figures", str(target)], capsys,
              f"{target / name} exists and was not written by this report")
        assert {p.name: p.read_bytes() for p in target.iterdir()} == before
        assert not (tmp_path / "other.html").exists()
    report.main([*runs, "--out", str(out), "--figures", str(mine), "--force"])
    assert (mine / "accuracy_vs_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_zero_bar_is_drawn(tmp_path):
    """A zero-height bar gets a thick line at 0 and a "0" label (visible in the SVG's text)."""
    from eval_scripts.figures import bar_figure, save_figure

    fig = bar_figure(["a", "b"], {"text only": {"a": (0.0, None), "b": (40.0, {"low": 30.0, "high": 50.0})}},
                     "task", "accuracy (%)")
    save_figure(fig, tmp_path, "z")
    texts = [el.text for el in ET.parse(tmp_path / "z.svg").getroot().iter() if el.text and el.text.strip()]
    assert "0" in texts


def test_the_demo_writes_its_page_with_the_report(tmp_path, k_runs):
    """demo.write_report on run folders named as the demo names them: the report's page and figures."""
    import shutil

    import demo

    results_dir = tmp_path / "demo" / "results"
    names = {"base": "text_only", "probs_k1": "probs_k1", "probs_k2": "probs_k2", "logits_k1": "logits_k1",
             "logits_k2": "logits_k2"}
    for src, name in names.items():
        shutil.copytree(k_runs[src], results_dir / name)
    info = demo.write_report(tmp_path / "demo", ["probs_k1", "probs_k2", "logits_k1", "logits_k2"])
    page = assert_inert(info["html"])
    assert [v for tag, k, v in page.attrs if tag == "div" and k == "data-label"] == \
        ["probs_k1 (k=1)", "probs_k2 (k=2)", "logits_k1 (k=1)", "logits_k2 (k=2)"]
    assert "text_only (baseline)" in "".join(page.text)
    assert {Path(p).name for p in info["figures"]} >= {"accuracy_vs_k.svg", "accuracy_vs_k.pdf", "accuracy_vs_k.png"}
