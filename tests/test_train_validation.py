"""Validation during training (``models/training/validation.py``): ``--validation_file`` or
``--validation_split_percentage``, measured every ``--eval_steps`` and at the end, logged to the trackers,
recorded in the saved weights' config.json, and equal to a direct computation with the model's forward."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train
from models.training.run_config import TRACKER_PROJECT
from tests.test_hostile_train import one_error_line, vg_dir  # noqa: F401 (fixture)
from tests.test_train import flags
from tests.zoo import reset_accelerate

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")

CAPTIONS = ["a red square on grey", "two blue circles", "a small green triangle beside a much larger yellow one",
            "stripes", "a picture of the sea at night with one boat"]


@pytest.fixture(scope="module")
def validation_file(tmp_path_factory) -> Path:
    """Five captioned images of different sizes, one of them cropped: the captions have different lengths."""
    root = tmp_path_factory.mktemp("validation")
    rng = np.random.default_rng(3)
    rows = []
    for i, caption in enumerate(CAPTIONS):
        Image.fromarray(rng.integers(0, 255, (20 + 4 * i, 24, 3), dtype=np.uint8)).save(root / f"v{i}.png")
        row = {"image": f"v{i}.png", "caption": caption}
        if i == 2:
            row["crop"] = [2, 2, 12, 12]
        rows.append(json.dumps(row))
    (root / "val.jsonl").write_text("\n".join(rows) + "\n")
    return root / "val.jsonl"


RUN = dict(max_train_samples=4, per_device_train_batch_size=2, max_train_steps=3, learning_rate=1e-2,
           checkpointing_steps=1, eval_steps=2, per_device_eval_batch_size=2)


def direct_losses(weights: Path, lm: str, clip: str, validation_file: Path) -> tuple[float, float]:
    """The mean fused and text-only losses over every caption token, one caption at a time, with the model's
    own forward (fused) and the Hugging Face LM's own loss (text only)."""
    from transformers import AutoTokenizer

    from data.captions import CaptionCollator, CaptionFile
    from models.checkpoints.weights import load_trainable
    from models.fusion.factory import load_late_fusion_model
    from models.vision import load_vision_encoder

    encoder = load_vision_encoder(clip, device=torch.device("cpu"), dtype=torch.float32)
    model = load_late_fusion_model(lm, vision_dim=encoder.hidden_size, torch_dtype=torch.float32)
    load_trainable(model, weights)
    model.eval()
    collate = CaptionCollator(AutoTokenizer.from_pretrained(lm), encoder.preprocess, max_length=512)
    items = CaptionFile(validation_file)
    fused = text = tokens = 0.0
    with torch.no_grad():
        for i in range(len(items)):
            batch = collate([items[i]])
            patches, _ = encoder.encode_images(batch["pixel_values"])
            n = int((batch["labels"][:, 1:] != -100).sum())
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], image_patches=patches,
                        labels=batch["labels"])
            lm_out = model.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch["labels"])
            fused, text, tokens = fused + out.loss.item() * n, text + lm_out.loss.item() * n, tokens + n
    return fused / tokens, text / tokens


def test_validation_loss_every_eval_steps_and_at_the_end_equals_a_direct_computation(
        tmp_path, lm_dirs, tiny_clip_spec, vg_dir, validation_file):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    result = train.main(flags(out, lm_dirs["gpt2"], tiny_clip_spec, vg_dir, validation_file=validation_file,
                              with_tracking=True, report_to="tensorboard", logging_steps=1, **RUN))
    history = result["validation"]
    assert [h["step"] for h in history] == [2, 3]  # every 2 steps, and the last step
    assert history[0]["validation_loss"] != history[1]["validation_loss"]  # the weights moved in between
    acc = EventAccumulator(str(out / TRACKER_PROJECT))
    acc.Reload()
    for name in ("validation_loss", "validation_loss_text_only"):
        logged = acc.Scalars(name)
        assert [e.step for e in logged] == [2, 3]
        assert [e.value for e in logged] == pytest.approx([h[name] for h in history], rel=1e-6)
    final = Path(result["saved"][-1])
    assert final.name == "test_1"  # 2 steps an epoch: test_0 at step 2, test_1 at step 3
    assert json.loads((final / "config.json").read_text())["validation"] == history
    assert json.loads((out / "test_0" / "config.json").read_text())["validation"] == history[:1]
    for record, weights in zip(history, (out / "checkpoint-2", final)):
        fused, text = direct_losses(weights, lm_dirs["gpt2"], tiny_clip_spec, validation_file)
        assert record["validation_loss"] == pytest.approx(fused, abs=1e-5)
        assert record["validation_loss_text_only"] == pytest.approx(text, abs=1e-5)
    # the frozen LM does not train: its loss is the same at every step, the fused one is not
    assert history[0]["validation_loss_text_only"] == pytest.approx(history[1]["validation_loss_text_only"], abs=1e-6)
    assert result["model"].training  # validation ran in eval mode and gave train mode back


def test_validation_changes_nothing_in_training(tmp_path, lm_dirs, tiny_clip_spec, vg_dir, validation_file):
    """Measuring in eval mode under no_grad draws from no RNG the run uses: the same losses and weights."""
    plain = train.main(flags(tmp_path / "plain", lm_dirs["gpt2"], tiny_clip_spec, vg_dir,
                             **{k: v for k, v in RUN.items() if k not in ("eval_steps", "per_device_eval_batch_size")}))
    reset_accelerate()
    measured = train.main(flags(tmp_path / "val", lm_dirs["gpt2"], tiny_clip_spec, vg_dir,
                                validation_file=validation_file, **{**RUN, "eval_steps": 1}))
    assert [h["step"] for h in measured["validation"]] == [1, 2, 3]
    assert measured["losses"] == plain["losses"]
    a, b = plain["model"].trainable_state_dict(), measured["model"].trainable_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_validation_split_holds_out_a_seeded_share(tmp_path, lm_dirs, tiny_clip_spec, vg_dir):
    from models.training.validation import held_out_indices

    assert held_out_indices(10, 25, seed=0) == held_out_indices(10, 25, seed=0)
    assert len(held_out_indices(10, 25, seed=0)) == 3 and len(held_out_indices(10, 0.1, seed=0)) == 1
    assert held_out_indices(10, 25, seed=0) != held_out_indices(10, 25, seed=1)
    result = train.main(flags(tmp_path / "out", lm_dirs["gpt2"], tiny_clip_spec, vg_dir, max_train_samples=4,
                              per_device_train_batch_size=1, num_train_epochs=1, learning_rate=1e-3,
                              validation_split_percentage=50))
    assert result["completed_steps"] == 2  # 2 of the 4 regions train, one per step
    assert [h["step"] for h in result["validation"]] == [2] and result["validation"][0]["tokens"] > 0


@pytest.fixture(scope="module")
def bad_validation(tmp_path_factory):
    root = tmp_path_factory.mktemp("badval")
    (root / "empty.jsonl").write_text("\n\n")
    (root / "header.csv").write_text("image,caption\n")
    (root / "no_caption.jsonl").write_text(json.dumps({"image": "x.png"}) + "\n")
    Image.new("RGB", (8, 8)).save(root / "x.png")
    (root / "ok.jsonl").write_text(json.dumps({"image": "x.png", "caption": "a black square"}) + "\n")
    return root


BAD = {
    "eval steps zero": (dict(eval_steps="0", validation_file="{root}/ok.jsonl"), "--eval_steps: must be an integer >= 1"),
    "eval steps without captions": (dict(eval_steps="2"), "--eval_steps needs validation captions"),
    "file with no rows": (dict(validation_file="{root}/empty.jsonl"), "--validation_file {root}/empty.jsonl holds no rows"),
    "csv with a header only": (dict(validation_file="{root}/header.csv"), "holds no rows"),
    "row without a caption": (dict(validation_file="{root}/no_caption.jsonl"), "missing or empty column 'caption'"),
    "file missing": (dict(validation_file="{root}/none.jsonl"), "--validation_file {root}/none.jsonl not found"),
    "file and split": (dict(validation_file="{root}/ok.jsonl", validation_split_percentage="10"), "exclude each other"),
    "split 100": (dict(validation_split_percentage="100"), "strictly between 0 and 100"),
    "split 0": (dict(validation_split_percentage="0"), "--validation_split_percentage: must be"),
    "split leaves nothing": (dict(validation_split_percentage="99", max_train_samples="2"), "leaves none to train"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_validation_input_is_one_line_before_training(case, bad_validation, tmp_path, lm_dirs, tiny_clip_spec,
                                                          vg_dir, capsys):
    extra, expected = BAD[case]
    extra = {k: v.format(root=bad_validation) for k, v in extra.items()}
    with pytest.raises(SystemExit) as exc:
        train.main(flags(tmp_path / "out", lm_dirs["gpt2"], tiny_clip_spec, vg_dir,
                         **{"max_train_steps": 1, **extra}))
    line = one_error_line(capsys, 2, exc)
    assert expected.format(root=bad_validation) in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # about 100 s on 2 cores: two torchrun processes, each loading the models
@pytest.mark.xdist_group("torchrun")  # one torchrun at a time: concurrent launches can meet on one port
def test_two_processes_measure_every_caption_once(tmp_path, lm_dirs, tiny_clip_spec, vg_dir, validation_file):
    """Under torchrun the 5 captions are split 3 + 2 and the sums added: both ranks get the losses of the
    whole set, equal to the direct computation with the saved weights."""
    from tests.test_train import torchrun

    out = tmp_path / "out"
    torchrun(flags(out, lm_dirs["gpt2"], tiny_clip_spec, vg_dir, validation_file=validation_file,
                   max_train_samples=4, per_device_train_batch_size=1, max_train_steps=2, learning_rate=1e-2,
                   eval_steps=1, per_device_eval_batch_size=2))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2 and ranks[0]["validation"] == ranks[1]["validation"]
    history = ranks[0]["validation"]
    assert [h["step"] for h in history] == [1, 2]
    fused, text = direct_losses(out / "test_0", lm_dirs["gpt2"], tiny_clip_spec, validation_file)
    assert history[-1]["validation_loss"] == pytest.approx(fused, abs=1e-5)
    assert history[-1]["validation_loss_text_only"] == pytest.approx(text, abs=1e-5)
    assert json.loads((out / "test_0" / "config.json").read_text())["validation"] == history


def test_masked_lm_validation_uses_the_same_masks_each_time_and_equals_the_direct_loss(
        tmp_path, wordpiece_dir, tiny_clip_spec, vg_dir, validation_file):
    """A masked LM's validation captions are masked with seeds fixed for the run: the frozen LM's loss and the
    token count are the same at every measurement, and the fused loss is the model's own MLM loss on them."""
    from transformers import AutoTokenizer

    from data.captions import CaptionCollator, CaptionFile
    from data.masking import MLMMasker, batch_seed
    from models.checkpoints.weights import load_trainable
    from models.fusion.factory import load_late_fusion_model
    from models.training.validation import VALIDATION_SEED
    from models.vision import load_vision_encoder
    from tests.zoo_masked import save_tiny_mlm

    lm = save_tiny_mlm(tmp_path / "bert", "bert", wordpiece_dir)
    out = tmp_path / "out"
    result = train.main(flags(out, lm, tiny_clip_spec, vg_dir, validation_file=validation_file, max_train_samples=4,
                              per_device_train_batch_size=2, max_train_steps=2, learning_rate=1e-2, eval_steps=1,
                              per_device_eval_batch_size=len(CAPTIONS), mlm_probability=0.5))
    first, last = result["validation"]
    assert first["tokens"] == last["tokens"] > 0
    assert first["validation_loss_text_only"] == pytest.approx(last["validation_loss_text_only"], abs=1e-6)

    encoder = load_vision_encoder(tiny_clip_spec, device=torch.device("cpu"), dtype=torch.float32)
    model = load_late_fusion_model(lm, vision_dim=encoder.hidden_size, torch_dtype=torch.float32)
    load_trainable(model, Path(result["saved"][-1]))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(lm)
    items = CaptionFile(validation_file)
    batch = CaptionCollator(tokenizer, encoder.preprocess, max_length=512, add_eos=False)(
        [items[i] for i in range(len(items))])
    ids, labels = MLMMasker(tokenizer, 0.5)(batch["input_ids"], batch["labels"], batch_seed(0, VALIDATION_SEED, 0, 0))
    with torch.no_grad():
        patches, _ = encoder.encode_images(batch["pixel_values"])
        fused = model(input_ids=ids, attention_mask=batch["attention_mask"], image_patches=patches, labels=labels).loss
        text = model.lm(input_ids=ids, attention_mask=batch["attention_mask"], labels=labels).loss
    assert int((labels != -100).sum()) == last["tokens"]
    assert last["validation_loss"] == pytest.approx(fused.item(), abs=1e-5)
    assert last["validation_loss_text_only"] == pytest.approx(text.item(), abs=1e-5)


def test_a_resumed_run_continues_the_validation_history(tmp_path, lm_dirs, tiny_clip_spec, vg_dir, validation_file,
                                                        capsys):
    """The measurements travel in the checkpoint: interrupted after step 2 and resumed, the run's weights
    record the same history as an uninterrupted run's; a forged record is refused in one line."""
    from tests.test_hostile_train import edit_component

    settings = {**RUN, "eval_steps": 1}
    full = train.main(flags(tmp_path / "full", lm_dirs["gpt2"], tiny_clip_spec, vg_dir,
                            validation_file=validation_file, **settings))
    reset_accelerate()

    class Stop(Exception):
        pass

    def stop_at_2(step):
        if step == 2:
            raise Stop

    out = tmp_path / "resumed"
    with pytest.raises(Stop):
        train.main(flags(out, lm_dirs["gpt2"], tiny_clip_spec, vg_dir, validation_file=validation_file, **settings),
                   step_callback=stop_at_2)
    reset_accelerate()
    forged = tmp_path / "forged"
    import shutil

    shutil.copytree(out, forged)
    resumed = train.main(flags(out, lm_dirs["gpt2"], tiny_clip_spec, vg_dir, validation_file=validation_file,
                               resume_from_checkpoint="latest", **settings))
    assert [h["step"] for h in resumed["validation"]] == [1, 2, 3]
    assert resumed["validation"] == full["validation"]  # the resume is exact: the same weights, the same losses
    final = json.loads((Path(resumed["saved"][-1]) / "config.json").read_text())["validation"]
    assert final == resumed["validation"]

    reset_accelerate()
    edit_component(forged / "checkpoint-2", "trainer_state",
                   lambda o: o["validation"]["history"][0].update(step=7))
    with pytest.raises(SystemExit) as exc:
        train.main(flags(forged, lm_dirs["gpt2"], tiny_clip_spec, vg_dir, validation_file=validation_file,
                         resume_from_checkpoint="latest", **settings))
    line = one_error_line(capsys, 2, exc)
    assert "trainer_state.json: validation record" in line and "up to 2" in line, line
