"""eval_scripts/imagenetVC.py end to end on the tiny zoo, the tiny SDXL pipeline and the real CSVs."""
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eval_scripts import core
from eval_scripts.core import run_main
from eval_scripts.imagenetVC import OPTIONS, main, make_compute, parse_args
from eval_scripts.runtime import clear_memos
from tests.zoo import boosted_checkpoint
from tests.paths import EVAL_DATA

REPO = Path(__file__).resolve().parents[1]
VC = EVAL_DATA / "imagenetvc"
SUBSETS = ("color", "shape", "material", "component", "others")
TEMPLATES = ("{q}", "{q} Answer:", "{q} The answer is", "Question: {q} Answer:", "Question: {q} The answer is")
SAMPLE_KEYS = {"id", "prompt", "candidates", "scores", "prediction", "answer", "correct", "images"}
K = 2
LIMIT = 3


def error_line(err: str) -> str:
    """The one ``error: ...`` line run_main printed (progress bars of model loading may precede it)."""
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and err.strip().endswith(lines[0]), err
    return lines[0]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def csv_rows(path, limit=None):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))[:limit]


def first_questions(limit=LIMIT):
    """{subset: [question, ...]} of the first rows of each CSV, read independently of the library."""
    return {s: [r["question"] for r in csv_rows(VC / f"{s}.csv", limit)] for s in SUBSETS}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def zoo(one_thread, tmp_path_factory, lm_dirs, tiny_clip_spec, tiny_sdxl_dir):
    """A trained-looking checkpoint (our format and the released .bin) and shared paths."""
    root = tmp_path_factory.mktemp("vc")
    model, ckpt = boosted_checkpoint(root, lm_dirs["llama"], tiny_clip_spec, seed=0)
    released = root / "released"
    released.mkdir()
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, released / "ft_wiki_laion_220_2.bin")
    return {"root": root, "lm": lm_dirs["llama"], "clip": tiny_clip_spec, "sdxl": str(tiny_sdxl_dir),
            "ckpt": str(ckpt), "released": str(released / "ft_wiki_laion_220_2"), "cache": str(root / "cache"),
            "out": str(root / "out")}


def image_args(zoo, run_name, pretrained=None, k=K, limit=LIMIT):
    """The released command line (--model_name --run_name --pretrained_model --generate_images True --k),
    pointed at local dirs."""
    return ["--model_name", zoo["lm"], "--run_name", run_name, "--pretrained_model", pretrained or zoo["ckpt"],
            "--generate_images", "True", "--k", str(k),
            "--vision_encoder", zoo["clip"], "--image_generator", zoo["sdxl"], "--image_size", "64",
            "--image_cache", zoo["cache"], "--data_dir", str(VC), "--limit", str(limit),
            "--output_dir", zoo["out"], "--device", "cpu"]


def text_args(zoo, run_name, limit=LIMIT, *extra):
    return ["--model_name", zoo["lm"], "--run_name", run_name, "--data_dir", str(VC), "--limit", str(limit),
            "--output_dir", zoo["out"], "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def released_run(zoo):
    clear_memos()
    result = main(image_args(zoo, "r"))
    return result, read_jsonl(Path(zoo["out"]) / "r" / "imagenetvc_samples.jsonl")


def test_released_command_writes_result_files(released_run, zoo):
    result, samples = released_run
    on_disk = json.loads((Path(zoo["out"]) / "r" / "imagenetvc.json").read_text())
    assert on_disk["metrics"] == result["metrics"]
    assert {"metrics", "config", "counts", "timing", "versions", "git_commit", "date"} <= set(on_disk)
    assert {"examples", "image_slots", "images_generated", "images_from_cache", "images_reused",
            "vision_features_computed", "vision_features_read", "pngs_decoded", "pipeline_loads"} <= set(on_disk["counts"])
    assert {"generation", "clip", "lm", "fusion", "total"} <= set(on_disk["timing"])
    assert on_disk["config"]["generate_images"] is True and on_disk["config"]["k"] == K
    # what "auto" became here, beside what was asked for (the run's device is the CPU: fp32)
    assert on_disk["resolved"] == {"device": "cpu", "dtype": "fp32"}
    assert on_disk["config"]["dtype"] in (None, "auto")
    # the image cache, recorded once: relative to the results folder and absolute
    cache = Path(zoo["cache"]).resolve()
    assert on_disk["image_root"] == {"path": os.path.relpath(cache, (Path(zoo["out"]) / "r").resolve()),
                                     "absolute": str(cache), "kind": "cache"}
    assert ((Path(zoo["out"]) / "r" / on_disk["image_root"]["path"]).resolve()) == cache
    assert on_disk["counts"]["examples"] == len(samples) == len(SUBSETS) * LIMIT * len(TEMPLATES)
    questions = first_questions()
    for rec in samples:
        assert SAMPLE_KEYS <= set(rec)
        assert len(rec["scores"]) == len(rec["candidates"])
        best = max(range(len(rec["scores"])), key=lambda i: (rec["scores"][i], -i))
        assert rec["prediction"] == rec["candidates"][best]
        assert rec["correct"] == (rec["prediction"] == rec["answer"])
        assert rec["answer"] in rec["candidates"]
        question = questions[rec["subset"]][int(rec["id"].split("/")[0].split("-")[1])]
        assert rec["prompt"] == TEMPLATES[rec["template"]].format(q=question)
        assert len(rec["images"]) == K
        for im in rec["images"]:
            assert set(im) == {"path", "prompt", "weight"}
            # relative to the image cache the results record once
            assert (Path(zoo["cache"]) / im["path"]).is_file() and im["prompt"] == question  # --image_prompt question
            assert isinstance(im["weight"], float) and im["weight"] >= 0.0


def test_images_generated_once_per_question_and_cached(released_run, zoo):
    result, samples = released_run
    distinct = {q for qs in first_questions().values() for q in qs}
    assert result["counts"]["images_generated"] == K * len(distinct)
    assert len(list(Path(zoo["cache"]).rglob("*.png"))) == K * len(distinct)
    # the 5 templates of a question share its k images
    by_question = {}
    for rec in samples:
        by_question.setdefault((rec["subset"], rec["id"].split("/")[0]), set()).add(
            tuple(im["path"] for im in rec["images"]))
    assert all(len(paths) == 1 for paths in by_question.values())

    again = main(image_args(zoo, "r_again"))
    assert again["counts"]["images_generated"] == 0
    assert again["counts"]["pipeline_loads"] == 0
    c = again["counts"]
    assert c["image_slots"] == K * len(samples) and c["images_from_cache"] == K * len(distinct)
    assert c["images_reused"] == c["image_slots"] - c["images_from_cache"]
    assert (c["vision_features_computed"], c["vision_features_read"], c["pngs_decoded"]) == (0, K * len(distinct), 0)
    assert again["metrics"] == result["metrics"]


def test_released_bin_without_suffix_loads_the_same_weights(released_run, zoo):
    result, samples = released_run
    from_bin = main(image_args(zoo, "r_bin", pretrained=zoo["released"]))
    assert from_bin["metrics"] == result["metrics"]
    assert [r["scores"] for r in read_jsonl(Path(zoo["out"]) / "r_bin" / "imagenetvc_samples.jsonl")] == \
        [r["scores"] for r in samples]


def direct_first_token_scores(lm, tok, prompt, candidates):
    """The released score, straight from the base LM: log_softmax of the last position's logits at the
    first token of " cand" and of " Cand", the better of the two."""
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(lm(input_ids=ids).logits[0, -1].float(), -1)
    return [max(float(logp[tok(" " + c[:1].upper() + c[1:] if cap else " " + c,
                               add_special_tokens=False)["input_ids"][0]]) for cap in (False, True))
            for c in candidates]


def test_text_only_scores_are_the_base_lm(released_run, zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = main(text_args(zoo, "text", 2, "--generate_images", "False"))
    samples = read_jsonl(Path(zoo["out"]) / "text" / "imagenetvc_samples.jsonl")
    assert result["config"]["generate_images"] is False and result["counts"]["fusion_passes"] == 0
    lm = AutoModelForCausalLM.from_pretrained(zoo["lm"]).eval()
    tok = AutoTokenizer.from_pretrained(zoo["lm"])
    for rec in samples:
        assert rec["images"] == []
        assert rec["scores"] == pytest.approx(direct_first_token_scores(lm, tok, rec["prompt"], rec["candidates"]),
                                              abs=2e-5)
    # the images move the scores (so the image runs above really fused something)
    with_images = {r["id"]: r["scores"] for r in released_run[1]}
    assert any(with_images[r["id"]] != pytest.approx(r["scores"], abs=1e-3) for r in samples)


def test_mean_and_std_match_a_hand_computation(released_run):
    result, samples = released_run
    per_subset = {}
    for subset in SUBSETS:
        accs = []
        for t in range(len(TEMPLATES)):
            rows = [r for r in samples if r["subset"] == subset and r["template"] == t]
            assert len(rows) == LIMIT
            accs.append(sum(r["correct"] for r in rows) / len(rows))
        per_subset[subset] = accs
        m = result["metrics"][subset]
        assert m["mean"] == pytest.approx(100 * statistics.mean(accs))
        assert m["std"] == pytest.approx(100 * statistics.stdev(accs))
        assert m["per_template"] == pytest.approx([100 * a for a in accs], abs=1e-4)
    overall = [statistics.mean(per_subset[s][t] for s in SUBSETS) for t in range(len(TEMPLATES))]
    assert result["metrics"]["overall"]["mean"] == pytest.approx(100 * statistics.mean(overall))
    assert result["metrics"]["overall"]["std"] == pytest.approx(100 * statistics.stdev(overall))


def test_killed_run_resumes_to_the_same_metrics(zoo, capsys):
    whole = main(text_args(zoo, "whole", LIMIT, "--subsets", "color,others"))
    main(text_args(zoo, "killed", 2, "--subsets", "color,others"))
    run_dir = Path(zoo["out"]) / "killed"
    lines = (run_dir / "imagenetvc_samples.cache.jsonl").read_text().splitlines(keepends=True)
    kept = [json.loads(line) for line in lines[:6]]
    kept[0]["marker"] = "not recomputed"
    # what a kill leaves: a part file whose last line is cut short, and no result files
    (run_dir / "imagenetvc_samples.part0.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in kept) + lines[6][: len(lines[6]) // 2])
    for name in ("imagenetvc_samples.cache.jsonl", "imagenetvc_samples.jsonl", "imagenetvc.json"):
        (run_dir / name).unlink()

    resumed = main(text_args(zoo, "killed", LIMIT, "--subsets", "color,others"))
    assert resumed["metrics"] == whole["metrics"]
    merged = read_jsonl(run_dir / "imagenetvc_samples.jsonl")
    assert len(merged) == len({r["id"] for r in merged}) == 2 * LIMIT * len(TEMPLATES)
    assert [r for r in merged if r["id"] == kept[0]["id"]][0]["marker"] == "not recomputed"
    assert not list(run_dir.glob("*.part*.jsonl"))

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(main, text_args(zoo, "killed", LIMIT, "--subsets", "color,others", "--k", "3"))
    assert e.value.code == 2
    err = error_line(capsys.readouterr().err)
    assert "--k" in err and "killed" in err


def test_full_scoring_differs_from_first_token_on_a_multi_token_candidate(zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(zoo["lm"]).eval()
    tok = AutoTokenizer.from_pretrained(zoo["lm"])
    prompt = "Question: What is the shape of a kite? Answer:"
    item = {"id": "x/t3", "subset": "shape", "template": 3, "prompt": prompt, "answer": "rhombus",
            "candidates": ["rhombus", "round"], "image_prompts": []}
    assert len(tok(" rhombus", add_special_tokens=False)["input_ids"]) == 3

    def score(scoring):
        ev = core.Evaluator(parse_args(text_args(zoo, f"unit_{scoring}", 1, "--scoring", scoring)), "imagenetvc", OPTIONS)
        return make_compute(ev)([item])[0]["scores"]

    ctx = tok(prompt)["input_ids"]
    full_ref = []
    for cand in item["candidates"]:
        cont = tok(" " + cand, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(lm(input_ids=torch.tensor([ctx + cont])).logits[0].float(), -1)
        full_ref.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
    full, first = score("full"), score("first_token")
    assert full == pytest.approx(full_ref, abs=2e-5)
    assert first == pytest.approx(direct_first_token_scores(lm, tok, prompt, item["candidates"]), abs=2e-5)
    assert abs(full[0] - first[0]) > 1.0  # three tokens' worth of log-probability against one

    # and the flag runs end to end on the real data
    result = main(text_args(zoo, "full", 1, "--scoring", "full", "--subsets", "color"))
    rec = read_jsonl(Path(zoo["out"]) / "full" / "imagenetvc_samples.jsonl")[0]
    assert result["config"]["scoring"] == "full"
    ctx = tok(rec["prompt"])["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(lm(input_ids=torch.tensor([ctx])).logits[0, -1].float(), -1)
    assert rec["scores"] == pytest.approx(
        [float(logp[tok(" " + c, add_special_tokens=False)["input_ids"][0]]) for c in rec["candidates"]], abs=2e-5)


def test_use_icl_prepends_dev_demonstrations(zoo):
    main(text_args(zoo, "icl", 1, "--subsets", "color,others", "--use-icl"))
    samples = read_jsonl(Path(zoo["out"]) / "icl" / "imagenetvc_samples.jsonl")
    question = {s: csv_rows(VC / f"{s}.csv", 1)[0]["question"] for s in ("color", "others")}
    demo_file = {"color": "color", "others": "others_other"}  # others' first answer ("short") is an "other" one
    for rec in samples:
        demos = csv_rows(VC / "dev" / f"{demo_file[rec['subset']]}.csv")
        fmt = TEMPLATES[rec["template"]]
        expected = "".join(f"{fmt.format(q=d['question'].strip())} {d['answer'].strip().lower()}. " for d in demos)
        assert rec["prompt"] == expected + fmt.format(q=question[rec["subset"]])


def write_color_csv(folder, header, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "color.csv").write_text("\n".join([header, *rows]) + "\n")
    return folder


@pytest.mark.parametrize("case", ["unknown_subset", "missing_column", "answer_outside"])
def test_bad_input_is_one_line_exit_2(case, zoo, tmp_path, capsys):
    args = text_args(zoo, f"bad_{case}", 1, "--subsets", "color")
    if case == "unknown_subset":
        args += ["--subsets", "colour"]
        expect = ["colour"]
    elif case == "missing_column":
        data = write_color_csv(tmp_path / "d", "category,question", ["tench,What's the color of a tench?"])
        args += ["--data_dir", str(data)]
        expect = [str(data / "color.csv"), ":1", "answer"]
    else:
        data = write_color_csv(tmp_path / "d", "category,question,answer",
                               ["tench,What's the color of a tench?,green", "goldfish,What color is it?,turquoise"])
        args += ["--data_dir", str(data)]
        expect = [f"{data / 'color.csv'}:3", "turquoise"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(main, args)
    assert e.value.code == 2
    err = error_line(capsys.readouterr().err)
    for piece in expect:
        assert piece in err


@pytest.mark.xdist_group("torchrun")  # one torchrun at a time: concurrent launches can meet on one port
def test_two_processes_give_the_same_metrics(released_run, zoo):
    result, _ = released_run
    torchrun = Path(sys.executable).with_name("torchrun")
    cache = Path(zoo["root"]) / "cache2"  # fresh: each process generates with its own pipeline
    args = image_args(zoo, "ddp") + ["--image_cache", str(cache)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2",
                           str(REPO / "eval_scripts" / "imagenetVC.py"), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((Path(zoo["out"]) / "ddp" / "imagenetvc.json").read_text())
    assert ddp["num_processes"] == 2
    assert ddp["counts"]["examples"] == result["counts"]["examples"]
    assert ddp["metrics"] == result["metrics"]
    samples = read_jsonl(Path(zoo["out"]) / "ddp" / "imagenetvc_samples.jsonl")
    assert len(samples) == len({r["id"] for r in samples}) == result["counts"]["examples"]
    shutil.rmtree(cache)
