"""Tiny masked LMs built from configs, saved once per test session.

BERT, DistilBERT and ALBERT share a lower-cased WordPiece vocabulary trained here with the ``tokenizers``
library on the repository's own text (the evaluation files and the trimmed test samples), so the eval
scripts' words are real pieces; RoBERTa uses the real GPT-2 BPE with RoBERTa's special tokens.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.paths import EVAL_DATA, TEST_DATA

WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDPIECE_SIZE = 3000
MLM_ARCHS = ("bert", "roberta", "distilbert", "albert")


def repository_text_files() -> list[Path]:
    """The evaluation files and the caption and WikiText samples (the words the tiny models see)."""
    roots = (EVAL_DATA, TEST_DATA / "visual_genome", TEST_DATA / "coco_captions", TEST_DATA / "wikitext2")
    return sorted(p for root in roots for p in root.rglob("*") if p.suffix in {".csv", ".jsonl", ".json", ".txt"})


def build_wordpiece_tokenizer(out_dir) -> str:
    """A lower-cased WordPiece vocabulary of the repository's text, saved as an HF BERT tokenizer.

    Deterministic (the ``tokenizers`` trainer breaks ties differently from run to run): BERT's own
    normalizer and pre-tokenizer split the text into words; the vocabulary holds the special tokens,
    every character seen (alone and as a ``##`` continuation) and the most frequent words (ties by
    spelling), so a rare word splits into pieces.
    """
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers
    from transformers import BertTokenizer

    normalizer, splitter = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter()
    for path in repository_text_files():
        text = normalizer.normalize_str(path.read_text(encoding="utf-8", errors="replace"))
        counts.update(word for word, _ in splitter.pre_tokenize_str(text))
    chars = sorted({c for word in counts for c in word})
    vocab = WORDPIECE_SPECIALS + chars + ["##" + c for c in chars]
    words = [w for w, _ in sorted(counts.items(), key=lambda x: (-x[1], x[0])) if len(w) > 1]
    vocab += words[:WORDPIECE_SIZE - len(vocab)]
    BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True).save_pretrained(out_dir)
    return str(out_dir)


def build_roberta_tokenizer(gpt2_dir, out_dir) -> str:
    """The GPT-2 BPE behind RoBERTa's special tokens (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask> last; the mask
    token takes the space before it, as roberta-base's does)."""
    from tokenizers import AddedToken
    from transformers import RobertaTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for token, i in json.loads((gpt2_dir / "vocab.json").read_text()).items():
        vocab[token] = i + 4
    vocab["<mask>"] = len(vocab)
    merges = [tuple(m.split(" ")) for m in (gpt2_dir / "merges.txt").read_text().splitlines()
              if m and not m.startswith("#version")]
    RobertaTokenizer(vocab=vocab, merges=merges, mask_token=AddedToken("<mask>", lstrip=True)).save_pretrained(out_dir)
    return str(out_dir)


def tiny_mlm_config(arch: str, vocab_size: int, d: int = 32, init: float = 0.02):
    import transformers as tf

    common = dict(vocab_size=vocab_size, max_position_embeddings=128, initializer_range=init)
    if arch == "bert":
        return tf.BertConfig(hidden_size=d, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * d,
                             **common)
    if arch == "roberta":
        common["max_position_embeddings"] = 130  # RoBERTa numbers positions from pad id + 1 = 2
        return tf.RobertaConfig(hidden_size=d, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * d,
                                pad_token_id=1, bos_token_id=0, eos_token_id=2, **common)
    if arch == "distilbert":
        return tf.DistilBertConfig(dim=d, n_layers=2, n_heads=4, hidden_dim=2 * d, **common)
    if arch == "albert":
        return tf.AlbertConfig(embedding_size=d // 2, hidden_size=d, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=2 * d, **common)
    raise KeyError(arch)


def save_tiny_mlm(path, arch: str, tokenizer_dir: str, seed: int = 0, **config) -> str:
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    AutoModelForMaskedLM.from_config(tiny_mlm_config(arch, len(tok), **config)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def wordpiece_dir(tmp_path_factory):
    return build_wordpiece_tokenizer(tmp_path_factory.mktemp("wordpiece"))


@pytest.fixture(scope="session")
def roberta_tokenizer_dir(tmp_path_factory, gpt2_tokenizer_dir):
    return build_roberta_tokenizer(gpt2_tokenizer_dir, tmp_path_factory.mktemp("roberta-bpe"))


@pytest.fixture(scope="session")
def mlm_dirs(tmp_path_factory, wordpiece_dir, roberta_tokenizer_dir):
    """{arch: dir} of tiny masked LMs (random, d=32) with their tokenizers."""
    return {arch: save_tiny_mlm(tmp_path_factory.mktemp(f"tiny-mlm-{arch}"), arch,
                                roberta_tokenizer_dir if arch == "roberta" else wordpiece_dir, seed=i)
            for i, arch in enumerate(MLM_ARCHS)}
