"""What the harness adapter adds to lm-eval's outputs (eval_scripts/harness_outputs.py): runs named after
the base LM and the checkpoint, as lm-eval's ``hf`` names them after ``pretrained=``, and logged samples
that carry each request's image prompts, image paths (relative to the recorded image root) and weights."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from eval_scripts.cli import EvalError
from eval_scripts.image_paths import SampleImages
from tests.test_harness import TASKS, data_dir, evaluate, fresh_accelerate, fusion_checkpoint, task_manager  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
IMAGES = {"k": 2, "image_generator": "toyworld", "image_size": 32, "uniform_weights": False}


def cli_run(data_dir, out: Path, model_args: dict, tasks="arc_easy", limit=3):
    from eval_scripts import harness

    with contextlib.chdir(data_dir):
        harness.main(["--tasks", tasks, "--include_path", str(TASKS), "--limit", str(limit), "--device", "cpu",
                      "--batch_size", "3", "--output_path", str(out), "--log_samples",
                      "--model_args", ",".join(f"{k}={v}" for k, v in model_args.items())])
    folders = [p for p in out.iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    folder = folders[0]
    (result,) = [json.loads(p.read_text()) for p in folder.glob("results_*.json")]
    samples = [json.loads(line) for p in sorted(folder.glob("samples_*.jsonl")) for line in p.read_text().splitlines()]
    return folder, result, samples


def direct_weight(vision, image_file, prompt, tau=2.0) -> float:
    from PIL import Image

    with torch.no_grad():
        _, embeds = vision.encode_images(vision.pixels([Image.open(image_file).convert("RGB")]))
        cos = float(vision.image_text_similarity(embeds, [prompt])[0])
    return tau * max(0.0, cos)


def test_cli_run_is_named_after_the_model_and_logs_each_requests_images(lm_dirs, tiny_clip_spec, fusion_checkpoint,
                                                                         data_dir, tmp_path):
    from lm_eval.utils import sanitize_model_name

    from eval_scripts.harness import image_prompts
    from models.vision import load_vision_encoder

    model_args = {"pretrained": lm_dirs["llama"], "pretrained_model": fusion_checkpoint,  # pretrained=: hf's spelling
                  "vision_encoder": tiny_clip_spec, "image_cache": str(tmp_path / "cache"), **IMAGES}
    folder, result, samples = cli_run(data_dir, tmp_path / "out", model_args)
    name = f"{lm_dirs['llama']}+{Path(fusion_checkpoint).name}"
    assert result["model_name"] == name and folder.name == sanitize_model_name(name)
    info = result["config"]["late_fusion"]
    assert info["model_name"] == lm_dirs["llama"] and info["k"] == 2
    root = info["image_root"]
    assert root["kind"] == "cache" and root["absolute"] == str((tmp_path / "cache").resolve())
    assert (folder / root["path"]).resolve() == (tmp_path / "cache").resolve()
    files = SampleImages(folder, root)
    vision = load_vision_encoder(tiny_clip_spec)
    assert len(samples) == 3
    for sample in samples:
        per_request = sample["late_fusion_images"]
        assert len(per_request) == len(sample["arguments"]) >= 2  # one entry per answer choice
        context = sample["arguments"]["gen_args_0"]["arg_0"]
        want = image_prompts(context, 2, "question")
        for entry in per_request:
            assert entry["image_prompts"] == want and len(want) == 2
            assert [im["prompt"] for im in entry["images"]] == want
            for im in entry["images"]:
                assert not Path(im["path"]).is_absolute() and files.resolve(im["path"]) is not None
                assert im["weight"] == pytest.approx(direct_weight(vision, files.resolve(im["path"]), im["prompt"]),
                                                     abs=1e-4)
        assert per_request[0] == per_request[-1]  # the choices of one question share its images


def test_text_only_runs_are_named_after_the_base_lm_like_hf(lm_dirs, data_dir, task_manager, tmp_path):
    from lm_eval.loggers import EvaluationTracker

    from eval_scripts.harness import LateFusionHarnessLM
    from eval_scripts.harness_outputs import recorded_outputs

    lm = LateFusionHarnessLM(pretrained=lm_dirs["gpt2"], device="cpu", batch_size=2)
    assert lm.args.model_name == lm_dirs["gpt2"] and lm.config._name_or_path == lm_dirs["gpt2"]
    tracker = EvaluationTracker(output_path=str(tmp_path / "out"))
    with recorded_outputs():
        results = evaluate(data_dir, task_manager, lm, tasks=("arc_easy",), limit=2, evaluation_tracker=tracker)
    assert results["config"]["model"] == lm_dirs["gpt2"]  # lm-eval reads config._name_or_path of a model object
    assert tracker.general_config_tracker.model_name == lm_dirs["gpt2"]
    assert all("late_fusion_images" not in s for s in results["samples"]["arc_easy"])  # no images, nothing added


def test_pretrained_and_model_name_must_agree(lm_dirs):
    from eval_scripts.harness import LateFusionHarnessLM

    with pytest.raises(EvalError, match="name two base LMs"):
        LateFusionHarnessLM(pretrained=lm_dirs["gpt2"], model_name=lm_dirs["llama"], device="cpu")
    assert LateFusionHarnessLM(pretrained="x", model_name="x", device="cpu").args.model_name == "x"


def test_names_of_checkpoints():
    from eval_scripts.harness_outputs import checkpoint_label, harness_model_name

    assert harness_model_name("gpt2", "output/gpt2/ft_wiki_laion_220_2", True) == "gpt2+ft_wiki_laion_220_2"
    assert harness_model_name("gpt2", "ORG/NAME", True) == "gpt2+ORG/NAME"
    assert harness_model_name("gpt2", "released/ft_wiki_laion_220_2.bin", True) == "gpt2+ft_wiki_laion_220_2"
    assert harness_model_name("gpt2", None, True) == "gpt2+untrained-fusion"
    assert harness_model_name("gpt2", "ORG/NAME", False) == "gpt2" and checkpoint_label(None) is None


def test_retrieval_through_model_args_on_the_command_line(lm_dirs, tiny_clip_spec, fusion_checkpoint, data_dir,
                                                          tmp_path):
    """image_source=retrieve and image_index= in --model_args: logged paths are relative to the indexed
    collection, with each image's index row and similarity."""
    from models.images import index as image_index
    from models.images.index import ImageIndex
    from tests.test_image_index import draw_stand_ins

    photos = draw_stand_ins(tmp_path / "photos", [f"photo{i:02d}.png" for i in range(8)])
    image_index.main(["build", "--images", str(photos), "--out", str(tmp_path / "index"), "--vision_encoder",
                      tiny_clip_spec, "--num_workers", "0", "--device", "cpu"])
    model_args = {"model_name": lm_dirs["llama"], "pretrained_model": fusion_checkpoint, "k": 2,
                  "vision_encoder": tiny_clip_spec, "image_source": "retrieve", "image_index": str(tmp_path / "index"),
                  "dedup_threshold": 1.0, "uniform_weights": False}
    folder, result, samples = cli_run(data_dir, tmp_path / "out", model_args, limit=2)
    info = result["config"]["late_fusion"]
    assert (info["image_source"], info["images_generated"], info["image_root"]["kind"]) == ("retrieve", 0, "index")
    index = ImageIndex(tmp_path / "index")
    files = SampleImages(folder, info["image_root"])
    for sample in samples:
        for entry in sample["late_fusion_images"]:
            assert len(entry["images"]) == 2
            for im in entry["images"]:
                assert im["path"] == index.paths[im["row"]]  # relative to the indexed collection
                assert files.resolve(im["path"]).resolve() == (index.root / im["path"]).resolve()
                assert isinstance(im["similarity"], float)
