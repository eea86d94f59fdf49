"""lm-evaluation-harness integration (eval_scripts/harness.py) against lm-eval's own ``hf`` model.

The task YAMLs under tests/harness_tasks copy lm-eval's official arc_easy and piqa definitions line for
line, apart from the data source: local JSON files in the hub layout the official tasks read, converted
here from the trimmed original files in tests/data.
"""
from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.paths import REPO, TEST_DATA

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = REPO / "tests" / "harness_tasks"
TINY = dict(vocab_size=50257, bos_token_id=50256, eos_token_id=50256, pad_token_id=50256)


# ------------------------------------------------------------------------------------- data and tasks
def convert_arc(src: Path, dst: Path) -> list[dict]:
    """ARC's original JSONL (question.stem, question.choices[{text, label}]) -> the ai2_arc hub layout."""
    rows = []
    for line in src.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        choices = r["question"]["choices"]
        rows.append({"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
                     "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]}})
    dst.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return rows


def convert_piqa(src: Path, labels: Path, dst: Path) -> list[dict]:
    """PIQA's valid.jsonl + valid-labels.lst -> the hub layout (goal, sol1, sol2, label)."""
    rows = [{**json.loads(line), "label": int(lab)} for line, lab in
            zip(src.read_text(encoding="utf-8").splitlines(), labels.read_text().split())]
    rows = [{k: r[k] for k in ("goal", "sol1", "sol2", "label")} for r in rows]
    dst.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return rows


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The converted files, named as the YAMLs' relative ``data_files`` (runs chdir here)."""
    d = tmp_path_factory.mktemp("harness_data")
    convert_arc(TEST_DATA / "arc" / "ARC-Easy-Dev.jsonl", d / "arc_easy.jsonl")
    convert_piqa(TEST_DATA / "piqa" / "valid.jsonl", TEST_DATA / "piqa" / "valid-labels.lst", d / "piqa.jsonl")
    return d


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS), include_defaults=False)


@pytest.fixture(autouse=True)
def fresh_accelerate():
    """lm-eval's hf model builds an Accelerator: start and leave each test with Accelerate's state clear."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def evaluate(data_dir, task_manager, model, model_args=None, tasks=("arc_easy", "piqa"), limit=None, **kw):
    import lm_eval

    import eval_scripts.harness  # noqa: F401  (registers late_fusion)
    with contextlib.chdir(data_dir):
        return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(tasks), limit=limit,
                                       task_manager=task_manager, log_samples=True, device="cpu",
                                       batch_size=kw.pop("batch_size", 4), bootstrap_iters=0, **kw)


def hf_args(path):
    return {"pretrained": path, "dtype": "float32"}


def test_task_yamls_copy_the_official_ones_apart_from_the_data_source():
    import lm_eval

    official = Path(lm_eval.__file__).parent / "tasks"

    def without_source(text: str) -> list[str]:
        lines, skip = [], False
        for line in text.splitlines():
            if line.startswith("dataset_kwargs:"):
                skip = True
                continue
            if skip and line.startswith(" "):
                continue
            skip = False
            if not line.startswith(("dataset_path:", "dataset_name:")):
                lines.append(line)
        return lines

    for ours, theirs in (("arc_easy.yaml", "arc/arc_easy.yaml"), ("piqa.yaml", "piqa/piqa.yaml")):
        mine = (TASKS / ours).read_text()
        assert without_source(mine) == without_source((official / theirs).read_text())
        assert "dataset_path: json" in mine and "data_files:" in mine


def test_conversion_keeps_every_field(data_dir):
    arc = [json.loads(x) for x in (data_dir / "arc_easy.jsonl").read_text().splitlines()]
    original = json.loads((TEST_DATA / "arc" / "ARC-Easy-Dev.jsonl").read_text().splitlines()[0])
    assert len(arc) == 100 and arc[0]["question"] == original["question"]["stem"]
    assert arc[0]["choices"]["text"][arc[0]["choices"]["label"].index(arc[0]["answerKey"])] == "cellular telephone"
    piqa = [json.loads(x) for x in (data_dir / "piqa.jsonl").read_text().splitlines()]
    labels = (TEST_DATA / "piqa" / "valid-labels.lst").read_text().split()
    assert len(piqa) == 200 and [r["label"] for r in piqa] == [int(x) for x in labels]
    assert piqa[0]["goal"] == "How do I ready a guinea pig cage for it's new occupants?"


# ------------------------------------------------------------------------------------- parity with hf
def assert_same_results(ref: dict, got: dict, tasks, rows_by_task):
    for task in tasks:
        for metric in ("acc,none", "acc_norm,none"):
            assert got["results"][task][metric] == ref["results"][task][metric], (task, metric)
        ref_samples = sorted(ref["samples"][task], key=lambda s: s["doc_id"])
        got_samples = sorted(got["samples"][task], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in got_samples] == [s["doc_id"] for s in ref_samples]
        for a, b in zip(ref_samples, got_samples):
            assert (a["acc"], a["acc_norm"]) == (b["acc"], b["acc_norm"])   # the same prediction
            lls_a = [ll for ll, _ in a["filtered_resps"]]
            lls_b = [ll for ll, _ in b["filtered_resps"]]
            assert lls_b == pytest.approx(lls_a, abs=1e-4)
            assert [g for _, g in a["filtered_resps"]] == [g for _, g in b["filtered_resps"]]
            assert max(range(len(lls_b)), key=lls_b.__getitem__) == max(range(len(lls_a)), key=lls_a.__getitem__)
            # the converted file reaches the task: its doc is the original row
            assert b["doc"] == rows_by_task[task][b["doc_id"]]


def converted_rows(data_dir):
    return {"arc_easy": [json.loads(x) for x in (data_dir / "arc_easy.jsonl").read_text().splitlines()],
            "piqa": [json.loads(x) for x in (data_dir / "piqa.jsonl").read_text().splitlines()]}


def test_parity_with_hf_on_tiny_gpt2(lm_dirs, data_dir, task_manager):
    ref = evaluate(data_dir, task_manager, "hf", hf_args(lm_dirs["gpt2"]), limit=40)
    got = evaluate(data_dir, task_manager, "late_fusion", {"model_name": lm_dirs["gpt2"]}, limit=40)
    assert_same_results(ref, got, ("arc_easy", "piqa"), converted_rows(data_dir))
    assert got["config"]["late_fusion"]["k"] == 0


def test_parity_with_hf_on_smollm2(smollm2_path, data_dir, task_manager):
    ref = evaluate(data_dir, task_manager, "hf", hf_args(smollm2_path), limit=8)
    got = evaluate(data_dir, task_manager, "late_fusion", {"model_name": smollm2_path, "dtype": "fp32"}, limit=8)
    assert_same_results(ref, got, ("arc_easy", "piqa"), converted_rows(data_dir))


def test_project_harness_protocol_equals_the_adapter(smollm2_path, data_dir, task_manager, tmp_path):
    """commonsenseQA.py --protocol harness and lm-eval scored through the adapter agree per choice."""
    from eval_scripts import commonsenseQA

    got = evaluate(data_dir, task_manager, "late_fusion", {"model_name": smollm2_path}, tasks=("piqa",), limit=6)
    commonsenseQA.main(["--model_name", smollm2_path, "--testset", "piqa", "--protocol", "harness", "--limit", "6",
                        "--data_dir", str(TEST_DATA / "piqa"), "--device", "cpu", "--output_dir", str(tmp_path),
                        "--run_name", "r"])
    rows = [json.loads(x) for x in (tmp_path / "r" / "commonsense_piqa_harness_samples.jsonl").read_text().splitlines()]
    for sample, row in zip(sorted(got["samples"]["piqa"], key=lambda s: s["doc_id"]), rows):
        assert row["scores"] == pytest.approx([ll for ll, _ in sample["filtered_resps"]], abs=1e-4)


# ------------------------------------------------------------------------------------- edge cases vs hf
def requests(kind: str, args_list):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=0, metadata=("synthetic", i, 1))
            for i, args in enumerate(args_list)]


def make_pair(path: str):
    """lm-eval's hf model and the adapter (no images) on one LM dir."""
    from lm_eval.models.huggingface import HFLM

    from eval_scripts.harness import LateFusionHarnessLM

    hf = HFLM(pretrained=path, device="cpu", dtype="float32", batch_size=3)
    return hf, LateFusionHarnessLM(model_name=path, device="cpu", batch_size=3)


@pytest.fixture(scope="module")
def bloom_n_ctx_dir(tmp_path_factory, tokenizer_dir):
    """A tiny Bloom (ALiBi: no position table) whose config names its window only as ``n_ctx`` (48)."""
    import transformers as tf

    config = tf.BloomConfig(hidden_size=32, n_layer=2, n_head=4, n_ctx=48, **TINY)
    assert getattr(config, "n_positions", None) is None and getattr(config, "max_position_embeddings", None) is None
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny-bloom-n_ctx")
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(d)
    tf.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def long_text():
    text = (TEST_DATA / "wikitext2" / "valid.txt").read_text(encoding="utf-8")
    return " ".join(text.split()[:900])


def edge_requests(long_text):
    return requests("loglikelihood", [
        (long_text, " lobster"),                          # longer than the window: truncated from the left
        ("The European lobster is ", "blue"),             # trailing space moves into the continuation
        ("The European lobster is  \n", "blue on cooking"),
        ("", " lobster pots"),                            # empty context: conditioned on BOS/EOS
        ("", "<|endoftext|> lobster"),                    # ... unless the continuation starts with it
        ("Homarus gammarus", " is a species of lobster"),
    ])


def assert_close(got, ref):
    assert [g for _, g in got] == [g for _, g in ref]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in ref], abs=1e-4)


def test_edge_cases_match_hf(lm_dirs, long_text):
    hf, ours = make_pair(lm_dirs["gpt2"])
    assert ours.max_length == hf.max_length == 512
    reqs = edge_requests(long_text)
    assert len(hf.tok_encode(long_text)) > 600
    ref = hf.loglikelihood(reqs)
    assert_close(ours.loglikelihood(reqs), ref)
    # the project's scoring core (commonsenseQA --protocol harness, ImageNetVC full scoring) agrees
    scorer = ours.scorer
    pairs = [r.args for r in reqs]
    for ctx, cont in pairs:
        expected = hf._encode_pair(ctx, cont) if ctx else None
        if expected:
            assert scorer.encode_pair(ctx, cont) == expected
    assert scorer.encode_pair("", " lobster pots") == ([50256], hf.tok_encode(" lobster pots"))
    out, _ = scorer.continuation_logprobs([c for c, _ in pairs], [x for _, x in pairs], [[] for _ in pairs])
    assert [sum(lps) for lps, _ in out] == pytest.approx([ll for ll, _ in ref], abs=1e-4)


def test_config_with_only_n_ctx_and_rolling_windows_match_hf(bloom_n_ctx_dir, long_text):
    hf, ours = make_pair(bloom_n_ctx_dir)
    assert ours.max_length == hf.max_length == 48
    assert_close(ours.loglikelihood(edge_requests(long_text)), hf.loglikelihood(edge_requests(long_text)))
    # a wikitext-style document over several windows of 48 tokens
    doc = requests("loglikelihood_rolling", [(long_text[:700],), ("A short line .",)])
    assert len(hf.tok_encode(long_text[:700])) > 3 * 48
    assert ours.loglikelihood_rolling(doc) == pytest.approx(hf.loglikelihood_rolling(doc), abs=1e-4)
    # a continuation longer than the window: one clear error naming the request
    from eval_scripts.cli import EvalError
    with pytest.raises(EvalError, match=r"task 'synthetic' doc 0: the continuation has \d+ tokens, more than"):
        ours.loglikelihood(requests("loglikelihood", [("Lobsters", " " + long_text[:400])]))


def test_window_fallbacks_follow_hf(gpt2_tokenizer_dir):
    from types import SimpleNamespace

    from lm_eval.models.utils import resolve_max_length
    from transformers import AutoTokenizer

    from eval_scripts.runtime import context_window

    tok = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    configs = [SimpleNamespace(n_positions=64, max_position_embeddings=128), SimpleNamespace(max_position_embeddings=128),
               SimpleNamespace(n_ctx=32), SimpleNamespace(text_config=SimpleNamespace(n_ctx=16), n_positions=8),
               SimpleNamespace(), SimpleNamespace(n_positions=None, n_ctx=None)]
    assert [context_window(c, tok) for c in configs] == [resolve_max_length(c, tok) for c in configs] == \
        [64, 128, 32, 16, 1024, 1024]                                          # the tokenizer's 1024 last
    tok.model_max_length = int(1e30)                                           # a tokenizer that sets none
    assert context_window(SimpleNamespace(), tok) == resolve_max_length(SimpleNamespace(), tok) == 2048


def test_generate_until_matches_hf_without_images(lm_dirs):
    hf, ours = make_pair(lm_dirs["gpt2"])
    reqs = requests("generate_until", [
        ("Question: Which is larger, a lobster or a crab?\nAnswer:", {"until": ["\n"], "max_gen_toks": 6}),
        ("The European lobster", {"until": [" the", "."], "max_gen_toks": 9, "do_sample": False}),
        ("Lobsters", {"max_gen_toks": 5}),
    ])
    assert ours.generate_until(reqs) == hf.generate_until(reqs)


# ------------------------------------------------------------------------------------- bad input
def test_bad_model_args_fail_before_any_model_loads(lm_dirs):
    from eval_scripts.cli import EvalError
    from eval_scripts.harness import LateFusionHarnessLM

    cases = [({"model_nmae": "gpt2"}, "unknown key 'model_nmae'"), ({"k": 0}, "k must be >= 1"),
             ({"mix": "mean"}, "mix: must be one of logits, probs, got 'mean'"), ({"batch_size": "auto"}, "auto"),
             ({"k": "two"}, "k: must be an integer >= 0, got 'two'"),
             ({"guidance_scale": -1}, "guidance_scale: must be a finite number >= 0, got -1"),
             ({"image_prompt": "context"}, "image_prompt: must be one of question, full, sentences"),
             ({"image_source": "fetch"}, "image_source: must be one of generate, retrieve, got 'fetch'"),
             ({"k": 2, "image_source": "retrieve"}, "retrieve needs --image_index")]
    for args, message in cases:
        with pytest.raises(EvalError, match=message):
            LateFusionHarnessLM.create_from_arg_obj({"model_name": "no/such-model", **args}, {"device": "cpu"})
    lm = LateFusionHarnessLM.create_from_arg_obj({"model_name": lm_dirs["gpt2"], "batch_size": 5},
                                                 {"batch_size": 1, "device": "cuda:0", "max_batch_size": None})
    assert lm.batch_size == 5 and lm._runtime is None   # --model_args win; nothing loaded yet
    # a sampling request is refused before the models load
    with pytest.raises(EvalError, match="doc 0: sampling .* late_fusion decodes greedily"):
        lm.generate_until(requests("generate_until", [("Q:", {"do_sample": True, "temperature": 0.7})]))
    with pytest.raises(EvalError, match="generation kwarg num_beams=4 is not supported"):
        lm.generate_until(requests("generate_until", [("Q:", {"num_beams": 4})]))
    assert lm._runtime is None
    with pytest.raises(EvalError, match="chat templates"):
        lm.chat_template(True)


def test_a_task_the_adapter_cannot_run_fails_before_any_model_loads(data_dir, task_manager, lm_dirs):
    from eval_scripts.cli import EvalError
    from eval_scripts.harness import LateFusionHarnessLM, tasks_checked_before_run

    lm = LateFusionHarnessLM(model_name=lm_dirs["gpt2"], device="cpu")
    with tasks_checked_before_run(), pytest.raises(EvalError, match="task 'arc_easy_sampled': sampling"):
        evaluate(data_dir, task_manager, lm, tasks=("arc_easy", "arc_easy_sampled"), limit=2)
    assert lm._runtime is None

    class Multimodal:
        MULTIMODAL = True
    with pytest.raises(EvalError, match="images or audio"):
        lm.check_tasks({"mmmu_val": Multimodal()})


def test_cli_bad_input_is_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "eval_scripts.harness", "--tasks", "arc_easy",
                           "--include_path", str(TASKS), "--model_args", "model_name=gpt2,kk=2", "--device", "cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    from eval_scripts.harness import MODEL_ARGS

    assert proc.stderr.strip().splitlines()[-1] == ("error: late_fusion model_args: unknown key 'kk'; allowed: "
                                                    + ", ".join(MODEL_ARGS))
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------- with images
def test_image_prompts_per_strategy():
    from eval_scripts.harness import image_prompts, strip_answer_cue

    ctx = "Question: Which animal is red once cooked? Think first.\nAnswer:"
    assert strip_answer_cue(ctx) == "Question: Which animal is red once cooked? Think first."
    assert strip_answer_cue("Q: Where do lobsters live?\nA:") == "Q: Where do lobsters live?"
    assert strip_answer_cue("Is the colour of a lobster a") == "Is the colour of a lobster a"
    assert image_prompts(ctx, 2, "question") == ["Question: Which animal is red once cooked? Think first."] * 2
    assert image_prompts(ctx, 2, "full") == [ctx] * 2
    assert image_prompts(ctx, 3, "sentences") == ["Answer:", "Think first.",
                                                  "Question: Which animal is red once cooked? Think first. Answer:"]
    assert image_prompts("", 2, "question") == [] and image_prompts("Answer:", 2, "question") == []


@pytest.fixture(scope="module")
def fusion_checkpoint(tmp_path_factory, lm_dirs, tiny_clip_spec):
    from tests.zoo import boosted_checkpoint

    return str(boosted_checkpoint(tmp_path_factory.mktemp("harness_ckpt"), lm_dirs["llama"], tiny_clip_spec)[1])


def test_images_end_to_end_and_cached(lm_dirs, tiny_clip_spec, tiny_sdxl_dir, fusion_checkpoint, data_dir,
                                      task_manager, tmp_path):
    """The command line with k = 2 images on a multiple-choice and a generate_until task; a second run
    (from Python) finds every image in the cache."""
    from eval_scripts import harness

    model_args = {"model_name": lm_dirs["llama"], "pretrained_model": fusion_checkpoint, "k": 2,
                  "vision_encoder": tiny_clip_spec, "image_generator": str(tiny_sdxl_dir), "image_size": 64,
                  "image_cache": str(tmp_path / "cache"), "uniform_weights": False}
    with contextlib.chdir(data_dir):
        harness.main(["--tasks", "arc_easy,arc_easy_gen", "--include_path", str(TASKS), "--limit", "4",
                      "--device", "cpu", "--batch_size", "3", "--output_path", str(tmp_path / "out"), "--log_samples",
                      "--model_args", ",".join(f"{k}={v}" for k, v in model_args.items())])
    results = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("results_*.json")]
    assert len(results) == 1
    config = results[0]["config"]["late_fusion"]
    samples = {p.name.split("_20")[0]: [json.loads(x) for x in p.read_text().splitlines()]
               for p in (tmp_path / "out").rglob("samples_*.jsonl")}
    assert set(samples) == {"samples_arc_easy", "samples_arc_easy_gen"}
    contexts = {s["arguments"]["gen_args_0"]["arg_0"] for rows in samples.values() for s in rows}
    assert len(contexts) == 4                     # both tasks ask the same 4 questions: images are shared
    assert config["k"] == 2 and config["images_generated"] == 2 * len(contexts)
    assert len(list((tmp_path / "cache").rglob("*.png"))) == 2 * len(contexts)
    assert all(isinstance(s["filtered_resps"][0], str) for s in samples["samples_arc_easy_gen"])
    assert 0 <= results[0]["results"]["arc_easy"]["acc,none"] <= 1

    # the same run from Python: nothing generated again, the same scores
    lm = harness.LateFusionHarnessLM(**{**model_args, "device": "cpu", "batch_size": 2})
    again = evaluate(data_dir, task_manager, lm, tasks=("arc_easy", "arc_easy_gen"), limit=4)
    assert lm.get_model_info()["late_fusion"]["images_generated"] == 0
    first = {s["doc_id"]: s["filtered_resps"] for s in samples["samples_arc_easy"]}
    for s in again["samples"]["arc_easy"]:
        assert [ll for ll, _ in s["filtered_resps"]] == pytest.approx([float(ll) for ll, _ in first[s["doc_id"]]],
                                                                     abs=1e-4)   # the samples file holds strings
    # the images move the prediction: fused scores differ from the base LM's
    base = evaluate(data_dir, task_manager, "late_fusion", {"model_name": lm_dirs["llama"]}, tasks=("arc_easy",),
                    limit=4)
    fused = [ll for s in again["samples"]["arc_easy"] for ll, _ in s["filtered_resps"]]
    plain = [ll for s in base["samples"]["arc_easy"] for ll, _ in s["filtered_resps"]]
    assert max(abs(a - b) for a, b in zip(fused, plain)) > 1e-3
    assert all(math.isfinite(x) for x in fused)


def test_retrieved_images_through_model_args(lm_dirs, tiny_clip_spec, fusion_checkpoint, data_dir, task_manager,
                                            tmp_path, monkeypatch):
    """image_source=retrieve: each request's k slots are its prompt's k best images of the index, nothing is
    generated, and the images move the scores."""
    from eval_scripts import harness
    from models.images import index as image_index
    from models.images.index import ImageIndex
    from models.images.retrieval import ImageRetriever
    from tests.test_image_index import draw_stand_ins

    photos = draw_stand_ins(tmp_path / "photos", [f"photo{i:02d}.png" for i in range(12)])
    image_index.main(["build", "--images", str(photos), "--out", str(tmp_path / "index"), "--vision_encoder",
                      tiny_clip_spec, "--num_workers", "0", "--device", "cpu"])
    served = []  # every image slot the scorer asked the source for
    refs = ImageRetriever.refs

    def spy(self, prompt_lists):
        out = refs(self, prompt_lists)
        served.extend(out)
        return out

    monkeypatch.setattr(ImageRetriever, "refs", spy)
    model_args = {"model_name": lm_dirs["llama"], "pretrained_model": fusion_checkpoint, "k": 2,
                  "vision_encoder": tiny_clip_spec, "image_source": "retrieve", "image_index": str(tmp_path / "index"),
                  "dedup_threshold": 1.0, "image_cache": str(tmp_path / "cache"), "uniform_weights": False,
                  "device": "cpu", "batch_size": 2}
    lm = harness.LateFusionHarnessLM(**model_args)
    fused = evaluate(data_dir, task_manager, lm, tasks=("arc_easy",), limit=3)
    info = lm.get_model_info()["late_fusion"]
    assert (info["image_source"], info["image_index"], info["images_generated"]) == ("retrieve",
                                                                                     str(tmp_path / "index"), 0)
    assert isinstance(lm.runtime.source, ImageRetriever) and not list((tmp_path / "cache").rglob("*.png"))
    index = ImageIndex(tmp_path / "index")
    assert served and all(len(item) == 2 for item in served)
    for item in served:  # image_prompt question: k copies of the context's question, its two best images
        assert item[0].prompt == item[1].prompt
        assert [r.row for r in item] == [row for row, _ in lm.runtime.source.rank([item[0].prompt], 2)[0]]
        assert [r.path for r in item] == [str(index.root / index.paths[r.row]) for r in item]
    counts = lm.runtime.image_stats()
    assert counts["generated"] == 0 and counts["slots"] == counts["from_cache"] + counts["reused"] > 0
    base = evaluate(data_dir, task_manager, "late_fusion", {"model_name": lm_dirs["llama"]}, tasks=("arc_easy",),
                    limit=3)
    with_images = [ll for s in fused["samples"]["arc_easy"] for ll, _ in s["filtered_resps"]]
    plain = [ll for s in base["samples"]["arc_easy"] for ll, _ in s["filtered_resps"]]
    assert max(abs(a - b) for a, b in zip(with_images, plain)) > 1e-3


# ------------------------------------------------------------------------------------- distributed
@pytest.mark.xdist_group("torchrun")  # one torchrun at a time: concurrent launches can meet on one port
def test_two_processes_shard_the_requests_like_hf(lm_dirs, data_dir, task_manager, tmp_path):
    """Under torchrun (as under accelerate launch) each process scores its share; lm-eval gathers the
    same results as one process."""
    import os

    single = evaluate(data_dir, task_manager, "late_fusion", {"model_name": lm_dirs["gpt2"]}, tasks=("arc_easy",),
                      limit=8)
    runner = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([str(runner), "--standalone", "--nproc_per_node", "2", "-m", "tests.harness_ddp_check",
                           lm_dirs["gpt2"], str(TASKS), str(tmp_path), "8"], cwd=data_dir, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    n_requests = sum(len(s["filtered_resps"]) for s in single["samples"]["arc_easy"])
    assert sum(r["n_scored"] for r in ranks) == n_requests and all(r["n_scored"] < n_requests for r in ranks)
    assert ranks[0]["acc"] == single["results"]["arc_easy"]["acc,none"]
    for s in single["samples"]["arc_easy"]:
        assert ranks[0]["lls"][str(s["doc_id"])] == pytest.approx([ll for ll, _ in s["filtered_resps"]], abs=1e-5)


def test_project_harness_protocol_names_the_example_whose_choice_cannot_fit(tmp_path, tokenizer_dir, capsys):
    """commonsenseQA.py --protocol harness on an LM with a 16-token window: PIQA's first long solution cannot
    be scored (lm-eval's hf model would stop on an assertion); one line naming the example, exit 2."""
    import transformers as tf

    from data.benchmarks import load_commonsense
    from eval_scripts import commonsenseQA
    from eval_scripts.core import run_main

    lm_dir = tmp_path / "gpt2-16"
    tf.AutoModelForCausalLM.from_config(tf.GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=16, **TINY)
                                        ).save_pretrained(lm_dir)
    tf.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(lm_dir)
    tok = tf.AutoTokenizer.from_pretrained(lm_dir)
    examples = load_commonsense("piqa", TEST_DATA / "piqa", limit=3)
    n_tokens = len(tok(examples[0].context + examples[0].choices[0])["input_ids"]) - len(tok(examples[0].context)["input_ids"])
    assert n_tokens > 16
    with pytest.raises(SystemExit) as exit_:
        run_main(commonsenseQA.main, ["--model_name", str(lm_dir), "--testset", "piqa", "--protocol", "harness",
                                      "--limit", "3", "--data_dir", str(TEST_DATA / "piqa"), "--device", "cpu",
                                      "--output_dir", str(tmp_path / "out"), "--run_name", "r"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {examples[0].id} (option 0): the continuation has {n_tokens} tokens, more than the model's "
        "window of 16")
