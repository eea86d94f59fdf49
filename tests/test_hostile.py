"""Hostile input to the eval scripts: every mistake is one line and exit status 2 with nothing written,
nothing is silently wrong (NaN, changed data, a smaller --limit, an encoder given as a causal LM), and
nothing computed is lost.

The table (``CASES``) runs each bad command in-process through ``run_main``, what a script's ``__main__``
calls; the dedicated tests below it cover the cases that need more than one command.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch

from eval_scripts.cli import EvalError, NonFiniteScores, run_main
from eval_scripts.records import RunRecords
from tests.paths import EVAL_DATA, TEST_DATA

pytestmark = pytest.mark.usefixtures("one_thread")

VC_HEADER = "category,question,answer\n"
VC_ROWS = ("banana,What is the color of a banana?,yellow\n"
           "zebra,What is the color of a zebra?,white\n"
           "tomato,What is the color of a tomato?,red\n")


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path.parent


def _copy_lm(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def env(tmp_path_factory, lm_dirs, tiny_clip_spec, tokenizer_dir):
    """Bad data files, bad model folders and a NaN-weight LM, built once."""
    import transformers as tf

    root = tmp_path_factory.mktemp("hostile")
    lm = lm_dirs["llama"]
    tok = tf.AutoTokenizer.from_pretrained(tokenizer_dir)
    e = {"lm": lm, "clip": tiny_clip_spec, "root": str(root), "cache": str(root / "cache")}

    # data
    e["vc"] = str(_write(root / "vc" / "color.csv", VC_HEADER + VC_ROWS))
    e["vc_header"] = str(_write(root / "vc_header" / "color.csv", VC_HEADER))
    e["vc_empty"] = str(_write(root / "vc_empty" / "color.csv", ""))
    e["vc_bom"] = str(_write(root / "vc_bom" / "color.csv", b"\xef\xbb\xbf" + (VC_HEADER + VC_ROWS).encode()))
    e["vc_latin1"] = str(_write(root / "vc_latin1" / "color.csv",
                                (VC_HEADER + "cafe,What is the color of a caf\xe9?,brown\n").encode("latin-1")))
    e["boolq_empty"] = str(_write(root / "boolq_empty" / "dev.jsonl", "\n"))
    e["piqa_empty"] = str(_write(root / "piqa_empty" / "valid.jsonl", ""))
    _write(root / "piqa_empty" / "valid-labels.lst", "")
    e["squad_shape"] = str(_write(root / "squad_shape" / "dev-v2.0.json", json.dumps({"data": [[1, 2]]})))
    e["squad_empty"] = str(_write(root / "squad_empty" / "dev-v2.0.json", json.dumps({"data": []})))
    e["obj_header"] = str(_write(root / "obj_header" / "shape.csv", "Index,Descriptor,Item,Shape\n"))
    e["a_file"] = str(_write(root / "plain" / "a_file", "not a folder") / "a_file")

    # model folders that are not causal LMs, or whose weights cannot be read
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    for name, model in (("bert", tf.BertModel(tf.BertConfig(vocab_size=50257, **small))),
                        ("clip_lm", tf.CLIPModel(tf.CLIPConfig(text_config=small, vision_config=dict(
                            small, image_size=32, patch_size=16)))),
                        ("llama_base", tf.LlamaModel(tf.LlamaConfig(vocab_size=50257, num_key_value_heads=2, **small)))):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        e[name] = str(root / name)
    not_clip = root / "clip_config_bert_weights"  # a CLIP config over another model's weights
    shutil.copytree(root / "bert", not_clip)
    shutil.copy(root / "clip_lm" / "config.json", not_clip / "config.json")
    e["not_clip"] = str(not_clip)
    weights = (Path(lm) / "model.safetensors").read_bytes()
    for name, data in (("garbage", random.Random(1).randbytes(4096)), ("truncated", weights[: len(weights) // 2]), ("empty_st", b"")):
        d = _copy_lm(lm, root / name)
        (d / "model.safetensors").write_bytes(data)
        e[name] = str(d)
    d = _copy_lm(lm, root / "random_bin")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x00" + random.Random(0).randbytes(4095))  # no pickle opcode
    e["random_bin"] = str(d)

    # NaN weights: everywhere (the final norm), or only in the embedding of one token of the second question
    q1, q2 = [tok(line.split(",")[1])["input_ids"] for line in VC_ROWS.splitlines()[:2]]
    token = next(t for t in q2 if t not in q1)
    for name, weight, rows in (("nan_all", "model.norm.weight", slice(None)),
                               ("nan_token", "model.embed_tokens.weight", token)):
        model = tf.AutoModelForCausalLM.from_pretrained(lm)
        with torch.no_grad():
            model.get_parameter(weight)[rows] = float("nan")
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        e[name] = str(root / name)
    return e


def _main(script: str):
    return importlib.import_module(f"eval_scripts.{script}").main


def _base(script: str, e: dict, out: Path) -> list[str]:
    """A valid text-only command of ``script`` on the tiny LM; a case appends the flags that break it."""
    common = ["--model_name", e["lm"], "--device", "cpu", "--limit", "1", "--output_dir", str(out), "--run_name", "r",
              "--image_cache", e["cache"]]
    data = {"imagenetVC": ["--data_dir", e["vc"], "--subsets", "color"],
            "boolq": ["--data_dir", str(TEST_DATA / "boolq")],
            "commonsenseQA": ["--testset", "piqa", "--data_dir", str(TEST_DATA / "piqa")],
            "squad": ["--data_dir", str(TEST_DATA / "squad_v2")],
            "object_commonsense": ["--data_dir", str(EVAL_DATA / "object_commonsense"), "--sets", "shape"]}
    return common + data[script]


IMAGES = ["--generate_images", "--k", "1", "--image_size", "32", "--image_generator", "toyworld"]

# (case id, script, flags appended to the script's valid command, what the error line must say)
CASES = [
    # numbers: NaN, inf, negative, zero
    ("temperature-nan", "imagenetVC", ["--clip_temperature", "nan"], "--clip_temperature: must be a finite"),
    ("temperature-inf", "imagenetVC", ["--clip_temperature", "inf"], "--clip_temperature: must be a finite"),
    ("temperature-negative", "imagenetVC", ["--clip_temperature", "-1"], "--clip_temperature: must be a finite number >= 0"),
    ("guidance-nan", "imagenetVC", ["--guidance_scale", "nan"], "--guidance_scale: must be a finite"),
    ("steps-0", "imagenetVC", ["--num_inference_steps", "0"], "--num_inference_steps: must be an integer >= 1"),
    ("k-negative", "imagenetVC", ["--k", "-1"], "--k: must be an integer >= 0"),
    ("k-0-with-images", "imagenetVC", ["--generate_images", "--k", "0"], "--k must be >= 1"),
    ("limit-0", "imagenetVC", ["--limit", "0"], "--limit: must be an integer >= 1"),
    ("batch-size-0", "boolq", ["--batch_size", "0"], "--batch_size: must be an integer >= 1"),
    ("image-size-0", "imagenetVC", ["--image_size", "0"], "--image_size: must be an integer >= 1"),
    ("gen-batch-size-0", "imagenetVC", ["--gen_batch_size", "0"], "--gen_batch_size: must be an integer >= 1"),
    ("noise-above-1", "imagenetVC", ["--toyworld_noise", "1.5"], "--toyworld_noise: must be a finite number >= 0 and <= 1"),
    ("max-new-tokens-0", "squad", ["--max_new_tokens", "0"], "--max_new_tokens: must be an integer >= 1"),
    # device, output folder, run name
    ("device-tpu9", "imagenetVC", ["--device", "tpu9"], "--device: must be cpu, cuda, cuda:N"),
    ("device-missing-gpu", "imagenetVC", ["--device", f"cuda:{torch.cuda.device_count()}"], "--device cuda"),
    ("output-dir-is-a-file", "imagenetVC", ["--output_dir", "{a_file}"], "is a file"),
    ("output-dir-under-a-file", "boolq", ["--output_dir", "{a_file}/sub"], "is a file"),
    ("run-name-escapes", "imagenetVC", ["--run_name", "../../x"], "--run_name: must be a plain folder name (no path separator, no '..'), got '../../x'"),
    ("run-name-separator", "boolq", ["--run_name", "a/b"], "must be a plain folder"),
    ("run-name-absolute", "imagenetVC", ["--run_name", "{root}/abs"], "must be a plain folder"),
    ("run-name-dotdot", "imagenetVC", ["--run_name", ".."], "must be a plain folder"),
    # data files
    ("csv-header-only", "imagenetVC", ["--data_dir", "{vc_header}"], "holds no rows"),
    ("csv-empty", "imagenetVC", ["--data_dir", "{vc_empty}"], "is empty"),
    ("csv-not-utf8", "imagenetVC", ["--data_dir", "{vc_latin1}"], "color.csv:2: not UTF-8"),
    ("jsonl-empty", "boolq", ["--data_dir", "{boolq_empty}"], "dev.jsonl: the file holds no rows"),
    ("piqa-empty", "commonsenseQA", ["--data_dir", "{piqa_empty}"], "valid.jsonl: the file holds no rows"),
    ("squad-wrong-shape", "squad", ["--data_dir", "{squad_shape}"], "'data' must be a list of objects"),
    ("squad-no-articles", "squad", ["--data_dir", "{squad_empty}"], "holds no articles"),
    ("object-header-only", "object_commonsense", ["--data_dir", "{obj_header}"], "shape.csv: the file holds no rows"),
    # models that are not causal LMs, or whose weights cannot be read
    ("encoder-as-lm", "imagenetVC", ["--model_name", "{bert}"], "'bert' (BertModel) is neither a causal LM nor a"),
    ("clip-as-lm", "boolq", ["--model_name", "{clip_lm}"], "is not a causal LM (model_type 'clip')"),
    ("lm-without-head", "imagenetVC", ["--model_name", "{llama_base}"], "no LM head weights (lm_head.weight"),
    ("garbage-safetensors", "imagenetVC", ["--model_name", "{garbage}"], "model.safetensors is not a valid safetensors"),
    ("truncated-safetensors", "boolq", ["--model_name", "{truncated}"], "model.safetensors is not a valid safetensors"),
    ("empty-safetensors", "imagenetVC", ["--model_name", "{empty_st}"], "model.safetensors is not a valid safetensors"),
    ("random-bin", "imagenetVC", ["--model_name", "{random_bin}"], "pytorch_model.bin is not a PyTorch checkpoint"),
    # vision encoders: unknown, offline (the default included), not CLIP
    ("vision-unknown", "imagenetVC", [*IMAGES, "--vision_encoder", "nonsense"], "unknown vision encoder 'nonsense'"),
    ("vision-default-offline", "imagenetVC", IMAGES, "pass --vision_encoder local-dir:PATH"),
    ("vision-hub-offline", "imagenetVC", [*IMAGES, "--vision_encoder", "nobody/no-clip"], "local-dir:PATH"),
    ("vision-unknown-tag", "imagenetVC", [*IMAGES, "--vision_encoder", "ViT-B-32/bogus"], "unknown pretrained tag"),
    ("vision-not-clip", "imagenetVC", [*IMAGES, "--vision_encoder", "{not_clip}"], "is not a CLIP model"),
    # a failure after the run has started, before its first example: nothing is left behind
    ("nan-weights-first-example", "imagenetVC", ["--model_name", "{nan_all}"], "'color-0/t0'"),
]


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []


def error_line(err: str) -> str:
    """The one error line: the last line of stderr (progress bars may come before it)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err[-2000:]
    return errors[0]


def run_bad(script: str, argv: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(_main(script), argv)
    assert e.value.code == 2
    return error_line(capsys.readouterr().err)


@pytest.mark.parametrize("case, script, extra, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(env, tmp_path, capsys, case, script, extra, expected):
    out = tmp_path / "out"
    argv = _base(script, env, out) + [a.format(**env) for a in extra]
    before = Path(env["a_file"]).read_bytes()
    line = run_bad(script, argv, capsys)
    assert expected in line, line
    assert len(line) < 400, line  # one readable line, not a library's page of config classes
    assert "weights_only" not in line  # never the advice to unpickle an untrusted file
    assert not out.exists() and not (out / "../../x").resolve().exists() and not (Path(env["root"]) / "abs").exists()
    assert Path(env["a_file"]).read_bytes() == before


# ---------------------------------------------------------------------------------------------- NaN
# Garbage after a pickle protocol opcode: torch's weights_only unpickler raises each of these kinds on
# one of these seeded files (found by fuzzing torch 2.14; CI once drew the KeyError from os.urandom).
PICKLE_GARBAGE = {"UnpicklingError": 0, "IndexError": 2, "KeyError": 20, "UnicodeDecodeError": 195}


@pytest.mark.parametrize("kind", sorted(PICKLE_GARBAGE))
def test_a_bin_of_pickle_garbage_is_one_line_whatever_the_unpickler_raises(env, tmp_path, kind):
    import warnings

    from models.fusion.loading import load_lm

    garbage = b"\x80\x04" + random.Random(PICKLE_GARBAGE[kind]).randbytes(4094)
    with warnings.catch_warnings():  # torch warns about protocol 4 before failing
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as raw:
            torch.load(_write(tmp_path / "raw" / "x.bin", garbage) / "x.bin", weights_only=True)
        assert type(raw.value).__name__ == kind  # the file still draws the kind it was chosen for
        d = _copy_lm(env["random_bin"], tmp_path / "lm")
        (d / "pytorch_model.bin").write_bytes(garbage)
        with pytest.raises(ValueError) as err:
            load_lm(str(d))
    assert str(err.value) == f"cannot load language model {str(d)!r}: pytorch_model.bin is not a PyTorch checkpoint"


def test_every_float_flag_refuses_nan_and_inf():
    from eval_scripts.imagenetVC import OPTIONS, parse_args

    floats = [o for o in OPTIONS if o.kind == "float"]
    assert {o.name for o in floats} >= {"clip_temperature", "guidance_scale", "toyworld_noise"}
    for opt in floats:
        for bad in ("nan", "inf", "-inf"):
            with pytest.raises(ValueError, match=f"argument --{opt.name}: must be a finite number"):
                parse_args([f"--{opt.name}={bad}"])
    assert math.isclose(parse_args(["--clip_temperature", "0"]).clip_temperature, 0.0)


def test_nan_scores_stop_the_run_naming_the_example_and_keep_what_was_scored(env, tmp_path, capsys):
    """The second question holds a token whose embedding is NaN: the five templates of the first
    question are scored and kept, the run stops at the second, and no metrics are written."""
    out = tmp_path / "out"
    argv = _base("imagenetVC", env, out) + ["--model_name", env["nan_token"], "--limit", "2", "--batch_size", "4"]
    for attempt in range(2):  # a resume scores nothing new and stops at the same example
        line = run_bad("imagenetVC", argv, capsys)
        assert "'color-1/t0'" in line and "NaN" in line and "5 scored examples kept" in line
        run_dir = out / "r"
        assert sorted(p.name for p in run_dir.iterdir()) == ["imagenetvc.run.json", "imagenetvc_samples.part0.jsonl"]
        rows = [json.loads(x) for x in (run_dir / "imagenetvc_samples.part0.jsonl").read_text().splitlines()]
        assert [r["id"] for r in rows] == [f"color-0/t{t}" for t in range(5)]
        assert all(math.isfinite(s) for r in rows for s in r["scores"])


def test_nan_during_generation_stops_before_anything_is_written(env, tmp_path, capsys):
    out = tmp_path / "deep" / "out"
    squad_ids = [qa["id"] for a in json.loads((TEST_DATA / "squad_v2" / "dev-v2.0.json").read_text())["data"]
                 for p in a["paragraphs"] for qa in p["qas"]]
    line = run_bad("squad", _base("squad", env, out) + ["--model_name", env["nan_all"]], capsys)
    assert "NaN" in line and "nothing was written" in line
    assert any(f"'{i}'" in line for i in squad_ids)
    assert not (tmp_path / "deep").exists()  # nor the folders the run made


class _OneProcess:
    is_main_process, num_processes, process_index = True, 1, 0

    def wait_for_everyone(self):
        pass


def test_a_non_finite_number_in_any_record_is_never_written(tmp_path):
    """Whatever a task computes from the scores (a perplexity that overflows, an F1): the rows before the
    first non-finite one are kept, the run stops naming it."""
    args = argparse.Namespace(output_dir=str(tmp_path), run_name="r", batch_size=2, model_name="m")
    records = RunRecords(args, "t", _OneProcess(), ("model_name",))
    items = [{"id": f"q{n}", "prompt": str(n)} for n in range(4)]

    def compute(batch):
        return [{"id": it["id"], "scores": [0.5, math.inf if it["id"] == "q1" else -1.0], "extra": {"f1": 1.0}}
                for it in batch]
    with pytest.raises(NonFiniteScores, match=r"t example 'q1': scores\[1\] is not a finite number; 1 scored example kept"):
        records.run(items, compute)
    rows = [json.loads(x) for x in (tmp_path / "r" / "t_samples.part0.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["q0"] and not (tmp_path / "r" / "t.json").exists()


# ---------------------------------------------------------------------------------------------- resume
def _vc_run(env, out, data_dir, limit, run_name="r"):
    from eval_scripts import imagenetVC
    from eval_scripts.runtime import clear_memos

    clear_memos()
    return imagenetVC.main(_base("imagenetVC", env, out) + ["--data_dir", data_dir, "--limit", str(limit),
                                                            "--run_name", run_name])


def _samples(out, run_name="r"):
    return [json.loads(x) for x in (out / run_name / "imagenetvc_samples.jsonl").read_text().splitlines()]


def test_changed_data_is_recomputed_on_resume(env, tmp_path):
    out = tmp_path / "out"
    changed = _write(tmp_path / "vc2" / "color.csv",
                     VC_HEADER + VC_ROWS.replace("zebra?,white", "zebra?,black").replace("banana", "lemon"))
    first = _vc_run(env, out, env["vc"], 3)
    resumed = _vc_run(env, out, str(changed), 3)
    fresh = _vc_run(env, out, str(changed), 3, run_name="fresh")
    assert resumed["metrics"] == fresh["metrics"]
    assert resumed["data_fingerprint"] == fresh["data_fingerprint"] != first["data_fingerprint"]
    assert _samples(out) == _samples(out, "fresh")
    assert [r["answer"] for r in _samples(out)][5:10] == ["black"] * 5
    assert resumed["counts"]["lm_passes"] == 2  # only the two changed questions: ids alone would reuse them
    cache = (out / "r" / "imagenetvc_samples.cache.jsonl").read_text().splitlines()
    assert len(cache) == 15 + 10  # the old rows of the changed questions are kept too


def test_same_data_from_another_copy_is_reused(env, tmp_path):
    out = tmp_path / "out"
    _vc_run(env, out, env["vc"], 2)
    again = _vc_run(env, out, env["vc_bom"], 2)  # the same rows, with a byte-order mark
    assert again["counts"]["lm_passes"] == 0 and again["metrics"]["color"]["n"] == 2


def test_smaller_limit_rewrites_the_samples_to_match_the_metrics(env, tmp_path):
    out = tmp_path / "out"
    full = _vc_run(env, out, env["vc"], 3)
    assert len(_samples(out)) == 15
    small = _vc_run(env, out, env["vc"], 1)
    rows = _samples(out)
    assert small["metrics"]["color"]["n"] == 1 and [r["id"] for r in rows] == [f"color-0/t{t}" for t in range(5)]
    assert small["metrics"]["color"]["per_template"] == [100.0 * r["correct"] for r in rows]
    assert small["counts"]["lm_passes"] == 0  # reused, not recomputed
    assert len((out / "r" / "imagenetvc_samples.cache.jsonl").read_text().splitlines()) == 15  # nothing lost
    again = _vc_run(env, out, env["vc"], 3)
    assert again["metrics"] == full["metrics"] and again["counts"]["lm_passes"] == 0
    assert len(_samples(out)) == 15


def test_a_failed_start_never_locks_the_run_name(env, tmp_path, capsys):
    """A run that fails at its first example (its settings were already recorded) leaves nothing, so
    the corrected command (another --model_name, a setting that must match to resume) runs."""
    from eval_scripts import imagenetVC

    out = tmp_path / "out"
    images = [*IMAGES, "--vision_encoder", env["clip"]]
    line = run_bad("imagenetVC", _base("imagenetVC", env, out) + [*images, "--model_name", env["nan_all"]], capsys)
    assert "'color-0/t0'" in line and "nothing was written" in line and not out.exists()
    result = imagenetVC.main(_base("imagenetVC", env, out) + images)
    assert result["config"]["model_name"] == env["lm"] and result["metrics"]["color"]["n"] == 1
    # settings left by an older version's failed start, with no result, lock nothing either
    (out / "s").mkdir()
    (out / "s" / "imagenetvc.run.json").write_text(json.dumps({"model_name": "another", "k": 7}))
    assert imagenetVC.main(_base("imagenetVC", env, out) + ["--run_name", "s"])["metrics"]["color"]["n"] == 1


# ---------------------------------------------------------------------------------------------- models and data
def test_models_late_fusion_cannot_wrap_are_refused(env):
    import transformers as tf

    from models.fusion.kinds import UnsupportedModelError, check_supported
    from models.fusion.loading import load_lm

    for config, why in ((tf.CLIPConfig(), "is not a causal LM \\(model_type 'clip'\\)"),
                        (tf.T5Config(), "'t5' is an encoder-decoder model"),
                        (tf.BartConfig(), "'bart' is an encoder-decoder model"),
                        (tf.BertConfig(architectures=["BertModel"]), "'bert' \\(BertModel\\) is neither")):
        with pytest.raises(UnsupportedModelError, match=why):
            check_supported(config, "m")
    for config, kind in ((tf.GPT2Config(), "causal"), (tf.LlamaConfig(), "causal"),
                         (tf.BertConfig(is_decoder=True), "causal"), (tf.BertConfig(), "masked"),
                         (tf.DistilBertConfig(), "masked")):
        assert check_supported(config, "m") == kind
    with pytest.raises(UnsupportedModelError, match="'bert' \\(BertModel\\)"):
        load_lm(env["bert"])
    assert type(load_lm(env["lm"])).__name__ == "LlamaForCausalLM"


def test_a_byte_order_mark_is_read_as_utf8(env, tmp_path):
    from data.benchmarks import load_boolq, load_imagenetvc

    assert load_imagenetvc("color", env["vc_bom"]) == load_imagenetvc("color", env["vc"])
    text = (TEST_DATA / "boolq" / "dev.jsonl").read_bytes()
    bom = _write(tmp_path / "boolq" / "dev.jsonl", b"\xef\xbb\xbf" + text)
    assert load_boolq(bom, limit=2) == load_boolq(TEST_DATA / "boolq", limit=2)
