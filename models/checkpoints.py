"""Save and load the trainable weights (``mm_proj`` + ``fusion_layer``) only.

Our format is a directory with ``model.safetensors``, a ``config.json`` naming the base LM, the
vision encoder and the projector width, and a short ``README.md`` model card.

The released vLMIG checkpoints are a ``torch.save`` of the WHOLE model's ``state_dict()`` (the
frozen LM included, e.g. ``bert.*`` and ``cls.*`` for BERT, and the CLIP tower; sometimes with a
DDP ``module.`` prefix), given with or without the ``.bin`` suffix. Only their ``mm_proj.*`` and
``fusion_layer.*`` keys are read. Loading is strict: any missing, unexpected or mis-shaped
trainable key is one clear error.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "late-fusion-trainable"
TRAINABLE_PREFIXES = ("mm_proj.", "fusion_layer.")
# Buffers older transformers versions persisted in state dicts; never trainable, safe to skip.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias", ".embeddings.position_ids",
                     ".embeddings.token_type_ids")


class CheckpointMismatchError(ValueError):
    pass


def save_trainable(model, out_dir: str | os.PathLike, *, base_model: str, vision_encoder: str,
                   extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` + ``README.md`` atomically into ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.trainable_state_dict().items()}
    save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    config = {"format": FORMAT, "base_model": base_model, "model_type": model.model_type,
              "vision_encoder": vision_encoder, "vision_dim": model.vision_dim,
              "proj_hidden": model.proj_hidden, "hidden_size": model.hidden_size, **(extra or {})}
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    n = sum(v.numel() for v in state.values())
    (tmp / "README.md").write_text(
        f"# Late-fusion weights for `{base_model}`\n\n"
        f"Trainable weights only ({n:,} parameters): the visual projector (`mm_proj`, width "
        f"{model.proj_hidden}) and one fusion block of the `{model.model_type}` architecture. The frozen "
        f"LM (`{base_model}`) and vision encoder (`{vision_encoder}`) are not included; load them "
        "from their own ids.\n")
    if out.exists():
        import shutil
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def read_checkpoint_config(path: str | os.PathLike) -> dict:
    cfg = Path(path) / CONFIG_NAME
    return json.loads(cfg.read_text()) if cfg.is_file() else {}


def _resolve(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        if (p / WEIGHTS_NAME).is_file():
            return p / WEIGHTS_NAME
        bins = sorted(p.glob("*.bin"))
        if len(bins) == 1:
            return bins[0]
        raise FileNotFoundError(f"checkpoint {str(p)!r}: no {WEIGHTS_NAME} (or single .bin) in the directory")
    if p.is_file():
        return p
    if p.with_name(p.name + ".bin").is_file():
        return p.with_name(p.name + ".bin")
    raise FileNotFoundError(f"checkpoint {str(p)!r} not found (also tried {p.name}.bin)")


def _torch_load(f: Path):
    """``torch.load`` with ``weights_only``; memory-mapped when the file's format allows, since a
    released file holds the whole LM (16.7 GB for Llama-3) of which only ~0.5 GB is read."""
    try:
        return torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(str(f), map_location="cpu", weights_only=True)  # legacy (non-zip) format


def load_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The trainable part of a checkpoint (ours or a released ``.bin``) and its config, if any."""
    f = _resolve(path)
    if f.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(f))
    else:
        try:
            state = _torch_load(f)
        except Exception as e:  # noqa: BLE001 - report any unpickling failure as one line
            raise CheckpointMismatchError(f"checkpoint {str(f)!r} cannot be read: {str(e).splitlines()[0]}") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointMismatchError(f"checkpoint {str(f)!r} does not hold a state dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    trainable = {k: v for k, v in state.items()
                 if k.startswith(TRAINABLE_PREFIXES) and not k.endswith(_IGNORED_SUFFIXES)}
    return trainable, read_checkpoint_config(f.parent)


def _describe(state: dict[str, torch.Tensor]) -> str:
    """A guess at the base LM a checkpoint was made for, from its key layout and widths."""
    keys = set(state)
    arch = ("GPT-2" if "fusion_layer.wpe.weight" in keys else
            "OPT" if any(k.startswith("fusion_layer.decoder.") for k in keys) else
            "Llama/Gemma/Qwen-style" if any(k.startswith("fusion_layer.layers.0.") for k in keys) else
            "BERT-style (masked LM)" if any(k.startswith(("fusion_layer.encoder.layer.0.",
                                                           "fusion_layer.transformer.layer.0.")) for k in keys)
            else None)
    w = state.get("mm_proj.linear2.weight")
    if arch is None and w is None:
        return "it holds no mm_proj/fusion_layer weights at all"
    width = f"hidden size {w.shape[0]}" if w is not None else "unknown hidden size"
    return f"it looks like a {arch or 'unknown'} fusion layer with {width}"


def load_trainable(model, path: str | os.PathLike, loaded: tuple[dict, dict] | None = None) -> dict:
    """Strictly load trainable weights into ``model``; returns the checkpoint's config (may be empty).
    ``loaded``: what :func:`load_state` already returned for ``path`` (to read a large file once)."""
    state, config = loaded if loaded is not None else load_state(path)
    expected = model.trainable_state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        made_for = config.get("base_model")
        hint = f"it was made for {made_for!r}" if made_for else _describe(state)
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} shape mismatches (e.g. {k}: checkpoint {tuple(state[k].shape)} "
                         f"vs model {tuple(expected[k].shape)})")
        raise CheckpointMismatchError(
            f"checkpoint {str(path)!r} does not match this {model.model_type} model "
            f"(hidden size {model.hidden_size}): {'; '.join(parts)}; {hint}")
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(state[k].to(v.dtype))
    return config
