"""eval_scripts/outcomes.py: the intervals, text-only metrics and gains every ``<task>.json`` records, against
``interval_of`` / ``gain_of`` applied to per-item outcomes recomputed by hand from the samples file."""
from __future__ import annotations

import json

import pytest

from eval_scripts import boolq, imagenetVC, outcomes, squad
from eval_scripts.intervals import gain_of, interval_of
from tests.paths import TEST_DATA

pytestmark = pytest.mark.usefixtures("one_thread")


def argv(lm, clip, tmp, run, images=True, extra=()):
    args = ["--model_name", lm, "--vision_encoder", clip, "--k", "2", "--limit", "4", "--device", "cpu",
            "--image_generator", "toyworld", "--image_size", "32", "--image_cache", str(tmp / "cache"),
            "--output_dir", str(tmp / "out"), "--run_name", run, "--batch_size", "8"]
    return args + (["--generate_images"] if images else []) + list(extra)


def read(tmp, run, task):
    result = json.loads((tmp / "out" / run / f"{task}.json").read_text())
    rows = [json.loads(x) for x in (tmp / "out" / run / f"{task}_samples.jsonl").read_text().splitlines()]
    return result, rows


def per_question(rows, correct):
    """Mean of ``correct(row)`` over each question's template rows, questions in first-seen order."""
    out = {}
    for r in rows:
        out.setdefault(r["id"].rsplit("/t", 1)[0], []).append(float(correct(r)))
    return [sum(v) / len(v) for v in out.values()]


def test_imagenetvc_intervals_text_only_and_gain(lm_dirs, tiny_clip_spec, tmp_path):
    result = imagenetVC.main(argv(lm_dirs["gpt2"], tiny_clip_spec, tmp_path, "vc", extra=["--subsets", "color,shape"]))
    result, rows = read(tmp_path, "vc", "imagenetvc")
    fused, text = {}, {}
    for subset in ("color", "shape"):
        mine = [r for r in rows if r["subset"] == subset]
        fused[subset] = per_question(mine, lambda r: r["correct"])
        text[subset] = per_question(mine, lambda r: r["text_only_prediction"] == r["answer"])
        assert len(fused[subset]) == 4
        assert result["intervals"][subset] == pytest.approx(interval_of(fused[subset]))
        assert result["text_only"]["intervals"][subset] == pytest.approx(interval_of(text[subset]))
        assert result["gain"][subset] == pytest.approx(gain_of(fused[subset], text[subset]))
        assert result["intervals"][subset]["low"] <= result["metrics"][subset]["mean"] <= \
            result["intervals"][subset]["high"]
        assert result["text_only"]["metrics"][subset] == pytest.approx(100 * sum(text[subset]) / 4)
    # overall is the macro average: with equal subset sizes the weighted outcomes are the questions' own
    both = fused["color"] + fused["shape"]
    assert result["intervals"]["overall"] == pytest.approx(interval_of(both))
    assert result["metrics"]["overall"]["mean"] == pytest.approx(100 * sum(both) / 8)
    assert "std" in result["metrics"]["overall"]  # the across-template std stays


def test_a_text_only_run_has_intervals_but_no_gain(lm_dirs, tiny_clip_spec, tmp_path):
    boolq.main(argv(lm_dirs["gpt2"], tiny_clip_spec, tmp_path, "b", images=False,
                    extra=["--data_dir", str(TEST_DATA / "boolq")]))
    result, rows = read(tmp_path, "b", "boolq")
    correct = [float(r["correct"]) for r in rows]
    assert result["intervals"] == {"acc": interval_of(correct)}
    assert result["intervals"]["acc"]["method"] == "clopper-pearson" and result["intervals"]["acc"]["n"] == 4
    assert "gain" not in result and "text_only" not in result


def test_boolq_image_run_gain(lm_dirs, tiny_clip_spec, tmp_path):
    boolq.main(argv(lm_dirs["gpt2"], tiny_clip_spec, tmp_path, "bi", extra=["--data_dir", str(TEST_DATA / "boolq")]))
    result, rows = read(tmp_path, "bi", "boolq")
    fused = [float(r["correct"]) for r in rows]
    text = [float(r["text_only_prediction"] == r["answer"]) for r in rows]
    assert result["gain"]["acc"] == pytest.approx(gain_of(fused, text))
    assert result["text_only"]["metrics"]["acc"] == pytest.approx(100 * sum(text) / len(text))


def test_constructed_outcomes():
    """Hand-made records: template means per question, QuAC's human-F1 filter, SQuAD's groups."""
    recs = [{"id": f"q{q}/t{t}", "set": "shape", "template": t, "correct": (q + t) % 3 == 0, "answer": "a",
             "text_only_prediction": "a" if t == 0 else "b"} for q in range(3) for t in range(3)]
    got = outcomes.item_outcomes("object_commonsense", recs)[("shape",)]
    assert got == ([1 / 3, 1 / 3, 1 / 3], [1 / 3, 1 / 3, 1 / 3])
    assert outcomes.weighted([[1.0, 0.0], [1.0]]) == [0.75, 0.0, 1.5]  # 3 / (2 * 2), 3 / (2 * 1): mean 0.75
    squad_recs = [{"id": str(i), "exact_match": float(i % 2), "f1": 0.5, "is_impossible": i == 0} for i in range(4)]
    got = outcomes.summarize("squad", {"exact_match": 50.0, "f1": 50.0, "answerable": {}, "unanswerable": {}},
                             squad_recs)
    assert got["intervals"]["answerable"]["exact_match"] == interval_of([1.0, 0.0, 1.0])
    assert got["intervals"]["f1"]["method"] == "bootstrap" and "gain" not in got
    quac_recs = [{"id": "a", "exact_match": 1.0, "f1": 1.0, "answers": ["red car"]},
                 {"id": "b", "exact_match": 0.0, "f1": 0.2, "answers": ["red car", "blue boat", "green tree"]}]
    got = outcomes.summarize("quac", {"f1": 100.0, "exact_match": 50.0}, quac_recs)
    assert got["intervals"]["f1"]["n"] == 1 and got["intervals"]["exact_match"]["n"] == 2


def test_squad_image_run_records_the_lms_own_answer(lm_dirs, tiny_clip_spec, tmp_path):
    """The text-only answer of an image run is the answer a text-only run generates; its EM/F1 give the gain."""
    extra = ["--data_dir", str(TEST_DATA / "squad_v2"), "--max_new_tokens", "4", "--limit", "3"]
    squad.main(argv(lm_dirs["llama"], tiny_clip_spec, tmp_path, "qi", extra=extra))
    squad.main(argv(lm_dirs["llama"], tiny_clip_spec, tmp_path, "qt", images=False, extra=extra))
    result, rows = read(tmp_path, "qi", "squad")
    _, text_rows = read(tmp_path, "qt", "squad")
    assert [r["text_only_generation"] for r in rows] == [r["prediction"] for r in text_rows]
    assert [r["text_only_f1"] for r in rows] == [r["f1"] for r in text_rows]
    fused = [r["exact_match"] for r in rows]
    text = [r["exact_match"] for r in text_rows]
    assert result["gain"]["exact_match"] == pytest.approx(gain_of(fused, text))
    assert result["text_only"]["intervals"]["f1"] == pytest.approx(interval_of([r["f1"] for r in text_rows]))
