"""The paper's published numbers, kept with their source in ``data/paper_numbers.json``, and which
of the paper's models a run's ``--model_name`` is.

Two tables: the group averages (VC, CR, RC) of GPT-2, Gemma-2B and Llama-3-8B, text-only and with
late fusion (Table 4), and GPT-2's object-commonsense accuracies (Table 1). A model matches by the
last part of its name or path (``gpt2``, ``openai-community/gpt2`` and a local ``.../gpt2`` folder
are GPT-2; ``google/gemma-2b`` is Gemma-2B; ``meta-llama/Meta-Llama-3-8B`` is Llama-3-8B),
case-blind.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

PAPER_FILE = Path(__file__).resolve().parents[1] / "data" / "paper_numbers.json"
SETTINGS = ("text_only", "late_fusion")


@lru_cache(maxsize=1)
def load() -> dict:
    return json.loads(PAPER_FILE.read_text(encoding="utf-8"))


def models() -> tuple[str, ...]:
    return tuple(load()["models"])


def model_key(model_name: str | None, override: str = "auto") -> str | None:
    """The paper model a run is (a key of ``models()``), or None. ``override``: ``auto`` (match
    ``model_name``), ``none``, or a model key."""
    if override != "auto":
        return None if override == "none" else override
    last = str(model_name or "").rstrip("/").split("/")[-1].lower()
    for key, info in load()["models"].items():
        if last in {hub.split("/")[-1].lower() for hub in info["hub_ids"]}:
            return key
    return None


def value(table: str, model: str | None, setting: str, name: str) -> float | None:
    """A published number: ``table`` is ``groups`` or ``object_commonsense``; None when the paper
    has none for it."""
    if model is None:
        return None
    return load()[table]["rows"].get(model, {}).get(setting, {}).get(name)


def source() -> dict:
    """Where the numbers come from: the paper, and the table of each kind of number."""
    data = load()
    return {"paper": data["source"], "groups": data["groups"]["table"],
            "object_commonsense": data["object_commonsense"]["table"]}
