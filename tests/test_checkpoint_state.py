"""A checkpoint's JSON state is checked against the run's flags on resume, whatever the hashes in its marker
say (``check_training_state`` in ``models/checkpoints/training_state.py``): the learning rate must be the one
the schedule gives at its step, its step within the run, its epoch consistent with its step."""
from __future__ import annotations

import pytest
import torch

import train
from models.checkpoints.training_state import expected_learning_rate
from models.training.options import SCHEDULERS
from tests.test_hostile_train import (TRAINED, copy_run, edit_component, listing, one_error_line,  # noqa: F401
                                      trained, vg_dir)
from tests.test_train import flags

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")


@pytest.mark.parametrize("kind", SCHEDULERS)
@pytest.mark.parametrize("processes", [1, 2])
def test_expected_learning_rate_is_the_stepped_schedule(kind, processes):
    from transformers import get_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=3e-4)
    schedule = get_scheduler(kind, optimizer=optimizer, num_warmup_steps=3 * processes,
                             num_training_steps=10 * processes)
    for step in range(1, 11):
        for _ in range(processes):
            optimizer.step()
            schedule.step()
        want = expected_learning_rate(step, learning_rate=3e-4, lr_scheduler_type=kind, num_warmup_steps=3,
                                      max_train_steps=10, num_processes=processes)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12, abs=1e-18)
    assert expected_learning_rate(2, learning_rate=1.0, lr_scheduler_type="linear", num_warmup_steps=4,
                                  max_train_steps=10, num_processes=1) == 0.5  # by hand: 2/4 of the way up


def _lr(value):
    def change(o):
        for g in o["param_groups"]:
            g["lr"] = value
    return change


def _everywhere(value):
    """lr, initial_lr, base_lrs and _last_lr all forged alike (the scheduler and the optimizer agree)."""
    def optimizer(o):
        for g in o["param_groups"]:
            g.update(lr=value, initial_lr=value)

    def scheduler(o):
        o.update(base_lrs=[value], _last_lr=[value])
    return [("optimizer", optimizer), ("scheduler", scheduler)]


# name: ([(component, change)], extra flags, what the line must say)
FORGED_STATE = {
    "optimizer lr 1000": ([("optimizer", _lr(1000.0))], {}, "optimizer.json: its parameter groups hold learning rate '1000.0', not 0.0005"),
    "scheduler last lr 1000": ([("scheduler", lambda o: o.update(_last_lr=[1000.0]))], {},
                               "scheduler.json: _last_lr [1000.0] is not"),
    "lr 1000 everywhere": (_everywhere(1000.0), {}, "scheduler.json: base_lrs [1000.0] is not 0.001"),
    "lr 1000 everywhere, resumed ignoring mismatches": (_everywhere(1000.0), {"ignore_config_mismatch": True},
                                                        "base_lrs [1000.0] is not 0.001"),
    "steps past max": ([("trainer_state", lambda o: o.update(completed_steps=50))], {},
                       "completed_steps 50 is past this run's 2 optimizer steps"),
    "steps past max, lr and scheduler to match": (
        [("trainer_state", lambda o: o.update(completed_steps=50)),
         ("scheduler", lambda o: o.update(last_epoch=50))], {}, "completed_steps 50 is past"),
    "epoch ahead of the step": ([("trainer_state", lambda o: o.update(epoch=3))], {},
                                "epoch 3 and batches_in_epoch 1 do not match completed_steps 1"),
    "position past the epoch": ([("trainer_state", lambda o: o.update(batches_in_epoch=7))], {},
                                "batches_in_epoch 7 do not match"),
    "scheduler count forged": ([("scheduler", lambda o: o.update(last_epoch=9))], {},
                               "the scheduler counted 9 steps"),
    "more bad images than seen": ([("trainer_state", lambda o: o.update(bad_images=99))], {},
                                  "bad_images 99 exceeds images_seen"),
    "accumulation step past the accumulation": ([("trainer_state", lambda o: o.update(accumulation_step=4))], {},
                                                "accumulation_step 4 is not batches_in_epoch 1"),
}


@pytest.mark.parametrize("case", list(FORGED_STATE))
def test_forged_state_with_recomputed_hashes_is_refused(case, trained, tmp_path, lm_dirs, tiny_clip_spec, vg_dir,
                                                         capsys):
    edits, extra, expected = FORGED_STATE[case]
    out = copy_run(trained, tmp_path)
    for name, change in edits:
        edit_component(out / "checkpoint-1", name, change)  # and the marker's sizes and hashes to match
    before = listing(out)
    with pytest.raises(SystemExit) as exc:
        train.main(flags(out, lm_dirs["gpt2"], tiny_clip_spec, vg_dir, resume_from_checkpoint=out / "checkpoint-1",
                         **TRAINED, **extra))
    line = one_error_line(capsys, 2, exc)
    assert line.startswith("error: --resume_from_checkpoint: ") and expected in line, line
    assert listing(out) == before  # nothing written, nothing deleted


def test_forged_config_to_match_the_forged_lr_is_a_config_mismatch(trained, tmp_path, lm_dirs, tiny_clip_spec,
                                                                   vg_dir, capsys):
    out = copy_run(trained, tmp_path)
    for name, change in _everywhere(1000.0):
        edit_component(out / "checkpoint-1", name, change)
    edit_component(out / "checkpoint-1", "trainer_state", lambda o: o["config"].update(learning_rate=1000.0))
    with pytest.raises(SystemExit) as exc:
        train.main(flags(out, lm_dirs["gpt2"], tiny_clip_spec, vg_dir, resume_from_checkpoint=out / "checkpoint-1",
                         **TRAINED))
    line = one_error_line(capsys, 2, exc)
    assert "learning_rate (checkpoint 1000.0, now 0.001)" in line, line


def test_an_honest_checkpoint_resumes_with_warmup_and_another_schedule(tmp_path, lm_dirs, tiny_clip_spec, vg_dir):
    """The check accepts what train.py writes: a warmup, a cosine schedule, accumulation, resumed mid-epoch."""
    from tests.zoo import reset_accelerate

    settings = dict(max_train_samples=8, per_device_train_batch_size=2, max_train_steps=3, learning_rate=1e-3,
                    checkpointing_steps=1, num_warmup_steps=2, lr_scheduler_type="cosine",
                    gradient_accumulation_steps=2)
    out = tmp_path / "out"
    full = train.main(flags(out, lm_dirs["gpt2"], tiny_clip_spec, vg_dir, **settings))
    reset_accelerate()
    resumed = train.main(flags(out, lm_dirs["gpt2"], tiny_clip_spec, vg_dir, resume_from_checkpoint=out / "checkpoint-1",
                               **settings))
    assert resumed["completed_steps"] == 3 and resumed["lrs"] == pytest.approx(full["lrs"][1:], rel=1e-12)
