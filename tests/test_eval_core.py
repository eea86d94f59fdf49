"""The shared evaluation core (eval_scripts/core.py), driven through the ImageNetVC script on the tiny zoo."""
import argparse
import json
from pathlib import Path

import pytest
import torch

from eval_scripts import core
from eval_scripts.core import EvalError, Evaluator, run_main
from eval_scripts.imagenetVC import OPTIONS, main, parse_args
from eval_scripts.runtime import clear_memos
from models.options.catalog import GENERATE_IMAGES as SWITCH
from tests.zoo import boosted_checkpoint
from tests.paths import EVAL_DATA

VC = EVAL_DATA / "imagenetvc"
QUESTIONS = 2  # color questions per run: 10 items with the 5 templates


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def zoo(one_thread, tmp_path_factory, lm_dirs, tiny_clip_spec, tiny_sdxl_dir):
    root = tmp_path_factory.mktemp("core")
    model, ckpt = boosted_checkpoint(root, lm_dirs["llama"], tiny_clip_spec, seed=1)
    return {"lm": lm_dirs["llama"], "clip": tiny_clip_spec, "sdxl": str(tiny_sdxl_dir), "ckpt": str(ckpt),
            "cache": str(root / "cache"), "out": root / "out"}


def args_for(zoo, run_name, *extra, images=True, k=2, batch_size=8):
    args = ["--model_name", zoo["lm"], "--pretrained_model", zoo["ckpt"], "--subsets", "color",
            "--data_dir", str(VC), "--limit", str(QUESTIONS), "--batch_size", str(batch_size),
            "--output_dir", str(zoo["out"]), "--run_name", run_name, "--device", "cpu", *extra]
    if images:
        args += ["--generate_images", "--k", str(k), "--vision_encoder", zoo["clip"],
                 "--image_generator", zoo["sdxl"], "--image_size", "64", "--image_cache", zoo["cache"]]
    return args


def samples(zoo, run_name):
    return read_jsonl(zoo["out"] / run_name / "imagenetvc_samples.jsonl")


# ---------------------------------------------------------------------------------------------- flags
def test_switch_words():
    for word in ("True", "true", "1", "yes", "Y", "on"):
        assert SWITCH.convert(word) is True
    for word in ("False", "false", "0", "no", "N", "off"):
        assert SWITCH.convert(word) is False
    with pytest.raises(ValueError, match="true or false"):
        SWITCH.convert("maybe")


def test_generate_images_is_a_switch_and_takes_the_released_true_false():
    p = parse_args
    assert p([]).generate_images is False  # resolved at parse time: off unless --image_source retrieve
    assert p(["--generate_images"]).generate_images is True
    assert p(["--generate_images", "True"]).generate_images is True
    assert p(["--generate_images", "False"]).generate_images is False  # a plain bool() would say True
    assert p(["--generate_images", "--k", "3"]).generate_images is True
    with pytest.raises(ValueError, match="generate_images"):
        p(["--generate_images", "maybe"])
    released = p(["--model_name_or_path", "m", "--no_clip_rescaling"])
    assert released.model_name == "m" and released.uniform_weights is True
    assert p([]).k == 10  # the released scripts' default


def test_k_below_one_with_images_is_an_error(zoo, capsys):
    with pytest.raises(EvalError, match="--k"):
        Evaluator(parse_args(args_for(zoo, "k0", k=0)), "imagenetvc", OPTIONS)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(main, args_for(zoo, "k0", k=0))
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --k must be >= 1")


# ---------------------------------------------------------------------------------------------- CLIP weights
def test_uniform_weights_are_one_half(zoo):
    main(args_for(zoo, "uniform", "--uniform_weights"))
    weights = [im["weight"] for rec in samples(zoo, "uniform") for im in rec["images"]]
    assert len(weights) == 5 * QUESTIONS * 2 and set(weights) == {0.5}


def test_clip_weights_are_tau_times_positive_cosine(zoo):
    """The recorded weight of each image is tau * max(0, cos(CLIP image, CLIP prompt)), computed here with
    open_clip directly."""
    import open_clip
    from PIL import Image

    main(args_for(zoo, "tau2"))
    main(args_for(zoo, "tau1", "--clip_temperature", "1"))
    model, _, preprocess = open_clip.create_model_and_transforms(zoo["clip"])
    tokenizer = open_clip.get_tokenizer(zoo["clip"])
    model.eval()
    assert any(im["weight"] > 0 for rec in samples(zoo, "tau2") for im in rec["images"])
    for rec2, rec1 in zip(samples(zoo, "tau2"), samples(zoo, "tau1")):
        assert [im["path"] for im in rec2["images"]] == [im["path"] for im in rec1["images"]]
        for im2, im1 in zip(rec2["images"], rec1["images"]):
            with torch.no_grad():
                img = model.encode_image(preprocess(Image.open(Path(zoo["cache"]) / im2["path"]).convert("RGB"))[None])
                txt = model.encode_text(tokenizer([im2["prompt"]]))
            cos = float(torch.nn.functional.cosine_similarity(img, txt)[0])
            assert im2["weight"] == pytest.approx(2 * max(0.0, cos), abs=1e-4)
            assert im1["weight"] == pytest.approx(max(0.0, cos), abs=1e-4)


def test_zero_temperature_gives_exactly_the_text_only_scores(zoo):
    main(args_for(zoo, "tau0", "--clip_temperature", "0"))
    main(args_for(zoo, "text", images=False))
    main(args_for(zoo, "tau2_for_text"))
    with_images, text_only = samples(zoo, "tau0"), samples(zoo, "text")
    assert all(im["weight"] == 0.0 for rec in with_images for im in rec["images"])
    assert [r["scores"] for r in with_images] == [r["scores"] for r in text_only]
    # while a positive temperature moves them
    moved = samples(zoo, "tau2_for_text")
    assert any(a["scores"] != pytest.approx(b["scores"], abs=1e-4) for a, b in zip(moved, text_only))


# ---------------------------------------------------------------------------------------------- passes
@pytest.mark.parametrize("k", [1, 3])
def test_lm_passes_per_batch_whatever_k(zoo, k):
    clear_memos()  # the LM's hidden states are memoised across runs in one process
    # without the prefix cache, which adds a fusion pass over the new images' prefixes (tests/test_prefix_cache.py)
    result = main(args_for(zoo, f"passes_k{k}", "--prefix_cache", "False", k=k, batch_size=4))
    n_items = 5 * QUESTIONS
    batches = -(-n_items // 4)
    assert result["counts"]["examples"] == n_items
    assert result["counts"]["lm_passes"] == batches
    assert result["counts"]["fusion_passes"] == batches  # the k images of a batch go through fusion together
    assert all(len(rec["images"]) == k for rec in samples(zoo, f"passes_k{k}"))


def test_text_only_never_runs_the_fusion_layer(zoo):
    clear_memos()
    result = main(args_for(zoo, "passes_text", images=False, batch_size=4))
    assert result["counts"]["lm_passes"] == 3 and result["counts"]["fusion_passes"] == 0
    assert result["counts"]["images_generated"] == 0 and result["counts"]["pipeline_loads"] == 0


def test_missing_model_is_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        run_main(main, ["--model_name", str(tmp_path / "no-such-model"), "--data_dir", str(VC), "--limit", "1",
                        "--output_dir", str(tmp_path / "out"), "--device", "cpu"])
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot load the tokenizer")
    assert not (tmp_path / "out").exists()  # nothing half-written
