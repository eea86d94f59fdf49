"""The benchmark registry: every eval script declares its benchmarks, the registry finds them by scanning
the package (a new module is picked up with nothing else edited), checks them, maps result files back
to them, and reads headlines, subsets and metrics from samples as the paper reports them."""
import importlib
import json
import math
import subprocess
import sys
import textwrap

import pytest

import eval_scripts
from data.benchmarks import COMMONSENSE_TESTSETS
from eval_scripts import registry, suite
from eval_scripts.benchmark import Benchmark
from eval_scripts.cli import EvalError
from eval_scripts.registry import DeclarationError, headline, metrics_from_samples, subset_values
from tests.paths import REPO

NOT_BENCHMARKS = ("harness.py", "report.py", "suite.py")  # entry points that run no benchmark of their own
SCRIPTS = sorted(p.stem for p in (REPO / "eval_scripts").glob("*.py")
                 if 'if __name__ == "__main__":' in p.read_text() and p.name not in NOT_BENCHMARKS)
# (script, argv, group, folders) of the benchmarks as the suite ran them before the declarations moved (a
# new benchmark needs no entry here: these only must not change)
EXPECTED = {
    "imagenetvc": ("imagenetVC", (), "VC", ("imagenetvc",)),
    "object_commonsense": ("object_commonsense", (), None, ("object_commonsense", "valm")),
    "piqa": ("commonsenseQA", ("--testset", "piqa"), "CR", ("piqa",)),
    "siqa": ("commonsenseQA", ("--testset", "siqa"), "CR", ("siqa", "socialiqa")),
    "arc": ("commonsenseQA", ("--testset", "arc"), "CR", ("arc",)),
    "arc_easy": ("commonsenseQA", ("--testset", "arc_easy"), "CR", ("arc",)),
    "arc_challenge": ("commonsenseQA", ("--testset", "arc_challenge"), "CR", ("arc",)),
    "obqa": ("commonsenseQA", ("--testset", "obqa"), "CR", ("obqa", "openbookqa")),
    "cqa": ("commonsenseQA", ("--testset", "cqa"), "CR", ("commonsenseqa", "cqa")),
    "hs": ("commonsenseQA", ("--testset", "hs"), "CR", ("hellaswag", "hs")),
    "winogrande": ("commonsenseQA", ("--testset", "winogrande"), "CR", ("winogrande",)),
    "boolq": ("boolq", (), "RC", ("boolq",)),
    "squad": ("squad", (), "RC", ("squad_v2", "squad")),
    "quac": ("quac", (), "RC", ("quac",)),
}


# ---------------------------------------------------------------------------------------------- discovery
def test_every_eval_script_declares_its_benchmarks():
    assert {"boolq", "commonsenseQA", "imagenetVC", "object_commonsense", "quac", "squad"} <= set(SCRIPTS)
    found = registry.benchmarks()
    for stem in SCRIPTS:
        module = importlib.import_module(f"eval_scripts.{stem}")
        declared = module.BENCHMARKS
        assert isinstance(declared, tuple) and declared and all(isinstance(b, Benchmark) for b in declared), stem
        for b in declared:
            assert found[b.name].script == module.__name__
            assert isinstance(module.OPTIONS, tuple) and callable(module.evaluate)
    assert len(importlib.import_module("eval_scripts.commonsenseQA").BENCHMARKS) == len(COMMONSENSE_TESTSETS)
    assert registry.declaring_modules() == [f"eval_scripts.{s}" for s in SCRIPTS]


def test_declarations_hold_what_the_suite_used():
    got = {name: (b.script.split(".")[-1], b.argv, b.group, b.folders) for name, b in registry.benchmarks().items()}
    assert {name: got[name] for name in EXPECTED} == EXPECTED


def test_registry_names_are_the_suite_choices():
    assert suite.TASKS == registry.benchmarks()
    assert set(EXPECTED) <= set(registry.names()) and set(suite.DEFAULT_SUITE) <= set(registry.names())
    with pytest.raises(EvalError, match="'nosuchtask' is not one of " + ", ".join(registry.names()) + "$"):
        suite.parse_args(["--tasks", "nosuchtask"])
    help_text = suite.help_parser().format_help()
    assert "from " + ", ".join(registry.names()) in " ".join(help_text.split())


def test_discovery_imports_no_torch():
    code = ("import sys, eval_scripts.registry as r; n = len(r.benchmarks()); "
            "print(n, sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'PIL', 'lm_eval'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(len(registry.names())), "[]"]
    assert "eval_scripts.harness" not in registry.declaring_modules()


@pytest.fixture
def fresh_registry():
    """The registry's cache cleared before and after (a test that adds a module sees it, the others do not)."""
    registry.benchmarks.cache_clear()
    yield
    registry.benchmarks.cache_clear()


def _write(folder, name, text):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(text))


TOY = """
    from eval_scripts.benchmark import Benchmark

    def task_name(args):
        return "toy_v2" if args.v2 else "toy"

    BENCHMARKS = (Benchmark("toy", results="toy", metric="f1", group="RC", folders=("toy",), task_name=task_name,
                            from_samples=lambda config, records: {"f1": 100.0 * len(records)}),)
"""


def test_a_new_benchmark_module_is_found_with_nothing_else_edited(tmp_path, monkeypatch, fresh_registry):
    """A module dropped into a folder of the package's path is a benchmark of the registry, and its
    result files read through its declaration."""
    _write(tmp_path, "toy_benchmark", TOY)
    monkeypatch.setattr(eval_scripts, "__path__", [*eval_scripts.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "eval_scripts.toy_benchmark", raising=False)
    try:
        found = registry.benchmarks()
        assert "eval_scripts.toy_benchmark" in registry.declaring_modules()
        assert set(found) == set(suite.TASKS) | {"toy"}  # the suite's were found before the module was there
        toy = found["toy"]
        assert toy.script == "eval_scripts.toy_benchmark" and toy.group == "RC" and toy.folders == ("toy",)
        assert registry.for_result("toy_v2") is toy and registry.for_result("toyx") is None
        assert headline("toy_v2", {"f1": 12.5, "acc": 3.0}) == ("f1", 12.5)
        assert metrics_from_samples("toy", {}, [{}, {}]) == {"f1": 200.0}
    finally:
        sys.modules.pop("eval_scripts.toy_benchmark", None)


def test_discovery_imports_only_the_modules_that_declare(tmp_path, monkeypatch):
    pkg = tmp_path / "fakebench"
    _write(pkg, "__init__", "")
    _write(pkg, "alpha", TOY.replace('"toy"', '"alpha"'))
    _write(pkg, "helpers", "import no_such_module_anywhere\n")  # declares nothing: never imported
    _write(pkg, "beta", """
        from eval_scripts.benchmark import Benchmark
        BENCHMARKS: tuple = (Benchmark("beta_one", results="beta_one", metric="acc"),
                             Benchmark("beta_two", results="beta_two", metric="acc", argv=("--part", "two")))
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert registry.declaring_modules("fakebench") == ["fakebench.alpha", "fakebench.beta"]
        found = registry.discover(registry.declaring_modules("fakebench"))
        assert list(found) == ["alpha", "beta_one", "beta_two"]
        assert [b.script for b in found.values()] == ["fakebench.alpha", "fakebench.beta", "fakebench.beta"]
        assert found["beta_two"].argv == ("--part", "two") and found["beta_one"].group is None
        assert "fakebench.helpers" not in sys.modules
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] == "fakebench"]:
            del sys.modules[name]


@pytest.mark.parametrize("declarations, message", [
    ('(Benchmark("piqa", results="mine", metric="acc"),)', "'piqa' is declared by both"),
    ('(Benchmark("mine", results="boolq", metric="acc"),)', "result family 'boolq' is also 'boolq'"),
    ('(Benchmark("mine", results="mine", metric="acc", group="XX"),)', "unknown group 'XX'"),
    ('(Benchmark("mine", results="", metric="acc"),)', "a result family"),
    ('(Benchmark("mine", results="mine", metric=""),)', "a headline metric"),
    ('(Benchmark("mine", results="mine", metric="acc", folders="mine"),)', "argv and folders are tuples"),
    ("()", "non-empty tuple of Benchmark"),
    ('[Benchmark("mine", results="mine", metric="acc")]', "non-empty tuple of Benchmark"),
    ('("mine",)', "holds 'mine', not a Benchmark"),
])
def test_a_bad_declaration_is_refused(tmp_path, monkeypatch, declarations, message):
    _write(tmp_path, "bad_benchmark", f"from eval_scripts.benchmark import Benchmark\nBENCHMARKS = {declarations}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(DeclarationError, match=message):
            registry.discover([*registry.declaring_modules(), "bad_benchmark"])
    finally:
        sys.modules.pop("bad_benchmark", None)


# ---------------------------------------------------------------------------------------------- result names
@pytest.mark.parametrize("result_task, benchmark", [
    ("imagenetvc", "imagenetvc"), ("object_commonsense", "object_commonsense"), ("commonsense_piqa", "piqa"),
    ("commonsense_piqa_harness_dev", "piqa"), ("commonsense_arc", "arc"), ("commonsense_arc_harness", "arc"),
    ("commonsense_arc_easy", "arc_easy"), ("commonsense_arc_challenge_harness", "arc_challenge"),
    ("boolq_harness", "boolq"), ("squad", "squad"), ("squad_v1.1", "squad"), ("quac", "quac"),
    ("quacks", None), ("commonsense", None), ("nosuch", None),
])
def test_a_result_file_maps_back_to_its_declaration(result_task, benchmark):
    b = registry.for_result(result_task)
    assert (b.name if b else None) == benchmark


@pytest.mark.parametrize("task, argv, name", [
    ("imagenetvc", [], "imagenetvc"), ("object_commonsense", [], "object_commonsense"),
    ("piqa", [], "commonsense_piqa"), ("arc_easy", ["--protocol", "harness", "--split", "dev"],
                                      "commonsense_arc_easy_harness_dev"),
    ("boolq", [], "boolq"), ("boolq", ["--prompt_format", "harness"], "boolq_harness"), ("squad", [], "squad"),
    ("quac", [], "quac"),
])
def test_result_names_follow_the_scripts(task, argv, name):
    b = registry.benchmarks()[task]
    args = b.module.parse_args([*b.argv, *argv])
    assert b.result_name(args) == name and registry.for_result(name) is b


# ---------------------------------------------------------------------------------------------- metrics
IMAGENETVC = {"color": {"mean": 40.0, "std": 1.0, "n": 3}, "shape": {"mean": 60.0}, "overall": {"mean": 50.0}}
OBJECTS = {"memory_color": {"mean": 30.0, "n": 108}, "shape": {"mean": 50.0, "n": 140}}
SQUAD = {"exact_match": 40.0, "f1": 55.0, "answerable": {"exact_match": 30.0, "f1": 45.0},
         "unanswerable": {"exact_match": 50.0, "f1": 50.0}, "skipped": 2}


@pytest.mark.parametrize("task, metrics, head, subsets", [
    ("imagenetvc", IMAGENETVC, ("acc", 50.0), {"color": 40.0, "shape": 60.0}),
    ("object_commonsense", OBJECTS, ("acc", 40.0), {"memory_color": 30.0, "shape": 50.0}),
    ("object_commonsense", {}, ("acc", None), {}),
    ("commonsense_piqa_harness", {"acc": 70.0, "acc_norm": 72.0, "n": 9}, ("acc", 70.0), {}),
    ("boolq", {"acc": 61.0, "n": 5}, ("acc", 61.0), {}),
    ("squad", SQUAD, ("exact_match", 40.0), {"answerable": 30.0, "unanswerable": 50.0}),
    ("squad_v1.1", {"exact_match": 20.0, "f1": 30.0}, ("exact_match", 20.0), {}),
    ("quac", {"f1": 33.0, "heq": 10.0, "exact_match": 20.0}, ("f1", 33.0), {}),
    ("someone_elses", {"f1": 3.0, "exact_match": 1.0}, ("f1", 3.0), {}),
    ("someone_elses", {"acc": "n/a", "exact_match": 2.0}, ("exact_match", 2.0), {}),
    ("someone_elses", {}, ("-", None), {}),
])
def test_headline_and_subsets(task, metrics, head, subsets):
    assert headline(task, metrics) == head
    assert subset_values(task, metrics) == subsets


def approx(value):
    """``value`` with every float compared to 1e-9 (nested dicts and lists)."""
    if isinstance(value, dict):
        return {k: approx(v) for k, v in value.items()}
    if isinstance(value, list):
        return [approx(v) for v in value]
    return pytest.approx(value, rel=1e-9, abs=1e-9) if isinstance(value, float) else value


def test_imagenetvc_metrics_from_samples():
    # color: 2 questions, right on both in templates 0-1, on one in 2-4; shape: 1 question, always right
    records = ([{"subset": "color", "template": t, "correct": True} for t in range(5)]
               + [{"subset": "color", "template": t, "correct": t < 2} for t in range(5)]
               + [{"subset": "shape", "template": t, "correct": True} for t in range(5)])
    got = metrics_from_samples("imagenetvc", {}, records)
    assert got == approx({"color": {"per_template": [100.0, 100.0, 50.0, 50.0, 50.0], "mean": 70.0,
                           "std": math.sqrt(750), "n": 2},
                 "shape": {"per_template": [100.0] * 5, "mean": 100.0, "std": 0.0, "n": 1},
                 "overall": {"per_template": [100.0, 100.0, 75.0, 75.0, 75.0], "mean": 85.0,
                             "std": math.sqrt(187.5)}})
    assert list(got) == ["color", "shape", "overall"]
    assert headline("imagenetvc", got) == ("acc", 85.0)
    assert subset_values("imagenetvc", got) == {"color": 70.0, "shape": 100.0}


def test_object_commonsense_metrics_from_samples():
    records = ([{"set": "shape", "template": t, "correct": t < 3} for t in range(9)]
               + [{"set": "relative_size", "template": t, "correct": t % 2 == 0} for t in range(6)])
    got = metrics_from_samples("object_commonsense", {}, records)
    assert list(got) == ["shape", "relative_size"]
    assert got["shape"]["per_template"] == [100.0] * 3 + [0.0] * 6 and got["shape"]["n"] is None
    assert math.isclose(got["shape"]["mean"], 100 / 3) and got["relative_size"]["mean"] == 50.0
    assert math.isclose(headline("object_commonsense", got)[1], (100 / 3 + 50) / 2)


def test_commonsense_boolq_and_generation_metrics_from_samples():
    right, right_norm = [True, False, True, True], [True, True, False, False]
    harness = [{"protocol": "harness", "correct": c, "correct_norm": n} for c, n in zip(right, right_norm)]
    assert metrics_from_samples("commonsense_piqa_harness", {}, harness) == {"acc": 75.0, "acc_norm": 50.0, "n": 4}
    unmarked = [{"correct": c, "correct_norm": n} for c, n in zip(right, right_norm)]
    assert metrics_from_samples("commonsense_hs", {}, unmarked) == {"acc": 75.0, "n": 4}  # released by default
    assert metrics_from_samples("commonsense_hs_harness", {"protocol": "harness"}, unmarked) == {
        "acc": 75.0, "acc_norm": 50.0, "n": 4}  # the run's config says the protocol
    boolq = [{"correct": c} for c in (True, False, False)]
    assert metrics_from_samples("boolq_harness", {}, boolq) == {"acc": 100 / 3, "n": 3}
    for task in ("squad", "quac", "someone_elses"):
        assert metrics_from_samples(task, {}, boolq) is None
    assert metrics_from_samples("boolq", {}, []) is None
