"""Hostile input to the training side: train.py, its checkpoints, demo.py and ``python -m models.images.pregenerate``.

Every bad input is one ``error: ...`` line on stderr and exit status 2, with no traceback and nothing written.
Nothing in a checkpoint folder runs code, nothing a user made is deleted, and nothing silently wrong is kept:
non-finite weights, a resume with other settings and unreadable RNG states are refused.
"""
import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train
from models.training.run_folder import check_output_dir, list_checkpoints, resolve_resume
from tests.test_train import REPO, flags, make_vg_dir
from tests.zoo import reset_accelerate

TRAINED = dict(max_train_samples=4, per_device_train_batch_size=2, max_train_steps=2, learning_rate=1e-3,
               checkpointing_steps=1)


pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")


@pytest.fixture(scope="module")
def vg_dir(tmp_path_factory):
    return make_vg_dir(tmp_path_factory.mktemp("vg") / "vg")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, lm_dirs, tiny_clip_spec, vg_dir):
    """A finished 2-step run (one epoch) with checkpoint-1, checkpoint-2 and the weights test_0."""
    out = tmp_path_factory.mktemp("trained") / "out"
    train.main(flags(out, lm_dirs["gpt2"], tiny_clip_spec, vg_dir, **TRAINED))
    reset_accelerate()
    return out


def copy_run(trained, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    return out


def listing(root: Path) -> dict:
    """Every file under ``root`` with its SHA-256: what a failed command must leave unchanged."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


def one_error_line(capsys, code: int, exc) -> str:
    """The exit status is ``code``; stderr is one ``error:`` line (besides progress bars), no traceback;
    returns the line."""
    err = capsys.readouterr().err
    assert exc.value.code == code, err
    assert "Traceback" not in err, err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip() and not re.search(r"\d+%\|", line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "weights_only=False" not in err and "weights_only` set to `False" not in err
    return lines[0]


class Trap:
    """A pickle that creates ``marker`` when unpickled: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def trap_bytes(marker: Path, zipped: bool = False) -> bytes:
    if not zipped:
        return pickle.dumps({"state": Trap(marker)})
    import io

    buffer = io.BytesIO()
    torch.save({"mm_proj.linear1.weight": Trap(marker)}, buffer)
    return buffer.getvalue()


def write_bad_files(tmp: Path) -> None:
    """The bad inputs the table refers to as {tmp}/NAME."""
    from safetensors.torch import save_file

    (tmp / "empty.bin").write_bytes(b"")
    (tmp / "random.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp / "trap.bin").write_bytes(trap_bytes(tmp / "TRAP-RAN"))
    (tmp / "trapzip.bin").write_bytes(trap_bytes(tmp / "TRAP-RAN", zipped=True))
    (tmp / "empty.safetensors").write_bytes(b"")
    (tmp / "random.safetensors").write_bytes(np.random.default_rng(1).bytes(4096))
    save_file({"mm_proj.linear1.weight": torch.zeros(64, 64)}, tmp / "whole.safetensors")
    (tmp / "truncated.safetensors").write_bytes((tmp / "whole.safetensors").read_bytes()[:-100])
    (tmp / "nan").mkdir()
    save_file({"mm_proj.linear1.weight": torch.tensor([[1.0, float("nan")]])}, tmp / "nan" / "model.safetensors")
    (tmp / "a_file").write_text("not a directory")
    latin1 = "caf\xe9, cr\xe8me br\xfbl\xe9e\n".encode("latin-1")
    (tmp / "latin1.jsonl").write_bytes(b'{"image": "x.png", "caption": "' + latin1.strip() + b'"}\n')
    (tmp / "latin1.csv").write_bytes(b"image,caption\nx.png," + latin1)
    (tmp / "latin1.txt").write_bytes(latin1 * 50)
    Image.new("RGB", (8, 8)).save(tmp / "x.png")
    (tmp / "empty.txt").write_text("\n  \n")
    (tmp / "prompts.txt").write_text("A red apple.\n")
    for name, regions, images in (("vg_dict", {"regions": []}, None), ("vg_no_regions", [{"id": 1}], None),
                                  ("vg_not_json", "{oops", None), ("vg_images_dict", None, {"1": {}}),
                                  ("vg_latin1", latin1, None)):
        d = tmp / name
        make_vg_dir(d)
        if regions is not None:
            data = regions if isinstance(regions, (bytes, str)) else json.dumps(regions)
            (d / "region_descriptions.json").write_bytes(data if isinstance(data, bytes) else data.encode())
        if images is not None:
            (d / "image_data.json").write_text(json.dumps(images))


# name: (extra train.py flags, expected text in the error line); "{tmp}" is the folder of write_bad_files
TRAIN_CASES = {
    "lr nan": (dict(learning_rate="nan"), "--learning_rate"),
    "lr negative": (dict(learning_rate="-1e-3"), "--learning_rate"),
    "lr inf": (dict(learning_rate="inf"), "--learning_rate"),
    "weight decay nan": (dict(weight_decay="nan"), "--weight_decay"),
    "weight decay negative": (dict(weight_decay="-0.1"), "--weight_decay"),
    "max grad norm zero": (dict(max_grad_norm="0"), "--max_grad_norm"),
    "max grad norm inf": (dict(max_grad_norm="inf"), "--max_grad_norm"),
    "warmup negative": (dict(num_warmup_steps="-1"), "--num_warmup_steps"),
    "warmup not a number": (dict(num_warmup_steps="1.5"), "--num_warmup_steps"),
    "max bad images > 1": (dict(max_bad_images="2"), "--max_bad_images"),
    "max bad images nan": (dict(max_bad_images="nan"), "--max_bad_images"),
    "seed negative": (dict(seed="-1"), "--seed"),
    "batch size zero": (dict(per_device_train_batch_size="0"), "--per_device_train_batch_size"),
    "checkpoint limit zero": (dict(checkpoints_total_limit="0"), "--checkpoints_total_limit"),
    "report_to bogus": (dict(report_to="bogus"), "--report_to"),
    "report_to not installed": (dict(report_to="aim", with_tracking=True), "not installed"),
    "device tpu9": (dict(device="tpu9"), "--device"),
    "image size zero": (dict(image_size="0"), "--image_size"),
    "inference steps zero": (dict(num_inference_steps="0"), "--num_inference_steps"),
    "output dir is a file": (dict(output_dir="{tmp}/a_file"), "not a directory"),
    "overwrite and resume": (dict(overwrite_output_dir=True, resume_from_checkpoint="latest"), "exclude"),
    "pretrained empty .bin": (dict(pretrained_model="{tmp}/empty.bin"), "empty (0 bytes)"),
    "pretrained random .bin": (dict(pretrained_model="{tmp}/random.bin"), "is not a checkpoint"),
    "pretrained trap pickle": (dict(pretrained_model="{tmp}/trap.bin"), "not a plain state dict"),
    "pretrained trap zip": (dict(pretrained_model="{tmp}/trapzip.bin"), "not a plain state dict"),
    "pretrained empty .safetensors": (dict(pretrained_model="{tmp}/empty.safetensors"), "not a valid safetensors"),
    "pretrained random .safetensors": (dict(pretrained_model="{tmp}/random.safetensors"), "not a valid safetensors"),
    "pretrained truncated .safetensors": (dict(pretrained_model="{tmp}/truncated.safetensors"),
                                          "not a valid safetensors"),
    "pretrained non-finite": (dict(pretrained_model="{tmp}/nan"), "non-finite"),
    "resume from saved weights": (dict(resume_from_checkpoint="{tmp}/nan"), "not a complete checkpoint"),
    "vg regions not a list": (dict(vg_dir="{tmp}/vg_dict"), "expected a JSON list"),
    "vg record without regions": (dict(vg_dir="{tmp}/vg_no_regions"), "'regions' list"),
    "vg not json": (dict(vg_dir="{tmp}/vg_not_json"), "invalid JSON"),
    "vg images not a list": (dict(vg_dir="{tmp}/vg_images_dict"), "image_data.json: expected a JSON list"),
    "vg not utf-8": (dict(vg_dir="{tmp}/vg_latin1"), "region_descriptions.json: not UTF-8"),
    "train_file jsonl not utf-8": (dict(dataset_name=None, vg_dir=None, train_file="{tmp}/latin1.jsonl"),
                                   "latin1.jsonl:1: not UTF-8"),
    "train_file csv not utf-8": (dict(dataset_name=None, vg_dir=None, train_file="{tmp}/latin1.csv"),
                                 "latin1.csv: not UTF-8"),
    "laion csv not utf-8": (dict(dataset_name="laion_220", vg_dir=None, laion_file="{tmp}/latin1.csv",
                                 laion_image_root="{tmp}"), "latin1.csv: not UTF-8"),
    "wiki text not utf-8": (dict(dataset_name="wiki", vg_dir=None, wiki_file="{tmp}/latin1.txt",
                                 image_generator="toyworld", image_cache="{tmp}/cache"), "latin1.txt: not UTF-8"),
}
TRAIN_CASES["device cuda without a GPU"] = (dict(device="cuda"), "no CUDA device")  # the GPU hidden, see below


def hide_gpus(monkeypatch) -> None:
    """This process sees no CUDA device, whatever the machine has: the refusal of --device cuda is tested on
    GPU machines too."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    write_bad_files(tmp)
    return tmp


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_bad_input(case, bad_files, tmp_path, lm_dirs, tiny_clip_spec, vg_dir, capsys, monkeypatch):
    extra, expected = TRAIN_CASES[case]
    if case.endswith("without a GPU"):
        hide_gpus(monkeypatch)
    extra = {k: v.format(tmp=bad_files) if isinstance(v, str) else v for k, v in extra.items()}
    out = Path(extra.pop("output_dir", tmp_path / "out"))
    before = listing(bad_files)
    with pytest.raises(SystemExit) as exc:
        train.main(flags(out, lm_dirs["gpt2"], tiny_clip_spec, vg_dir, **extra))
    line = one_error_line(capsys, 2, exc)
    assert expected in line, line
    assert not (tmp_path / "out").exists()
    assert listing(bad_files) == before and not (bad_files / "TRAP-RAN").exists()


# ----------------------------------------------------------------------------- pre-generation CLI

IG_CASES = {
    "missing prompts file": (["--prompts_file", "{tmp}/none.txt"], "not found"),
    "empty prompts file": (["--prompts_file", "{tmp}/empty.txt"], "holds no text"),
    "prompts file not utf-8": (["--prompts_file", "{tmp}/latin1.txt"], "not UTF-8"),
    "k zero": (["--k", "0"], "k must be >= 1"),
    "k not a number": (["--k", "six"], "--k"),
    "image size zero": (["--image_size", "0"], "--image_size"),
    "inference steps zero": (["--num_inference_steps", "0"], "--num_inference_steps"),
    "generation batch zero": (["--gen_batch_size", "0"], "--gen_batch_size"),
    "guidance nan": (["--guidance_scale", "nan"], "--guidance_scale"),
    "noise above one": (["--toyworld_noise", "2"], "--toyworld_noise"),
    "last words zero": (["--last_n_words", "0"], "--last_n_words"),
    "device tpu9": (["--device", "tpu9"], "--device"),
    "dtype fp8": (["--dtype", "fp8"], "--dtype"),
    "generator missing": (["--image_generator", "{tmp}/no-such-pipeline"], "no such directory"),
    "generator without model_index": (["--image_generator", "{tmp}/nan"], "no model_index.json"),
    "cache is a file": (["--image_cache", "{tmp}/a_file/cache"], "not writable"),
    "unknown flag": (["--kk", "3"], "unrecognized"),
}
IG_CASES["device cuda without a GPU"] = (["--device", "cuda"], "no CUDA device")  # the GPU hidden, see below


@pytest.mark.parametrize("case", list(IG_CASES))
def test_image_generation_bad_input(case, bad_files, tmp_path, capsys, monkeypatch):
    from models.images import pregenerate

    argv, expected = IG_CASES[case]
    if case.endswith("without a GPU"):
        hide_gpus(monkeypatch)
    base = {"--prompts_file": str(bad_files / "prompts.txt"), "--image_generator": "toyworld",
            "--image_cache": str(tmp_path / "cache"), "--device": "cpu"}
    base.update(dict(zip(argv[::2], [a.format(tmp=bad_files) for a in argv[1::2]])))
    with pytest.raises(SystemExit) as exc:
        pregenerate.main([x for kv in base.items() for x in kv])
    line = one_error_line(capsys, 2, exc)
    assert expected in line, line
    assert not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------- demo.py

DEMO_CASES = {
    "ks abc": (["--ks", "abc"], "--ks"),
    "ks zero": (["--ks", "0,1"], "--ks"),
    "ks repeated": (["--ks", "1,1"], "--ks"),
    "batch size zero": (["--batch_size", "0"], "--batch_size"),
    "steps zero": (["--steps", "0"], "--steps"),
    "lr nan": (["--learning_rate", "nan"], "--learning_rate"),
    "noise above one": (["--noise", "1.5"], "--noise"),
    "too many objects": (["--objects", "1000"], "--objects"),
    "seed negative": (["--seed", "-3"], "--seed"),
}


def demo_dir(root: Path) -> Path:
    """An earlier demo's folder (marker present) with the user's own file beside the demo's outputs."""
    import demo

    out = root / "demo"
    for name in (*demo.STALE, "clip"):
        (out / name).mkdir(parents=True)
        (out / name / "kept.txt").write_text(name)
    (out / demo.MARKER).write_text("")
    (out / "my_notes.txt").write_text("mine")
    return out


@pytest.mark.parametrize("case", list(DEMO_CASES))
def test_demo_bad_flag_deletes_nothing(case, tmp_path, capsys):
    import demo

    out = demo_dir(tmp_path)
    before = listing(out)
    argv, expected = DEMO_CASES[case]
    with pytest.raises(SystemExit) as exc:
        demo.main(["--output_dir", str(out), *argv])
    assert expected in one_error_line(capsys, 2, exc)
    assert listing(out) == before


def test_demo_deletes_only_what_it_wrote(tmp_path, capsys):
    import demo

    # a folder the demo did not write is refused before anything is touched
    foreign = tmp_path / "foreign"
    (foreign / "train").mkdir(parents=True)
    (foreign / "train" / "weights.bin").write_text("precious")
    before = listing(foreign)
    with pytest.raises(SystemExit) as exc:
        demo.main(["--output_dir", str(foreign)])
    assert "was not written by the demo" in one_error_line(capsys, 2, exc)
    assert listing(foreign) == before and not (foreign / demo.MARKER).exists()
    # --output_dir that is a file
    with pytest.raises(SystemExit) as exc:
        demo.main(["--output_dir", str(foreign / "train" / "weights.bin")])
    assert "not a directory" in one_error_line(capsys, 2, exc)

    # the demo's own folder: its stale train/, results/ and train_data/ go, everything else stays
    out = demo_dir(tmp_path)
    demo.prepare_output_dir(out)
    assert sorted(listing(out)) == [".late-fusion-demo", "clip/kept.txt", "my_notes.txt"]
    # ... unless one of them is not what the demo writes (a link to the user's folder): refused, nothing deleted
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.txt").write_text("not the demo's")
    os.symlink(tmp_path / "elsewhere", out / "results")
    (out / "train").mkdir()
    with pytest.raises(demo.DemoError, match="results is not a folder the demo wrote"):
        demo.prepare_output_dir(out)
    assert (tmp_path / "elsewhere" / "x.txt").is_file() and (out / "train").is_dir()
    # an empty or new folder becomes the demo's
    demo.prepare_output_dir(tmp_path / "new")
    assert (tmp_path / "new" / demo.MARKER).is_file()


# ----------------------------------------------------------------------------- checkpoints: security

CHECKPOINT_FILES = ("model.safetensors", "optimizer.json", "optimizer.safetensors", "scheduler.json",
                    "trainer_state.json", "rng_state_0.json", "rng_state_0.safetensors", "checkpoint.json")
ACCELERATE_FILES = ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin")


def rewrite_marker(ckpt: Path) -> None:
    """Make checkpoint.json agree with the files as they are now (what an attacker would do)."""
    marker = json.loads((ckpt / "checkpoint.json").read_text())
    for name, entry in marker["files"].items():
        data = (ckpt / name).read_bytes()
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (ckpt / "checkpoint.json").write_text(json.dumps(marker))


def test_checkpoint_holds_no_pickle(trained):
    names = sorted(p.name for p in (trained / "checkpoint-2").iterdir())
    assert names == sorted(CHECKPOINT_FILES)
    for name in names:
        head = (trained / "checkpoint-2" / name).read_bytes()[:2]
        assert head[:1] in (b"{", b"[") or name.endswith(".safetensors"), name
    assert json.loads((trained / "checkpoint-2" / "scheduler.json").read_text())


@pytest.mark.parametrize("name,forged", [(n, f) for n in CHECKPOINT_FILES for f in (False, True)
                                         if not (n == "checkpoint.json" and f)] +
                         [(n, False) for n in ACCELERATE_FILES])
def test_booby_trapped_checkpoint_runs_no_code(name, forged, trained, tmp_path, lm_dirs, tiny_clip_spec, vg_dir,
                                               capsys):
    """A pickle that would create a file when unpickled, in place of each file of a checkpoint (with the marker
    forged to match, or not), or as each pickle of an Accelerate checkpoint: no code runs, one line names it."""
    out = copy_run(trained, tmp_path)
    ckpt = out / "checkpoint-1"
    marker = tmp_path / "TRAP-RAN"
    if name in ACCELERATE_FILES:
        (ckpt / "checkpoint.json").unlink()
        for legacy in ACCELERATE_FILES:
            (ckpt / legacy).write_bytes(trap_bytes(marker, zipped=legacy.endswith(".bin")))
    else:
        (ckpt / name).write_bytes(trap_bytes(marker, zipped=name.endswith(".safetensors")))
        if forged:
            rewrite_marker(ckpt)
    with pytest.raises(SystemExit) as exc:
        train.main(flags(out, lm_dirs["gpt2"], tiny_clip_spec, vg_dir, resume_from_checkpoint=ckpt, **TRAINED))
    line = one_error_line(capsys, 2, exc)
    assert (ACCELERATE_FILES[0] if name in ACCELERATE_FILES else name) in line, line
    assert not marker.exists()


# ----------------------------------------------------------------------------- nothing is lost

def test_new_run_into_a_used_output_dir_is_refused(trained, tmp_path, lm_dirs, tiny_clip_spec, vg_dir, capsys):
    out = copy_run(trained, tmp_path)
    before = listing(out)
    with pytest.raises(SystemExit) as exc:
        train.main(flags(out, lm_dirs["gpt2"], tiny_clip_spec, vg_dir, **TRAINED))
    line = one_error_line(capsys, 2, exc)
    assert "checkpoint-1, checkpoint-2, test_0" in line and "--overwrite_output_dir" in line
    assert listing(out) == before
    # another run name next to saved weights only is fine (stage 2 beside stage 1): nothing is at risk
    weights_only = tmp_path / "weights_only"
    shutil.copytree(out / "test_0", weights_only / "test_0")
    check_output_dir(train.parse_args(flags(weights_only, "lm", "clip", run_name="stage2")), None)

    reset_accelerate()
    result = train.main(flags(out, lm_dirs["gpt2"], tiny_clip_spec, vg_dir, overwrite_output_dir=True,
                              **{**TRAINED, "checkpointing_steps": 2}))
    assert result["completed_steps"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "test_0"]  # the old checkpoint-1 went


def test_kill_mid_save_keeps_the_last_complete_checkpoint(trained, tmp_path, lm_dirs, tiny_clip_spec, vg_dir,
                                                          monkeypatch, caplog):
    # a save killed after its weights: checkpoint-2.tmp is left, checkpoint-1 survives --checkpoints_total_limit 1
    import models.checkpoints.training_state as ts

    real = ts.write_component

    def killed(folder, name, obj):
        if name == "optimizer" and folder.name == "checkpoint-2.tmp":
            raise KeyboardInterrupt
        real(folder, name, obj)

    monkeypatch.setattr(ts, "write_component", killed)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        train.main(flags(out, lm_dirs["gpt2"], tiny_clip_spec, vg_dir, checkpoints_total_limit=1, **TRAINED))
    monkeypatch.setattr(ts, "write_component", real)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "checkpoint-2.tmp"]
    assert (out / "checkpoint-2.tmp" / "model.safetensors").is_file()
    # an older version's killed save: a checkpoint folder with a 0-byte file and no marker
    (out / "checkpoint-3").mkdir()
    (out / "checkpoint-3" / "optimizer.bin").write_bytes(b"")
    with caplog.at_level("WARNING"):
        assert resolve_resume("latest", out) == out / "checkpoint-1"
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("checkpoint-2.tmp" in w and "interrupted" in w for w in warned), warned
    assert any("checkpoint-3" in w for w in warned), warned
    assert list_checkpoints(out) == [out / "checkpoint-1"]

    reset_accelerate()
    result = train.main(flags(out, lm_dirs["gpt2"], tiny_clip_spec, vg_dir, checkpoints_total_limit=1,
                              resume_from_checkpoint="latest", **TRAINED))
    assert result["completed_steps"] == 2 and len(result["losses"]) == 1
    # the resumed run's save completed: the interrupted one is cleared, the older checkpoint pruned after it
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-3", "test_0"]


def test_stale_checkpoint_is_refused_unless_told(trained, tmp_path, lm_dirs, tiny_clip_spec, vg_dir, capsys):
    out = copy_run(trained, tmp_path)
    before = listing(out)
    changed = {**TRAINED, "learning_rate": 5e-4, "seed": 3}
    with pytest.raises(SystemExit) as exc:
        train.main(flags(out, lm_dirs["gpt2"], tiny_clip_spec, vg_dir, resume_from_checkpoint="latest", **changed))
    line = one_error_line(capsys, 2, exc)
    assert "learning_rate (checkpoint 0.001, now 0.0005)" in line and "seed (checkpoint 0, now 3)" in line, line
    assert "batch" not in line and "--ignore_config_mismatch" in line
    assert listing(out) == before

    reset_accelerate()
    result = train.main(flags(out, lm_dirs["gpt2"], tiny_clip_spec, vg_dir, resume_from_checkpoint="latest",
                              ignore_config_mismatch=True, **changed))
    assert result["completed_steps"] == 2  # resumed at the end: nothing left to train
    run_args = json.loads((out / "test_0" / "config.json").read_text())["run_args"]
    assert run_args["resumed_from"] == str(out / "checkpoint-2")


def test_non_finite_checkpoint_is_refused(trained, tmp_path, lm_dirs, tiny_clip_spec, vg_dir, capsys):
    from safetensors.torch import load_file, save_file

    from models.checkpoints.weights import CheckpointError, load_state

    out = copy_run(trained, tmp_path)
    for target in (out / "test_0", out / "checkpoint-1"):
        weights = load_file(target / "model.safetensors")
        key = sorted(weights)[1]
        weights[key].view(-1)[0] = float("inf")
        save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    rewrite_marker(out / "checkpoint-1")
    with pytest.raises(CheckpointError, match=f"{sorted(weights)[1]} holds 1 non-finite"):  # evaluation's loader
        load_state(out / "test_0")
    for extra in (dict(pretrained_model=out / "test_0", output_dir=tmp_path / "fresh"),
                  dict(resume_from_checkpoint=out / "checkpoint-1")):
        reset_accelerate()
        with pytest.raises(SystemExit) as exc:
            train.main(flags(out, lm_dirs["gpt2"], tiny_clip_spec, vg_dir, **{**TRAINED, **extra}))
        assert "non-finite" in one_error_line(capsys, 2, exc)
    assert not (tmp_path / "fresh").exists()


def test_unreadable_rng_state_fails(trained, tmp_path, lm_dirs, tiny_clip_spec, vg_dir, capsys):
    out = copy_run(trained, tmp_path)
    rng = out / "checkpoint-1" / "rng_state_0.json"
    rng.write_bytes(rng.read_bytes()[:-40])  # truncated: its hash no longer matches
    with pytest.raises(SystemExit) as exc:
        train.main(flags(out, lm_dirs["gpt2"], tiny_clip_spec, vg_dir, resume_from_checkpoint=rng.parent, **TRAINED))
    assert "rng_state_0.json: damaged" in one_error_line(capsys, 2, exc)
    # valid JSON of the wrong shape, with the marker forged to match: still refused, before training
    rng.write_text(json.dumps({"__dict__": [["python", [1, 2, 3]], ["numpy", [0]], ["torch", 0]]}))
    rewrite_marker(rng.parent)
    reset_accelerate()
    with pytest.raises(SystemExit) as exc:
        train.main(flags(out, lm_dirs["gpt2"], tiny_clip_spec, vg_dir, resume_from_checkpoint=rng.parent, **TRAINED))
    assert "rng_state_0.json: not a valid RNG state" in one_error_line(capsys, 2, exc)
    assert not (out / "checkpoint-1.tmp").exists()


def edit_component(ckpt: Path, name: str, change) -> None:
    """Change a checkpoint's ``name`` component in place and forge its marker to match."""
    from safetensors.torch import load_file

    from models.checkpoints.training_state import decode_tree, write_component

    tensors_file = ckpt / f"{name}.safetensors"
    obj = decode_tree(json.loads((ckpt / f"{name}.json").read_text()),
                      load_file(tensors_file) if tensors_file.exists() else {}, name)
    change(obj)
    write_component(ckpt, name, obj)
    rewrite_marker(ckpt)


FORGED = {  # valid JSON and safetensors, with content that must not reach the torch objects
    "optimizer lr as text": ("optimizer", lambda o: o["param_groups"][0].update(lr="0.1"), "parameter groups"),
    "optimizer extra setting": ("optimizer", lambda o: o["param_groups"][0].update(evil=1), "parameter groups"),
    "optimizer state of another shape": ("optimizer", lambda o: o["state"][0].update(exp_avg=torch.zeros(3)),
                                         "does not fit this model"),
    "optimizer state not finite": ("optimizer", lambda o: o["state"][1]["exp_avg"].fill_(float("nan")),
                                   "non-finite"),
    "scheduler extra attribute": ("scheduler", lambda o: o.update(optimizer="x"), "does not fit this learning-rate"),
    "negative step": ("trainer_state", lambda o: o.update(completed_steps=-5), "completed_steps must be"),
    "no run config": ("trainer_state", lambda o: o.pop("config"), "no run config"),
}


@pytest.mark.parametrize("case", list(FORGED))
def test_forged_checkpoint_content_is_refused(case, trained, tmp_path, lm_dirs, tiny_clip_spec, vg_dir, capsys):
    name, change, expected = FORGED[case]
    out = copy_run(trained, tmp_path)
    edit_component(out / "checkpoint-1", name, change)
    with pytest.raises(SystemExit) as exc:
        train.main(flags(out, lm_dirs["gpt2"], tiny_clip_spec, vg_dir, resume_from_checkpoint=out / "checkpoint-1",
                         **TRAINED))
    line = one_error_line(capsys, 2, exc)
    assert expected in line and f"{name}." in line, line
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "checkpoint-2", "test_0"]


# ----------------------------------------------------------------------------- training images

def image_file(root: Path, n: int, bad: dict) -> Path:
    """``root/train.jsonl``: n captioned 16x16 images; ``bad`` maps an index to corrupt|truncated|outside."""
    root.mkdir(parents=True)
    rows = []
    for i in range(n):
        path = root / f"img{i}.png"
        Image.fromarray(np.full((16, 16, 3), 20 * i, dtype=np.uint8)).save(path)
        row = {"image": path.name, "caption": f"a picture number {i}"}
        if bad.get(i) == "corrupt":
            path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
        elif bad.get(i) == "truncated":
            path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
        elif bad.get(i) == "outside":
            row["crop"] = [100, 100, 5, 5]
        rows.append(json.dumps(row))
    (root / "train.jsonl").write_text("\n".join(rows) + "\n")
    return root / "train.jsonl"


def test_bad_training_images_are_skipped_counted_and_limited(tmp_path, lm_dirs, tiny_clip_spec, caplog, capsys):
    from data.captions import CaptionFile, SkipBadImages

    bad = {2: "corrupt", 5: "truncated", 6: "outside"}
    train_file = image_file(tmp_path / "data", 10, bad)
    data = SkipBadImages(CaptionFile(train_file))
    item = data[5]  # 5 and 6 are bad: item 7 stands in, and both skipped paths are reported
    assert item["text"] == "a picture number 7"
    assert [Path(p).name for p, _ in item["bad_images"]] == ["img5.png", "img6.png"]
    assert "truncated" in item["bad_images"][0][1] and "outside" in item["bad_images"][1][1]

    common = dict(train_file=train_file, per_device_train_batch_size=2, num_train_epochs=1, learning_rate=1e-3)
    with caplog.at_level("WARNING"):
        result = train.main(flags(tmp_path / "out", lm_dirs["gpt2"], tiny_clip_spec, max_bad_images=0.5, **common))
    # one epoch of 10 items: 2 -> 3, 5 -> 7 (6 bad too), 6 -> 7: four bad reads among 14 images read
    assert result["bad_images"] == 4
    run_args = json.loads((tmp_path / "out" / "test_0" / "config.json").read_text())["run_args"]
    assert (run_args["bad_images"], run_args["images_seen"]) == (4, 14)
    logged = [r.getMessage() for r in caplog.records if "unreadable training image" in r.getMessage()]
    assert sorted(Path(m.split(": ")[1]).name for m in logged) == ["img2.png", "img5.png", "img6.png"]  # once each

    # the default limit (1%) on a 10-image set: the first bad image stops the run with one line (at the end of
    # step 2: items 0, 1, then 2 (bad) replaced by 3, and 3)
    reset_accelerate()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        train.main(flags(tmp_path / "strict", lm_dirs["gpt2"], tiny_clip_spec, **common))
    line = one_error_line(capsys, 2, exc)
    assert "1 of the 5 training images seen so far cannot be read" in line and "img2.png" in line, line
    assert not list((tmp_path / "strict").glob("test_*"))


# ----------------------------------------------------------------------------- torchrun

@pytest.mark.xdist_group("torchrun")  # one torchrun at a time: concurrent launches can meet on one port
def test_torchrun_rank0_prints_one_line_and_the_others_stay_quiet(tmp_path, lm_dirs, tiny_clip_spec, bad_files):
    """A failure of the main process while the others wait for it (building the data, main process first)."""
    logs = tmp_path / "logs"
    runner = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    argv = flags(tmp_path / "out", lm_dirs["gpt2"], tiny_clip_spec, train_file=bad_files / "latin1.jsonl")
    proc = subprocess.run([str(runner), "--standalone", "--nproc_per_node", "2", "--log-dir", str(logs),
                           "--redirects", "3", "-m", "tests.train_ddp_check", *argv],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errs = {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")}
    assert sorted(errs) == [0, 1], proc.stderr[-2000:]
    lines = [line for line in errs[0].splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error: ")] == [lines[-1]]
    assert "latin1.jsonl:1: not UTF-8" in lines[-1]
    for text in errs.values():
        assert "Traceback" not in text and "gloo" not in text.lower(), text[-2000:]
    assert "error:" not in errs[1]
    assert "exitcode  : 2" in proc.stderr
    assert not (tmp_path / "out").exists()
