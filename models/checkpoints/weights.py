"""Save and load the trainable weights (``mm_proj`` + ``fusion_layer``) only.

Our format is a directory with ``model.safetensors``, a ``config.json`` naming the base LM, the
vision encoder and the projector width, and a ``README.md`` model card (:mod:`models.card`). A checkpoint
is named by its path, or by a hub id ``ORG/NAME`` (:mod:`models.checkpoints.locate`).

The released vLMIG checkpoints are a ``torch.save`` of the WHOLE model's ``state_dict()`` (the
frozen LM included, e.g. ``bert.*`` and ``cls.*`` for BERT, and the CLIP tower; sometimes with a
DDP ``module.`` prefix), given with or without the ``.bin`` suffix. Only their ``mm_proj.*`` and
``fusion_layer.*`` keys are read, with ``weights_only=True``: nothing in a file can run code. Loading is
strict: any missing, unexpected or mis-shaped trainable key, any non-finite value, and any unreadable
file (empty, truncated, random bytes, a pickle of objects) is one clear single-line error naming the file.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch

from models.checkpoints.config_file import (CONFIG_NAME, FORMAT, CheckpointError, portable_ref,  # noqa: F401
                                            read_checkpoint_config)

WEIGHTS_NAME = "model.safetensors"
TRAINABLE_PREFIXES = ("mm_proj.", "fusion_layer.")
# Buffers older transformers versions persisted in state dicts; never trainable, safe to skip.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias", ".embeddings.position_ids",
                     ".embeddings.token_type_ids")


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint that does not fit the model."""


def save_trainable(model, out_dir: str | os.PathLike, *, base_model: str, vision_encoder: str,
                   extra: dict | None = None, files: dict[str, str] | None = None,
                   state: dict | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` + ``README.md`` (the model card, :mod:`models.card`) and
    the text ``files``, by name, atomically into ``out_dir``. ``state``: the trainable weights, when the caller
    has gathered them (FSDP2's shards); by default ``model.trainable_state_dict()``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous()
             for k, v in (model.trainable_state_dict() if state is None else state).items()}
    save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    # other models by hub id, absolute path, or relative to this folder: the config holds from anywhere
    base_model, vision_encoder = portable_ref(base_model, out), portable_ref(vision_encoder, out)
    config = {"format": FORMAT, "base_model": base_model, "model_type": model.model_type,
              "vision_encoder": vision_encoder, "vision_dim": model.vision_dim,
              "proj_hidden": model.proj_hidden, "hidden_size": model.hidden_size, **(extra or {})}
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    for name, text in (files or {}).items():
        (tmp / name).write_text(text, encoding="utf-8")
    from models.card import CARD_NAME, render_card

    n = sum(v.numel() for v in state.values())  # the card reads config.json and the files just written
    (tmp / CARD_NAME).write_text(render_card(tmp, n_params=n, kind=model.kind, path=out), encoding="utf-8")
    import shutil

    old = out.with_name(out.name + ".replaced")  # the previous weights stay whole until the new ones are in place
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def _resolve(path: str | os.PathLike) -> Path:
    from models.checkpoints.locate import locate_checkpoint

    p = locate_checkpoint(path)  # a local path as is; a hub id ORG/NAME downloaded (or from the HF cache)
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


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
_PICKLE_MAGIC = b"\x80"  # torch.save's legacy format starts with a pickle protocol opcode


def _torch_load(f: Path):
    """``torch.load`` with ``weights_only``; memory-mapped when the file's format allows, since a
    released file holds the whole LM (16.7 GB for Llama-3) of which only ~0.5 GB is read.

    Every failure is one :class:`CheckpointError` line. torch's own messages are not passed on: they
    suggest ``weights_only=False``, which would let the file run code."""
    with open(f, "rb") as handle:
        head = handle.read(4)
    if not head:
        raise CheckpointError(f"checkpoint {str(f)!r} is empty (0 bytes): not a checkpoint")
    if head != _ZIP_MAGIC and not head.startswith(_PICKLE_MAGIC):
        raise CheckpointError(f"checkpoint {str(f)!r} is not a checkpoint (neither a safetensors file nor a "
                              "PyTorch state dict)")
    try:
        if head == _ZIP_MAGIC:
            return torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
        return torch.load(str(f), map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError:
        raise CheckpointError(f"checkpoint {str(f)!r} is not a plain state dict of tensors (it holds other Python "
                              "objects, which are never loaded)") from None
    except Exception as e:  # noqa: BLE001 - zip, storage and EOF errors of a damaged file
        raise CheckpointError(f"checkpoint {str(f)!r} is truncated or corrupt ({type(e).__name__})") from None


def read_safetensors(f: str | os.PathLike, data: bytes | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (or of its bytes ``data``), or one :class:`CheckpointError` line."""
    from safetensors import SafetensorError
    from safetensors.torch import load, load_file

    try:
        return load(data) if data is not None else load_file(str(f))
    except (SafetensorError, ValueError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{str(f)!r} is not a valid safetensors file ({reason})") from None


def check_finite(state: dict[str, torch.Tensor], where: str | os.PathLike) -> None:
    """One :class:`CheckpointError` naming the first tensor of ``state`` holding NaN or inf."""
    for key, value in state.items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"checkpoint {str(where)!r}: {key} holds {bad} non-finite value(s) (NaN or inf)")


def load_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The trainable part of a checkpoint (ours or a released ``.bin``) and its config, if any.
    Raises :class:`CheckpointError` when the file is unreadable or a trainable tensor is not finite."""
    f = _resolve(path)
    if f.suffix == ".safetensors":
        state = read_safetensors(f)
    else:
        state = _torch_load(f)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"checkpoint {str(f)!r} does not hold a state dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    trainable = {k: v for k, v in state.items()
                 if k.startswith(TRAINABLE_PREFIXES) and not k.endswith(_IGNORED_SUFFIXES)}
    if not all(torch.is_tensor(v) for v in trainable.values()):
        raise CheckpointError(f"checkpoint {str(f)!r}: its mm_proj/fusion_layer entries are not all tensors")
    check_finite(trainable, f)
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
