"""Tests for train.py, called the way users call it: ``main([...])`` on tiny models, on the CPU."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train
from models.checkpoints.weights import load_trainable, read_checkpoint_config
from models.fusion.factory import load_late_fusion_model
from models.tiny_models import TINY
from models.training.run_config import TRACKER_PROJECT
from models.training.run_folder import list_checkpoints
from tests.paths import EVAL_DATA, TEST_DATA
from tests.zoo import reset_accelerate

REPO = Path(__file__).resolve().parents[1]
VG_SAMPLE = TEST_DATA / "visual_genome" / "v1.2"
WIKI_SAMPLE = TEST_DATA / "wikitext2" / "valid.txt"
README_COMMAND = ("--run_name test --dataset_name cropped_vg --model_name_or_path meta-llama/Meta-Llama-3-8B "
                  "--output_dir output/llama3 --report_to wandb --per_device_train_batch_size 64 "
                  "--num_train_epochs 1 --run_bf16 --learning_rate 5e-4 --with_tracking").split()


pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")


def make_vg_dir(root: Path, regions=None) -> Path:
    """The sample's VG json files plus stand-in JPEGs of the listed sizes, at their url's folder."""
    root.mkdir(parents=True)
    shutil.copyfile(VG_SAMPLE / "image_data.json", root / "image_data.json")
    if regions is None:
        shutil.copyfile(VG_SAMPLE / "region_descriptions.json", root / "region_descriptions.json")
    else:
        (root / "region_descriptions.json").write_text(json.dumps(regions))
    for entry in json.loads((root / "image_data.json").read_text()):
        folder, name = entry["url"].split("/")[-2:]
        (root / folder).mkdir(exist_ok=True)
        y, x = np.mgrid[0:entry["height"], 0:entry["width"]]
        pixels = np.stack([x % 256, y % 256, np.full_like(x, entry["image_id"] * 40)], -1).astype(np.uint8)
        Image.fromarray(pixels).save(root / folder / name)
    return root


@pytest.fixture(scope="module")
def vg_dir(tmp_path_factory):
    return make_vg_dir(tmp_path_factory.mktemp("vg") / "vg")


@pytest.fixture(scope="module")
def fit_lm(tmp_path_factory, tokenizer_dir):
    """A tiny Llama whose frozen head has a realistic logit scale (initializer_range 0.2, d=64).

    The zoo's d=32 models with 0.02-scale embeddings cannot reach logits large enough to fit any
    text through their frozen head in a few steps, whatever the fusion layer does.
    """
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, **TINY)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fit-llama")
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tf.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return str(path)


def flags(out, lm, clip, vg=None, **extra) -> list[str]:
    """train.py flags for a quick CPU run on Visual Genome; ``extra`` adds or overrides flags."""
    base = {"output_dir": out, "model_name_or_path": lm, "vision_encoder": clip, "device": "cpu",
            "lm_dtype": "fp32", "num_workers": 0, "seed": 0}
    if vg is not None:
        base.update(dataset_name="cropped_vg", vg_dir=vg)
    base.update(extra)
    argv = []
    for name, value in base.items():
        if value is True:
            argv.append(f"--{name}")
        elif value is not None:
            argv += [f"--{name}", str(value)]
    return argv


def trainable(model) -> dict:
    return {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# ----------------------------------------------------------------------------- flags

def test_released_readme_command_parses():
    args = train.parse_args(README_COMMAND)
    assert args.mixed_precision == "bf16"  # --run_bf16
    assert (args.dataset_name, args.per_device_train_batch_size, args.learning_rate) == ("cropped_vg", 64, 5e-4)
    assert args.with_tracking and args.report_to == "wandb" and args.num_train_epochs == 1
    assert args.weight_decay == 0.0 and args.lr_scheduler_type == "linear"


def test_flag_types():
    args = train.parse_args(README_COMMAND + ["--max_train_samples", "7", "--checkpointing_steps", "epoch",
                                             "--max_seq_length", "64"])
    assert args.max_train_samples == 7 and args.checkpointing_steps == "epoch" and args.max_length == 64
    assert train.parse_args(README_COMMAND + ["--checkpointing_steps", "25"]).checkpointing_steps == 25
    for bad in (["--max_train_samples", "ten"], ["--checkpointing_steps", "often"],
                ["--mixed_precision", "fp16"]):  # the last one conflicts with --run_bf16
        with pytest.raises(SystemExit) as exc:
            train.parse_args(README_COMMAND + bad)
        assert exc.value.code == 2


# ----------------------------------------------------------------------------- training

def test_overfits_a_repeated_batch_and_saves_loadable_weights(tmp_path, fit_lm, tiny_clip_spec, vg_dir):
    out = tmp_path / "out"
    result = train.main(flags(out, fit_lm, tiny_clip_spec, vg_dir, max_train_samples=8,
                              per_device_train_batch_size=8, max_train_steps=30, learning_rate=1e-2,
                              lr_scheduler_type="constant", run_name="fit"))
    losses = result["losses"]
    assert len(losses) == 30 and result["completed_steps"] == 30
    assert losses[-1] <= 0.5 * losses[0], losses
    # one batch per epoch: 30 epochs, each saved as <run_name>_<epoch>
    assert result["saved"][-1] == out / "fit_29" and len(result["saved"]) == 30
    config = read_checkpoint_config(out / "fit_29")
    assert config["base_model"] == fit_lm and config["vision_encoder"] == tiny_clip_spec
    assert config["run_args"]["completed_steps"] == 30 and config["run_args"]["dataset_name"] == "cropped_vg"

    model = result["model"]
    assert not model.lm.training and model.fusion_layer.training  # the frozen LM never drops out
    assert {p.dtype for p in model.trainable_parameters()} == {torch.float32}
    fresh = load_late_fusion_model(fit_lm, vision_dim=48)
    assert_same_weights(fresh.lm.state_dict(), model.lm.state_dict())  # only the trainable part moved
    assert not torch.equal(fresh.mm_proj.linear1.weight, model.mm_proj.linear1.weight)
    load_trainable(fresh, out / "fit_29")
    assert_same_weights(trainable(fresh), trainable(result["model"]))

    # an eval script takes the folder as --pretrained_model (vision encoder from its config.json)
    from eval_scripts import imagenetVC

    reset_accelerate()
    evaluated = imagenetVC.main(["--model_name", fit_lm, "--pretrained_model", str(out / "fit_29"),
                                 "--generate_images", "True", "--k", "1", "--image_generator", "toyworld",
                                 "--image_size", "32", "--image_cache", str(tmp_path / "cache"), "--limit", "1",
                                 "--data_dir", str(EVAL_DATA / "imagenetvc"), "--output_dir", str(tmp_path / "eval"),
                                 "--run_name", "vc", "--device", "cpu"])
    assert (tmp_path / "eval" / "vc" / "imagenetvc.json").is_file() and evaluated["metrics"]


def test_resume_after_interruption_is_exact(tmp_path, lm_dirs, tiny_clip_spec, vg_dir):
    """GPT-2 (dropout on), shuffled data, accumulation 2 over 5 batches per epoch (steps after batches 2, 4, 5):
    a crash at step 12 loses only the steps after checkpoint-10 (mid-epoch), and the resumed run ends
    with the weights of an uninterrupted 20-step run."""
    common = dict(max_train_samples=10, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                  max_train_steps=20, learning_rate=3e-3, num_warmup_steps=3, shuffle_data=True,
                  checkpointing_steps=5, checkpoints_total_limit=2)
    full = train.main(flags(tmp_path / "full", lm_dirs["gpt2"], tiny_clip_spec, vg_dir, **common))
    full_weights = trainable(full["model"])
    assert full["completed_steps"] == 20 and full["num_epochs"] == 7

    class Crash(Exception):
        pass

    def crash_at_12(step):
        if step == 12:
            raise Crash

    out = tmp_path / "resumed"
    with pytest.raises(Crash):
        train.main(flags(out, lm_dirs["gpt2"], tiny_clip_spec, vg_dir, **common), step_callback=crash_at_12)
    assert sorted(p.name for p in list_checkpoints(out)) == ["checkpoint-10", "checkpoint-5"]
    from safetensors import safe_open

    with safe_open(out / "checkpoint-10" / "model.safetensors", "pt") as f:  # no frozen LM in checkpoints
        assert set(f.keys()) == set(full_weights)

    reset_accelerate()
    resumed = train.main(flags(out, lm_dirs["gpt2"], tiny_clip_spec, vg_dir, resume_from_checkpoint="latest",
                               **common))
    assert resumed["completed_steps"] == 20
    assert resumed["losses"] == full["losses"][10:]  # same batches, same dropout masks
    assert_same_weights(trainable(resumed["model"]), full_weights)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-15", "checkpoint-20"]


def test_lr_schedule_length_under_accumulation(tmp_path, lm_dirs, tiny_clip_spec, vg_dir):
    """5 batches per epoch with accumulation 2 is 3 optimizer steps per epoch, so 2 epochs are 6 steps; the
    linear schedule with 2 warmup steps then gives lr x [1/2, 1, 3/4, 1/2, 1/4, 0]."""
    result = train.main(flags(tmp_path / "out", lm_dirs["llama"], tiny_clip_spec, vg_dir, max_train_samples=10,
                              per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=2,
                              learning_rate=1e-3, num_warmup_steps=2, checkpointing_steps="epoch"))
    assert result["completed_steps"] == 6
    assert result["lrs"] == pytest.approx([1e-3 * f for f in (0.5, 1, 0.75, 0.5, 0.25, 0)])
    assert [p.name for p in result["saved"]] == ["test_0", "test_1"]
    assert [p.name for p in list_checkpoints(tmp_path / "out")] == ["checkpoint-3", "checkpoint-6"]


def test_workers_give_the_same_run(tmp_path, lm_dirs, tiny_clip_spec, vg_dir):
    """Decoding, cropping and preprocessing in 2 DataLoader workers changes nothing in the result."""
    runs = {}
    for workers in (0, 2):
        reset_accelerate()
        runs[workers] = train.main(flags(tmp_path / f"w{workers}", lm_dirs["qwen2"], tiny_clip_spec, vg_dir,
                                         max_train_samples=12, per_device_train_batch_size=4, max_train_steps=3,
                                         learning_rate=1e-3, shuffle_data=True, num_workers=workers))
    assert runs[0]["losses"] == runs[2]["losses"]
    assert_same_weights(trainable(runs[0]["model"]), trainable(runs[2]["model"]))


def test_tensorboard_tracking_writes_events(tmp_path, lm_dirs, tiny_clip_spec, vg_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    result = train.main(flags(out, lm_dirs["gpt2"], tiny_clip_spec, vg_dir, max_train_samples=4,
                              per_device_train_batch_size=2, max_train_steps=2, learning_rate=1e-3,
                              with_tracking=True, report_to="tensorboard", logging_steps=1,
                              resume_from_checkpoint="latest"))  # no checkpoint yet: a fresh run
    assert result["completed_steps"] == 2 and len(result["losses"]) == 2
    runs = out / TRACKER_PROJECT  # the scalars; hparams go to a subfolder
    assert len(list(runs.glob("events.out.tfevents*"))) == 1
    acc = EventAccumulator(str(runs))
    acc.Reload()
    logged = acc.Scalars("train_loss")
    assert [e.step for e in logged] == [1, 2]
    assert [e.value for e in logged] == pytest.approx(result["losses"], rel=1e-6)
    assert [e.value for e in acc.Scalars("lr")] == pytest.approx(result["lrs"], rel=1e-6)


def test_wandb_offline_tracking(tmp_path, lm_dirs, tiny_clip_spec, vg_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "out"
    train.main(flags(out, lm_dirs["gpt2"], tiny_clip_spec, vg_dir, max_train_samples=2,
                     per_device_train_batch_size=2, max_train_steps=1, with_tracking=True, report_to="wandb"))
    assert len(list((out / "wandb").glob("offline-run-*/run-*.wandb"))) == 1


def test_wiki_images_pregenerated_then_read_from_cache(tmp_path, lm_dirs, tiny_clip_spec):
    wiki = dict(dataset_name="wiki", wiki_file=WIKI_SAMPLE, max_elements=4, wiki_chunk_tokens=24,
                image_generator="toyworld", image_cache=tmp_path / "cache", image_size=32)
    stats = train.main(flags(tmp_path / "pre", lm_dirs["gpt2"], tiny_clip_spec, pregenerate_images=True, **wiki))
    assert stats["pregenerated"]["generated"] == 4
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("*.png"))
    assert len(cached) == 4
    reset_accelerate()
    result = train.main(flags(tmp_path / "out", lm_dirs["gpt2"], tiny_clip_spec, per_device_train_batch_size=2,
                              max_train_steps=2, learning_rate=1e-3, **wiki))
    assert result["completed_steps"] == 2
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*.png")) == cached  # nothing generated again


def torchrun(argv: list[str]) -> None:
    """``torchrun --nproc_per_node 2`` of train.py (through tests/train_ddp_check.py) on the CPU, with gloo."""
    runner = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([str(runner), "--standalone", "--nproc_per_node", "2", "-m", "tests.train_ddp_check",
                           *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.xdist_group("torchrun")  # one torchrun at a time: concurrent launches can meet on one port
def test_two_processes_with_torchrun_agree_and_resume(tmp_path, lm_dirs, tiny_clip_spec, vg_dir):
    common = dict(max_train_samples=8, per_device_train_batch_size=2, max_train_steps=3, learning_rate=1e-3,
                  num_warmup_steps=1, shuffle_data=True, checkpointing_steps=1)
    out = tmp_path / "out"
    torchrun(flags(out, lm_dirs["gpt2"], tiny_clip_spec, vg_dir, **common))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    # 8 samples / (2 per device x 2 processes) = 2 steps per epoch, so step 3 is in epoch 1. The prepared
    # scheduler steps once per process per optimizer step: linear decay after 1 warmup step over 3 steps.
    assert [r["completed_steps"] for r in ranks] == [3, 3]
    assert ranks[0]["lrs"] == ranks[1]["lrs"] == pytest.approx([1e-3, 5e-4, 0.0])
    assert sorted(p.name for p in out.glob("test_*")) == ["test_0", "test_1"]

    # resuming from the mid-epoch checkpoint-1 ends with the same weights on both ranks
    resumed = tmp_path / "resumed"
    torchrun(flags(resumed, lm_dirs["gpt2"], tiny_clip_spec, vg_dir, resume_from_checkpoint=out / "checkpoint-1",
                   **common))
    again = [json.loads((resumed / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["digest"] for r in again] == [ranks[0]["digest"]] * 2
    assert again[0]["lrs"] == pytest.approx([5e-4, 0.0])


# ----------------------------------------------------------------------------- bad input

def _regions_with_box_outside():
    regions = json.loads((VG_SAMPLE / "region_descriptions.json").read_text())
    regions[0]["regions"][0]["x"] = 5000
    return regions


BAD_INPUTS = {
    "missing image root": (dict(dataset_name="cropped_vg", vg_dir="{tmp}/no-such-dir"), "no-such-dir"),
    "box outside its image": (dict(dataset_name="cropped_vg", vg_dir="{bad_box_vg}"), "outside"),
    "empty dataset": (dict(train_file="{tmp}/empty.jsonl"), "no rows"),
    "name matching nothing": (dict(dataset_name="imagenet_captions"), "names no source"),
    "resume path missing": (dict(dataset_name="cropped_vg", vg_dir="{vg}",
                                 resume_from_checkpoint="{tmp}/checkpoint-7"), "checkpoint-7"),
    "laion image root missing": (dict(dataset_name="laion_220", laion_file="{tmp}/empty.jsonl",
                                      laion_image_root="{tmp}/coco"), "coco"),
    "pretrained weights missing": (dict(dataset_name="cropped_vg", vg_dir="{vg}",
                                        pretrained_model="{tmp}/ft_wiki_laion_220_2"), "ft_wiki_laion_220_2"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_error_and_writes_nothing(case, tmp_path, lm_dirs, tiny_clip_spec, vg_dir, capsys):
    extra, expected = BAD_INPUTS[case]
    (tmp_path / "empty.jsonl").write_text("")
    if case == "box outside its image":
        make_vg_dir(tmp_path / "badvg", _regions_with_box_outside())
    where = {"tmp": tmp_path, "vg": vg_dir, "bad_box_vg": tmp_path / "badvg"}
    extra = {k: v.format(**where) for k, v in extra.items()}
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        train.main(flags(out, lm_dirs["gpt2"], tiny_clip_spec, **extra))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not out.exists()
