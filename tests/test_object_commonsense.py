"""eval_scripts/object_commonsense.py on VaLM's real files, with the tiny zoo and the tiny SDXL pipeline."""
import csv
import json
from pathlib import Path

import pytest
import torch

from data.benchmarks import load_object_commonsense
from eval_scripts.core import run_main
from eval_scripts.object_commonsense import COLOR_TEMPLATES, SIZE_TEMPLATES, main
from tests.paths import EVAL_DATA

DATA = EVAL_DATA / "object_commonsense"
VALM = DATA / "valm"
SETS = ("memory_color", "color_terms", "shape", "relative_size")
N_TEMPLATES = {"memory_color": 9, "color_terms": 9, "shape": 9, "relative_size": 6}
LIMIT = 2


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def csv_rows(name):
    with open(VALM / name, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def phrase(descriptor, item):
    return f"{descriptor.strip()} {item.strip()}" if descriptor.strip() else item.strip()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def paths(one_thread, tmp_path_factory, lm_dirs, tiny_clip_spec, tiny_sdxl_dir):
    root = tmp_path_factory.mktemp("objects")
    return {"lm": lm_dirs["llama"], "clip": tiny_clip_spec, "sdxl": str(tiny_sdxl_dir),
            "cache": str(root / "cache"), "out": root / "out"}


def text_args(paths, run_name, *extra):
    return ["--model_name", paths["lm"], "--data_dir", str(DATA), "--output_dir", str(paths["out"]),
            "--run_name", run_name, "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def image_run(paths):
    args = text_args(paths, "images", "--limit", str(LIMIT), "--generate_images", "True", "--k", "2",
                     "--vision_encoder", paths["clip"], "--image_generator", paths["sdxl"], "--image_size", "64",
                     "--image_cache", paths["cache"])
    return main(args), read_jsonl(paths["out"] / "images" / "object_commonsense_samples.jsonl")


def test_loader_counts_match_the_files():
    counts = {s: len(load_object_commonsense(s, DATA)) for s in SETS}
    assert counts == {"memory_color": 108, "color_terms": 51, "shape": 140, "relative_size": 486}
    assert counts["memory_color"] == len(csv_rows("memory_color_data.csv"))
    assert counts["color_terms"] == len(csv_rows("color-concrete-objects.csv"))
    assert counts["shape"] == len(csv_rows("shape.csv"))
    assert counts["relative_size"] == len(csv_rows("size.csv"))


def test_every_set_runs_with_images(image_run):
    result, samples = image_run
    assert result["task"] == "object_commonsense"
    assert set(result["metrics"]) == set(SETS)
    assert result["counts"]["examples"] == len(samples) == sum(LIMIT * n for n in N_TEMPLATES.values())
    memory = csv_rows("memory_color_data.csv")[:LIMIT]
    size = csv_rows("size.csv")[:LIMIT]
    subjects = {"memory_color": [phrase(r["Descriptor"], r["Item"]) for r in memory],
                "color_terms": [r["object"] for r in csv_rows("color-concrete-objects.csv")[:LIMIT]],
                "shape": [phrase(r["Descriptor"], r["Item"]) for r in csv_rows("shape.csv")[:LIMIT]],
                "relative_size": [f"{phrase(r['Descriptor1'], r['Item1'])} and {phrase(r['Descriptor2'], r['Item2'])}"
                                  for r in size]}
    for name in SETS:
        m = result["metrics"][name]
        rows = [r for r in samples if r["set"] == name]
        assert m["n"] == LIMIT and len(m["per_template"]) == N_TEMPLATES[name]
        assert len(rows) == LIMIT * N_TEMPLATES[name]
        for t in range(N_TEMPLATES[name]):
            acc = sum(r["correct"] for r in rows if r["template"] == t) / LIMIT
            assert m["per_template"][t] == pytest.approx(100 * acc, abs=1e-4)
        # all templates of an example share its k images, made from the object phrase
        assert {im["prompt"] for r in rows for im in r["images"]} == set(subjects[name])
        for r in rows:
            assert len(r["images"]) == 2
            assert r["prediction"] == r["candidates"][max(range(len(r["scores"])), key=lambda i: (r["scores"][i], -i))]
    assert result["counts"]["images_generated"] == 2 * sum(len(set(v)) for v in subjects.values())
    # prompts: VaLM's templates filled with the object phrase ("a sunflower", or the bare item)
    first = {(r["set"], r["id"]): r for r in samples}
    assert first[("memory_color", "memory_color-1/t0")]["prompt"] == "Q: What is the color of a sunflower? A: It is"
    assert first[("memory_color", "memory_color-1/t0")]["answer"] == memory[0]["Shape"] == "yellow"
    assert first[("memory_color", "memory_color-2/t8")]["prompt"] == "the ocean usually has the color of"
    assert first[("shape", "shape-1/t4")]["prompt"] == "The shape of table top is"
    assert first[("relative_size", "relative_size-0/t1")]["prompt"] == "Is an airplane larger than an apple?"
    assert first[("relative_size", "relative_size-0/t1")]["candidates"] == ["yes", "no"]
    assert first[("relative_size", "relative_size-0/t1")]["answer"] == "yes"


def direct_logprobs(lm, tok, text):
    ids = tok(text)["input_ids"]
    with torch.no_grad():
        return ids, torch.log_softmax(lm(input_ids=torch.tensor([ids])).logits[0].float(), -1)


def test_text_only_scores_are_the_base_lm(paths):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(paths["lm"]).eval()
    tok = AutoTokenizer.from_pretrained(paths["lm"])

    # first token (default): the last position's log-prob of " cand" / " Cand", the better one
    main(text_args(paths, "text", "--limit", "1", "--sets", "memory_color,relative_size"))
    samples = {r["id"]: r for r in read_jsonl(paths["out"] / "text" / "object_commonsense_samples.jsonl")}
    for rid in ("memory_color-1/t0", "relative_size-0/t3"):
        rec = samples[rid]
        _, logp = direct_logprobs(lm, tok, rec["prompt"])
        ref = [max(float(logp[-1, tok(s, add_special_tokens=False)["input_ids"][0]])
                   for s in (" " + c, " " + c.capitalize())) for c in rec["candidates"]]
        assert rec["scores"] == pytest.approx(ref, abs=2e-5)
        assert rec["images"] == []

    # full: the summed log-probs of every token of " cand" ("rhombus" is three GPT-2 tokens)
    main(text_args(paths, "text_full", "--limit", "1", "--sets", "shape", "--scoring", "full"))
    full = read_jsonl(paths["out"] / "text_full" / "object_commonsense_samples.jsonl")
    rec = next(r for r in full if r["id"] == "shape-1/t4")
    assert rec["prompt"] == "The shape of table top is" and "rhombus" in rec["candidates"]
    ref = []
    for cand in rec["candidates"]:
        ctx = tok(rec["prompt"])["input_ids"]
        ids, logp = direct_logprobs(lm, tok, rec["prompt"] + " " + cand)
        assert ids[:len(ctx)] == ctx
        ref.append(sum(float(logp[j - 1, ids[j]]) for j in range(len(ctx), len(ids))))
    assert rec["scores"] == pytest.approx(ref, abs=2e-5)
    _, logp = direct_logprobs(lm, tok, rec["prompt"])
    first_token = max(float(logp[-1, tok(s, add_special_tokens=False)["input_ids"][0]])
                      for s in (" rhombus", " Rhombus"))
    assert abs(rec["scores"][rec["candidates"].index("rhombus")] - first_token) > 1.0  # full != first token


def test_a_whole_set_matches_its_file(paths):
    result = main(text_args(paths, "whole", "--sets", "color_terms", "--batch_size", "32"))
    samples = read_jsonl(paths["out"] / "whole" / "object_commonsense_samples.jsonl")
    assert result["metrics"]["color_terms"]["n"] == 51
    assert len(samples) == result["counts"]["examples"] == 51 * len(COLOR_TEMPLATES)
    colors = sorted({r["color"] for r in csv_rows("color-concrete-objects.csv")})
    assert all(r["candidates"] == colors for r in samples)


def test_size_both_directions_and_full_image_prompts(paths):
    main(text_args(paths, "swap", "--limit", "1", "--sets", "relative_size", "--size_both_directions",
                   "--generate_images", "--k", "1", "--image_prompt", "full", "--vision_encoder", paths["clip"],
                   "--image_generator", paths["sdxl"], "--image_size", "64", "--image_cache", paths["cache"]))
    samples = {r["id"]: r for r in read_jsonl(paths["out"] / "swap" / "object_commonsense_samples.jsonl")}
    assert len(samples) == 2 * len(SIZE_TEMPLATES)
    assert samples["relative_size-0/swap/t0"]["prompt"] == "Is an apple bigger than an airplane?"
    assert samples["relative_size-0/swap/t0"]["answer"] == "no" and samples["relative_size-0/t0"]["answer"] == "yes"
    assert all(r["images"][0]["prompt"] == r["prompt"] for r in samples.values())


def test_rerun_with_another_protocol_does_not_resume(paths, capsys):
    main(text_args(paths, "proto", "--limit", "1", "--sets", "shape"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(main, text_args(paths, "proto", "--limit", "1", "--sets", "shape", "--scoring", "full"))
    assert e.value.code == 2
    assert "--scoring 'first_token', not 'full'" in capsys.readouterr().err


@pytest.mark.parametrize("extra, needle", [(["--data_file", str(DATA / "vicomte" / "color.jsonl")], "--sets"),
                                           (["--data_dir", str(DATA), "--sets", "size"], "size"),
                                           (["--data_dir", "/nonexistent"], "/nonexistent")])
def test_bad_input_is_one_line_exit_2(paths, capsys, extra, needle):
    args = ["--model_name", paths["lm"], "--output_dir", str(paths["out"]), "--run_name", "bad",
            "--device", "cpu", "--limit", "1", *extra]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(main, args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and needle in lines[0]
