"""object_commonsense.py and imagenetVC.py on masked LMs (tiny BERT and RoBERTa): fill-mask prompts, images
from the prompt without the mask, text-only scores equal to transformers' fill-mask, full = pseudo-log-
likelihood; the causal-only scripts refuse a masked LM in one line."""
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

from eval_scripts import boolq, commonsenseQA, imagenetVC, object_commonsense, quac, squad
from eval_scripts.core import run_main
from eval_scripts.runtime import clear_memos
from models.checkpoints.weights import save_trainable
from models.fusion.factory import load_late_fusion_model
from tests.paths import EVAL_DATA, TEST_DATA
from tests.zoo import boost_fusion

pytestmark = pytest.mark.usefixtures("one_thread")
OBJECTS, VC = EVAL_DATA / "object_commonsense", EVAL_DATA / "imagenetvc"
K = 2


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def zoo(one_thread, tmp_path_factory, mlm_dirs, tiny_clip_spec):
    """A tiny BERT with trained-looking fusion weights (our checkpoint format) and shared paths."""
    root = tmp_path_factory.mktemp("masked-eval")
    torch.manual_seed(0)
    model = boost_fusion(load_late_fusion_model(mlm_dirs["bert"], vision_dim=48))
    ckpt = save_trainable(model, root / "ckpt", base_model=mlm_dirs["bert"], vision_encoder=tiny_clip_spec)
    return {"bert": mlm_dirs["bert"], "roberta": mlm_dirs["roberta"], "clip": tiny_clip_spec, "ckpt": str(ckpt),
            "cache": str(root / "cache"), "out": root / "out"}


def run(script, zoo, run_name, data, *extra, lm="bert", images=False):
    args = ["--model_name", zoo[lm], "--data_dir", str(data), "--output_dir", str(zoo["out"]), "--run_name",
            run_name, "--device", "cpu", *extra]
    if images:
        args += ["--pretrained_model", zoo["ckpt"], "--generate_images", "--k", str(K), "--image_generator",
                 "toyworld", "--image_size", "32", "--image_cache", zoo["cache"]]
    clear_memos()
    return script.main(args)


def test_object_commonsense_runs_with_images(zoo):
    result = run(object_commonsense, zoo, "objects", OBJECTS, "--limit", "2", "--image_prompt", "full", images=True)
    samples = read_jsonl(zoo["out"] / "objects" / "object_commonsense_samples.jsonl")
    on_disk = json.loads((zoo["out"] / "objects" / "object_commonsense.json").read_text())
    assert on_disk["metrics"] == result["metrics"] and set(result["metrics"]) == set(object_commonsense.TEMPLATES)
    assert result["counts"]["examples"] == len(samples) == 2 * (9 + 9 + 9 + 6)
    assert result["counts"]["fusion_passes"] > 0
    rec = next(r for r in samples if r["id"] == "memory_color-1/t0")
    assert rec["prompt"] == "Q: What is the color of a sunflower? A: It is [MASK]."
    for r in samples:
        assert r["prompt"].endswith(" [MASK].") and len(r["images"]) == K
        template = object_commonsense.TEMPLATES[r["set"]][r["template"]]
        # --image_prompt full: the images come from the templated prompt without the mask
        assert {im["prompt"] for im in r["images"]} == {r["prompt"][:-len(" [MASK].")]}
        assert r["prompt"][:-len(" [MASK].")].startswith(template.split("{")[0])
        assert r["prediction"] == r["candidates"][max(range(len(r["scores"])), key=lambda i: (r["scores"][i], -i))]


def test_imagenetvc_runs_with_images_and_the_images_move_the_scores(zoo):
    result = run(imagenetVC, zoo, "vc", VC, "--limit", "2", images=True)
    samples = read_jsonl(zoo["out"] / "vc" / "imagenetvc_samples.jsonl")
    assert (zoo["out"] / "vc" / "imagenetvc.json").is_file()
    assert set(result["metrics"]) == {"color", "shape", "material", "component", "others", "overall"}
    assert len(samples) == result["counts"]["examples"] == 5 * 2 * 5
    assert result["counts"]["images_generated"] == K * 5 * 2  # one set per question, shared by the 5 templates
    for r in samples:
        assert r["prompt"].endswith(" [MASK].") and "[MASK]" not in r["images"][0]["prompt"]
    text = run(imagenetVC, zoo, "vc_text", VC, "--limit", "2")
    assert text["counts"]["fusion_passes"] == 0
    text_scores = {r["id"]: r["scores"] for r in read_jsonl(zoo["out"] / "vc_text" / "imagenetvc_samples.jsonl")}
    assert any(text_scores[r["id"]] != pytest.approx(r["scores"], abs=1e-3) for r in samples)


@pytest.mark.parametrize("lm", ["bert", "roberta"])
def test_text_only_predictions_are_fill_mask(lm, zoo):
    """Text-only scores are log-probabilities of transformers' own fill-mask pipeline (which scores a
    multi-piece target by its first piece, as --scoring first_token does); the predictions are its best
    candidates."""
    run(object_commonsense, zoo, f"fill_{lm}", OBJECTS, "--limit", "1", "--sets", "memory_color,shape,relative_size",
        lm=lm)
    run(imagenetVC, zoo, f"fill_vc_{lm}", VC, "--limit", "1", lm=lm)
    samples = read_jsonl(zoo["out"] / f"fill_{lm}" / "object_commonsense_samples.jsonl") + \
        read_jsonl(zoo["out"] / f"fill_vc_{lm}" / "imagenetvc_samples.jsonl")
    fill = pipeline("fill-mask", model=zoo[lm], device="cpu")
    tok = fill.tokenizer
    assert all(r["prompt"].endswith(f" {tok.mask_token}.") and r["images"] == [] for r in samples)
    for rec in samples[::5]:
        # RoBERTa's BPE: the word after the mask's space is " word"; the pipeline takes targets as given
        targets = [(" " if lm == "roberta" else "") + c for c in rec["candidates"]]
        out = {o["token"]: o["score"] for o in fill(rec["prompt"], targets=targets, top_k=len(targets))}
        first = [tok(t, add_special_tokens=False)["input_ids"][0] for t in targets]
        if lm == "roberta":  # the released capitalised variant: the better of " word" and " Word"
            caps = [tok(" " + c[:1].upper() + c[1:], add_special_tokens=False)["input_ids"][0]
                    for c in rec["candidates"]]
            out.update({o["token"]: o["score"] for o in fill(rec["prompt"], targets=[tok.decode([c]) for c in caps],
                                                              top_k=len(caps))})
            first = [max((f, c), key=lambda t: out[t]) for f, c in zip(first, caps)]
        reference = [math.log(out[t]) for t in first]
        assert rec["scores"] == pytest.approx(reference, abs=1e-4), rec["id"]
        best = max(range(len(reference)), key=lambda i: (reference[i], -i))
        assert rec["prediction"] == rec["candidates"][best]


def pseudo_log_likelihood(lm, tok, prompt, candidate):
    """Written out: fill the mask with the candidate's pieces, mask each piece in turn, sum their log-probs."""
    ids = tok(prompt)["input_ids"]
    at = ids.index(tok.mask_token_id)
    pieces = tok(" " + candidate, add_special_tokens=False)["input_ids"]
    total = 0.0
    for j, piece in enumerate(pieces):
        copy = ids[:at] + pieces + ids[at + 1:]
        copy[at + j] = tok.mask_token_id
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([copy])).logits[0, at + j]
        total += float(torch.log_softmax(logits, -1)[piece])
    return total, len(pieces)


@pytest.mark.parametrize("lm, script, data, flags, multi", [
    ("bert", imagenetVC, VC, ["--subsets", "material"], "clay"),
    ("roberta", object_commonsense, OBJECTS, ["--sets", "shape"], "polygon")])
def test_full_scoring_is_the_pseudo_log_likelihood(lm, script, data, flags, multi, zoo):
    run(script, zoo, f"full_{lm}", data, "--limit", "1", "--scoring", "full", *flags, lm=lm)
    task = "imagenetvc" if script is imagenetVC else "object_commonsense"
    samples = read_jsonl(zoo["out"] / f"full_{lm}" / f"{task}_samples.jsonl")
    model = AutoModelForMaskedLM.from_pretrained(zoo[lm]).eval()
    tok = AutoTokenizer.from_pretrained(zoo[lm])
    rec = samples[0]
    assert multi in rec["candidates"]
    reference = [pseudo_log_likelihood(model, tok, rec["prompt"], c) for c in rec["candidates"]]
    assert rec["scores"] == pytest.approx([s for s, _ in reference], abs=1e-4)
    assert reference[rec["candidates"].index(multi)][1] > 1  # a multi-piece candidate was scored


@pytest.mark.parametrize("script, data, extra", [
    (commonsenseQA, TEST_DATA / "piqa", ["--testset", "piqa"]), (boolq, TEST_DATA / "boolq", []),
    (squad, TEST_DATA / "squad_v2", []), (quac, TEST_DATA / "quac", [])])
def test_causal_only_scripts_refuse_a_masked_lm_in_one_line(script, data, extra, zoo, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        run_main(script.main, ["--model_name", zoo["bert"], "--data_dir", str(data), "--output_dir", str(out),
                               "--run_name", "r", "--device", "cpu", "--limit", "1", *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    name = Path(script.__file__).name
    assert err == [f"error: {name} needs a causal LM (it scores next tokens or generates), but {zoo['bert']!r} "
                   "is a masked LM; masked LMs run object_commonsense.py and imagenetVC.py"]
    assert not out.exists()
