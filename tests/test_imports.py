"""Start-up cost: what each entry point imports, checked in fresh processes through ``sys.modules``.

* ``--help`` of every eval script, ``train.py`` and ``python -m models.images.pregenerate`` imports no torch;
* a text-only run imports no diffusers, open_clip, timm, wandb or matplotlib;
* an image run with an HF CLIP never imports open_clip (nor timm, which open_clip pulls in).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.paths import EVAL_DATA

REPO = Path(__file__).resolve().parents[1]
# every eval script (a file that runs as __main__), and train.py; not harness.py, whose --help is
# lm-evaluation-harness's own (its CLI imports torch)
SCRIPTS = sorted(str(p.relative_to(REPO)) for p in (REPO / "eval_scripts").glob("*.py")
                 if 'if __name__ == "__main__":' in p.read_text() and p.name != "harness.py") + ["train.py"]
HEAVY = ("torch", "transformers", "diffusers", "open_clip", "timm", "wandb", "matplotlib", "accelerate", "datasets",
         "PIL", "numpy", "safetensors")

# runs each (script, argv) as __main__ in this one process, then prints the heavy modules loaded (from an
# atexit handler: a finished eval script ends its process at once, running the atexit handlers)
PROBE = """
import atexit, contextlib, io, json, runpy, sys
runs, wanted, codes = json.loads(sys.argv[1]), set(sys.argv[2].split(",")), []

def report():  # a run that ended the process from inside (exit_now) finished with status 0
    heavy = sorted({m.split(".")[0] for m in sys.modules} & wanted)
    sys.__stdout__.write(json.dumps({"codes": codes + [0] * (len(runs) - len(codes)), "heavy": heavy}) + "\\n")
atexit.register(report)
for target, argv in runs:
    sys.argv = [target, *argv]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            if target.endswith(".py"):
                runpy.run_path(target, run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
        codes.append(0)
    except SystemExit as e:
        codes.append(e.code or 0)
    assert "usage:" in out.getvalue() or argv[:1] != ["--help"], target
"""


def probe(runs: list[tuple[str, list[str]]]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(runs), ",".join(HEAVY)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_help_imports_no_torch():
    runs = [(script, ["--help"]) for script in SCRIPTS] + [("models.images.pregenerate", ["--help"])]
    assert len(runs) >= 8  # six eval scripts, train.py, the image pre-generation module
    result = probe(runs)
    assert result["codes"] == [0] * len(runs)
    assert result["heavy"] == []  # not even numpy or PIL


def test_text_only_run_imports_no_image_stack(lm_dirs, tmp_path):
    argv = ["--model_name", lm_dirs["gpt2"], "--data_dir", str(EVAL_DATA / "imagenetvc"), "--subsets", "color",
            "--limit", "1", "--output_dir", str(tmp_path), "--run_name", "text", "--device", "cpu"]
    result = probe([("eval_scripts/imagenetVC.py", argv)])
    assert result["codes"] == [0] and (tmp_path / "text" / "imagenetvc.json").is_file()
    assert {"torch", "transformers"} <= set(result["heavy"])
    assert not {"diffusers", "open_clip", "timm", "wandb", "matplotlib"} & set(result["heavy"])


def test_hf_clip_run_never_imports_open_clip(lm_dirs, hf_clip_dir, tiny_sdxl_dir, tmp_path):
    argv = ["--model_name", lm_dirs["gpt2"], "--data_dir", str(EVAL_DATA / "imagenetvc"), "--subsets", "color",
            "--limit", "1", "--output_dir", str(tmp_path), "--run_name", "hf", "--device", "cpu",
            "--generate_images", "--k", "1", "--vision_encoder", f"hf-clip:{hf_clip_dir}",
            "--image_generator", str(tiny_sdxl_dir), "--image_size", "64", "--image_cache", str(tmp_path / "cache")]
    result = probe([("eval_scripts/imagenetVC.py", argv)])
    assert result["codes"] == [0]
    counts = json.loads((tmp_path / "hf" / "imagenetvc.json").read_text())["counts"]
    assert counts["images_generated"] == 1 and counts["vision_features_computed"] == 1
    assert "diffusers" in result["heavy"]
    assert not {"open_clip", "timm", "wandb", "matplotlib"} & set(result["heavy"])
