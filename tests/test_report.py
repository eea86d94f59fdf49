"""eval_scripts/report.py on real ImageNetVC runs of the tiny zoo (text-only, k = 1, k = 2), and the
text-only predictions image runs record."""
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from eval_scripts import report
from eval_scripts.runtime import clear_memos
from eval_scripts.cli import run_main
from eval_scripts.imagenetVC import main as imagenetvc
from tests.paths import EVAL_DATA
from tests.zoo import boosted_checkpoint

VC = EVAL_DATA / "imagenetvc"
VOID = {"meta", "img", "br", "input", "link", "hr"}

pytestmark = pytest.mark.usefixtures("one_thread")


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(one_thread, tmp_path_factory, lm_dirs, tiny_clip_spec, tiny_sdxl_dir):
    """Text-only, k = 1 and k = 2 runs of imagenetVC.py (2 subsets x 2 questions x 5 templates)."""
    root = tmp_path_factory.mktemp("report")
    _, ckpt = boosted_checkpoint(root, lm_dirs["llama"], tiny_clip_spec, seed=3)
    common = ["--model_name", lm_dirs["llama"], "--data_dir", str(VC), "--subsets", "color,shape", "--limit", "2",
              "--output_dir", str(root / "out"), "--device", "cpu"]
    images = ["--pretrained_model", str(ckpt), "--generate_images", "--vision_encoder", tiny_clip_spec,
              "--image_generator", str(tiny_sdxl_dir), "--image_size", "64", "--image_cache", str(root / "cache")]
    clear_memos()
    imagenetvc(common + ["--run_name", "text"])
    imagenetvc(common + images + ["--run_name", "k2", "--k", "2"])
    imagenetvc(common + images + ["--run_name", "k1", "--k", "1"])
    return {"root": root, **{name: root / "out" / name for name in ("text", "k1", "k2")}}


def samples(run_dir):
    return {r["id"]: r for r in read_jsonl(Path(run_dir) / "imagenetvc_samples.jsonl")}


class Page(HTMLParser):
    """Collects the example cards and images of a report, and checks that every tag closes."""

    def __init__(self):
        super().__init__()
        self.stack, self.problems = [], []
        self.cards, self.imgs, self.card_imgs = [], [], []
        self._in_card = False
        self._header = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.imgs.append(attrs.get("src", ""))
            if self._in_card:
                self.card_imgs[-1].append(attrs.get("src", ""))
        if tag == "article":
            self._in_card = True
            self.cards.append({"flip": attrs.get("data-flip"), "id": None})
            self.card_imgs.append([])
        if tag == "b" and self._in_card and self.cards[-1]["id"] is None:
            self._header = ""
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()
        if tag == "article":
            self._in_card = False
        if tag == "b" and self._header is not None:
            self.cards[-1]["id"] = self._header
            self._header = None

    def handle_data(self, data):
        if self._header is not None:
            self._header += data


def parse(path) -> Page:
    page = Page()
    page.feed(Path(path).read_text(encoding="utf-8"))
    page.close()
    assert not page.problems and not page.stack, (page.problems, page.stack)
    return page


def direct_flips(text: dict, fused: dict) -> dict:
    counts = {"fixed": 0, "broke": 0, "unchanged": 0}
    for i, f in fused.items():
        t = text[i]["correct"]
        counts["fixed" if f["correct"] and not t else "broke" if t and not f["correct"] else "unchanged"] += 1
    return counts


# ---------------------------------------------------------------------------------------------- text-only
def test_image_runs_record_the_text_only_prediction(runs):
    """text_only_scores and text_only_prediction of a k = 2 run are what the text-only run scored."""
    text, fused = samples(runs["text"]), samples(runs["k2"])
    assert set(text) == set(fused) and len(fused) == 20
    for i, rec in fused.items():
        assert {"id", "prompt", "candidates", "scores", "prediction", "answer", "correct", "images"} <= set(rec)
        assert rec["text_only_scores"] == pytest.approx(text[i]["scores"], abs=1e-4)
        assert rec["text_only_prediction"] == text[i]["prediction"]
        assert "text_only_prediction" not in text[i]
    # the images moved some score, so the text-only scores are not just a copy of the fused ones
    assert any(r["scores"] != pytest.approx(r["text_only_scores"], abs=1e-4) for r in fused.values())
    result = json.loads((runs["k2"] / "imagenetvc.json").read_text())
    assert result["counts"]["lm_passes"] <= 3  # no extra LM pass: 20 items in batches of 8, memo shared


# ---------------------------------------------------------------------------------------------- report
def test_report_lists_every_example_with_flips_and_embedded_thumbnails(runs, tmp_path):
    out = tmp_path / "r.html"
    info = report.main([str(runs["k2"]), "--baseline", str(runs["text"]), "--out", str(out)])
    text, fused = samples(runs["text"]), samples(runs["k2"])
    page = parse(out)
    assert sorted(c["id"] for c in page.cards) == sorted(fused)  # every example, once
    expected = direct_flips(text, fused)
    assert info["flips"]["imagenetvc"]["k2"] == expected
    assert {name: sum(c["flip"] == name for c in page.cards) for name in expected} == expected
    # each example's two images are embedded as thumbnails; every picture on the page is a data: URI
    for card, imgs in zip(page.cards, page.card_imgs):
        assert len(imgs) == len({im["path"] for im in fused[card["id"]]["images"]}) == 2
    assert page.imgs and all(src.startswith("data:image/") for src in page.imgs)
    assert all(re.match(r"data:image/(webp|jpeg);base64,", src) for imgs in page.card_imgs for src in imgs)
    html_text = out.read_text(encoding="utf-8")
    assert "http://" not in html_text and "https://" not in html_text  # nothing fetched from elsewhere
    assert len(html_text.encode("utf-8")) <= report.EXAMPLE_BUDGET * len(page.cards)
    md = out.with_suffix(".md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| imagenetvc | k2 "))
    assert row.rstrip(" |").endswith(f"{expected['fixed']} | {expected['broke']} | {expected['unchanged']}")


def test_flips_from_the_samples_alone_equal_those_against_the_text_only_run(runs, tmp_path):
    with_baseline = report.main([str(runs["k2"]), "--baseline", str(runs["text"]), "--out", str(tmp_path / "a.html")])
    alone = report.main([str(runs["k2"]), "--out", str(tmp_path / "b.html")])
    assert alone["flips"] == with_baseline["flips"]
    md = (tmp_path / "b.md").read_text()
    text_acc = json.loads((runs["text"] / "imagenetvc.json").read_text())["metrics"]["overall"]["mean"]
    assert f"| {text_acc:.2f} (" in md  # the text-only column, recomputed from the k = 2 samples


def test_runs_that_differ_only_in_k_get_an_accuracy_vs_k_chart(runs, tmp_path):
    out = tmp_path / "k.html"
    info = report.main([str(runs["text"]), str(runs["k1"]), str(runs["k2"]), "--out", str(out)])
    page_text = out.read_text()
    assert "alt='accuracy against the number of images k'" in page_text
    assert "alt='imagenetvc per subset'" in page_text
    page = parse(out)  # one browser per image run: k1's and k2's examples
    assert len(page.cards) == 40 and info["shown_by_run"] == {"imagenetvc": {"k1": 20, "k2": 20}}
    # the text-only run among the runs is the baseline; the examples shown are the last image run's
    assert info["flips"]["imagenetvc"]["k2"] == direct_flips(samples(runs["text"]), samples(runs["k2"]))
    assert "k1 (k=1): " in page_text  # the other run's prediction beside each example


def test_max_examples_shows_flips_first(runs, tmp_path):
    out = tmp_path / "m.html"
    report.main([str(runs["k2"]), "--baseline", str(runs["text"]), "--out", str(out), "--max_examples", "3"])
    page = parse(out)
    flips = direct_flips(samples(runs["text"]), samples(runs["k2"]))
    assert len(page.cards) == 3
    n_flipped = flips["fixed"] + flips["broke"]
    assert sum(c["flip"] in ("fixed", "broke") for c in page.cards) == min(3, n_flipped)


def test_the_report_does_not_overwrite_a_file_it_did_not_write(runs, tmp_path, capsys):
    out = tmp_path / "mine.html"
    out.write_text("my notes")
    with pytest.raises(SystemExit) as e:
        run_main(report.main, [str(runs["k2"]), "--out", str(out)])
    assert e.value.code == 2 and out.read_text() == "my notes"
    assert capsys.readouterr().err.strip().startswith("error: ")
    report.main([str(runs["k2"]), "--out", str(tmp_path / "ours.html")])
    report.main([str(runs["k2"]), "--out", str(tmp_path / "ours.html")])  # its own file: rewritten


# ---------------------------------------------------------------------------------------------- other layouts
def _fake_run(root: Path, task: str, config: dict, metrics: dict, rows: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{task}.json").write_text(json.dumps({"task": task, "metrics": metrics, "config": config,
                                                   "counts": {"examples": len(rows)}}))
    (root / f"{task}_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_commonsense_and_generation_layouts(tmp_path):
    """Option-index predictions with one image list per option, and generated answers with a baseline."""
    from PIL import Image

    paths = []
    for i, color in enumerate(("red", "blue", "green")):
        paths.append(str(tmp_path / f"im{i}.png"))
        Image.new("RGB", (200, 150), color).save(paths[-1])
    cfg = {"model_name": "m", "generate_images": True, "k": 2, "mix": "logits", "protocol": "released",
           "image_cache": str(tmp_path)}
    piqa = _fake_run(tmp_path / "cs", "commonsense_piqa", cfg, {"acc": 50.0, "n": 2}, [
        {"id": "q1", "protocol": "released", "prompt": "<script>alert(1)</script> open a jar",
         "candidates": ["twist the lid", "hit it"], "scores": [3.1, 5.2], "prediction": 0, "answer": 0,
         "correct": True, "text_only_scores": [6.0, 4.0], "text_only_prediction": 1,
         "images": [[{"path": paths[0], "prompt": "a jar", "weight": 0.4},
                     {"path": paths[1], "prompt": "lid", "weight": 0.2}],
                    [{"path": paths[0], "prompt": "a jar", "weight": 0.4},
                     {"path": paths[2], "prompt": "hit", "weight": 0.1}]]},
        {"id": "q2", "protocol": "released", "prompt": "b" * 200_000, "candidates": ["x", "y"], "scores": [2.0, 1.0],
         "prediction": 1, "answer": 0, "correct": False, "text_only_scores": [1.0, 2.0], "text_only_prediction": 0,
         "images": [[{"path": str(tmp_path / "gone.png"), "prompt": "b", "weight": 0.3}]] * 2}])
    out = tmp_path / "cs.html"
    info = report.main([str(piqa), "--out", str(out)])
    page = parse(out)
    assert info["flips"] == {"commonsense_piqa": {"cs": {"fixed": 1, "broke": 1, "unchanged": 0}}}
    assert [c["flip"] for c in page.cards] == ["fixed", "broke"]
    assert len(page.card_imgs[0]) == 3 and len(page.card_imgs[1]) == 0  # shared image once; a missing one
    assert "<script>alert(1)" not in out.read_text() and "image not found" in out.read_text()
    assert len(out.read_bytes()) <= 2 * report.EXAMPLE_BUDGET  # a 200 KB prompt is cut to fit

    text_cfg = {"model_name": "m", "generate_images": False, "k": 10, "image_cache": str(tmp_path)}
    gen = {"prompt": "Q: who?\nA:", "answers": ["Ann"], "is_impossible": False, "images": []}
    base = _fake_run(tmp_path / "sq_text", "squad", text_cfg, {"exact_match": 0.0, "f1": 0.0, "n": 1},
                     [{"id": "s1", **gen, "prediction": "Bob", "exact_match": 0.0, "f1": 0.0, "correct": False}])
    fused = _fake_run(tmp_path / "sq", "squad", {**text_cfg, "generate_images": True, "k": 2},
                      {"exact_match": 100.0, "f1": 100.0, "n": 1},
                      [{"id": "s1", **gen, "prediction": "Ann", "exact_match": 1.0, "f1": 1.0, "correct": True,
                        "images": [{"path": paths[0], "prompt": "who", "weight": 0.5}]}])
    info = report.main([str(fused), "--baseline", str(base), "--out", str(tmp_path / "sq.html")])
    assert info["flips"] == {"squad": {"sq": {"fixed": 1, "broke": 0, "unchanged": 0}}}
    assert "text-only: <b>Bob</b>" in (tmp_path / "sq.html").read_text()


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_one_line_and_exit_2(runs, tmp_path, capsys):
    other = _fake_run(tmp_path / "bq", "boolq", {"model_name": "m"}, {"acc": 50.0, "n": 1},
                      [{"id": "b1", "prompt": "p", "candidates": ["yes", "no"], "scores": [0, 1], "prediction": "no",
                        "answer": "no", "correct": True, "images": []}])
    (tmp_path / "empty").mkdir()
    cases = {"holds no result files": [str(tmp_path / "empty")],
             "is not a directory": [str(tmp_path / "nowhere")],
             "runs of different tasks cannot be compared": [str(runs["k2"]), str(other)],
             "the baseline": [str(runs["k2"]), "--baseline", str(other)]}
    for message, argv in cases.items():
        with pytest.raises(SystemExit) as e:
            run_main(report.main, argv + ["--out", str(tmp_path / "x.html")])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "x.html").exists()
