"""The ``config.json`` of a trained-weights folder, read without torch (option resolution reads it before
any model loads: the vision encoder a checkpoint was trained with is the default of ``--vision_encoder``).

Where the config names the base LM (``base_model``) and the vision encoder (``vision_encoder``), the names
hold wherever the folder is and whatever the working directory (:func:`portable_ref` when written,
:func:`resolve_ref` when read): a hub id or open_clip name as it is; a local folder by its absolute path,
or, when it lies inside the checkpoint folder, relative to it (``local-dir:./clip``), so that the folder can
be moved or copied whole. A relative name read from a config never leaves the checkpoint folder (``..`` or a
link out of it is refused). Configs written before this named local folders relative to the working
directory of the training run (``local-dir:output/demo/clip``): such a name that is no folder of the
checkpoint is still taken from the working directory, as it was.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

CONFIG_NAME = "config.json"
FORMAT = "late-fusion-trainable"
MAX_CONFIG_BYTES = 1 << 20
PATH_PREFIXES = ("local-dir:", "hf-clip:")  # vision-encoder specs whose rest is a path
REF_FIELDS = ("base_model", "vision_encoder")  # the names of other models a config holds


class CheckpointError(ValueError):
    """A weights file that cannot be used: unreadable, not a checkpoint, or holding non-finite values."""


def _split(value: str) -> tuple[str, str]:
    for prefix in PATH_PREFIXES:
        if value.startswith(prefix):
            return prefix, value[len(prefix):]
    return "", value


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def portable_ref(value, checkpoint_dir: str | os.PathLike):
    """How a config written into ``checkpoint_dir`` names a model: a local folder by its absolute path, or
    as ``./RELATIVE`` when it lies inside the checkpoint folder (keeping a ``local-dir:``/``hf-clip:``
    prefix); anything else (a hub id, an open_clip name) as it is."""
    if not isinstance(value, str):
        return value
    prefix, rest = _split(value)
    if not rest or not os.path.isdir(rest):
        return value
    full, folder = Path(os.path.abspath(rest)), Path(os.path.abspath(checkpoint_dir))
    if _inside(full, folder) and full != folder:
        return f"{prefix}./{full.relative_to(folder).as_posix()}"
    return prefix + str(full)


def resolve_ref(value, checkpoint_dir: str | os.PathLike, field: str = "name"):
    """A model name read from the config of ``checkpoint_dir``, as a name that holds from any working
    directory: a relative path that is a folder of the checkpoint becomes its absolute path; one that would
    leave the checkpoint folder is a CheckpointError; an older config's path relative to the training run's
    working directory is kept when it is no folder of the checkpoint; hub ids and absolute paths are kept."""
    if not isinstance(value, str) or not value:
        return value
    prefix, rest = _split(value)
    if not rest or os.path.isabs(rest):
        return value
    parts = rest.replace("\\", "/").split("/")
    if ".." in parts:
        raise CheckpointError(f"{str(Path(checkpoint_dir) / CONFIG_NAME)!r}: {field} {value!r} leaves the "
                              "checkpoint folder")
    folder = Path(checkpoint_dir).resolve()
    inside = folder / rest
    if inside.is_dir():
        if not _inside(inside.resolve(), folder):
            raise CheckpointError(f"{str(Path(checkpoint_dir) / CONFIG_NAME)!r}: {field} {value!r} links out of "
                                  "the checkpoint folder")
        return prefix + str(inside.resolve())
    if rest.startswith("./"):
        return prefix + str(inside)  # meant inside the checkpoint: not there (the loader names the folder)
    return value  # a hub id, or (explicit) an older config's folder relative to the working directory


def read_checkpoint_config(path: str | os.PathLike) -> dict:
    """The ``config.json`` beside a checkpoint ({} when there is none), with the base LM and vision
    encoder it names resolved against the checkpoint folder (:func:`resolve_ref`); one CheckpointError
    line if unreadable."""
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
    for field in REF_FIELDS:
        if field in config:
            config[field] = resolve_ref(config[field], path, field)
    return config
