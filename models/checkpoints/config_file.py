"""The ``config.json`` of a trained-weights folder, read without torch (option resolution reads it before
any model loads: the vision encoder a checkpoint was trained with is the default of ``--vision_encoder``)."""
from __future__ import annotations

import json
import os
from pathlib import Path

CONFIG_NAME = "config.json"
FORMAT = "late-fusion-trainable"
MAX_CONFIG_BYTES = 1 << 20


class CheckpointError(ValueError):
    """A weights file that cannot be used: unreadable, not a checkpoint, or holding non-finite values."""


def read_checkpoint_config(path: str | os.PathLike) -> dict:
    """The ``config.json`` beside a checkpoint ({} when there is none); one CheckpointError line if unreadable."""
    cfg = Path(path) / CONFIG_NAME
    if not cfg.is_file():
        return {}
    if cfg.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{str(cfg)!r} is larger than a checkpoint config can be ({MAX_CONFIG_BYTES} bytes)")
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{str(cfg)!r} is not valid JSON ({type(e).__name__})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{str(cfg)!r} does not hold a JSON object")
    return config
