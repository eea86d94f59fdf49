"""One run-name rule for every entry point that writes a folder named after its run (``models/run_names.py``):
train.py, the eval scripts, the suite, and each of them through ``--config``. A bad name is one ``error:`` line,
exit status 2, and nothing is written anywhere (not even the escaped folder two levels up)."""
from __future__ import annotations

import re

import pytest

from models.run_names import run_name_problem

BAD_NAMES = ["../../escaped", "..", ".", "", "   ", "a/b", "a\\b", "/abs", "C:x", "x\ny", "x\0y"]
GOOD_NAMES = ["test", "run-2024_01", "a..b", "llama3 stage1", "é"]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_plain_names_pass(name):
    assert run_name_problem(name) is None


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_named(name):
    problem = run_name_problem(name)
    assert problem and "plain folder name" in problem and "\n" not in problem


def _train(argv):
    import train

    train.main(argv)


def _eval(argv):
    from eval_scripts import imagenetVC
    from eval_scripts.cli import run_main

    run_main(imagenetVC.main, argv)


def _suite(argv):
    from eval_scripts import suite
    from eval_scripts.cli import run_main

    run_main(suite.main, argv)


# entry point: (how to run it, its valid command before the run name; "{out}" is the output folder)
ENTRY_POINTS = {
    "train.py": (_train, ["--model_name_or_path", "{tmp}/lm", "--output_dir", "{out}", "--device", "cpu",
                          "--dataset_name", "cropped_vg", "--vg_dir", "{tmp}/vg"]),
    "imagenetVC": (_eval, ["--model_name", "{tmp}/lm", "--output_dir", "{out}", "--device", "cpu"]),
    "suite": (_suite, ["--model_name", "{tmp}/lm", "--output_dir", "{out}", "--device", "cpu",
                       "--tasks", "imagenetvc"]),
}


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("how", ["flag", "config"])
@pytest.mark.parametrize("name", ["../../escaped", "/abs_run", "a/b", ".."])
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_entry_point_refuses_a_bad_run_name(entry, name, how, tmp_path, monkeypatch, capsys):
    run, base = ENTRY_POINTS[entry]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    out = work / "o1" / "o2"
    argv = [a.format(tmp=tmp_path, out=out) for a in base]
    if how == "flag":
        argv += ["--run_name", name]
    elif entry == "suite":  # the suite hands the name to every task: its config file has a per-task section
        config = tmp_path / "suite.yaml"
        config.write_text(f"run_name: {name!r}\n")
        argv += ["--config", str(config)]
    else:
        config = tmp_path / "run.yaml"
        config.write_text(f"run_name: {name!r}\n")
        argv += ["--config", str(config)]
    before = _files(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "plain folder name" in lines[0], lines
    assert _files(tmp_path) == before
    assert not (tmp_path / "escaped").exists() and not list(tmp_path.glob("escaped*"))
