"""Benchmark readers against the shipped evaluation files, the trimmed real samples in tests/data, and small
fixtures in original layouts."""

import csv
import json
from pathlib import Path

import pytest

from data import benchmarks as B

from tests.paths import EVAL_DATA, TEST_DATA


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _csv_rows(path: Path) -> int:
    with open(path, newline="", encoding="utf-8") as f:
        return sum(1 for _ in csv.reader(f)) - 1


# ---------------------------------------------------------------- ImageNetVC


def test_imagenetvc_counts_match_the_files():
    # The files lack a final newline (except shape.csv), so `wc -l` reports one fewer row; the
    # ImageNetVC paper's total is 4,076 = 557 + 424 + 430 + 1114 + 1551.
    expected = {"color": 557, "shape": 424, "material": 430, "component": 1114, "others": 1551}
    for subset, n in expected.items():
        records = B.load_imagenetvc(subset, EVAL_DATA / "imagenetvc")
        assert len(records) == n == _csv_rows(EVAL_DATA / "imagenetvc" / f"{subset}.csv")
    assert sum(expected.values()) == 4076


def test_imagenetvc_record_and_others_groups():
    first = B.load_imagenetvc("color", EVAL_DATA / "imagenetvc")[0]
    assert first == {"id": "color-0", "category": "tench", "question": "What's the color of a tench?",
                     "answer": "green", "candidates": list(B.IMAGENETVC_CANDIDATES["color"]), "group": "color"}
    others = B.load_imagenetvc("others", EVAL_DATA / "imagenetvc")
    with open(EVAL_DATA / "imagenetvc" / "others.csv", newline="") as f:
        answers = [r["answer"] for r in csv.DictReader(f)]
    n_yes = sum(a in ("yes", "no") for a in answers)
    n_num = sum(a in ("2", "4", "6", "1", "8", "3", "5") for a in answers)
    groups = [r["group"] for r in others]
    assert groups.count("others_yes") == n_yes
    assert groups.count("others_number") == n_num
    assert groups.count("others_other") == len(answers) - n_yes - n_num
    assert others[3]["answer"] == "short" and others[3]["group"] == "others_other"
    assert B.load_imagenetvc("shape", EVAL_DATA / "imagenetvc", limit=3)[2]["id"] == "shape-2"


def test_imagenetvc_candidates_and_templates():
    assert B.imagenetvc_candidates("others", "4") == ["2", "4", "6", "1", "8", "3", "5"]
    assert B.imagenetvc_candidates("others", "Yes") == ["yes", "no"]
    assert "feathers" in B.imagenetvc_candidates("others", "long")
    assert B.imagenetvc_candidates("component") == ["yes", "no"]
    assert len(B.imagenetvc_candidates("material")) == 16
    with pytest.raises(ValueError, match="needs the answer"):
        B.imagenetvc_candidates("others")
    with pytest.raises(ValueError, match="unknown ImageNetVC subset"):
        B.imagenetvc_candidates("texture")
    assert [t.format(q="Q?") for t in B.IMAGENETVC_TEMPLATES] == [
        "Q?", "Q? Answer:", "Q? The answer is", "Question: Q? Answer:", "Question: Q? The answer is"]
    demos = [{"question": "What color is snow?", "answer": "white"}, {"question": "Is fire cold?", "answer": "no"}]
    assert B.imagenetvc_prompt("What color is grass?", 3, demos) == (
        "Question: What color is snow? Answer: white. Question: Is fire cold? Answer: no. "
        "Question: What color is grass? Answer:")


def test_imagenetvc_demos_by_group():
    numbers = B.load_imagenetvc_demos("others", EVAL_DATA / "imagenetvc", answer="4")
    assert [d["answer"] for d in numbers] == ["4", "2", "10", "1", "3"]  # "10" is kept
    assert numbers[0] == {"category": "tree frog", "question": "How many legs does the tree frog have?",
                          "answer": "4"}
    assert len(B.load_imagenetvc_demos("others_yes", EVAL_DATA / "imagenetvc")) == 5
    assert B.load_imagenetvc_demos("color", EVAL_DATA / "imagenetvc")[0]["category"] == "hammerhead"


def test_imagenetvc_bad_rows(tmp_path):
    (tmp_path / "color.csv").write_text("category,question\ntench,What color?\n")
    with pytest.raises(ValueError, match=r"color\.csv:1: missing column\(s\) answer"):
        B.load_imagenetvc("color", tmp_path)
    (tmp_path / "color.csv").write_text("category,question,answer\ntench,Color?,green\ncrow,Color?,violet\n")
    with pytest.raises(ValueError, match=r"color\.csv:3: answer 'violet' is not in the color candidate list"):
        B.load_imagenetvc("color", tmp_path)
    with pytest.raises(FileNotFoundError, match="shape.csv"):
        B.load_imagenetvc("shape", tmp_path)


def test_imagenetvc_hub_path(monkeypatch):
    calls = []

    def fake(path, name=None, split="validation", *, revision=None, data_files=None):
        calls.append((path, data_files))
        return iter([{"category": "goldfish", "question": "How many fins?", "answer": 4}])

    monkeypatch.setattr(B, "_hub_rows", fake)
    rec = B.load_imagenetvc("others")[0]
    assert calls == [("hemingkx/ImageNetVC", {"train": "others.csv"})]
    assert rec["answer"] == "4" and rec["group"] == "others_number"


# ---------------------------------------------------------------- object commonsense


def test_object_commonsense_counts_and_records():
    valm = EVAL_DATA / "object_commonsense" / "valm"
    files = {"memory_color": "memory_color_data.csv", "color_terms": "color-concrete-objects.csv",
             "shape": "shape.csv", "relative_size": "size.csv"}
    counts = {name: len(B.load_object_commonsense(name, EVAL_DATA / "object_commonsense")) for name in B.OBJECT_SETS}
    assert counts == {name: _csv_rows(valm / f) for name, f in files.items()}
    assert counts == {"memory_color": 108, "color_terms": 51, "shape": 140, "relative_size": 486}

    memory = B.load_object_commonsense("memory_color", valm)
    assert memory[0] == {"id": "memory_color-1", "object": "sunflower", "descriptor": "a", "answer": "yellow",
                         "candidates": ["black", "blue", "brown", "gray", "green", "grey", "orange", "pink",
                                        "purple", "red", "white", "yellow"]}
    assert memory[7]["descriptor"] == "the inside of a"
    assert B.object_phrase(memory[7]["descriptor"], memory[7]["object"]) == "the inside of a pineapple"
    assert B.object_phrase("", "grass") == "grass"
    size = B.load_object_commonsense("relative_size", valm)
    assert size[0] == {"id": "relative_size-0", "obj1": "airplane", "descriptor1": "an", "obj2": "apple",
                       "descriptor2": "an", "answer": "larger", "candidates": ["larger", "smaller"]}
    assert {r["answer"] for r in size} == {"larger"}  # every released label is "yes"


def test_object_commonsense_fixtures(tmp_path):
    (tmp_path / "size.csv").write_text("Descriptor1,Item1,Descriptor2,Item2,Label\na,cat,a,house,no\n")
    assert B.load_object_commonsense("relative_size", tmp_path)[0]["answer"] == "smaller"
    (tmp_path / "size.csv").write_text("Descriptor1,Item1,Descriptor2,Item2,Label\na,cat,a,house,maybe\n")
    with pytest.raises(ValueError, match=r"size\.csv:2: label 'maybe' is not yes/no"):
        B.load_object_commonsense("relative_size", tmp_path)
    (tmp_path / "shape.csv").write_text("Index,Descriptor,Item\n1,,coin\n")
    with pytest.raises(ValueError, match=r"shape\.csv:1: missing column\(s\) Shape"):
        B.load_object_commonsense("shape", tmp_path)
    with pytest.raises(ValueError, match="unknown object-commonsense set"):
        B.load_object_commonsense("texture", tmp_path)


def test_vicomte_counts_and_records():
    folder = EVAL_DATA / "object_commonsense" / "vicomte"
    for relation in B.VICOMTE_RELATIONS:
        n_lines = sum(1 for line in open(folder / f"{relation}.jsonl") if line.strip())
        assert len(B.load_vicomte(relation, EVAL_DATA / "object_commonsense")) == n_lines
    color = B.load_vicomte("color", folder)
    assert len(color) == 2303
    assert color[0]["object"] == "clock" and color[0]["answer"] == "white" and color[0]["distractor"] == "silver"
    assert len(color[0]["candidates"]) == 12
    larger = B.load_vicomte("larger", folder)
    assert larger[0]["candidates"] == ["microphone", "hotel"]


# ---------------------------------------------------------------- multiple choice: real files


def test_piqa_real_file():
    examples = B.load_commonsense("piqa", TEST_DATA / "piqa")
    labels = [int(x) for x in (TEST_DATA / "piqa" / "valid-labels.lst").read_text().split()]
    assert len(examples) == 200 == len(labels)  # the trimmed sample: the first 200 rows
    assert [e.label for e in examples] == labels
    first = json.loads((TEST_DATA / "piqa" / "valid.jsonl").open().readline())
    ex = examples[0]
    assert ex.id == "piqa-0"
    assert ex.context == f"Question: {first['goal']}\nAnswer:"
    assert ex.choices == [" " + first["sol1"], " " + first["sol2"]]
    assert ex.released_queries == [first["goal"] + " " + first["sol1"], first["goal"] + " " + first["sol2"]]
    assert ex.image_context == first["goal"]
    assert ex.requests() == [(ex.context, ex.choices[0]), (ex.context, ex.choices[1])]
    assert ex.norm_lengths() == [len(first["sol1"]), len(first["sol2"])]
    assert len(B.load_commonsense("piqa", TEST_DATA / "piqa", limit=5)) == 5


def test_arc_easy_dev_real_file():
    examples = B.load_commonsense("arc_easy", TEST_DATA / "arc", split="dev")
    assert len(examples) == 100  # the trimmed sample
    ex = examples[0]
    assert ex.id == "MCAS_2000_4_6"
    assert ex.context == "Question: Which technology was developed most recently?\nAnswer:"
    assert ex.choices == [" cellular telephone", " television", " refrigerator", " airplane"]
    assert ex.label == 0
    numeric = {e.id: e for e in examples}["NYSEDREGENTS_2014_8_8"]  # labels "1".."4", answerKey "2"
    assert numeric.label == 1 and numeric.choices[1] == " pedigree chart"
    assert numeric.released_queries[1] == "Which model can be used to trace genetic inheritance? pedigree chart"
    with pytest.raises(FileNotFoundError, match="ARC-Easy-Test.jsonl"):
        B.load_commonsense("arc_easy", TEST_DATA / "arc")  # the default split is test


def test_commonsenseqa_real_file():
    examples = B.load_commonsense("cqa", TEST_DATA / "commonsenseqa")
    assert len(examples) == 100  # the trimmed sample
    ex = examples[0]
    stem = "A revolving door is convenient for two direction travel, but it also serves as a security measure at a what?"
    assert ex.context == (f"Question: {stem}\nA. bank\nB. library\nC. department store\nD. mall\nE. new york\nAnswer:")
    assert ex.choices == [" A", " B", " C", " D", " E"]
    assert ex.label == 0
    assert ex.released_queries[4] == f"{stem} new york"
    assert ex.image_context == stem


# ---------------------------------------------------------------- multiple choice: fixtures


SIQA_ROWS = [
    {"context": "Tracy didn't go home that evening and resisted Riley's attacks.",
     "question": "What does Tracy need to do before this?",
     "answerA": "make a new plan", "answerB": "Go home and see Riley", "answerC": "Find somewhere to go"},
    {"context": "Sydney walked past a homeless woman.", "question": "How would you describe Sydney?",
     "answerA": "sympathetic", "answerB": "like a person who was unable to help", "answerC": "incredulous"},
]


def test_siqa_fixture(tmp_path):
    _write_jsonl(tmp_path / "dev.jsonl", SIQA_ROWS)
    (tmp_path / "dev-labels.lst").write_text("3\n1\n")
    examples = B.load_commonsense("siqa", tmp_path)
    assert [e.label for e in examples] == [2, 0]
    ex = examples[0]
    assert ex.context == ("Q: Tracy didn't go home that evening and resisted Riley's attacks. "
                          "What does Tracy need to do before this?\nA:")
    assert ex.choices == [" make a new plan", " Go home and see Riley", " Find somewhere to go"]
    assert ex.released_queries[2] == ("Tracy didn't go home that evening and resisted Riley's attacks. "
                                      "What does Tracy need to do before this? Find somewhere to go")
    assert ex.id == "siqa-0"


def test_siqa_label_outside_options(tmp_path):
    _write_jsonl(tmp_path / "dev.jsonl", SIQA_ROWS)
    (tmp_path / "dev-labels.lst").write_text("3\n4\n")
    with pytest.raises(ValueError, match=r"dev-labels\.lst:2: label '4' outside the options"):
        B.load_commonsense("siqa", tmp_path)


def test_labels_length_mismatch(tmp_path):
    _write_jsonl(tmp_path / "valid.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}] * 3)
    (tmp_path / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(ValueError, match=r"valid-labels\.lst:3: 2 labels but .*valid\.jsonl has 3 rows"):
        B.load_commonsense("piqa", tmp_path)


def _arc_row(id_, stem, texts, key, labels="ABCDE"):
    return {"id": id_, "question": {"stem": stem, "choices": [{"text": t, "label": l} for t, l in zip(texts, labels)]},
            "answerKey": key}


def test_arc_both_parts_from_release_layout(tmp_path):
    (tmp_path / "ARC-Easy").mkdir()
    (tmp_path / "ARC-Challenge").mkdir()
    _write_jsonl(tmp_path / "ARC-Easy" / "ARC-Easy-Test.jsonl", [_arc_row("e1", "Easy?", ["x", "y"], "B")])
    _write_jsonl(tmp_path / "ARC-Challenge" / "ARC-Challenge-Test.jsonl",
                 [_arc_row("c1", "Hard?", ["p", "q", "r"], "3", labels="123")])
    both = B.load_commonsense("arc", tmp_path)
    assert [(e.id, e.label) for e in both] == [("e1", 1), ("c1", 2)]
    assert [e.id for e in B.load_commonsense("arc_challenge", tmp_path)] == ["c1"]
    _write_jsonl(tmp_path / "ARC-Easy" / "ARC-Easy-Test.jsonl", [_arc_row("e1", "Easy?", ["x", "y"], "C")])
    with pytest.raises(ValueError, match=r"ARC-Easy-Test\.jsonl:1: answerKey 'C' not among the choice labels"):
        B.load_commonsense("arc", tmp_path)


def test_obqa_fixture(tmp_path):
    _write_jsonl(tmp_path / "test.jsonl", [_arc_row(
        "8-343", "A person wants to start saving money so that they can afford a nice vacation at the end of the year. After looking over their budget and expenses, they decide the best way to save money is to",
        ["make more phone calls", "quit eating lunch out", "buy less with monopoly money", "have lunch with friends"], "B")])
    ex = B.load_commonsense("obqa", tmp_path)[0]
    assert ex.context.startswith("A person wants") and ex.context.endswith("save money is to")
    assert ex.choices[1] == " quit eating lunch out" and ex.label == 1
    assert ex.released_queries[1] == ex.context + " quit eating lunch out"


HS_ROWS = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
     "source_id": "activitynet~v_-JhWjGDPHMY"},
    {"ind": 92, "activity_label": "Home and Garden", "ctx_a": "[header] How to clean a grill. [title] Heat the grill.",
     "ctx_b": "", "ctx": "[header] How to clean a grill. [title] Heat the grill.", "split": "val",
     "split_type": "zeroshot", "label": 0,
     "endings": ["[step] Turn  on the gas.", "Eat it.", "Paint it.", "Sell it."], "source_id": "wikihow~1"},
]


def test_hellaswag_fixture_preprocessing(tmp_path):
    _write_jsonl(tmp_path / "hellaswag_val.jsonl", HS_ROWS)
    first, second = B.load_commonsense("hs", tmp_path)
    assert first.id == "24" and first.label == 3
    assert first.context == "Roof shingle removal: A man is sitting on a roof. He"
    assert first.choices[3] == " starts pulling up roofing on a roof."
    assert first.released_queries[3] == "A man is sitting on a roof. he starts pulling up roofing on a roof."
    assert first.image_context == "A man is sitting on a roof. he"
    assert second.context == "Home and Garden: How to clean a grill.. Heat the grill."
    # the harness strips before removing "[step]", so the choice keeps a space of its own
    assert second.choices[0] == "  Turn on the gas."


WG_ROWS = [
    {"qID": "3D5G8J4N5CI2K40F4RZLF9OG2CKVTH-2",
     "sentence": "Kyle doesn't wear leg warmers to bed, while Logan almost always does. _ is more likely to live in a colder climate.",
     "option1": "Kyle", "option2": "Logan", "answer": "2"},
    {"qID": "q2", "sentence": "The trophy doesn't fit into the suitcase because the _ is too large.",
     "option1": "trophy", "option2": "suitcase", "answer": "1"},
]


def test_winogrande_partial_evaluation(tmp_path):
    _write_jsonl(tmp_path / "dev.jsonl", WG_ROWS)
    (tmp_path / "dev-labels.lst").write_text("2\n1\n")
    ex = B.load_commonsense("winogrande", tmp_path)[0]
    prefix = "Kyle doesn't wear leg warmers to bed, while Logan almost always does. "
    assert ex.label == 1
    assert ex.requests() == [(prefix + "Kyle", " is more likely to live in a colder climate."),
                             (prefix + "Logan", " is more likely to live in a colder climate.")]
    assert ex.released_queries == [prefix + "Kyle is more likely to live in a colder climate.",
                                   prefix + "Logan is more likely to live in a colder climate."]
    assert ex.norm_lengths() == [len("is more likely to live in a colder climate.")] * 2
    (tmp_path / "dev-labels.lst").unlink()  # falls back to each row's "answer"
    assert [e.label for e in B.load_commonsense("winogrande", tmp_path)] == [1, 0]


def test_unknown_testset_and_bad_json(tmp_path):
    with pytest.raises(ValueError, match="unknown testset 'copa'"):
        B.load_commonsense("copa", tmp_path)
    (tmp_path / "test.jsonl").write_text('{"id": "1"}\n')
    with pytest.raises(ValueError, match=r"test\.jsonl:1: missing field 'question'"):
        B.load_commonsense("obqa", tmp_path)
    (tmp_path / "test.jsonl").write_text('{"id": "1"}\n{not json\n')
    with pytest.raises(ValueError, match=r"test\.jsonl:2: invalid JSON"):
        B.load_commonsense("obqa", tmp_path)


def test_commonsense_hub_layouts(monkeypatch):
    hub = {
        ("baber/piqa", None): [{"goal": "g", "sol1": "a", "sol2": "b", "label": 1}],
        ("lighteval/siqa", None): [{"context": "c", "question": "q?", "answerA": "x", "answerB": "y",
                                    "answerC": "z", "label": "2"}],
        ("allenai/ai2_arc", "ARC-Easy"): [{"id": "e", "question": "Q?", "answerKey": "B",
                                           "choices": {"text": ["x", "y"], "label": ["A", "B"]}}],
        ("allenai/ai2_arc", "ARC-Challenge"): [{"id": "c", "question": "Q2?", "answerKey": "1",
                                                "choices": {"text": ["x", "y"], "label": ["1", "2"]}}],
        ("allenai/winogrande", "winogrande_xl"): [{"sentence": "A _ b.", "option1": "x", "option2": "y",
                                                   "answer": "3"}],
    }
    splits = []

    def fake(path, name=None, split="validation", *, revision=None, data_files=None):
        splits.append((path, split))
        return iter(hub[(path, name)])

    monkeypatch.setattr(B, "_hub_rows", fake)
    assert B.load_commonsense("piqa")[0].label == 1
    assert B.load_commonsense("siqa")[0].label == 1
    assert [(e.id, e.label) for e in B.load_commonsense("arc")] == [("e", 1), ("c", 0)]
    assert ("allenai/ai2_arc", "test") in splits and ("baber/piqa", "validation") in splits
    with pytest.raises(ValueError, match=r"allenai/winogrande/winogrande_xl \[validation\] row 0: label '3' outside"):
        B.load_commonsense("winogrande")


# ---------------------------------------------------------------- BoolQ


def test_boolq_real_file_keeps_case():
    records = B.load_boolq(TEST_DATA / "boolq")
    assert len(records) == 100  # the trimmed sample
    raw = [json.loads(line) for line in (TEST_DATA / "boolq" / "dev.jsonl").open()]
    assert [r["passage"] for r in records] == [r["passage"] for r in raw]
    assert sum(r["answer"] for r in records) == sum(r["answer"] for r in raw)
    rec = records[0]
    assert rec["id"] == "boolq-0" and rec["title"] == "Ethanol fuel" and rec["answer"] is False
    assert rec["passage"].startswith("All biomass goes through")
    assert B.boolq_context(rec) == f"{rec['passage']}\nQuestion: does ethanol take more energy make that produces?\nAnswer:"
    assert B.boolq_released_prompt(rec) == (
        f"Context: {rec['passage']}. Question: Does ethanol take more energy make that produces? Answer:")
    assert B.BOOLQ_CHOICES == (" no", " yes")


def test_boolq_empty_passage(tmp_path):
    _write_jsonl(tmp_path / "dev.jsonl", [{"question": "is it", "title": "T", "answer": True, "passage": "Text."},
                                          {"question": "is it", "title": "T", "answer": True, "passage": "  "}])
    with pytest.raises(ValueError, match=r"dev\.jsonl:2: empty field 'passage'"):
        B.load_boolq(tmp_path)


# ---------------------------------------------------------------- SQuAD and QuAC


def _released_squad_ids(records):
    """The questions the released squad.py scored: answerable, and not its article's first answerable one."""
    ids, former_title = [], None
    for r in records:
        if not r["answers"]:
            continue
        if r["title"] == former_title:
            ids.append(r["id"])
        former_title = r["title"]
    return ids


def test_squad_sample():
    records = B.load_squad(TEST_DATA / "squad_v2")
    assert len(records) == 121  # the trimmed sample: 6 paragraphs of each of the 2 articles
    assert sum(r["is_impossible"] for r in records) == 49
    assert [r["title"] for r in records].count("Normans") == 36
    first, second = records[0], records[1]
    assert first["question"] == "In what country is Normandy located?" and first["answers"][0] == "France"
    assert first["prev_question"] is None and first["index_in_article"] == 0
    assert second["prev_question"] == "In what country is Normandy located?" and second["prev_answer"] == "France"
    scored = [r["id"] for r in records if not r["is_impossible"] and r["prev_question"] is not None]
    assert scored == _released_squad_ids(records)
    assert len(scored) == 121 - 49 - 2
    rhine = [r for r in records if r["title"] == "Rhine"]
    assert rhine[0]["index_in_article"] == 0 and rhine[0]["prev_question"] is None
    prompt = B.qa_one_shot_prompt(second)
    assert prompt.startswith(B.QA_INSTRUCTION + "\n\nTitle: Normans\n\nBackground: The Normans")
    assert prompt.endswith("Q: In what country is Normandy located?\n\nA: France\n\nQ: When were the Normans in Normandy?\n\nA:")
    with pytest.raises(ValueError, match="no previous answered question"):
        B.qa_one_shot_prompt(first)


def test_squad_bad_json(tmp_path):
    bad = {"version": "v2.0", "data": [{"title": "T", "paragraphs": [{"context": "C", "qas": [
        {"id": "1", "question": "Q?", "answers": [], "is_impossible": False}]}]}]}
    (tmp_path / "dev-v2.0.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"dev-v2\.0\.json: data\[0\]\.paragraphs\[0\]\.qas\[0\]: answerable question without answers"):
        B.load_squad(tmp_path)


def test_quac_sample():
    records = B.load_quac(path=TEST_DATA / "quac" / "val_v0.2.json")
    assert len(records) == 41
    assert len({r["dialog_id"] for r in records}) == 5
    first = records[0]
    assert first["title"] == "Anna Vissi" and first["question"] == "what happened in 1983?"
    assert first["context"].startswith("Anna Vissi (Greek:")
    assert first["section_title"] == "1983-1989: Collaboration with Nikos Karvelas"
    assert first["section_text"].endswith("hall at the time.")
    assert len(first["answers"]) == 4
    assert first["orig_answer"] == "In May 1983, she married Nikos Karvelas, a composer,"
    third = records[2]
    assert third["is_impossible"] and third["answers"] == ["CANNOTANSWER"] * 4
    assert records[3]["prev_question"] == "did they have any children?"  # skips the unanswerable one
    graham = [r for r in records if r["title"] == "Superstar Billy Graham"]
    assert [r["index_in_article"] for r in graham] == list(range(14))  # two dialogs, one article
    assert graham[7]["turn_index"] == 0 and graham[7]["prev_question"] is not None
    assert B.qa_one_shot_prompt(records[1]).split("\n\n")[1] == (
        "Title: Anna Vissi\nParagraph: 1983-1989: Collaboration with Nikos Karvelas")


def test_qa_hub_layouts(monkeypatch):
    squad = [{"id": "a", "title": "T", "context": "C1", "question": "Q1?", "answers": {"text": ["x"], "answer_start": [0]}},
             {"id": "b", "title": "T", "context": "C1", "question": "Q2?", "answers": {"text": [], "answer_start": []}}]
    quac = [{"dialogue_id": "d", "wikipedia_page_title": "P", "background": "B", "section_title": "S",
             "context": "Text. CANNOTANSWER", "turn_ids": ["d_q#0", "d_q#1"], "questions": ["q0?", "q1?"],
             "followups": ["y", "n"], "yesnos": ["x", "x"],
             "answers": {"texts": [["Text."], ["CANNOTANSWER"]], "answer_starts": [[0], [6]]},
             "orig_answers": {"texts": ["Text.", "CANNOTANSWER"], "answer_starts": [0, 6]}}]
    boolq = [{"question": "is it", "answer": True, "passage": "P."}]
    calls = []

    def fake(path, name=None, split="validation", *, revision=None, data_files=None):
        calls.append((path, name, split, revision))
        return iter({"rajpurkar/squad_v2": squad, "allenai/quac": quac, "google/boolq": boolq}[path])

    monkeypatch.setattr(B, "_hub_rows", fake)
    s = B.load_squad()
    assert [(r["is_impossible"], r["prev_question"]) for r in s] == [(False, None), (True, "Q1?")]
    q = B.load_quac()
    assert [r["id"] for r in q] == ["d_q#0", "d_q#1"] and q[1]["is_impossible"]
    assert q[0]["section_text"] == "Text." and q[1]["prev_answer"] == "Text."
    assert B.load_boolq()[0] == {"id": "boolq-0", "passage": "P.", "question": "is it", "title": "", "answer": True}
    assert ("allenai/quac", "plain_text", "validation", "refs/convert/parquet") in calls
