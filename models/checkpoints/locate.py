"""Where a checkpoint given by name is: a local folder or file (a released ``.bin``, suffix optional), or a
``train.py`` checkpoint on the Hugging Face hub, given as ``ORG/NAME``.

A local path always wins: ``output/gpt2`` is a hub id only when nothing of that name exists here. A hub id is
downloaded with ``huggingface_hub.snapshot_download`` into the HF cache (``HF_HUB_CACHE``); with
``HF_HUB_OFFLINE=1`` it is read from that cache only. Only the checkpoint's own files are fetched (weights,
config, recorded settings, card). A repo that cannot be had is one :class:`CheckpointNotFound` line naming it.
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from models.checkpoints.config_file import CheckpointError

# ORG/NAME as the hub spells repo ids: two parts, letters, digits, '-', '_', '.'; no '..', no leading '.'
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
# the files of a train.py checkpoint (and of a released .bin uploaded as is)
CHECKPOINT_FILES = ("*.safetensors", "*.json", "*.yaml", "*.md", "*.bin")


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """Neither a local checkpoint nor a hub repo of that name can be had (one line naming it)."""


def local_candidates(spec: str | os.PathLike) -> tuple[Path, ...]:
    """The local paths ``spec`` may name: itself and, for a released file, ``spec.bin``."""
    p = Path(spec).expanduser()
    return (p, p.with_name(p.name + ".bin")) if p.name else (p,)


def exists_locally(spec: str | os.PathLike) -> bool:
    return any(os.path.lexists(c) for c in local_candidates(spec))


def looks_like_hub_id(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` has the form of a hub repo id ``ORG/NAME`` (says nothing about a local path of that name)."""
    text = str(spec)
    return bool(_HUB_ID.match(text)) and ".." not in text and not text.endswith((".bin", ".safetensors"))


def is_hub_id(spec: str | os.PathLike) -> bool:
    """``spec`` names a hub repo: it has the form ``ORG/NAME`` and no local file or folder has that name."""
    return looks_like_hub_id(spec) and not exists_locally(spec)


@functools.lru_cache(maxsize=64)
def download_checkpoint(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot folder of hub checkpoint ``repo_id`` (downloaded, or from the HF cache offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=list(CHECKPOINT_FILES))
    except LocalEntryNotFoundError:
        where = "in the local HF cache (HF_HUB_OFFLINE is set)" if offline else "on the hub or in the local HF cache"
        raise CheckpointNotFound(f"checkpoint {repo_id!r}: no such local path, and no hub repo {repo_id!r} "
                                 f"{where}") from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointNotFound(f"checkpoint {repo_id!r}: no such local path, and the hub repo {repo_id!r} "
                                 f"cannot be had ({reason})") from None
    return Path(folder)


def locate_checkpoint(spec: str | os.PathLike) -> Path:
    """The local path of checkpoint ``spec``: as given when anything of that name (or ``spec.bin``) exists
    here, else the downloaded snapshot of hub repo ``spec`` (``ORG/NAME``). A path that is neither is given
    back as is (the weights reader names what it tried)."""
    if is_hub_id(spec):
        return download_checkpoint(str(spec))
    return Path(spec)
