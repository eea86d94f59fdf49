"""train.py's ``--help`` shows every default, and ``--num_workers`` never asks for more workers than CPUs."""
from __future__ import annotations

import argparse
import re
import warnings

import pytest

import train
from models import workers
from models.options import build_parser
from models.training.options import DESCRIPTION, OPTIONS

BASE = ["--model_name_or_path", "lm", "--output_dir", "out", "--device", "cpu"]


def _help_of(parser: argparse.ArgumentParser) -> dict[str, str]:
    return {a.dest: a.help for a in parser._actions if a.dest not in ("help",)}


def test_help_shows_every_default(capsys):
    helps = _help_of(build_parser(OPTIONS, DESCRIPTION))
    for opt in OPTIONS:
        text = helps[opt.name]
        assert "default" in text.lower() or text.endswith("required") or "(required)" in text, (opt.name, text)
    assert helps["seed"].endswith("(default: 42)")
    assert helps["output_dir"] == "required"  # no help text of its own: still says what it needs
    assert helps["with_tracking"].endswith("(default: off)")
    assert helps["max_train_steps"].endswith("(default: none)")
    assert helps["logging_steps"] == "default: 10"
    assert f"{workers.default_workers()} here" in helps["num_workers"]
    with pytest.raises(SystemExit) as exc:
        train.parse_args(["--help"])
    assert exc.value.code == 0
    out = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert "(default: 42)" in out and "--learning_rate LEARNING_RATE default: 5e-05" in out


def test_num_workers_default_is_at_most_the_cpu_count():
    assert workers.default_workers() == min(4, workers.available_cpus())
    args = train.parse_args(BASE)
    assert args.num_workers == min(4, workers.available_cpus())


def test_num_workers_above_the_cpu_count_is_lowered_with_one_warning(capsys):
    import torch
    from torch.utils.data import DataLoader

    cpus = workers.available_cpus()
    args = train.parse_args([*BASE, "--num_workers", str(cpus + 3)])
    assert args.num_workers == cpus
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: --num_workers {cpus + 3}: this process may use {cpus} CPU(s); using {cpus} "
                   "DataLoader worker(s)"]
    assert train.parse_args([*BASE, "--num_workers", str(cpus)]).num_workers == cpus
    assert capsys.readouterr().err == ""
    with warnings.catch_warnings():  # PyTorch's "suggested max number of worker" check stays quiet
        warnings.simplefilter("error")
        DataLoader(torch.arange(4), num_workers=args.num_workers).check_worker_number_rationality()


def test_capped_workers_when_the_machine_has_two_cpus(monkeypatch):
    monkeypatch.setattr(workers, "available_cpus", lambda: 2)
    assert workers.capped_workers(0) == (0, None)
    assert workers.capped_workers(2) == (2, None)
    assert workers.capped_workers(4)[0] == 2 and "using 2" in workers.capped_workers(4)[1]
    assert workers.default_workers() == 2
