"""The Python API (models/pipeline.py): the README example runs verbatim, ``score`` gives the numbers
imagenetVC.py records for the same item, ``generate`` the answers squad.py records, and bad input is one
ValueError naming it."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.paths import EVAL_DATA, TEST_DATA
from tests.zoo import boosted_checkpoint

REPO = Path(__file__).resolve().parents[1]
K = 2

pytestmark = pytest.mark.usefixtures("one_thread")


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def zoo(one_thread, tmp_path_factory, lm_dirs, tiny_clip_spec):
    """A tiny Llama checkpoint whose images matter, the folder it lives in, and an image cache."""
    root = tmp_path_factory.mktemp("pipeline")
    _, ckpt = boosted_checkpoint(root, lm_dirs["llama"], tiny_clip_spec, seed=0)
    return {"root": root, "ckpt": str(ckpt), "lm": lm_dirs["llama"], "clip": tiny_clip_spec,
            "cache": str(root / "cache")}


@pytest.fixture(scope="module")
def pipe(zoo):
    from models import LateFusionPipeline

    return LateFusionPipeline.from_pretrained(zoo["ckpt"], image_generator="toyworld", image_cache=zoo["cache"],
                                              image_size=64, device="cpu", k=K)


def test_the_readme_example_runs_verbatim(zoo, tmp_path, monkeypatch, capsys):
    """The README's Python block, with its checkpoint path holding a tiny checkpoint and the offline generator."""
    blocks = python_blocks((REPO / "README.md").read_text())
    assert len(blocks) == 1, "the README has one Python example"
    example = blocks[0]
    assert '"output/gpt2/ft_wiki_laion_220_2"' in example and '"stabilityai/sdxl-turbo"' in example
    shutil.copytree(zoo["ckpt"], tmp_path / "output" / "gpt2" / "ft_wiki_laion_220_2")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example.replace('"stabilityai/sdxl-turbo"', '"toyworld"'), "README.md", "exec"), namespace)
    out, pipe = namespace["out"], namespace["pipe"]
    assert out.prediction in ("yellow", "blue", "red") and len(out.scores) == len(out.text_only_scores) == 3
    assert len(out.images) == 6 and all(im["image"].size == (512, 512) for im in out.images)
    assert all(Path(im["path"]).is_file() for im in out.images)  # generated into output/image_cache
    assert out.scores != out.text_only_scores  # the images move the scores
    assert Path(pipe.settings.image_cache) == Path("output/image_cache")
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 + 6 + 2


def test_score_equals_what_imagenetvc_records(zoo, pipe, tmp_path):
    from eval_scripts import imagenetVC

    out = tmp_path / "out"
    imagenetVC.main(["--model_name", zoo["lm"], "--pretrained_model", zoo["ckpt"], "--run_name", "vc",
                     "--generate_images", "True", "--k", str(K), "--vision_encoder", zoo["clip"],
                     "--image_generator", "toyworld", "--image_size", "64", "--image_cache", zoo["cache"],
                     "--data_dir", str(EVAL_DATA / "imagenetvc"), "--subsets", "color,others", "--limit", "1",
                     "--output_dir", str(out), "--device", "cpu"])
    records = read_jsonl(out / "vc" / "imagenetvc_samples.jsonl")
    assert len(records) == 10
    for rec in records[:: 3]:
        got = pipe.score(rec["prompt"], rec["candidates"], image_prompts=[im["prompt"] for im in rec["images"]])
        assert got.scores == pytest.approx(rec["scores"], abs=1e-5)
        assert got.text_only_scores == pytest.approx(rec["text_only_scores"], abs=1e-5)
        assert got.prediction == rec["prediction"] and got.text_only_prediction == rec["text_only_prediction"]
        assert [im["weight"] for im in got.images] == pytest.approx([im["weight"] for im in rec["images"]], abs=1e-5)
        root = Path(json.loads((out / "vc" / "imagenetvc.json").read_text())["image_root"]["absolute"])
        assert [im["path"] for im in got.images] == [str(root / im["path"]) for im in rec["images"]]
    # a batch gives what single calls give
    pair = records[:2]
    batch = pipe.score([r["prompt"] for r in pair], [r["candidates"] for r in pair],
                       image_prompts=[[im["prompt"] for im in r["images"]] for r in pair])
    assert [b.scores for b in batch] == [pytest.approx(r["scores"], abs=1e-5) for r in pair]


def test_generate_equals_what_squad_records(zoo, pipe, tmp_path):
    from eval_scripts import squad

    out = tmp_path / "out"
    squad.main(["--model_name", zoo["lm"], "--pretrained_model", zoo["ckpt"], "--run_name", "sq",
                "--generate_images", "True", "--k", str(K), "--vision_encoder", zoo["clip"],
                "--image_generator", "toyworld", "--image_size", "64", "--image_cache", zoo["cache"],
                "--data_file", str(TEST_DATA / "squad_v2" / "dev-v2.0.json"), "--limit", "2", "--batch_size", "1",
                "--max_new_tokens", "6", "--output_dir", str(out), "--device", "cpu"])
    records = read_jsonl(out / "sq" / "squad_samples.jsonl")
    assert len(records) == 2
    for rec in records:  # the image prompts are derived from the prompt as squad.py derives them
        assert pipe.generate(rec["prompt"], max_new_tokens=6) == rec["prediction"]
    assert pipe.generate([r["prompt"] for r in records][:1], max_new_tokens=6) == [records[0]["prediction"]]


def test_own_images_are_fused_with_their_weights(pipe, tmp_path):
    from PIL import Image

    prompt, cands = "What color is a banana? Answer:", ["yellow", "blue"]
    yellow, blue = Image.new("RGB", (64, 64), "yellow"), Image.new("RGB", (64, 64), "blue")
    path = tmp_path / "blue.png"
    blue.save(path)
    given = pipe.score(prompt, cands, images=[yellow, str(path)])
    assert len(given.images) == 2 and given.images[1]["path"] == str(path) and given.images[0]["path"] is None
    assert given.images[0]["image"].tobytes() == yellow.tobytes()
    again = pipe.score(prompt, cands, images=[yellow, blue])
    assert again.scores == pytest.approx(given.scores, abs=1e-6)  # a file and the same image in memory agree
    # direct reference: the model's own mixed log-probabilities with these images' features
    import torch

    from models.fusion.mixing import clip_weights

    rt = pipe.runtime
    patches, embeds = rt.vision.encode_images(rt.vision.pixels([yellow, blue]))
    text = rt.vision.encode_texts(pipe._image_prompts(prompt, 2, None))
    w = clip_weights((embeds * text).sum(-1), 2.0)
    assert [im["weight"] for im in given.images] == pytest.approx(w.tolist(), abs=1e-5)
    ids = torch.tensor([rt.encode(prompt)])
    with torch.no_grad():
        logp = pipe.model.mixed_logprobs(ids, torch.ones_like(ids), patches.unsqueeze(0), w.unsqueeze(0), "logits",
                                         positions=torch.tensor([[ids.shape[1] - 1]]))[0, 0]
    from models.scoring.scorer import first_token_ids

    expected = [max(float(logp[t]) for t in first_token_ids(pipe.tokenizer, c)) for c in cands]
    assert given.scores == pytest.approx(expected, abs=1e-5)
    text_only = pipe.score(prompt, cands, k=0)
    assert text_only.images == [] and text_only.scores == text_only.text_only_scores
    assert text_only.scores == pytest.approx(given.text_only_scores, abs=1e-5)


@pytest.mark.parametrize("call,message", [
    (lambda p: p.score("Q?", ["a"], k=0, images=[]), "k must be >= 1 when images are requested"),
    (lambda p: p.score("Q?", ["a"], k=-1), "k must be an integer >= 0"),
    (lambda p: p.score("Q?", []), "candidates must be a non-empty list"),
    (lambda p: p.score("Q?", "yellow"), "candidates must be a non-empty list"),
    (lambda p: p.score("Q?", ["a", 3]), "every candidate must be a non-empty string, got 3"),
    (lambda p: p.score("Q?", ["a", ""]), "every candidate must be a non-empty string"),
    (lambda p: p.score("Q?", ["a"], images=[42]), "images must be PIL images or paths to image files, got int"),
    (lambda p: p.score("Q?", ["a"], images=["/no/such.png"]), "no image file '/no/such.png'"),
    (lambda p: p.score("Q?", ["a"], images="x.png"), "images must be a list of PIL images or paths"),
    (lambda p: p.score("Q?", ["a"], k=3, images=[__import__("PIL.Image").Image.new("RGB", (8, 8))]),
     "k=3 but 1 image"),
    (lambda p: p.score("Q?", ["a"], image_prompts=["x"]), "image_prompts must be a string or a list of 2"),
    (lambda p: p.score("Q?", ["a"], scoring="best"), "scoring must be one of first_token, full"),
    (lambda p: p.score(["Q?", "R?"], [["a"]]), "candidates must be a list of 2"),
    (lambda p: p.score("", ["a"]), "prompt must be a non-empty string"),
    (lambda p: p.generate("Q?", max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (lambda p: p.score("Q?", ["a"], temperature=2), "score: unknown keyword 'temperature'; allowed: k, images"),
    (lambda p: p.generate("Q?", top_p=0.9), "generate: unknown keyword 'top_p'"),
])
def test_bad_input_is_a_value_error_naming_it(pipe, call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call(pipe)


def test_from_pretrained_refuses_unknown_keywords_and_bad_values(zoo):
    from models import LateFusionPipeline

    with pytest.raises(ValueError, match="unknown keyword 'temperature'"):
        LateFusionPipeline.from_pretrained(zoo["ckpt"], temperature=2.0)
    with pytest.raises(ValueError, match="mix: must be one of logits, probs, got 'max'"):
        LateFusionPipeline.from_pretrained(zoo["ckpt"], mix="max")
    with pytest.raises(ValueError, match="no such local path, and no hub repo 'nobody/nothing-here'"):
        LateFusionPipeline.from_pretrained("nobody/nothing-here")
    with pytest.raises(ValueError, match="not found"):
        LateFusionPipeline.from_pretrained(str(zoo["root"] / "no" / "such" / "dir"))


def test_a_released_bin_loads_without_its_suffix(zoo, pipe, tmp_path):
    """A released checkpoint (the whole model's state dict, DDP prefix) scores as our folder of the same weights."""
    import torch

    from models import LateFusionPipeline
    from models.checkpoints.weights import load_state

    state, _ = load_state(zoo["ckpt"])
    (tmp_path / "released").mkdir()
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "released" / "ft_wiki_laion_220_2.bin")
    released = LateFusionPipeline.from_pretrained(str(tmp_path / "released" / "ft_wiki_laion_220_2"),
                                                  model_name=zoo["lm"], vision_encoder=zoo["clip"],
                                                  image_generator="toyworld", image_cache=zoo["cache"], image_size=64,
                                                  device="cpu", k=K)
    prompt, cands = "What color is a banana? Answer:", ["yellow", "blue"]
    assert released.score(prompt, cands).scores == pytest.approx(pipe.score(prompt, cands).scores, abs=1e-6)
    with pytest.raises(ValueError, match="names no base LM; give model_name="):
        LateFusionPipeline.from_pretrained(str(tmp_path / "released" / "ft_wiki_laion_220_2"))
