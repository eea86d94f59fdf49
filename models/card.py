"""The model card (``README.md``) of a trained-weights folder, as the Hugging Face hub reads one.

YAML front matter (``base_model``, ``library_name``, ``license``, ``tags``, ``datasets``, ``pipeline_tag``),
then what the weights are (the projector and the fusion block only; the frozen LM and CLIP named), a usage
example with the Python API, the training data and hyperparameters recorded beside the weights
(``train_config.yaml``, ``config.json``), the final training loss (``train_results.json``) and, when a run
folder of evaluation results is given, its ``<task>.json`` results.

Everything read is treated as hostile: reads are bounded, YAML is read with ``safe_load``, JSON only as
data, and every value put into the Markdown is escaped (no HTML, no links, no table breaks) and cut short;
the front matter is written by ``yaml.safe_dump``.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

CARD_NAME = "README.md"
TRAIN_RESULTS = "train_results.json"  # the final training loss, written by train.py beside the weights
TRAIN_CONFIG = "train_config.yaml"    # the run's settings (models/training/run_config.py)
LIBRARY_NAME = "late-fusion"
LICENSE = "mit"  # the project's license (LICENSE): the trained weights are released under it
MAX_FILE_BYTES = 1 << 20        # a config, settings or results file larger than this is not read
MAX_RESULT_FILES = 64            # result files read from a run folder
MAX_ROWS_PER_TASK = 12
MAX_VALUE_CHARS = 160
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")
# training sources (train.py --dataset_name substrings) and the hub datasets they are
DATASETS = {"cropped_vg": "ranjaykrishna/visual_genome", "wiki": "Salesforce/wikitext",
            "laion_220": "laion/220k-GPT4Vision-captions-from-LIVIS"}
HYPERPARAMETERS = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
                   "max_train_steps", "lr_scheduler_type", "num_warmup_steps", "weight_decay", "max_grad_norm",
                   "mixed_precision", "lm_dtype", "max_length", "seed", "proj_hidden")
DATA_SETTINGS = ("dataset_name", "vg_dir", "wiki_file", "wiki_num", "wiki_chunk_tokens", "laion_file",
                 "laion_image_root", "train_file", "max_elements", "max_train_samples", "shuffle_data",
                 "image_source", "image_generator", "image_index")
RUN_COUNTS = ("completed_steps", "num_processes", "images_seen", "bad_images")


class CardError(ValueError):
    """A folder a card cannot be written for (one line)."""


# ---------------------------------------------------------------------------------------------- reading
def read_bounded(path: Path, limit: int = MAX_FILE_BYTES) -> str | None:
    """The text of ``path`` if it is a regular file of at most ``limit`` bytes in UTF-8, else None."""
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > limit:
            return None
        with open(path, "rb") as f:
            data = f.read(limit + 1)
        return data.decode("utf-8") if len(data) <= limit else None
    except (OSError, UnicodeDecodeError):
        return None


def read_json(path: Path) -> dict:
    text = read_bounded(path)
    if text is None:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def read_yaml(path: Path) -> dict:
    import yaml

    text = read_bounded(path)
    if text is None:
        return {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def read_results(run_dir: str | os.PathLike) -> list[dict]:
    """The evaluation results of a run folder: each ``<task>.json`` (not ``*.stats*``, not a config) holding
    a ``task`` name and a ``metrics`` mapping, at most :data:`MAX_RESULT_FILES`, in name order."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise CardError(f"--results {str(run_dir)!r}: no such run folder")
    out = []
    for path in sorted(folder.glob("*.json"))[:MAX_RESULT_FILES * 4]:
        if ".stats" in path.name or path.name.endswith(".config.json"):
            continue
        data = read_json(path)
        if isinstance(data.get("task"), str) and isinstance(data.get("metrics"), dict):
            out.append(data)
        if len(out) >= MAX_RESULT_FILES:
            break
    if not out:
        raise CardError(f"--results {str(run_dir)!r}: no <task>.json results in the folder")
    return out


# ---------------------------------------------------------------------------------------------- escaping
def md(value) -> str:
    """``value`` as inline Markdown text: one line, no HTML, no link or emphasis syntax, no table break, cut short."""
    text = str(value)
    text = " ".join(text.split())
    if len(text) > MAX_VALUE_CHARS:
        text = text[:MAX_VALUE_CHARS - 1] + "…"
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"([\\`*_{}\[\]()#+!|~])", r"\\\1", text)


def md_code(value) -> str:
    """``value`` as inline code; a value holding a backtick, ``<``, ``>``, ``&``, ``|`` or ``\\`` as escaped
    text instead (:func:`md`), since a code span would show it raw and a pipe would still split a table cell."""
    text = " ".join(str(value).split())
    if not text or any(c in text for c in "`<>&|\\"):
        return md(text)
    if len(text) > MAX_VALUE_CHARS:
        text = text[:MAX_VALUE_CHARS - 1] + "…"
    return f"`{text}`"


def plain_number(value):
    """A finite int or float (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def is_hub_id(value) -> bool:
    return isinstance(value, str) and bool(_HUB_ID.match(value)) and ".." not in value


# ---------------------------------------------------------------------------------------------- parts
def datasets_of(settings: dict) -> list[str]:
    """The hub datasets a run trained on: its sources (``dataset_name``) and hub ids given as its files."""
    name = settings.get("dataset_name")
    found = []
    if isinstance(name, str):
        for part, dataset in DATASETS.items():
            if part in name and not (part == "laion_220" and "cropped_vg" == name):
                found.append(dataset)
    for key in ("wiki_file", "laion_file"):
        value = settings.get(key)
        if is_hub_id(value) and "/" in value and not Path(value).exists():
            found.append(value)
    return list(dict.fromkeys(found))


def metric_rows(metrics: dict) -> list[tuple[str, float]]:
    """``(name, value)`` of a result's numeric metrics: top-level numbers, then each sub-mapping's numbers
    (``overall.mean``), at most :data:`MAX_ROWS_PER_TASK`."""
    rows = []
    for key, value in metrics.items():
        number = plain_number(value)
        if number is not None and key not in ("n", "skipped"):
            rows.append((str(key), number))
    for key, value in metrics.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                number = plain_number(v)
                if number is not None and sub not in ("n",):
                    rows.append((f"{key}.{sub}", number))
    return rows[:MAX_ROWS_PER_TASK]


def usage_example(repo_id_or_path: str, masked: bool) -> str:
    """The card's Python example (the README's API)."""
    lines = ["from models import LateFusionPipeline", "",
             f"pipe = LateFusionPipeline.from_pretrained({json.dumps(repo_id_or_path)},",
             '                                          image_generator="stabilityai/sdxl-turbo")']
    if masked:  # a masked LM answers at its mask token, which the pipeline adds after the prompt
        lines += ['out = pipe.score("The color of a banana is", ["yellow", "blue", "red"], k=6)',
                  "print(out.prediction, out.scores, out.text_only_scores)"]
    else:
        lines += ['out = pipe.score("What color is a banana? Answer:", ["yellow", "blue", "red"], k=6)',
                  "print(out.prediction, out.scores, out.text_only_scores)",
                  'print(pipe.generate("Q: What color is the sky? A:", k=6, max_new_tokens=8))']
    return "\n".join(lines)


MASKED_TYPES = ("bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "xlm-roberta",
                "camembert", "mpnet", "modernbert")


def front_matter(config: dict, settings: dict, kind: str | None = None) -> dict:
    """The card's metadata. ``kind``: the model's kind (causal or masked), when known; else from its type."""
    base = config.get("base_model")
    masked = kind == "masked" if kind else str(config.get("model_type", "")).lower() in MASKED_TYPES
    meta = {}
    if is_hub_id(base) and not Path(base).exists():
        meta["base_model"] = base
    meta.update(library_name=LIBRARY_NAME, license=LICENSE,
                tags=["late-fusion", "multimodal", "visual-commonsense", "clip", "image-augmented-lm",
                      *([str(config["model_type"])] if is_hub_id(config.get("model_type")) else [])],
                datasets=datasets_of(settings),
                pipeline_tag="fill-mask" if masked else "text-generation")
    return meta


def table(rows: list[tuple[str, str]], head: tuple[str, str]) -> list[str]:
    return [f"| {head[0]} | {head[1]} |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)]


# ---------------------------------------------------------------------------------------------- the card
def render_card(folder: str | os.PathLike, *, repo_id: str | None = None, results: list[dict] | None = None,
                n_params: int | None = None, kind: str | None = None, path: str | os.PathLike | None = None) -> str:
    """The model card of the weights in ``folder`` (see the module docstring). ``repo_id``: the hub id the
    usage example loads (default: ``path``, else the folder's own path); ``results``: :func:`read_results` of a
    run folder; ``kind``: causal or masked, when known."""
    import yaml

    folder = Path(folder)
    config = read_json(folder / "config.json")
    settings = read_yaml(folder / TRAIN_CONFIG)
    run_args = config.get("run_args") if isinstance(config.get("run_args"), dict) else {}
    settings = {**run_args, **settings}
    trained = read_json(folder / TRAIN_RESULTS)
    base, vision = config.get("base_model", "unknown"), config.get("vision_encoder", "unknown")
    meta = front_matter(config, settings, kind)
    masked = meta["pipeline_tag"] == "fill-mask"
    out = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=False).rstrip("\n"), "---", "",
           f"# Late-fusion weights for {md_code(base)}", "",
           "## What these weights are", "",
           f"The trainable part of a late-fusion model{f' ({n_params:,} parameters)' if n_params else ''}: the visual "
           f"projector (`mm_proj`, width {md(config.get('proj_hidden', '?'))}) and one fusion block of the "
           f"{md_code(config.get('model_type', '?'))} architecture (hidden size {md(config.get('hidden_size', '?'))}). "
           f"The frozen language model {md_code(base)} and the frozen CLIP vision encoder {md_code(vision)} "
           f"(width {md(config.get('vision_dim', '?'))}) are not included: they load from their own ids. "
           "At inference each of k images (generated from the text or retrieved) is encoded by CLIP, projected and "
           "read by the fusion block over the frozen LM's hidden states; the k fused predictions are mixed with the "
           "text-only one, weighted by CLIP image-text agreement.", "",
           "## Usage", "",
           "With this repository's Python API (`pip install -r requirements.txt` in a clone):", "",
           "```python", usage_example(repo_id or str(path or folder), masked), "```", "",
           "Any eval script takes the same id: " + md_code("--pretrained_model " + (repo_id or str(path or folder))) + ".",
           ""]
    out += ["## Training", ""]
    data_rows = [(md(k), md_code(settings[k])) for k in DATA_SETTINGS if settings.get(k) not in (None, "", False)]
    if data_rows:
        out += ["Training data:", "", *table(data_rows, ("setting", "value")), ""]
    else:
        out += ["The training data was not recorded beside these weights.", ""]
    hyper = [(md(k), md_code(settings[k])) for k in HYPERPARAMETERS if settings.get(k) is not None]
    hyper += [(md(k), md_code(run_args[k])) for k in RUN_COUNTS if run_args.get(k) is not None]
    if hyper:
        out += ["Hyperparameters (from `train_config.yaml` and `config.json`):", "", *table(hyper, ("setting", "value")),
                ""]
    loss = plain_number(trained.get("train_loss"))
    out += [f"Final training loss: {loss:.4f}" + (f" (after {int(trained['completed_steps'])} optimizer steps)"
                                                  if plain_number(trained.get("completed_steps")) is not None else "")
            if loss is not None else "Final training loss: not recorded.", ""]
    if results:
        out += ["## Evaluation results", ""]
        for res in results:
            cfg = res.get("config") if isinstance(res.get("config"), dict) else {}
            images = (f"k = {md(cfg.get('k'))} images ({md(cfg.get('image_source', 'generate'))}), mix "
                      f"{md(cfg.get('mix', 'logits'))}" if cfg.get("generate_images") else "text only")
            rows = [(md(name), f"{value:.4g}") for name, value in metric_rows(res["metrics"])]
            out += [f"**{md(res['task'])}** ({images}):", "", *table(rows, ("metric", "value")), ""]
    return "\n".join(out).rstrip("\n") + "\n"


def count_parameters(folder: Path) -> int | None:
    """The number of parameters in ``model.safetensors`` (from its header only), or None."""
    path = folder / "model.safetensors"
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size <= 0 or size > 100 * MAX_FILE_BYTES:
                return None
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return None
    total = 0
    for key, entry in header.items():
        if key == "__metadata__" or not isinstance(entry, dict) or not isinstance(entry.get("shape"), list):
            continue
        n = 1
        for d in entry["shape"]:
            n *= int(d) if isinstance(d, int) and d >= 0 else 0
        total += n
    return total


def check_weights_folder(folder: str | os.PathLike) -> Path:
    """``folder`` is a train.py weights folder: ``model.safetensors`` and a readable ``config.json`` of our format."""
    from models.checkpoints.config_file import FORMAT

    p = Path(folder)
    if not p.is_dir():
        raise CardError(f"{str(folder)!r} is not a folder")
    if not (p / "model.safetensors").is_file():
        raise CardError(f"{str(folder)!r} holds no model.safetensors: not a train.py weights folder")
    config = read_json(p / "config.json")
    if config.get("format") != FORMAT:
        raise CardError(f"{str(folder)!r}: its config.json is missing, unreadable or not of a train.py weights "
                        f"folder (format {FORMAT!r})")
    return p


def write_card(folder: str | os.PathLike, *, repo_id: str | None = None,
               results_dir: str | os.PathLike | None = None) -> Path:
    """Write (replace) ``folder``'s ``README.md`` with its card; returns its path."""
    from models.write_behind import write_atomic

    p = check_weights_folder(folder)
    results = read_results(results_dir) if results_dir is not None else None
    card = render_card(p, repo_id=repo_id, results=results, n_params=count_parameters(p))
    write_atomic(p / CARD_NAME, card.encode("utf-8"))
    return p / CARD_NAME
