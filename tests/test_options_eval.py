"""What the option declarations mean for evaluation runs: every result-changing option locks a run name
(derived from the declarations, so a new option is covered without editing this file), and --config gives the
same run as the same flags; the recorded YAML re-runs to identical metrics."""
import json
from pathlib import Path

import pytest
import yaml

from eval_scripts.cli import run_main
from eval_scripts.imagenetVC import OPTIONS, main
from models.options import Option, keys
from tests.paths import EVAL_DATA

pytestmark = pytest.mark.usefixtures("one_thread")
RESULTS = keys(OPTIONS, "results")


def base(lm_dir: str, out: Path, run_name: str = "same") -> list[str]:
    return ["--model_name", lm_dir, "--subsets", "color", "--data_dir", str(EVAL_DATA / "imagenetvc"), "--limit", "1",
            "--output_dir", str(out), "--run_name", run_name, "--device", "cpu", "--batch_size", "5"]


def another_value(opt: Option, current) -> list[str]:
    """Command-line tokens that set ``opt`` to a valid value other than ``current``."""
    if opt.kind == "flag":
        assert current is False
        return [opt.flag]
    if opt.kind == "switch":
        return [opt.flag, "False" if current else "True"]
    if opt.kind == "choice":
        return [opt.flag, str(next(c for c in opt.choice_values if c != current))]
    if opt.kind == "list":
        return [opt.flag, next(c for c in opt.choice_values if c not in (current or []))]
    if opt.kind == "int":
        value = 1 if current is None else current + 1
        value = value if opt.high is None or value <= opt.high else current - 1
        return [opt.flag, str(max(value, int(opt.low or 0) + (1 if opt.low_open else 0)))]
    if opt.kind == "float":
        value = 0.5 if current is None else current + 0.25
        if opt.high is not None and value > opt.high:
            value = current - 0.25
        return [opt.flag, str(value)]
    return [opt.flag, f"{current or 'x'}-other"]


@pytest.fixture(scope="module")
def first_run(lm_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("locked")
    result = main(base(lm_dirs["llama"], out))
    return out, result


@pytest.mark.parametrize("name", RESULTS)
def test_a_rerun_with_another_value_of_any_result_changing_option_is_refused_naming_it(first_run, lm_dirs, capsys,
                                                                                     name):
    out, result = first_run
    opt = next(o for o in OPTIONS if o.name == name)
    current = result["config"][name]
    argv = [a for a in base(lm_dirs["llama"], out)]
    if name in ("subsets", "model_name"):  # given by base(): replace its value
        i = argv.index(opt.flag)
        del argv[i:i + 2]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(main, argv + another_value(opt, current))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and line.startswith("error: run 'same' was started with ") and f"--{name} " in line, line
    run_dir = out / "same"
    assert json.loads((run_dir / "imagenetvc.json").read_text())["metrics"] == result["metrics"]


def test_every_declared_result_option_is_in_the_resume_file(first_run):
    out, _ = first_run
    assert set(json.loads((out / "same" / "imagenetvc.run.json").read_text())) == set(RESULTS)


def test_toyworld_noise_locks_the_run_name(lm_dirs, tiny_clip_spec, tmp_path, capsys):
    """The case of issue 20: a toy-world run re-run under its name with another noise was silently resumed."""
    def argv(noise):
        return base(lm_dirs["llama"], tmp_path) + ["--image_generator", "toyworld", "--k", "2", "--generate_images",
                                                   "--vision_encoder", tiny_clip_spec, "--image_size", "32",
                                                   "--image_cache", str(tmp_path / "cache"), "--toyworld_noise", noise]

    first = main(argv("0.0"))
    assert first["counts"]["images_generated"] > 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_main(main, argv("1.0"))
    assert "was started with --toyworld_noise 0.0, not 1.0" in capsys.readouterr().err
    assert json.loads((tmp_path / "same" / "imagenetvc.json").read_text())["config"]["toyworld_noise"] == 0.0


def test_config_file_gives_the_same_run_as_the_flags_and_the_recorded_yaml_reruns_it(lm_dirs, tmp_path):
    flags = ["--scoring", "full", "--k", "3", "--mix", "probs", "--seed", "5"]
    by_flags = main(base(lm_dirs["llama"], tmp_path, "flags") + flags)
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("scoring: full\nk: 3\nmix: probs\nseed: 5\n")
    by_file = main(base(lm_dirs["llama"], tmp_path, "file") + ["--config", str(cfg)])
    config_of = {k: v for k, v in by_flags["config"].items() if k != "run_name"}
    assert {k: v for k, v in by_file["config"].items() if k != "run_name"} == config_of
    assert by_file["metrics"] == by_flags["metrics"]

    recorded = tmp_path / "flags" / "imagenetvc.config.yaml"
    text = recorded.read_text()
    assert text.startswith("#") and yaml.safe_load(text)["scoring"] == "full"
    again = main(["--config", str(recorded), "--run_name", "again"])  # everything else comes from the file
    assert {k: v for k, v in again["config"].items() if k != "run_name"} == config_of
    assert again["metrics"] == by_flags["metrics"] and again["counts"]["examples"] == by_flags["counts"]["examples"]
    rows = [json.loads(x) for x in (tmp_path / "again" / "imagenetvc_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(r["scores"] for r in rows)  # recomputed under the new name, not copied
