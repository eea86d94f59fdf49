"""Commonsense QA, BoolQ, SQuAD and QuAC scripts on the tiny zoo (CPU), against the real files in
the trimmed samples in tests/data and direct computations with the base LM."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from eval_scripts import boolq, commonsenseQA, quac, squad
from eval_scripts.core import run_main

from tests.paths import TEST_DATA as SHARED


def argv(lm, clip, tmp, run, images=True, extra=()):
    """A released-style command line on the tiny zoo with toyworld images."""
    args = ["--model_name", lm, "--vision_encoder", clip, "--k", "2", "--limit", "3", "--device", "cpu",
            "--image_generator", "toyworld", "--image_size", "32", "--image_cache", str(tmp / "cache"),
            "--output_dir", str(tmp / "out"), "--run_name", run]
    return args + ["--generate_images", "True" if images else "False", *extra]


def samples(tmp, run, task) -> dict[str, dict]:
    lines = (tmp / "out" / run / f"{task}_samples.jsonl").read_text().splitlines()
    return {r["id"]: r for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def base_lm(lm_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = lm_dirs["llama"]
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()


def token_logprobs(base_lm, ids: list[int]) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= 1, straight from the base LM."""
    _, lm = base_lm
    with torch.no_grad():
        logp = lm(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return [float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]


# ------------------------------------------------------------------------------------- released commands
MC_CASES = [("piqa", "piqa", ()), ("arc_easy", "arc", ("--split", "dev")), ("cqa", "commonsenseqa", ())]


@pytest.mark.parametrize("testset,folder,extra", MC_CASES, ids=[c[0] for c in MC_CASES])
def test_commonsense_released_command(lm_dirs, tiny_clip_spec, tmp_path, testset, folder, extra):
    from data.benchmarks import load_commonsense
    from data.prompts import derive_prompts

    res = commonsenseQA.main(argv(lm_dirs["llama"], tiny_clip_spec, tmp_path, "r",
                                  extra=["--testset", testset, "--data_dir", str(SHARED / folder), *extra]))
    task = "commonsense_" + testset + ("_dev" if extra else "")
    written = json.loads((tmp_path / "out" / "r" / f"{task}.json").read_text())
    assert written["task"] == task and set(written["metrics"]) == {"acc", "n"} and written["metrics"]["n"] == 3
    assert written["config"]["protocol"] == "released" and written["counts"]["images_generated"] > 0
    rows = samples(tmp_path, "r", task)
    examples = load_commonsense(testset, SHARED / folder, split="dev" if extra else None, limit=3)
    for ex in examples:
        r = rows[ex.id]
        assert set(r) == {"id", "protocol", "prompt", "candidates", "scores", "prediction", "answer", "correct",
                          "images", "text_only_scores", "text_only_prediction"}
        assert r["candidates"] == ex.released_queries and r["answer"] == ex.label
        assert r["prediction"] == min(range(len(r["scores"])), key=lambda i: r["scores"][i])
        # one image set per option, from that option's query (last sentence, then its last 70 words)
        assert [[im["prompt"] for im in opt] for opt in r["images"]] == \
            [derive_prompts(q, 2, "sentences", last_n_words=70) for q in ex.released_queries]
    assert res["metrics"]["acc"] == pytest.approx(100 * sum(r["correct"] for r in rows.values()) / 3)


def test_boolq_released_command(lm_dirs, tiny_clip_spec, tmp_path):
    res = boolq.main(argv(lm_dirs["llama"], tiny_clip_spec, tmp_path, "r", extra=["--data_dir", str(SHARED / "boolq")]))
    assert set(res["metrics"]) == {"acc", "n"} and res["metrics"]["n"] == 3
    rows = list(samples(tmp_path, "r", "boolq").values())
    first = json.loads((SHARED / "boolq" / "dev.jsonl").read_text().splitlines()[0])
    assert rows[0]["prompt"].startswith(f"Context: {first['passage']}. Question: ")  # passage keeps its case
    assert rows[0]["answer"] == ("yes" if first["answer"] else "no")
    for r in rows:
        assert set(r) == {"id", "prompt", "candidates", "scores", "prediction", "answer", "correct", "images",
                          "text_only_scores", "text_only_prediction"}
        assert r["prediction"] == r["candidates"][0 if r["scores"][0] >= r["scores"][1] else 1]
        assert r["images"][-1]["prompt"] == " ".join(r["prompt"].split()[-60:])


@pytest.mark.parametrize("script,folder", [(squad, "squad_v2"), (quac, "quac")], ids=["squad", "quac"])
def test_qa_released_command(lm_dirs, tiny_clip_spec, tmp_path, script, folder):
    task = script.__name__.rsplit(".", 1)[-1]
    res = script.main(argv(lm_dirs["llama"], tiny_clip_spec, tmp_path, "r",
                           extra=["--data_dir", str(SHARED / folder), "--max_new_tokens", "4"]))
    keys = {"exact_match", "f1", "n", "skipped"} | ({"heq", "count"} if task == "quac" else set())
    assert set(res["metrics"]) == keys and res["metrics"]["n"] == 3
    rows = list(samples(tmp_path, "r", task).values())
    for r in rows:
        assert set(r) == {"id", "prompt", "prediction", "answers", "is_impossible", "exact_match", "f1", "correct",
                          "images", "text_only_generation", "text_only_exact_match", "text_only_f1"}
        assert not r["is_impossible"] and "\n" not in r["prediction"]
        assert r["prompt"].startswith("Answer each question using information") and r["prompt"].endswith("\n\nA:")
        assert r["images"][-1]["prompt"] == " ".join(r["prompt"].split()[-70:])
    assert res["metrics"]["exact_match"] == pytest.approx(100 * sum(r["exact_match"] for r in rows) / 3)


# ------------------------------------------------------------------------------------- scores vs the base LM
def test_harness_scores_equal_base_lm(lm_dirs, tiny_clip_spec, tmp_path, base_lm):
    from data.benchmarks import load_commonsense

    tok, _ = base_lm
    res = commonsenseQA.main(argv(lm_dirs["llama"], tiny_clip_spec, tmp_path, "h", images=False,
                                  extra=["--testset", "piqa", "--data_dir", str(SHARED / "piqa"),
                                         "--protocol", "harness", "--batch_size", "3"]))
    assert set(res["metrics"]) == {"acc", "acc_norm", "n"}
    rows = samples(tmp_path, "h", "commonsense_piqa_harness")
    correct = correct_norm = 0
    for ex in load_commonsense("piqa", SHARED / "piqa", limit=3):
        r = rows[ex.id]
        direct = []
        for ctx, cont in ex.requests():
            ctx_ids, whole = tok(ctx)["input_ids"], tok(ctx + cont)["input_ids"]
            assert whole[:len(ctx_ids)] == ctx_ids
            direct.append(sum(token_logprobs(base_lm, whole)[len(ctx_ids) - 1:]))
        assert r["scores"] == pytest.approx(direct, abs=1e-4)
        # acc_norm by hand: log-likelihood per character of the choice without its leading space
        assert all(c.startswith(" ") for c in ex.choices)
        per_char = [ll / len(c[1:]) for ll, c in zip(direct, ex.choices)]
        assert r["prediction_norm"] == per_char.index(max(per_char))
        assert r["prediction"] == direct.index(max(direct))
        correct += r["prediction"] == ex.label
        correct_norm += per_char.index(max(per_char)) == ex.label
    assert res["metrics"]["acc"] == pytest.approx(100 * correct / 3)
    assert res["metrics"]["acc_norm"] == pytest.approx(100 * correct_norm / 3)


def test_winogrande_harness_partial_evaluation(lm_dirs, tiny_clip_spec, tmp_path, base_lm):
    """Each option fills the blank of the context; both score the same rest of the sentence."""
    tok, _ = base_lm
    rows = [{"qID": "w1", "sentence": "The trophy did not fit in the case because the _ was too big.",
             "option1": "trophy", "option2": "case", "answer": "1"},
            {"qID": "w2", "sentence": "Sarah lent Maria money because _ was broke.",
             "option1": "Sarah", "option2": "Maria", "answer": "2"}]
    (tmp_path / "wg").mkdir()
    (tmp_path / "wg" / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = commonsenseQA.main(argv(lm_dirs["llama"], tiny_clip_spec, tmp_path, "w", images=False,
                                  extra=["--testset", "winogrande", "--data_dir", str(tmp_path / "wg"),
                                         "--protocol", "harness"]))
    out = samples(tmp_path, "w", "commonsense_winogrande_harness")
    for row in rows:
        blank = row["sentence"].index("_")
        prefix, rest = row["sentence"][:blank], " " + row["sentence"][blank + 1:].strip()
        r = out[row["qID"]]
        assert r["contexts"] == [prefix + row["option1"], prefix + row["option2"]] and r["candidates"] == [rest] * 2
        direct = []
        for ctx in r["contexts"]:
            n_ctx, whole = len(tok(ctx)["input_ids"]), tok(ctx + rest)["input_ids"]
            direct.append(sum(token_logprobs(base_lm, whole)[n_ctx - 1:]))
        assert r["scores"] == pytest.approx(direct, abs=1e-4)
        assert r["answer"] == int(row["answer"]) - 1
    assert res["metrics"]["n"] == 2


def test_released_ppl_equals_base_lm(lm_dirs, tiny_clip_spec, tmp_path, base_lm):
    from data.benchmarks import load_commonsense

    tok, _ = base_lm
    commonsenseQA.main(argv(lm_dirs["llama"], tiny_clip_spec, tmp_path, "p", images=False,
                            extra=["--testset", "piqa", "--data_dir", str(SHARED / "piqa")]))
    rows = samples(tmp_path, "p", "commonsense_piqa")
    for ex in load_commonsense("piqa", SHARED / "piqa", limit=3):
        direct = []
        for query in ex.released_queries:
            lps = token_logprobs(base_lm, tok(query)["input_ids"])  # every token after the first
            direct.append(math.exp(-sum(lps) / len(lps)))
        assert rows[ex.id]["scores"] == pytest.approx(direct, rel=1e-5)
        assert rows[ex.id]["prediction"] == direct.index(min(direct))


def test_context_image_prompt_shares_images(lm_dirs, tiny_clip_spec, tmp_path):
    from data.benchmarks import load_commonsense
    from data.prompts import derive_prompts

    commonsenseQA.main(argv(lm_dirs["llama"], tiny_clip_spec, tmp_path, "c",
                            extra=["--testset", "piqa", "--data_dir", str(SHARED / "piqa"),
                                   "--image_prompt", "context", "--limit", "2"]))
    rows = samples(tmp_path, "c", "commonsense_piqa")
    for ex in load_commonsense("piqa", SHARED / "piqa", limit=2):
        images = rows[ex.id]["images"]
        assert images[0] == images[1]
        assert [im["prompt"] for im in images[0]] == derive_prompts(ex.image_context, 2, "sentences")


# ------------------------------------------------------------------------------------- fused generation
def test_fused_generation(lm_dirs, tiny_clip_spec, tmp_path):
    from models.checkpoints.weights import save_trainable
    from models.fusion.factory import load_late_fusion_model

    torch.manual_seed(0)
    model = load_late_fusion_model(lm_dirs["llama"], vision_dim=48)  # the tiny CLIP's width
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.mul_(4.0)
    ckpt = save_trainable(model, tmp_path / "ckpt", base_model=lm_dirs["llama"], vision_encoder=tiny_clip_spec)

    def predictions(run, images, *extra):
        res = squad.main(argv(lm_dirs["llama"], tiny_clip_spec, tmp_path, run, images=images,
                              extra=["--data_dir", str(SHARED / "squad_v2"), "--limit", "2",
                                     "--max_new_tokens", "4", "--pretrained_model", str(ckpt), *extra]))
        return [r["prediction"] for r in samples(tmp_path, run, "squad").values()], res

    text_only, _ = predictions("text", False)
    zero_weight, _ = predictions("zero", True, "--clip_temperature", "0")
    fused, res = predictions("fused", True, "--uniform_weights")
    assert zero_weight == text_only  # s_i = 0: exactly the base LM, at every step
    assert fused != text_only
    assert res["counts"]["fusion_passes"] > 1  # the decode steps are fused, not only the prompt


# ------------------------------------------------------------------------------------- QA selection and scores
def test_squad_selection_and_abstention():
    from data.benchmarks import load_squad

    records = load_squad(SHARED / "squad_v2")
    default, skipped = squad.select_questions(records, all_questions=False)
    everything, skipped_all = squad.select_questions(records, all_questions=True)
    answerable_with_example = [r for r in records if not r["is_impossible"] and r["prev_question"] is not None]
    assert default == answerable_with_example and skipped == 2  # two articles: each first answer is the example
    assert len(everything) > len(default) and any(r["is_impossible"] for r in everything)
    assert len(everything) + skipped_all == len(records)
    assert squad.squad_scores("Not in background.", []) == (1.0, 1.0)
    assert squad.squad_scores("not in background", ["France"]) == (0.0, 0.0)
    assert squad.squad_scores("The France!", ["in France", "france"]) == (1.0, 1.0)
    assert squad.squad_scores("north of France", ["France"]) == (0.0, pytest.approx(2 * (1 / 3) / (1 + 1 / 3)))
    refs = ["CANNOTANSWER", "CANNOTANSWER", "a b"]
    assert quac.quac_example_scores("Not in background.", refs) == (1.0, 1.0)


# ------------------------------------------------------------------------------------- bad input
def fail(main, args, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        run_main(main, args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def write_piqa(folder: Path, n_rows: int, labels: list[str]) -> Path:
    folder.mkdir()
    lines = (SHARED / "piqa" / "valid.jsonl").read_text().splitlines()[:n_rows]
    (folder / "valid.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "valid-labels.lst").write_text("\n".join(labels) + "\n")
    return folder


def test_bad_input(lm_dirs, tiny_clip_spec, tmp_path, capsys):
    base = argv(lm_dirs["llama"], tiny_clip_spec, tmp_path, "bad", images=False)
    err = fail(commonsenseQA.main, base + ["--testset", "piqaa", "--data_dir", str(SHARED / "piqa")], capsys)
    assert "piqaa" in err and "winogrande" in err

    short = write_piqa(tmp_path / "short", 5, ["0", "1", "1", "0"])
    err = fail(commonsenseQA.main, base + ["--testset", "piqa", "--data_dir", str(short)], capsys)
    assert f"{short / 'valid-labels.lst'}:5:" in err and "4 labels" in err

    outside = write_piqa(tmp_path / "outside", 3, ["0", "1", "2"])
    err = fail(commonsenseQA.main, base + ["--testset", "piqa", "--data_dir", str(outside)], capsys)
    assert f"{outside / 'valid-labels.lst'}:3:" in err and "'2'" in err

    (tmp_path / "boolq").mkdir()
    rows = [json.loads(x) for x in (SHARED / "boolq" / "dev.jsonl").read_text().splitlines()[:3]]
    rows[1]["passage"] = "  "
    (tmp_path / "boolq" / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    err = fail(boolq.main, base + ["--data_dir", str(tmp_path / "boolq")], capsys)
    assert f"{tmp_path / 'boolq' / 'dev.jsonl'}:2:" in err and "passage" in err
