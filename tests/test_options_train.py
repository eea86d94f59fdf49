"""What the option declarations mean for training: a resume with another value of any result-changing option is
refused naming it (derived from the declarations, before any data or model loads), unless
--ignore_config_mismatch; --config gives the same run as the same flags, and the recorded train_config.yaml runs
it again."""
import shutil

import pytest
import torch
import yaml

import train
from models.checkpoints.weights import read_safetensors
from models.options import keys
from models.training.options import OPTIONS
from tests.test_hostile_train import TRAINED, one_error_line, trained, vg_dir  # noqa: F401 (fixtures)
from tests.test_options_eval import another_value
from tests.test_train import flags
from tests.zoo import reset_accelerate

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")
RESULTS = keys(OPTIONS, "results")
# values whose parsed default differs from what the checkpoint records once resolved
RESOLVED = {"mixed_precision": ["--mixed_precision", "bf16"], "lm_dtype": ["--lm_dtype", "bf16"]}


def without(argv: list[str], flag: str) -> list[str]:
    if flag not in argv:
        return argv
    i = argv.index(flag)
    return argv[:i] + argv[i + 2:]


@pytest.mark.parametrize("name", RESULTS)
def test_a_resume_with_another_value_of_any_result_changing_option_is_refused_naming_it(trained, tmp_path, lm_dirs,
                                                                                      tiny_clip_spec, vg_dir, capsys,
                                                                                      name):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    opt = next(o for o in OPTIONS if o.name == name)
    argv = flags(out, lm_dirs["gpt2"], tiny_clip_spec, vg_dir, resume_from_checkpoint=out / "checkpoint-1", **TRAINED)
    parsed = train.parse_args(argv)
    change = RESOLVED.get(name) or another_value(opt, getattr(parsed, name))
    with pytest.raises(SystemExit) as exc:
        train.main(without(argv, opt.flag) + change)
    line = one_error_line(capsys, 2, exc)
    assert "was made with other settings" in line and f"{name} (checkpoint " in line, line
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in trained.iterdir())


def test_ignore_config_mismatch_resumes_with_a_warning(trained, tmp_path, lm_dirs, tiny_clip_spec, vg_dir, caplog):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    settings = {**TRAINED, "learning_rate": 2e-3, "max_train_steps": 3}
    result = train.main(flags(out, lm_dirs["gpt2"], tiny_clip_spec, vg_dir, resume_from_checkpoint=out / "checkpoint-2",
                              ignore_config_mismatch=True, **settings))
    assert result["completed_steps"] == 3 and len(result["losses"]) == 1
    assert "learning_rate (checkpoint 0.001, now 0.002)" in caplog.text


def test_config_file_gives_the_same_run_as_the_flags_and_the_recorded_yaml_runs_it_again(tmp_path, lm_dirs,
                                                                                      tiny_clip_spec, vg_dir):
    settings = dict(max_train_samples=4, per_device_train_batch_size=2, max_train_steps=3, learning_rate=1e-3,
                    lr_scheduler_type="cosine", num_warmup_steps=1, seed=3)
    by_flags = train.main(flags(tmp_path / "flags", lm_dirs["gpt2"], tiny_clip_spec, vg_dir, **settings))
    reset_accelerate()
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(yaml.safe_dump({**settings, "model_name_or_path": lm_dirs["gpt2"], "vision_encoder": tiny_clip_spec,
                                   "dataset_name": "cropped_vg", "vg_dir": str(vg_dir), "device": "cpu",
                                   "lm_dtype": "fp32", "num_workers": 0}))
    by_file = train.main(["--config", str(cfg), "--output_dir", str(tmp_path / "file")])
    reset_accelerate()
    assert by_file["losses"] == by_flags["losses"] and len(by_flags["losses"]) == 3

    def recorded(folder):
        data = yaml.safe_load((folder / "test_0" / "train_config.yaml").read_text())
        return {k: v for k, v in data.items() if k != "output_dir"}

    assert recorded(tmp_path / "file") == recorded(tmp_path / "flags")
    assert recorded(tmp_path / "flags")["lr_scheduler_type"] == "cosine"
    again = train.main(["--config", str(tmp_path / "flags" / "test_0" / "train_config.yaml"),
                        "--output_dir", str(tmp_path / "again")])
    assert again["losses"] == by_flags["losses"]
    weights = [read_safetensors(tmp_path / d / "test_0" / "model.safetensors") for d in ("flags", "again")]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
