"""The paper's published numbers, kept with their source in ``data/paper_numbers.json``, how they were
measured (its ``protocol``), which of the paper's models a run is, and the rule that says when a row of ours
can be compared with the paper's.

Two tables: the group averages (VC, CR, RC) of GPT-2, Gemma-2B and Llama-3-8B, text-only and with
late fusion (Table 4), and GPT-2's object-commonsense accuracies (Table 1).

Which model a run is (:func:`recorded_model`) is decided from what was recorded, never from a folder name:
the ``base_model`` that the checkpoint's ``config.json`` records (``--pretrained_model``), else
``--model_name`` when it is a hub id (not a local folder). It matches a paper model when it is one of that
model's hub ids exactly (``gpt2``, ``openai-community/gpt2``; ``google/gemma-2b``;
``meta-llama/Meta-Llama-3-8B``), case-blind. :func:`model_key` (the last part of a name) only picks the row
of published numbers shown when ``--paper_model`` is ``auto``.

Comparable (:func:`reasons`): a row is compared with the paper's number of a setting only when the reasons
list is empty: the model is the paper model of that row, no ``--limit``, the official split (the script's
default or a name the protocol lists), no ``--data_file``, the task settings the protocol names (all
ImageNetVC subsets, the released commonsense protocol, ...), and for late fusion the paper's k, mixing and
generated images; a group also needs exactly the paper's tasks.
"""
from __future__ import annotations

import json
import os
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


# ---------------------------------------------------------------------------------------------- comparability
def protocol() -> dict:
    """How the paper's numbers were measured (``protocol`` of data/paper_numbers.json)."""
    return load()["protocol"]


def _hub_match(name: str | None) -> str | None:
    """The paper model whose hub ids include ``name`` exactly (case-blind), else None."""
    if not name:
        return None
    for key, info in load()["models"].items():
        if str(name).strip().lower() in {hub.lower() for hub in info["hub_ids"]}:
            return key
    return None


def recorded_base_model(model_name: str | None, pretrained_model: str | None) -> str | None:
    """The base model a run records: the checkpoint's ``base_model`` (its ``config.json``), else
    ``model_name`` when it is not a local path (a hub id); None when neither says."""
    if pretrained_model:
        from models.checkpoints.config_file import read_checkpoint_config

        if Path(pretrained_model).is_dir():
            base = read_checkpoint_config(pretrained_model).get("base_model")
            return base if isinstance(base, str) else None
        return None
    if model_name and not os.path.exists(model_name):
        return model_name
    return None


def recorded_model(model_name: str | None, pretrained_model: str | None) -> str | None:
    """The paper model (a key of ``models()``) the run's recorded base model is, else None."""
    return _hub_match(recorded_base_model(model_name, pretrained_model))


def model_name_of(key: str | None) -> str:
    return load()["models"][key]["name"] if key in load()["models"] else str(key)


def task_protocol(run, task: str) -> dict:
    """A task's settings as a suite row records them (``run``: its parsed settings), for :func:`reasons`."""
    facts = protocol()["tasks"].get(task, {})
    use_images = bool(getattr(run, "generate_images", False)) and int(getattr(run, "k", 0) or 0) > 0
    split = getattr(run, "split", None)
    shown = split if split is not None else (facts.get("split") or ["default"])[0]
    parts = getattr(run, "subsets", None) or getattr(run, "sets", None)  # ImageNetVC, object commonsense
    if split is None and parts:
        wanted = facts.get("settings", {}).get("subsets")
        shown = "all subsets" if wanted and _same(parts, wanted) else ",".join(parts)
    return {
        "task": task, "split": shown,
        "split_given": split is not None, "limit": getattr(run, "limit", None),
        "data_file": getattr(run, "data_file", None),
        "k": int(run.k) if use_images else 0, "mix": run.mix if use_images else None,
        "image_source": getattr(run, "image_source", None) if use_images else None,
        "image_generator": getattr(run, "image_generator", None) if use_images else None,
        "settings": {name: getattr(run, name, None) for name in facts.get("settings", {})},
    }


def _same(value, wanted) -> bool:
    if isinstance(wanted, list) and isinstance(value, (list, tuple)):
        return sorted(map(str, value)) == sorted(map(str, wanted))
    return value == wanted


def _shown(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def reasons(row: dict, setting: str, model: str | None, paper_model: str | None) -> list[str]:
    """Why a task's row (``task_protocol``) cannot be compared with the paper's ``setting`` (``text_only`` or
    ``late_fusion``) number of ``paper_model``, given the run's recorded paper model ``model``; [] when it can."""
    facts = protocol()
    task = facts["tasks"].get(row["task"], {})
    out = []
    if paper_model is None or model is None:
        out.append("model: not a paper model")
    elif model != paper_model:
        out.append(f"model: {model_name_of(model)} (paper row: {model_name_of(paper_model)})")
    if row.get("limit") is not None:
        out.append(f"limit={row['limit']}")
    if row.get("data_file"):
        out.append(f"data_file={Path(str(row['data_file'])).name}")
    allowed = task.get("split")
    if row.get("split_given") and allowed and row.get("split") not in allowed:
        out.append(f"split={row['split']} (paper: {allowed[0]})")
    for name, wanted in task.get("settings", {}).items():
        value = row.get("settings", {}).get(name)
        if not _same(value, wanted):
            out.append(f"{name}={_shown(value)} (paper: {_shown(wanted)})")
    if setting == "late_fusion":
        if not row.get("k"):
            out.append("text-only run")
        else:
            if row["k"] != facts["k"]:
                out.append(f"k={row['k']} (paper: {facts['k']})")
            if row.get("mix") != facts["mix"]:
                out.append(f"mix={row.get('mix')} (paper: {facts['mix']})")
            if row.get("image_source") != facts["image_source"]:
                out.append(f"images: {row.get('image_source')} (paper: {facts['image_source']}d)")
    return out


def group_reasons(group: str, rows: list[dict], setting: str, model: str | None, paper_model: str | None) -> list[str]:
    """Why a group of task rows cannot be compared with the paper's group number: the reasons of its tasks
    (each once, in order), a missing paper task (``partial group: 2 of 4 CR tasks``) or an extra task."""
    wanted = protocol()["groups"].get(group, [])
    have = [r["task"] for r in rows]
    out = []
    missing = [t for t in wanted if t not in have]
    if missing:
        out.append(f"partial group: {len(wanted) - len(missing)} of {len(wanted)} {group} tasks")
    out += [f"{t} is not in the paper's {group}" for t in have if t not in wanted]
    for r in rows:
        for reason in reasons(r, setting, model, paper_model):
            if reason not in out:
                out.append(reason)
    return out
