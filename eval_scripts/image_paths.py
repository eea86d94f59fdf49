"""Where a run's sample images are: the ``image_root`` record of ``<task>.json`` and the one resolver of
the image paths in ``<task>_samples.jsonl``.

An image run records its image root once, at the top of ``<task>.json``::

    "image_root": {"path": "../../cache", "absolute": "/data/cache", "kind": "cache"}

``path`` is the image cache (``kind: cache``) or the image collection an index was built from (``kind:
index``), relative to the folder holding ``<task>.json`` (POSIX separators); ``absolute`` is the same
folder as an absolute path. Every ``images[i].path`` of the samples file is relative to that root, never
to the working directory, so a run folder and its cache moved or copied together still resolve, and so
does a run folder moved alone while the cache stays where it was.

:class:`SampleImages` resolves a sample's path: ``results_dir / image_root.path / p`` first, then
``image_root.absolute / p``. A path read from a samples file is trusted no further than its root: it
must be relative, without ``..`` or empty parts (and, in a cache, have the cache's own file layout), or
it is refused and counted as missing. Samples of runs made before the root was recorded (no
``image_root``) name their files as they were written (absolute, or relative to the eval's working
directory) and resolve as they always did.
"""
from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.images.source import ImageRoot

ROOT_KINDS = ("cache", "index")
KEY = "image_root"  # the key of <task>.json
_CACHE_FILE = re.compile(r"[0-9a-f]{2}/[0-9a-f]{64}\.png")  # models.images.cache.ImageCache.path, relative


def root_record(root: "ImageRoot", results_dir: "str | os.PathLike") -> dict:
    """The ``image_root`` entry of a ``<task>.json`` written into ``results_dir``."""
    absolute = os.path.abspath(root.path)
    try:
        rel = os.path.relpath(absolute, os.path.abspath(results_dir))
    except ValueError:  # another drive (Windows): only the absolute path names it
        rel = absolute
    return {"path": Path(rel).as_posix(), "absolute": absolute, "kind": root.kind}


def safe_relative(path, kind: str) -> PurePosixPath | None:
    """``path`` (from a samples file) as a path inside its root, or None when it could leave it."""
    if not isinstance(path, str) or not path or "\x00" in path or "\\" in path:
        return None
    p = PurePosixPath(path)
    if p.is_absolute() or any(part in ("..", "") for part in path.split("/")) or ":" in p.parts[0]:
        return None
    if kind == "cache" and not _CACHE_FILE.fullmatch(path):
        return None
    return p


class SampleImages:
    """The image files of one run's samples (``results_dir``: the folder holding ``<task>.json``;
    ``image_root``: its ``image_root`` entry, None for a run made before it was recorded).

    :meth:`resolve` turns a sample's ``path`` into a file; the distinct paths asked for and those not
    found are kept, for :meth:`missing_line`.
    """

    def __init__(self, results_dir: "str | os.PathLike", image_root=None):
        self.results_dir = Path(results_dir)
        self.legacy = image_root is None
        self.kind = None
        self.roots: list[Path] = []
        self.malformed = False
        if not self.legacy:
            if isinstance(image_root, dict) and image_root.get("kind") in ROOT_KINDS:
                self.kind = image_root["kind"]
                if isinstance(image_root.get("path"), str) and image_root["path"]:
                    self.roots.append(self.results_dir / image_root["path"])
                if isinstance(image_root.get("absolute"), str) and os.path.isabs(image_root["absolute"]):
                    self.roots.append(Path(image_root["absolute"]))
            self.malformed = not self.roots
        self.asked: set[str] = set()
        self.missing: set[str] = set()

    def resolve(self, path) -> Path | None:
        """The file a sample's image ``path`` names, or None (refused, or found in none of the roots)."""
        key = str(path)
        self.asked.add(key)
        found = self._find(path)
        if found is None:
            self.missing.add(key)
        return found

    def _find(self, path) -> Path | None:
        if self.legacy:
            return Path(path) if isinstance(path, str) and path and "\x00" not in path \
                and os.path.isfile(path) else None
        rel = safe_relative(path, self.kind)
        if rel is None:
            return None
        for root in self.roots:
            candidate = root / rel
            if candidate.is_file():
                return candidate
        return None

    def where(self) -> str:
        """Where :meth:`resolve` looks, in words."""
        if self.legacy:
            return (f"as the samples name them (this run records no image root; relative paths from the working "
                    f"directory {os.getcwd()})")
        if self.malformed:
            return "nowhere: the run's image_root entry is malformed"
        return " and ".join(str(r) for r in dict.fromkeys(self.roots)) + f" (the run's image {self.kind})"

    def missing_line(self) -> str | None:
        """One line saying how many images were not found and where they were looked for; None if none."""
        if not self.missing:
            return None
        n, total = len(self.missing), len(self.asked)
        return f"{n} of {total} image{'s' if total != 1 else ''} not found; looked in {self.where()}"
