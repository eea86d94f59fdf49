"""Smoke tests of the benchmark scripts on the tiny zoo: they run, print their ratio lines, and count
what the protocol says they must (the timings themselves are not checked)."""
from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    """Import a benchmark script by path: pysbd installs an unrelated top-level ``benchmarks`` package."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


eval_cost, train_cost = _load("eval_cost"), _load("train_cost")


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-zoo")


@pytest.fixture(autouse=True)
def _restore_threads():
    """The scripts' ``--threads 1`` (much faster on a busy 2-core machine) is process-wide: undo it."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_eval_cost_counts_and_ratios(zoo_dir, tmp_path, capsys):
    k, questions, batch = 2, 2, 8
    out = tmp_path / "eval.json"
    result = eval_cost.main(["--tiny", "--zoo_dir", str(zoo_dir), "--work_dir", str(tmp_path / "work"),
                             "--questions", str(questions), "--k", str(k), "--batch_size", str(batch),
                             "--no_warmup", "--threads", "1", "--out", str(out)])
    text = capsys.readouterr().out
    per_question = re.search(r"^images per question: (\S+) \(released protocol: 5 x k = (\d+)", text, re.M)
    assert per_question and float(per_question.group(1)) == k and int(per_question.group(2)) == 5 * k
    assert re.search(r"^images generated / \(k x distinct image prompts = 2 x 2\): 1$", text, re.M)
    assert re.search(r"^warm-cache time / text-only time: \d+\.\d{3}$", text, re.M)
    assert re.search(r"^cold-cache time / warm-cache time: \d+\.\d{3}$", text, re.M)
    assert re.search(r"^cold-cache time / \(generation time \+ text-only time\): \d+\.\d{3}$", text, re.M)

    ways = result["ways"]
    items = questions * 5
    assert {w: ways[w]["questions"] for w in ways} == {"text": 2, "cold": 2, "warm": 2}
    assert ways["cold"]["images_generated"] == k * questions  # each question's k images, once for 5 templates
    assert ways["warm"]["images_generated"] == 0
    for w in ("cold", "warm"):  # every slot counted once
        c = ways[w]
        assert c["image_slots"] == items * k == c["images_generated"] + c["images_from_cache"] + c["images_reused"]
    assert ways["warm"]["images_from_cache"] == ways["warm"]["vision_features_read"] == k * questions
    assert ways["cold"]["vision_features_computed"] == k * questions and ways["warm"]["vision_features_computed"] == 0
    assert ways["warm"]["pngs_decoded"] == 0
    assert [ways[w]["pipeline_constructions"] for w in ("text", "cold", "warm")] == [0, 1, 0]
    assert ways["text"]["lm_passes"] == math.ceil(items / batch) and ways["text"]["fusion_passes"] == 0
    assert ways["cold"]["lm_passes"] == ways["warm"]["lm_passes"] == math.ceil(items / batch)  # no memo carried over
    assert ways["warm"]["seconds"]["generation"] < ways["cold"]["seconds"]["generation"]
    r = result["ratios"]
    assert r["warm_over_text"] == round(ways["warm"]["loop_s"] / ways["text"]["loop_s"], 3)
    floor = ways["cold"]["seconds"]["generation"] + ways["text"]["loop_s"]
    assert r["cold_over_floor"] == round(ways["cold"]["loop_s"] / floor, 3)
    assert json.loads(out.read_text())["ratios"] == r


def test_train_cost_configs(zoo_dir, tmp_path, capsys):
    out = tmp_path / "train.json"
    result = train_cost.main(["--tiny", "--zoo_dir", str(zoo_dir), "--work_dir", str(tmp_path), "--batch_size", "4",
                              "--steps", "2", "--warmup", "1", "--threads", "1", "--out", str(out)])
    text = capsys.readouterr().out
    rows = {r["config"]: r for r in result["configs"]}
    assert list(rows) == ["base", "workers", "precomputed", "bf16"]
    assert (rows["workers"]["workers"], rows["bf16"]["lm_dtype"], rows["precomputed"]["features"]) == \
        (2, "bf16", "precomputed")
    for name, row in rows.items():
        split = row["split_ms"]
        assert abs(sum(split.values()) - row["step_ms"]) < 0.05
        assert row["samples_per_s"] == pytest.approx(4 / (row["step_ms"] / 1000), rel=1e-3)
        assert len(row["losses"]) == 3 and all(math.isfinite(x) for x in row["losses"])
        assert re.search(rf"^{name}\s+{row['workers']}\s+{row['lm_dtype']}\s", text, re.M)
    assert rows["precomputed"]["split_ms"]["data"] == rows["precomputed"]["split_ms"]["vision"] == 0.0
    assert rows["base"]["split_ms"]["lm"] > 0 and rows["base"]["split_ms"]["vision"] > 0
    assert re.search(r"^precomputed vs base: \d+\.\d\dx samples/s$", text, re.M)
    assert json.loads(out.read_text())["configs"] == result["configs"]


def test_eval_cost_fast512_and_startup(zoo_dir, tmp_path, capsys):
    result = eval_cost.main(["--tiny", "--zoo_dir", str(zoo_dir), "--work_dir", str(tmp_path / "work"),
                             "--questions", "1", "--k", "2", "--generator", "fast512", "--ways", "cold,warm",
                             "--no_warmup", "--threads", "1", "--startup", "1"])
    text = capsys.readouterr().out
    ways = result["ways"]
    assert result["generator"] == "fast512" and result["flags"]["image_size"] == "512"
    assert (ways["cold"]["images_generated"], ways["cold"]["pipeline_constructions"]) == (2, 0)  # no model at all
    assert ways["cold"]["split_s"]["writer_png"] > 0 and ways["warm"]["vision_features_read"] == 2
    assert re.search(r"^cold-cache time / warm-cache time: \d+\.\d{3}$", text, re.M)
    startup = result["startup"]["this"]
    assert set(startup) == {"help", "one_question"} and all(v["wall_s"] > 0 for v in startup.values())
    assert re.search(r"^start-up this +help +wall \d+\.\d{3} s", text, re.M)
    with pytest.raises(SystemExit):
        eval_cost.parse_args(["--generator", "fast512", "--image_size", "64"])


def test_prefix_ratios_pair_each_warm_run_with_the_text_only_run_next_to_it():
    """--prefix_compare: warm / text-only uses the variant's own text-only run, the hit rate counts disk reads
    as reused, and the cold target divides by warm + generation + vision (hand-computed numbers)."""
    def way(loop, lm=1.0, fusion=0.0, clip=0.0, gen=0.0, computed=None, reused=None):
        return {"loop_s": loop, "seconds": {"lm": lm, "fusion": fusion, "clip": clip, "generation": gen},
                "prefix_computed": computed, "prefix_reused": reused}
    ways = {"text": way(2.0), "text_after": way(4.0), "warm_after": way(5.0, lm=3.5, fusion=0.5, computed=0, reused=60),
            "cold_after": way(11.0, clip=4.0, gen=1.0, computed=12, reused=48),
            "warm_before": way(8.0, fusion=3.0)}
    after = eval_cost.prefix_ratios(ways, "after")
    assert after["warm_over_text"] == 1.25 and after["text_loop_s"] == 4.0      # 5 / 4, not 5 / 2
    assert after["warm_split_s"] == {"lm": 3.5, "fusion": 0.5, "rest": 1.0}
    assert after["cold_over_warm_generation_vision"] == 1.1                    # 11 / (5 + 1 + 4)
    assert after["cold_over_generation_text_vision"] == round(11 / (1 + 2 + 4), 3)
    assert (after["cold_prefix_hit_rate"], after["warm_prefix_hit_rate"]) == (0.8, 1.0)
    assert eval_cost.prefix_ratios(ways, "before")["warm_over_text"] == 4.0    # no pair: the first text-only run
    report = eval_cost.prefix_report(ways, {v: eval_cost.prefix_ratios(ways, v) for v, _ in eval_cost.PREFIX_VARIANTS})
    assert re.search(r"warm loop / text-only loop\s+4\.0\s+None\s+1\.25", report)
