"""eval_scripts/suite.py on the tiny zoo: 3 tasks in one process with one LM load, the same metrics as
the scripts run one by one, the paper's numbers for GPT-2, resuming task by task, and bad input."""
import json
from pathlib import Path

import pytest
import transformers

from eval_scripts import boolq, commonsenseQA, imagenetVC, paper, suite
from eval_scripts.runtime import clear_memos
from eval_scripts.cli import run_main
from tests.paths import EVAL_DATA, TEST_DATA
from tests.zoo import boosted_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
TASKS = ("imagenetvc", "boolq", "piqa")


@pytest.fixture(scope="module")
def zoo(one_thread, tmp_path_factory, lm_dirs, tiny_clip_spec, tiny_sdxl_dir):
    """The tiny GPT-2 in a folder named ``gpt2`` (so the suite shows the paper's GPT-2 numbers) with
    a checkpoint whose images matter."""
    root = tmp_path_factory.mktemp("suite")
    gpt2 = root / "models" / "gpt2"
    gpt2.parent.mkdir()
    gpt2.symlink_to(lm_dirs["gpt2"], target_is_directory=True)
    _, ckpt = boosted_checkpoint(root, str(gpt2), tiny_clip_spec, seed=2)
    common = ["--model_name", str(gpt2), "--pretrained_model", str(ckpt), "--generate_images", "--k", "2",
              "--vision_encoder", tiny_clip_spec, "--image_generator", str(tiny_sdxl_dir), "--image_size", "64",
              "--image_cache", str(root / "cache"), "--limit", "2", "--batch_size", "4", "--device", "cpu",
              "--output_dir", str(root / "out")]
    return {"root": root, "common": common, "out": root / "out"}


@pytest.fixture(scope="module")
def suite_run(zoo):
    loads = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def counting(*args, **kwargs):
        loads.append(args[0])
        return original(*args, **kwargs)
    mp = pytest.MonkeyPatch()
    mp.setattr(transformers.AutoModelForCausalLM, "from_pretrained", counting)
    try:
        clear_memos()
        summary = suite.main(zoo["common"] + ["--run_name", "s", "--tasks", ",".join(TASKS), "--subsets", "color",
                                              "--data_root", str(TEST_DATA)])
    finally:
        mp.undo()
    return summary, loads


def result(zoo, run, name):
    return json.loads((zoo["out"] / run / f"{name}.json").read_text())


def test_suite_runs_three_tasks_with_one_lm_load(suite_run, zoo):
    summary, loads = suite_run
    assert len(loads) == 1 and summary["model_loads"] == 1
    assert [r["task"] for r in summary["rows"]] == list(TASKS)
    for name in ("imagenetvc", "boolq", "commonsense_piqa"):
        assert (zoo["out"] / "s" / f"{name}.json").is_file() and (zoo["out"] / "s" / f"{name}_samples.jsonl").is_file()
    assert result(zoo, "s", "imagenetvc")["config"]["data_dir"] == str(EVAL_DATA / "imagenetvc")  # shipped data
    assert result(zoo, "s", "boolq")["config"]["data_dir"] == str(TEST_DATA / "boolq")  # from --data_root
    assert summary["complete"] and json.loads((zoo["out"] / "s" / "suite.json").read_text())["complete"]


def test_suite_metrics_equal_the_scripts_run_one_by_one(suite_run, zoo):
    common = zoo["common"] + ["--run_name", "separate"]
    alone = {
        "imagenetvc": imagenetVC.main(common + ["--subsets", "color", "--data_dir", str(EVAL_DATA / "imagenetvc")]),
        "boolq": boolq.main(common + ["--data_dir", str(TEST_DATA / "boolq")]),
        "commonsense_piqa": commonsenseQA.main(common + ["--testset", "piqa", "--data_dir", str(TEST_DATA / "piqa")]),
    }
    for name, res in alone.items():
        assert result(zoo, "s", name)["metrics"] == res["metrics"], name
        in_suite = (zoo["out"] / "s" / f"{name}_samples.jsonl").read_text().splitlines()
        by_script = (zoo["out"] / "separate" / f"{name}_samples.jsonl").read_text().splitlines()
        assert [json.loads(x)["prediction"] for x in in_suite] == [json.loads(x)["prediction"] for x in by_script]


def test_suite_groups_with_intervals_and_no_paper_difference_under_limit(suite_run, zoo):
    """A --limit run on a folder named gpt2 (its checkpoint records the folder, not gpt2): the paper's GPT-2 row
    is the one shown, but no number or difference appears; every cell says why."""
    summary, _ = suite_run
    values = {r["task"]: r["value"] for r in summary["rows"]}
    assert values["imagenetvc"] == result(zoo, "s", "imagenetvc")["metrics"]["overall"]["mean"]
    assert values["boolq"] == result(zoo, "s", "boolq")["metrics"]["acc"]
    assert values["piqa"] == result(zoo, "s", "commonsense_piqa")["metrics"]["acc"]
    groups = summary["groups"]
    assert groups["VC"]["value"] == values["imagenetvc"] and groups["CR"]["value"] == values["piqa"]
    assert groups["RC"]["value"] == values["boolq"] and groups["RC"]["tasks"] == ["boolq"]
    assert groups["VC"]["fused"]["value"] == pytest.approx(values["imagenetvc"])
    assert summary["paper"]["model"] == "gpt2" and "2406.13621 v2" in summary["paper"]["source"]["paper"]
    assert summary["recorded_paper_model"] is None
    for g, v in groups.items():
        for setting in paper.SETTINGS:
            assert v["paper"][setting] is None and v["diff"][setting] is None, (g, setting)
            why = v["not_comparable"][setting]
            assert "limit=2" in why and "model: not a paper model" in why, (g, setting, why)
    assert "partial group: 1 of 4 CR tasks" in groups["CR"]["not_comparable"]["late_fusion"]
    assert "k=2 (paper: 6)" in groups["VC"]["not_comparable"]["late_fusion"]
    assert "mix=logits (paper: probs)" in groups["VC"]["not_comparable"]["late_fusion"]
    assert "subsets=color (paper: color,shape,material,component,others)" in groups["VC"]["not_comparable"]["text_only"]
    md = (zoo["out"] / "s" / "suite.md").read_text()
    assert "Δ" not in md.replace("Δ are shown only", "")
    for g in ("VC", "CR", "RC"):
        line = next(x for x in md.splitlines() if x.startswith(f"| {g} "))
        cells = line.split(" | ")
        assert cells[-2].startswith("not comparable: ") and "model: not a paper model; limit=2" in cells[-2], line
        assert cells[-1].startswith("not comparable: ") and "limit=2" in cells[-1], line
    rows = {r["task"]: r for r in summary["rows"]}
    assert rows["boolq"]["protocol"] == {"split": "dev", "limit": 2, "k": 2, "mix": "logits", "image_source": "generate",
                                         "image_generator": rows["boolq"]["protocol"]["image_generator"],
                                         "data_file": None, "settings": {"prompt_format": "released"}}
    assert rows["boolq"]["counts"]["examples"] == 2
    assert "| boolq | acc | " in md and "| dev | 2 | 2 | logits | generate (" in md


def test_suite_intervals_equal_interval_of_the_samples(suite_run, zoo):
    from eval_scripts.intervals import gain_of, interval_of

    summary, _ = suite_run
    rows = {r["task"]: r for r in summary["rows"]}
    samples = [json.loads(x) for x in (zoo["out"] / "s" / "boolq_samples.jsonl").read_text().splitlines()]
    fused = [float(r["correct"]) for r in samples]
    text = [float(r["text_only_prediction"] == r["answer"]) for r in samples]
    assert rows["boolq"]["fused"] == {"value": 100 * sum(fused) / len(fused), **interval_of(fused)}
    assert rows["boolq"]["text_only"] == {"value": 100 * sum(text) / len(text), **interval_of(text)}
    assert rows["boolq"]["gain"] == pytest.approx(gain_of(fused, text))
    assert summary["groups"]["RC"]["gain"] == pytest.approx(gain_of(fused, text))  # one task: its own items
    saved = result(zoo, "s", "boolq")
    assert saved["intervals"]["acc"] == interval_of(fused) and saved["gain"]["acc"] == pytest.approx(gain_of(fused, text))


def test_suite_text_only_column_equals_a_text_only_run(suite_run, zoo):
    summary, _ = suite_run
    text_argv = [a for a in zoo["common"] if a != "--generate_images"] + [
        "--run_name", "text", "--tasks", ",".join(TASKS), "--subsets", "color", "--data_root", str(TEST_DATA)]
    alone = suite.main(text_argv)
    assert alone["setting"] == "text_only"
    ours = {r["task"]: r for r in summary["rows"]}
    for r in alone["rows"]:
        assert r["fused"] is None and r["gain"] is None
        assert ours[r["task"]]["text_only"]["value"] == pytest.approx(r["text_only"]["value"]), r["task"]
        assert ours[r["task"]]["text_only"]["value"] == pytest.approx(r["value"])
    for g, v in alone["groups"].items():
        assert summary["groups"][g]["text_only"]["value"] == pytest.approx(v["text_only"]["value"])
        assert v["not_comparable"]["late_fusion"][-1] == "text-only run"


def test_a_killed_suite_resumes_task_by_task(suite_run, zoo):
    """Finished tasks are reused; the task that was cut short resumes from its partial samples."""
    import shutil

    run = zoo["out"] / "s"
    killed = zoo["out"] / "killed"
    shutil.copytree(run, killed)
    (killed / "commonsense_piqa.json").unlink()
    rows = (killed / "commonsense_piqa_samples.jsonl").read_text().splitlines()
    (killed / "commonsense_piqa_samples.jsonl").unlink()
    (killed / "commonsense_piqa_samples.part0.jsonl").write_text(rows[0] + "\n")
    summary = suite.main(zoo["common"] + ["--run_name", "killed", "--tasks", ",".join(TASKS), "--subsets", "color",
                                          "--data_root", str(TEST_DATA)])
    assert summary["reused"] == ["imagenetvc", "boolq"] and summary["model_loads"] == 1
    resumed = result(zoo, "killed", "commonsense_piqa")
    assert resumed["metrics"] == result(zoo, "s", "commonsense_piqa")["metrics"]
    assert resumed["counts"]["lm_passes"] >= 0 and resumed["counts"]["images_generated"] == 0
    again = suite.main(zoo["common"] + ["--run_name", "killed", "--tasks", ",".join(TASKS), "--subsets", "color",
                                        "--data_root", str(TEST_DATA)])
    assert again["reused"] == list(TASKS) and again["model_loads"] == 0
    assert again["groups"] == summary["groups"]


def test_object_commonsense_beside_table_1(zoo, lm_dirs, tiny_clip_spec, tmp_path):
    """--paper_model names the row shown; a model without a recorded base model is not compared with it."""
    summary = suite.main(["--model_name", lm_dirs["llama"], "--tasks", "object_commonsense", "--sets",
                          "memory_color,relative_size", "--limit", "2", "--paper_model", "gpt2", "--device", "cpu",
                          "--output_dir", str(tmp_path / "out"), "--run_name", "oc"])
    metrics = result({"out": tmp_path / "out"}, "oc", "object_commonsense")["metrics"]
    sets = {s["set"]: s for s in summary["object_commonsense"]}
    assert list(sets) == ["memory_color", "relative_size"]
    assert sets["memory_color"]["value"] == metrics["memory_color"]["mean"]
    assert sets["memory_color"]["text_only"]["value"] == pytest.approx(metrics["memory_color"]["mean"])
    assert sets["memory_color"]["paper"] == {"text_only": None, "late_fusion": None}
    assert sets["relative_size"]["not_comparable"]["text_only"] == ["model: not a paper model", "limit=2"]
    md = (tmp_path / "out" / "oc" / "suite.md").read_text()
    assert "| memory_color | " + f"{metrics['memory_color']['mean']:.1f} [" in md
    assert "not comparable: model: not a paper model; limit=2 | not comparable: " in md
    assert summary["groups"] == {} and "## Groups" not in md


def test_paper_model_names():
    assert paper.model_key("gpt2") == paper.model_key("openai-community/gpt2") == "gpt2"
    assert paper.model_key("/somewhere/gpt2/") == "gpt2"
    assert paper.model_key("google/gemma-2b") == "gemma_2b"
    assert paper.model_key("meta-llama/Meta-Llama-3-8B") == "llama3_8b"
    assert paper.model_key("gpt2-medium") is None and paper.model_key("HuggingFaceTB/SmolLM2-135M") is None
    assert paper.model_key("my/model", "llama3_8b") == "llama3_8b" and paper.model_key("gpt2", "none") is None
    assert paper.value("object_commonsense", "gpt2", "late_fusion", "memory_color") == 72.5  # Table 1
    assert paper.value("groups", "gemma_2b", "text_only", "CR") == 63.8
    assert paper.value("object_commonsense", "gemma_2b", "late_fusion", "memory_color") is None


@pytest.mark.parametrize("extra,message", [
    (["--tasks", "imagenetvc,nosuchtask"], "--tasks: 'nosuchtask' is not one of"),
    (["--tasks", "boolq", "--sets", "shape"], "no selected task has the flag --sets"),
    (["--tasks", "boolq", "--data_dir", "x"], "--data_dir differs per task"),
    (["--tasks", "boolq", "--task_args", "piqa=--protocol harness"], "--task_args"),
    (["--tasks", "boolq", "--task_args", "boolq=--testset piqa"], "its script has no flag --testset"),
    (["--tasks", "boolq,piqa", "--image_prompt", "context"], "boolq: argument --image_prompt"),
    (["--tasks", "boolq", "--paper_model", "gpt5"], "--paper_model: must be one of auto, none"),
])
def test_bad_input_is_one_line_and_exit_2(zoo, tmp_path, capsys, extra, message):
    argv = zoo["common"] + ["--output_dir", str(tmp_path / "out"), "--run_name", "bad"] + extra
    with pytest.raises(SystemExit) as e:
        run_main(suite.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_the_report_reads_a_suite_run(suite_run, zoo, tmp_path):
    """One report over the suite's run directory: every task's examples, PIQA's per-option images."""
    from eval_scripts import report

    info = report.main([str(zoo["out"] / "s"), "--out", str(tmp_path / "suite.html")])
    assert info["shown"] == {"imagenetvc": 10, "boolq": 2, "commonsense_piqa": 2}
    assert all(counts["s"] is not None for counts in info["flips"].values())
    assert Path(info["md"]).read_text().count("| s | 2 |") == 3
