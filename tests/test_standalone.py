"""The repository stands alone: its own data, no references to files outside it, every reader takes a
folder or a single file, SQuAD 1.1 as well as 2.0."""
from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

from data import benchmarks as B
from eval_scripts import commonsenseQA, imagenetVC, object_commonsense, quac, squad
from eval_scripts.core import run_main
from eval_scripts.metrics import exact_match, f1
from tests.paths import EVAL_DATA, REPO, TEST_DATA

pytestmark = pytest.mark.usefixtures("one_thread")

# Names of things that exist only where the project is developed, written in pieces so that this file
# does not match itself.
FORBIDDEN = ("../" + "shared", "shared" + "/data", "METHOD" + ".md", "CONVENTIONS" + ".md")


def test_no_tracked_file_names_outside_material():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split("\0")
    assert len(files) > 50
    hits = []
    for name in filter(None, files):
        path = REPO / name
        if not path.is_file():
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        hits += [f"{name}: {word}" for word in FORBIDDEN if word in text]
    assert hits == []


def test_shipped_data_has_sources_and_tests_data_is_small():
    for folder in [EVAL_DATA / "imagenetvc", EVAL_DATA / "object_commonsense", *TEST_DATA.iterdir()]:
        if folder.is_dir():
            source = (folder / "SOURCE.md").read_text()
            assert "Origin" in source and "icen" in source and "SHA-256" in source, folder  # licence/license
    size = sum(p.stat().st_size for p in TEST_DATA.rglob("*") if p.is_file())
    assert size < 1.5 * 2**20


def _csv_rows(path: Path) -> int:
    with open(path, newline="", encoding="utf-8") as f:
        return sum(1 for _ in csv.reader(f)) - 1


def test_imagenetvc_reads_the_shipped_files_by_default():
    args = imagenetVC.parse_args([])
    assert Path(args.data_dir) == B.IMAGENETVC_DIR == EVAL_DATA / "imagenetvc"
    examples = imagenetVC.load_examples(args)
    assert list(examples) == list(B.IMAGENETVC_SUBSETS)
    for subset, rows in examples.items():
        assert len(rows) == _csv_rows(EVAL_DATA / "imagenetvc" / f"{subset}.csv")
    assert imagenetVC.parse_args(["--from_hub"]).data_dir is None


def test_object_commonsense_reads_the_shipped_files_by_default():
    examples = object_commonsense.load_examples(object_commonsense.parse_args([]))
    valm = EVAL_DATA / "object_commonsense" / "valm"
    files = {"memory_color": "memory_color_data.csv", "color_terms": "color-concrete-objects.csv",
             "shape": "shape.csv", "relative_size": "size.csv"}
    assert {name: len(rows) for name, rows in examples.items()} == {
        name: _csv_rows(valm / file) for name, file in files.items()}


def _text_only(lm, tmp_path, run, *extra):
    return ["--model_name", lm, "--device", "cpu", "--output_dir", str(tmp_path), "--run_name", run, *extra]


def test_both_scripts_run_with_no_data_flags(lm_dirs, tmp_path):
    res = imagenetVC.main(_text_only(lm_dirs["gpt2"], tmp_path, "vc", "--limit", "2", "--subsets", "color,others"))
    assert res["metrics"]["color"]["n"] == 2 and res["metrics"]["others"]["n"] == 2
    first = next(csv.DictReader(open(EVAL_DATA / "imagenetvc" / "color.csv", encoding="utf-8")))
    rows = [json.loads(x) for x in (tmp_path / "vc" / "imagenetvc_samples.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"] == first["question"] and rows[0]["answer"] == first["answer"].strip().lower()
    res = object_commonsense.main(_text_only(lm_dirs["gpt2"], tmp_path, "oc", "--limit", "1"))
    assert {name: m["n"] for name, m in res["metrics"].items()} == dict.fromkeys(B.OBJECT_SETS, 1)


def test_data_file_on_every_script(lm_dirs, tmp_path):
    lm = lm_dirs["gpt2"]
    color = EVAL_DATA / "imagenetvc" / "color.csv"
    res = imagenetVC.main(_text_only(lm, tmp_path, "vc", "--limit", "1", "--data_file", str(color)))
    assert list(res["config"]["subsets"]) == ["color"] and res["metrics"]["color"]["n"] == 1
    memory = EVAL_DATA / "object_commonsense" / "valm" / "memory_color_data.csv"
    res = object_commonsense.main(_text_only(lm, tmp_path, "oc", "--limit", "1", "--data_file", str(memory)))
    assert list(res["metrics"]) == ["memory_color"]
    res = commonsenseQA.main(_text_only(lm, tmp_path, "mc", "--limit", "2", "--testset", "piqa",
                                        "--data_file", str(TEST_DATA / "piqa" / "valid.jsonl")))
    assert res["metrics"]["n"] == 2
    res = quac.main(_text_only(lm, tmp_path, "qc", "--limit", "1", "--max_new_tokens", "2",
                               "--data_file", str(TEST_DATA / "quac" / "val_v0.2.json")))
    assert res["metrics"]["n"] == 1


def _squad11(folder: Path) -> Path:
    """A SQuAD 1.1 file in the official layout, from the answerable questions of the 2.0 sample."""
    data = json.loads((TEST_DATA / "squad_v2" / "dev-v2.0.json").read_text())
    for article in data["data"]:
        for par in article["paragraphs"]:
            par["qas"] = [{k: v for k, v in qa.items() if k != "is_impossible"}
                          for qa in par["qas"] if not qa["is_impossible"]]
    data["version"] = "1.1"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "dev-v1.1.json"
    path.write_text(json.dumps(data))
    return path


def test_squad11_is_read_and_scored_without_the_no_answer_rule(lm_dirs, tmp_path):
    path = _squad11(tmp_path / "v11")
    records = B.load_squad(tmp_path / "v11")
    assert records and {r["squad_version"] for r in records} == {"1.1"} and not any(r["is_impossible"] for r in records)
    assert {r["squad_version"] for r in B.load_squad(TEST_DATA / "squad_v2")} == {"2.0"}
    # 2.0 scores abstention as the empty answer; 1.1 has no such rule
    assert squad.squad_scores("Not in background.", []) == (1.0, 1.0)
    assert squad.squad11_scores("Not in background.", ["France"]) == (0.0, 0.0)
    assert squad.squad11_scores("the France", ["France"]) == (1.0, 1.0)

    base = _text_only(lm_dirs["gpt2"], tmp_path, "s11", "--limit", "3", "--max_new_tokens", "3")
    res = squad.main([*base, "--data_dir", str(tmp_path / "v11")])
    assert res["task"] == "squad_v1.1" and res["metrics"]["n"] == 3 and "unanswerable" not in res["metrics"]
    rows = [json.loads(x) for x in (tmp_path / "s11" / "squad_v1.1_samples.jsonl").read_text().splitlines()]
    em = 100 * sum(exact_match(r["prediction"], r["answers"]) for r in rows) / 3
    f = 100 * sum(f1(r["prediction"], r["answers"]) for r in rows) / 3
    assert res["metrics"]["exact_match"] == pytest.approx(em) and res["metrics"]["f1"] == pytest.approx(f)
    again = squad.main([*_text_only(lm_dirs["gpt2"], tmp_path, "s11f", "--limit", "3", "--max_new_tokens", "3"),
                        "--data_file", str(path)])
    assert again["metrics"] == res["metrics"]
    v2 = squad.main([*_text_only(lm_dirs["gpt2"], tmp_path, "s2f", "--limit", "2", "--max_new_tokens", "2"),
                     "--data_file", str(TEST_DATA / "squad_v2" / "dev-v2.0.json")])
    assert v2["task"] == "squad" and v2["metrics"]["n"] == 2


@pytest.mark.parametrize("script,extra,expected", [
    (imagenetVC, [], "no color.csv, shape.csv, material.csv, component.csv, others.csv in"),
    (object_commonsense, [], "no memory_color_data.csv, color-concrete-objects.csv, shape.csv, size.csv in"),
    (squad, [], "no dev-v2.0.json or dev-v1.1.json in"),
    (commonsenseQA, ["--testset", "piqa"], "valid.jsonl not found"),
])
def test_a_data_dir_without_the_files_names_them(script, extra, expected, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as e:
        run_main(script.main, ["--data_dir", str(empty), "--output_dir", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and expected in err and str(empty) in err
    assert not (tmp_path / "out").exists()
