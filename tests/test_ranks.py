"""Every rank stops together: an error on one rank of a two-process torchrun run (a bad item only that rank
scores, a full disk on one rank) ends both ranks at once, with one line from rank 0 and one exit status.

Each run goes through ``tests/rank_exit_check.py``, which records every rank's exit status and end time;
the subprocess timeout turns a hang into a failure instead of a blocked suite.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import distributed
from tests.paths import TEST_DATA

REPO = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=50257, bos_token_id=50256, eos_token_id=50256, pad_token_id=50256)
WINDOW = 24


def torchrun(out: Path, module: str, args: list[str], env_extra=None, cwd=REPO,
             timeout=240) -> tuple[subprocess.CompletedProcess, dict]:
    """``torchrun --nproc_per_node 2`` of ``python -m module args``; returns the process and
    ``{rank: (status, end time, stderr)}``."""
    logs = out / "logs"
    out.mkdir(parents=True, exist_ok=True)
    runner = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    proc = subprocess.run([str(runner), "--standalone", "--nproc_per_node", "2", "--log-dir", str(logs),
                           "--redirects", "3", "-m", "tests.rank_exit_check", str(out), module, *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    errs = {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")}
    ranks = {}
    for r in (0, 1):
        path = out / f"exit{r}.json"
        assert path.is_file(), f"rank {r} left no exit record:\n{proc.stderr[-3000:]}\n{errs.get(r, '')[-3000:]}"
        ended = json.loads(path.read_text())
        ranks[r] = (ended["status"], ended["time"], errs.get(r, ""))
    return proc, ranks


def assert_stopped_together(ranks: dict, status: int, expected: str) -> str:
    """Both ranks ended with ``status`` within 60 s of each other; rank 0 printed one ``error:`` line
    holding ``expected``, rank 1 none. Returns the line."""
    assert [ranks[r][0] for r in (0, 1)] == [status, status], {r: ranks[r][2][-2000:] for r in ranks}
    assert abs(ranks[0][1] - ranks[1][1]) < 60
    lines = [line for line in ranks[0][2].splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and expected in lines[0], ranks[0][2][-3000:]
    assert "error:" not in ranks[1][2], ranks[1][2][-3000:]
    for _, _, text in ranks.values():
        assert "Traceback" not in text, text[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------- one process

def test_one_process_passes_exceptions_through_and_check_in_returns_the_value():
    with pytest.raises(KeyError):
        with distributed.step():
            raise KeyError("x")
    assert distributed.check_in(value=7) == 7
    with pytest.raises(distributed.RankFailure) as failure:
        distributed.check_in(("a bad row", 2))
    assert (failure.value.message, failure.value.status) == ("a bad row", 2)
    agreed = distributed.agree_on(OSError(28, "No space left on device", "/x"))
    assert (agreed.status, agreed.message) == (2, "[Errno 28] No space left on device: '/x'")
    assert distributed.agree_on(RuntimeError("boom\nmore")).message == "RuntimeError: boom more"
    assert distributed.agree_on(RuntimeError("boom")).status == 1


# ----------------------------------------------------------------------------- evaluation

@pytest.fixture(scope="module")
def short_window_lm(tmp_path_factory, tokenizer_dir):
    """A GPT-2 with a 24-token window: a PIQA example whose solution is longer cannot be scored."""
    import transformers as tf

    d = tmp_path_factory.mktemp("gpt2-window")
    tf.AutoModelForCausalLM.from_config(tf.GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=WINDOW,
                                                      **TINY)).save_pretrained(d)
    tf.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(d)
    return d


def piqa_with_one_long_example(root: Path, lm_dir: Path) -> tuple[Path, str]:
    """A PIQA folder of four examples in which only the second (rank 1's share) has a solution longer than
    the window; returns the folder and that example's id."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lm_dir)
    rows = [json.loads(line) for line in (TEST_DATA / "piqa" / "valid.jsonl").read_text().splitlines()]
    labels = (TEST_DATA / "piqa" / "valid-labels.lst").read_text().split()

    def longest(row):
        return max(len(tok(" " + row[s])["input_ids"]) for s in ("sol1", "sol2"))

    def fits(row):
        return longest(row) + len(tok(row["goal"])["input_ids"]) + 4 < WINDOW

    short = [i for i, r in enumerate(rows) if fits(r)][:3]
    long_one = next(i for i, r in enumerate(rows) if longest(r) > WINDOW + 4)
    order = [short[0], long_one, short[1], short[2]]
    root.mkdir(parents=True)
    (root / "valid.jsonl").write_text("".join(json.dumps(rows[i]) + "\n" for i in order))
    (root / "valid-labels.lst").write_text("".join(labels[i] + "\n" for i in order))
    return root, order


@pytest.mark.xdist_group("torchrun")  # one torchrun at a time: concurrent launches can meet on one port
def test_eval_an_item_only_rank_1_scores_stops_both_ranks(tmp_path, short_window_lm):
    data, _ = piqa_with_one_long_example(tmp_path / "piqa", short_window_lm)
    out = tmp_path / "out"
    proc, ranks = torchrun(tmp_path / "run", "eval_scripts.commonsenseQA", [
        "--model_name", str(short_window_lm), "--testset", "piqa", "--protocol", "harness",
        "--data_dir", str(data), "--device", "cpu", "--batch_size", "1", "--output_dir", str(out),
        "--run_name", "r"])
    assert proc.returncode != 0
    line = assert_stopped_together(ranks, 2, f"more than the model's window of {WINDOW}")
    assert ":1" in line or "piqa" in line  # the example is named
    # what rank 0 scored before the stop is kept for a resume; no metrics were written
    assert not (out / "r" / "commonsense_piqa.json").exists()


@pytest.mark.xdist_group("torchrun")
def test_eval_a_full_disk_on_rank_1_at_the_end_stops_both_ranks(tmp_path, short_window_lm):
    """The per-process statistics file of rank 1 cannot be written (a stand-in for ENOSPC)."""
    data, order = piqa_with_one_long_example(tmp_path / "piqa", short_window_lm)
    rows = (data / "valid.jsonl").read_text().splitlines()
    (data / "valid.jsonl").write_text("\n".join(rows[:1] + rows[2:]) + "\n")
    labels = (data / "valid-labels.lst").read_text().split()
    (data / "valid-labels.lst").write_text("\n".join(labels[:1] + labels[2:]) + "\n")
    out = tmp_path / "out"
    proc, ranks = torchrun(tmp_path / "run", "eval_scripts.commonsenseQA", [
        "--model_name", str(short_window_lm), "--testset", "piqa", "--protocol", "harness",
        "--data_dir", str(data), "--device", "cpu", "--batch_size", "1", "--output_dir", str(out),
        "--run_name", "r"], env_extra={"RANK_FAIL_AT": "1:eval_scripts.records.RunRecords.finish"})
    assert proc.returncode != 0
    assert_stopped_together(ranks, 2, "No space left on device")
    assert not (out / "r" / "commonsense_piqa.json").exists()


# ----------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def vg(tmp_path_factory):
    from tests.test_captions import make_vg_dir

    return make_vg_dir(tmp_path_factory.mktemp("vg") / "v1.2")


def train_flags(out: Path, lm: str, clip: str, vg: Path, **extra) -> list[str]:
    from tests.test_train import flags

    return flags(out, lm, clip, vg, max_train_samples=8, per_device_train_batch_size=2, max_train_steps=2,
                 learning_rate=1e-3, **extra)


@pytest.mark.xdist_group("torchrun")
@pytest.mark.parametrize("case", ["unreadable images on rank 1", pytest.param(
    "full disk on rank 0 saving the weights", marks=pytest.mark.slow)])
def test_training_a_failure_on_one_rank_stops_both(case, tmp_path, lm_dirs, tiny_clip_spec, vg):
    target = {"unreadable images on rank 1": "1:data.captions.CaptionCollator.__call__",
              "full disk on rank 0 saving the weights": "0:models.checkpoints.weights.save_trainable"}[case]
    out = tmp_path / "out"
    proc, ranks = torchrun(tmp_path / "run", "train", train_flags(out, lm_dirs["gpt2"], tiny_clip_spec, vg),
                           env_extra={"RANK_FAIL_AT": target, "WANDB_MODE": "offline"})
    assert proc.returncode != 0
    assert_stopped_together(ranks, 2, "No space left on device")
    assert not list(out.glob("test_*"))


# ----------------------------------------------------------------------------- FSDP2 checkpoints

def test_checkpoints_are_refused_only_where_they_cannot_be_written():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from models.training.setup import checkpoint_refusal

    def accelerator(kind, version=None):
        return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(
            fsdp_plugin=SimpleNamespace(fsdp_version=version)))

    assert checkpoint_refusal(accelerator(DistributedType.NO)) is None
    assert checkpoint_refusal(accelerator(DistributedType.MULTI_CPU)) is None
    assert checkpoint_refusal(accelerator(DistributedType.MULTI_GPU)) is None
    assert checkpoint_refusal(accelerator(DistributedType.FSDP, 2)) is None
    assert checkpoint_refusal(accelerator(DistributedType.FSDP, 1)) == "FSDP version 1"
    assert "DEEPSPEED" in checkpoint_refusal(accelerator(DistributedType.DEEPSPEED)).upper()


def fsdp2_torchrun(*args) -> None:
    runner = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([str(runner), "--standalone", "--nproc_per_node", "2", "-m", "tests.fsdp2_check",
                           *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.xdist_group("torchrun")
def test_fsdp2_checkpoints_gather_the_shards_and_resume_exactly(tmp_path, lm_dirs):
    """The projector and fusion block sharded by FSDP2 over two CPU processes (gloo): 4 steps straight equal
    2 steps, a checkpoint, and 2 resumed steps; the checkpoint holds the whole trainable weights and
    optimizer state (gathered from the shards) in safetensors + JSON, as a one-process run's does."""
    from safetensors.torch import load_file

    from models.checkpoints.training_state import read_training_checkpoint

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir()
    resumed.mkdir()
    fsdp2_torchrun(lm_dirs["gpt2"], straight, 4, "--save_at", 2)
    run = json.loads((straight / "run.json").read_text())
    assert run["sharded"] and run["world_size"] == 2 and len(run["losses"]) == 4
    final = load_file(straight / "final.safetensors")

    ckpt = read_training_checkpoint(straight / "checkpoint-2", 1)
    assert {k: tuple(v.shape) for k, v in ckpt["weights"].items()} == {k: tuple(v.shape) for k, v in final.items()}
    weight_names = [k for k in final if "weight" in k or "bias" in k]
    moments = [s["exp_avg"] for s in ckpt["optimizer"]["state"].values()]
    assert len(moments) == len(weight_names) and all(m.abs().sum() > 0 for m in moments)
    assert sorted(tuple(m.shape) for m in moments) == sorted(tuple(final[k].shape) for k in weight_names)
    assert not [p.name for p in (straight / "checkpoint-2").iterdir() if p.suffix not in (".json", ".safetensors")]
    assert not any(torch.equal(ckpt["weights"][k], final[k]) for k in weight_names)  # it is the step-2 state

    fsdp2_torchrun(lm_dirs["gpt2"], resumed, 4, "--resume_from", straight / "checkpoint-2")
    again = json.loads((resumed / "run.json").read_text())
    assert again["losses"] == pytest.approx(run["losses"][2:], rel=1e-6)
    assert again["lrs"] == pytest.approx(run["lrs"][2:])
    final_resumed = load_file(resumed / "final.safetensors")
    for k in final:
        assert torch.allclose(final[k], final_resumed[k], atol=1e-6, rtol=0), k


# ----------------------------------------------------------------------------- index building

@pytest.mark.slow
@pytest.mark.xdist_group("torchrun")
def test_index_build_a_full_disk_on_rank_1_stops_both_ranks(tmp_path, tiny_clip_spec):
    from tests.test_image_index import coco_names, draw_stand_ins

    images = draw_stand_ins(tmp_path / "images", coco_names()[:12])
    out = tmp_path / "index"
    proc, ranks = torchrun(tmp_path / "run", "models.images.index", [
        "build", "--images", str(images), "--out", str(out), "--vision_encoder", tiny_clip_spec,
        "--batch_size", "2", "--num_workers", "0", "--device", "cpu"],
        env_extra={"RANK_FAIL_AT": "1:numpy.savez"})  # rank 1 writing its first batch
    assert proc.returncode != 0
    assert_stopped_together(ranks, 2, "No space left on device")
    assert not (out / "manifest.json").exists()


# ----------------------------------------------------------------------------- pre-generating images

@pytest.mark.xdist_group("torchrun")
def test_pregenerate_a_full_disk_on_rank_1_stops_both_ranks(tmp_path):
    """Every chunk of pregenerate is a step, on every rank as many: rank 1's refused PNG writes stop both ranks
    with its one line (exit 2), and rank 0's images stay in the cache."""
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(f"A red apple number {i} sits on a table.\n" for i in range(20)))
    cache = tmp_path / "cache"
    proc, ranks = torchrun(tmp_path / "run", "models.images.pregenerate", [
        "--prompts_file", str(texts), "--image_generator", "toyworld", "--k", "1", "--image_cache", str(cache),
        "--image_size", "32", "--device", "cpu", "--gen_batch_size", "1"],
        env_extra={"RANK_FAIL_AT": "1:models.write_behind.write_atomic"})
    assert proc.returncode != 0
    assert_stopped_together(ranks, 2, "image(s) could not be written to the cache")
    assert len(list(cache.rglob("*.png"))) == 10  # rank 0's share, whole
    # without the failure the two ranks split the texts: 10 each, 20 images, both exit 0
    whole = tmp_path / "whole"
    proc, ranks = torchrun(tmp_path / "run_ok", "models.images.pregenerate", [
        "--prompts_file", str(texts), "--image_generator", "toyworld", "--k", "1", "--image_cache", str(whole),
        "--image_size", "32", "--device", "cpu", "--gen_batch_size", "1"])
    assert proc.returncode == 0 and [ranks[r][0] for r in (0, 1)] == [0, 0]
    assert len(list(whole.rglob("*.png"))) == 20


# ----------------------------------------------------------------------------- the harness

@pytest.mark.slow
@pytest.mark.xdist_group("torchrun")
def test_harness_a_failure_on_rank_1_while_scoring_stops_both_ranks(tmp_path, lm_dirs, tmp_path_factory):
    from tests.test_harness import TASKS, convert_arc

    data = tmp_path / "data"
    data.mkdir()
    convert_arc(TEST_DATA / "arc" / "ARC-Easy-Dev.jsonl", data / "arc_easy.jsonl")
    proc, ranks = torchrun(tmp_path / "run", "eval_scripts.harness", [
        "--tasks", "arc_easy", "--include_path", str(TASKS), "--limit", "6", "--batch_size", "2",
        "--model_args", f"model_name={lm_dirs['gpt2']},device=cpu"],
        env_extra={"RANK_FAIL_AT": "1:eval_scripts.scoring.Scorer.pair_logprobs"}, cwd=data,
        timeout=300)  # importing lm-eval is slow on a busy machine: the stop itself is checked below
    assert proc.returncode != 0
    assert_stopped_together(ranks, 2, "No space left on device")
