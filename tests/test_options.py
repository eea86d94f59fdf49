"""Option declarations (models/options) and what is derived from them: conversion and ranges, the command
line over --config over defaults, config-file errors, the same range at every entry point, shipped configs."""
import subprocess
import sys
from pathlib import Path

import pytest

from models.options import Option, OptionError, Settings, by_name, config_yaml, keys, parse, read_config
from models.options import catalog

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- one option
@pytest.mark.parametrize("opt, given, expected", [
    (Option("n", kind="int", low=1), "3", 3),
    (Option("n", kind="int", low=1), 3, 3),
    (Option("n", kind="int", low=1), 3.0, 3),
    (Option("x", kind="float", low=0.0, high=1.0), "0.25", 0.25),
    (Option("x", kind="float", low=0.0, high=1.0), 1, 1.0),
    (Option("s", kind="switch"), "False", False),
    (Option("s", kind="switch"), "on", True),
    (Option("s", kind="switch"), True, True),
    (Option("c", kind="choice", choices=(2, 103)), "103", 103),
    (Option("c", kind="choice", choices=("a", "b")), "b", "b"),
    (Option("l", kind="list", choices=("a", "b", "c")), "c, a", ["c", "a"]),
    (Option("l", kind="list", choices=("a", "b", "c")), ["b"], ["b"]),
    (Option("w", kind="int", low=1, words=("epoch",)), "epoch", "epoch"),
    (Option("p"), "some/path", "some/path"),
])
def test_convert_gives_the_declared_type(opt, given, expected):
    out = opt.convert(given)
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize("opt, given, message", [
    (Option("n", kind="int", low=1), "0", "must be an integer >= 1, got '0'"),
    (Option("n", kind="int", low=1), "1.5", "must be an integer >= 1, got '1.5'"),
    (Option("n", kind="int", low=1), 2.5, "must be an integer >= 1, got 2.5"),
    (Option("n", kind="int", low=1), True, "must be an integer"),
    (Option("x", kind="float", low=0.0, high=1.0), "nan", "must be a finite number >= 0 and <= 1, got 'nan'"),
    (Option("x", kind="float", low=0.0, high=1.0), "inf", "finite"),
    (Option("x", kind="float", low=0.0, high=1.0), 1.5, "<= 1, got 1.5"),
    (Option("x", kind="float", low=0.0, low_open=True), "0", "must be a finite number > 0, got '0'"),
    (Option("s", kind="switch"), "maybe", "must be true or false, got 'maybe'"),
    (Option("c", kind="choice", choices=("a", "b")), "z", "must be one of a, b, got 'z'"),
    (Option("l", kind="list", choices=("a", "b")), "a,z", "'z' is not one of a, b"),
    (Option("l", kind="list", choices=("a", "b")), ",", "must be a comma-separated list of a, b"),
    (Option("p"), {"a": 1}, "must be a string"),
    (Option("w", kind="int", low=1, words=("epoch",)), "epochs", "or 'epoch'"),
])
def test_convert_refuses_in_one_line_saying_what_is_allowed(opt, given, message):
    with pytest.raises(OptionError) as err:
        opt.convert(given)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_name_is_declared_once_per_entry_point():
    with pytest.raises(TypeError, match="declared twice"):
        by_name([catalog.K, catalog.K.replace(default=3)])


def test_settings_are_read_only():
    s = Settings(k=2)
    with pytest.raises(AttributeError, match="read-only"):
        s.k = 3
    assert s.replace(k=3).k == 3 and s.k == 2


# ---------------------------------------------------------------------------------------------- precedence
OPTS = (catalog.K, catalog.MIX, catalog.GUIDANCE_SCALE, Option("tasks", kind="list", choices=("a", "b"), default=["a"]))


def test_command_line_wins_over_config_which_wins_over_defaults(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("k: 4\nmix: probs\n")
    assert parse(OPTS, []).k == 10 and parse(OPTS, []).mix == "logits"
    s = parse(OPTS, ["--config", str(cfg)])
    assert (s.k, s.mix, s.guidance_scale, s.config) == (4, "probs", 0.0, str(cfg))
    s = parse(OPTS, ["--config", str(cfg), "--k", "2"])
    assert (s.k, s.mix) == (2, "probs")
    s = parse(OPTS, ["--k", "2", "--config", str(cfg)])  # wherever --config stands
    assert s.k == 2


def test_recorded_yaml_reads_back_as_the_same_settings(tmp_path):
    s = parse(OPTS, ["--k", "3", "--mix", "probs", "--tasks", "b,a", "--guidance_scale", "1.5"])
    path = tmp_path / "rec.yaml"
    path.write_text(config_yaml(s, OPTS, "header line"))
    assert path.read_text().startswith("# header line\n")
    back = parse(OPTS, ["--config", str(path)])
    assert {o.name: getattr(back, o.name) for o in OPTS} == {o.name: getattr(s, o.name) for o in OPTS}


@pytest.mark.parametrize("text, message", [
    ("kk: 3\n", "unknown key 'kk'; allowed: k, mix, guidance_scale, tasks"),
    ("k: three\n", "k: must be an integer >= 0, got 'three'"),
    ("k: -1\n", "k: must be an integer >= 0, got -1"),
    ("guidance_scale: -1\n", "guidance_scale: must be a finite number >= 0, got -1"),
    ("mix: mean\n", "mix: must be one of logits, probs, got 'mean'"),
    ("k: [1, 2\n", "not valid YAML at line"),
    ("- k\n- 3\n", "must be a mapping of option names to values, got a list"),
    ("k: !!python/object/apply:os.system ['echo pwned']\n", "not valid YAML"),
    ("k: null\n", "k: must be an integer >= 0, got null"),
])
def test_config_errors_name_the_file_the_key_and_what_is_allowed(tmp_path, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(OptionError) as err:
        read_config(cfg, OPTS)
    line = str(err.value)
    assert line.startswith(f"--config {cfg}: ") and message in line and "\n" not in line, line


def test_config_files_are_bounded_and_must_exist(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("k: 1\n" + "#" * (1 << 20))
    with pytest.raises(OptionError, match="holds at most"):
        read_config(big, OPTS)
    with pytest.raises(OptionError, match="no such file"):
        read_config(tmp_path / "missing.yaml", OPTS)


@pytest.mark.parametrize("entry", ["eval_scripts/imagenetVC.py", "train.py", "-m eval_scripts.suite"])
def test_a_bad_config_file_is_one_line_and_exit_2_before_anything_loads(tmp_path, entry):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("guidance_scale: -1\n")
    out = tmp_path / "out"
    argv = [*entry.split(), "--config", str(cfg), "--output_dir", str(out)]
    if entry == "train.py":
        argv += ["--model_name_or_path", "gpt2"]
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and f"--config {cfg}: guidance_scale: must be a finite number >= 0" in lines[0]
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- every entry point
def _entry_points():
    """Every entry point's option declarations."""
    from eval_scripts import harness, registry, suite
    from models.training import options as train_options

    out = {"train.py": train_options.OPTIONS, "harness": harness.HARNESS_OPTIONS, "suite": suite.SUITE_OPTIONS}
    for b in registry.benchmarks().values():
        out[b.script] = b.module.OPTIONS
    return out


RANGE_FIELDS = ("kind", "low", "high", "low_open", "words", "check")


def test_a_shared_option_has_one_range_everywhere():
    """Every option that two entry points share is the same declaration (defaults and help may differ;
    the type and range may not)."""
    seen: dict[str, tuple] = {}
    shared = 0
    for entry, options in _entry_points().items():
        for opt in options:
            rule = tuple(getattr(opt, f) for f in RANGE_FIELDS)
            if opt.name in seen:
                shared += 1
                assert rule == seen[opt.name][1], f"--{opt.name}: {entry} and {seen[opt.name][0]} differ"
            else:
                seen[opt.name] = (entry, rule)
    assert shared > 50 and {"guidance_scale", "image_size", "toyworld_noise", "seed"} <= set(seen)


def test_guidance_scale_minus_one_is_refused_by_every_entry_point(tmp_path):
    from eval_scripts import suite
    from eval_scripts.cli import EvalError
    from eval_scripts.harness import parse_model_args
    from eval_scripts.registry import benchmarks
    from models.training.options import OPTIONS as TRAIN

    for b in benchmarks().values():
        with pytest.raises(ValueError, match="--guidance_scale: must be a finite number >= 0"):
            b.module.parse_args([*b.argv, "--guidance_scale", "-1"])
    with pytest.raises(EvalError, match="--guidance_scale: must be a finite number >= 0"):
        suite.parse_args(["--tasks", "boolq", "--guidance_scale", "-1"])
    with pytest.raises(EvalError, match="guidance_scale: must be a finite number >= 0"):
        parse_model_args({"guidance_scale": -1})
    with pytest.raises(OptionError, match="--guidance_scale: must be a finite number >= 0"):
        parse(TRAIN, ["--model_name_or_path", "m", "--output_dir", str(tmp_path), "--guidance_scale", "-1"],
              raise_errors=True)


def test_derived_key_sets():
    from eval_scripts.imagenetVC import OPTIONS
    from eval_scripts.results import COSMETIC
    from eval_scripts.runtime import RUNTIME_KEYS

    resume = keys(OPTIONS, "results")
    assert {"toyworld_noise", "guidance_scale", "k", "mix", "subsets", "scoring", "dtype"} <= set(resume)
    assert not {"run_name", "output_dir", "batch_size", "device", "limit", "image_cache"} & set(resume)
    assert set(COSMETIC) == {"image_cache", "gen_batch_size", "faiss_threshold", "batch_size", "device",
                             "output_dir", "run_name", "prefix_cache", "prefix_store", "compile",
                             "channels_last"}
    assert {"model_name", "vision_encoder", "image_generator", "toyworld_noise", "image_index"} <= set(RUNTIME_KEYS)
    assert "mix" not in RUNTIME_KEYS  # mixing is per task: one runtime serves several mixes


# ---------------------------------------------------------------------------------------------- shipped configs
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO)) for p in CONFIGS])
def test_every_shipped_config_is_read_by_its_entry_point(path):
    from eval_scripts import suite
    from eval_scripts.imagenetVC import parse_args as vc_args
    from models.training import options as train_options

    text = path.read_text()
    assert text.startswith("#"), "a shipped config says where its numbers come from"
    if "stage" in path.name:
        s = parse(train_options.OPTIONS, ["--config", str(path)], raise_errors=True)
        assert s.learning_rate in (5e-4, 5e-5) and s.lr_scheduler_type == "linear" and s.mixed_precision == "bf16"
        assert s.per_device_train_batch_size * s.gradient_accumulation_steps in (64, 128)
    elif "suite" in path.name:
        own, tasks = suite.parse_args(["--config", str(path)])
        assert all(t.k == 6 for t in tasks.values())
    else:
        s = vc_args(["--config", str(path)])
        assert s.k == 6 and s.mix == "probs" and s.generate_images is True
    assert CONFIGS and len(CONFIGS) >= 8
