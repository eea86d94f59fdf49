"""Where a run's sample images are: the ``image_root`` record of ``<task>.json`` and the one resolver of
the image paths in ``<task>_samples.jsonl`` (the report uses it too).

An image run records its image root once, at the top of ``<task>.json``::

    "image_root": {"path": "../../cache", "absolute": "/data/cache", "kind": "cache"}

``path`` is the image cache (``kind: cache``) or the image collection an index was built from (``kind:
index``), relative to the folder holding ``<task>.json`` (POSIX separators); ``absolute`` is the same
folder as an absolute path. Every ``images[i].path`` of the samples file is relative to that root, never
to the working directory, so a run folder and its cache moved or copied together still resolve, and so
does a run folder moved alone while the cache stays where it was.

:class:`SampleImages` resolves a sample's path: ``results_dir / image_root.path / p`` first, then
``image_root.absolute / p``. A path read from a samples file is trusted no further than its root:

* it must be relative, without ``..`` or empty parts, and in a cache have the cache's own file layout
  (``xx/<sha256>.png``, so a hostile ``<task>.json`` calling some folder its cache finds none of its files);
* the file it names, symlinks resolved, must lie inside the root;
* a root is no root when it is a filesystem root or holds the user's home folder (it would let a path
  name anything), and an entry of an unknown kind names no root.

Anything else is refused and counted as missing. Samples of runs made before the root was recorded (no
``image_root``) name their files as they were written (absolute, or relative to the eval's working
directory): :meth:`SampleImages.of_result` confines them to the run's recorded ``--image_cache`` or, for a
retrieving run, to the collection root its index's manifest names; ``SampleImages(results_dir)`` alone
resolves them as written, as it always did.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.images.source import ImageRoot

ROOT_KINDS = ("cache", "index")
KEY = "image_root"  # the key of <task>.json
MAX_MANIFEST_BYTES = 2**20  # an index manifest, read for an older run's collection root
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


def usable_root(path: Path) -> Path | None:
    """``path`` resolved, when it is an existing folder narrower than a filesystem root or a home folder."""
    try:
        real = Path(path).resolve()
    except (OSError, RuntimeError, ValueError):  # ValueError: a NUL in the name
        return None
    home = Path.home().resolve()
    if not real.is_dir() or real == Path(real.anchor) or home.is_relative_to(real):
        return None
    return real


def _manifest_root(index_dir: str) -> str | None:
    """The collection root an index's manifest names (read bounded), or None."""
    try:
        with open(Path(index_dir) / "manifest.json", "rb") as f:
            manifest = json.loads(f.read(MAX_MANIFEST_BYTES + 1)[:MAX_MANIFEST_BYTES])
    except (OSError, ValueError):
        return None
    root = manifest.get("image_root") if isinstance(manifest, dict) else None
    return root if isinstance(root, str) else None


def legacy_places(result: dict) -> list[str]:
    """Where the pictures of a run that records no ``image_root`` are, from its recorded config: the
    collection root of a retrieving run's index, else its image cache (as written)."""
    cfg = result.get("config") if isinstance(result.get("config"), dict) else {}
    if cfg.get("image_source") == "retrieve" and isinstance(cfg.get("image_index"), str):
        root = _manifest_root(cfg["image_index"])
        return [root] if root is not None else []
    return [cfg["image_cache"]] if isinstance(cfg.get("image_cache"), str) else []


class SampleImages:
    """The image files of one run's samples (``results_dir``: the folder holding ``<task>.json``;
    ``image_root``: its ``image_root`` entry, None for a run made before it was recorded, whose paths are
    then confined to ``legacy_roots`` when given, or resolved as written when not).

    :meth:`find` turns a sample's ``path`` into a file and says why when it cannot; :meth:`resolve` is the
    same without the reason. The distinct paths asked for and those not found are kept, for
    :meth:`missing_line`.
    """

    def __init__(self, results_dir: "str | os.PathLike", image_root=None, legacy_roots=None):
        self.results_dir = Path(results_dir)
        self.legacy = image_root is None
        self.kind = None
        self.places: list[str] = []  # where the files are looked for, as recorded (for the line on missing ones)
        self.confined = not self.legacy or legacy_roots is not None
        if not self.legacy:
            if isinstance(image_root, dict) and image_root.get("kind") in ROOT_KINDS:
                self.kind = image_root["kind"]
                if isinstance(image_root.get("path"), str) and image_root["path"]:
                    self.places.append(str(self.results_dir / image_root["path"]))
                if isinstance(image_root.get("absolute"), str) and os.path.isabs(image_root["absolute"]):
                    self.places.append(image_root["absolute"])
        elif legacy_roots is not None:
            self.places = [str(p) for p in legacy_roots]
        self.malformed = not self.legacy and not self.places
        self.roots = list(dict.fromkeys(r for p in self.places if (r := usable_root(Path(p))) is not None))
        self.asked: set[str] = set()
        self.missing: set[str] = set()

    @classmethod
    def of_result(cls, results_dir: "str | os.PathLike", result: dict) -> "SampleImages":
        """The resolver of a run from its ``<task>.json`` (``result``): its recorded image root, or for an
        older run the folders its config names (:func:`legacy_places`)."""
        if KEY in result:
            return cls(results_dir, result[KEY])
        return cls(results_dir, legacy_roots=legacy_places(result))

    def resolve(self, path) -> Path | None:
        """The file a sample's image ``path`` names, or None (refused, or found in none of the roots)."""
        return self.find(path)[0]

    def find(self, path) -> tuple[Path | None, str | None]:
        """``(file, None)`` for the file a sample's image ``path`` names, else ``(None, reason)``: ``outside``
        (a path that could leave its root, or a file through a link leaving it) or ``missing``."""
        key = str(path)
        self.asked.add(key)
        found, reason = self._find(path)
        if found is None:
            self.missing.add(key)
        return found, reason

    def _find(self, path) -> tuple[Path | None, str | None]:
        if not isinstance(path, str) or not path or "\x00" in path:
            return None, "missing"
        if not self.confined:  # an older run, resolved as written
            return (Path(path), None) if os.path.isfile(path) else (None, "missing")
        rel = None  # an older run's path, confined to the roots as written
        if not self.legacy and (rel := safe_relative(path, self.kind) if self.kind else PurePosixPath(path)) is None:
            return None, "outside"
        if not self.roots:  # a recorded root that is not there (moved, cleared or malformed): not found
            return None, "outside" if self.legacy else "missing"
        reason = "outside"
        for root in self.roots:
            try:
                real = (root / rel).resolve() if rel is not None else Path(path).resolve()
            except (OSError, RuntimeError, ValueError):
                continue
            if not real.is_relative_to(root) or real == root:
                continue
            if real.is_file():
                return real, None
            reason = "missing"
        return None, reason

    def where(self) -> str:
        """Where :meth:`find` looks, in words."""
        if not self.confined:
            return (f"as the samples name them (this run records no image root; relative paths from the working "
                    f"directory {os.getcwd()})")
        if self.malformed:
            return "nowhere: the run's image_root entry is malformed"
        if not self.places:
            return "nowhere: this run records no image root, and its config names no image cache or index"
        what = f"the run's image {self.kind}" if self.kind else "the folder its config names"
        return " and ".join(dict.fromkeys(self.places)) + f" ({what})"

    def missing_line(self) -> str | None:
        """One line saying how many images were not found and where they were looked for; None if none."""
        if not self.missing:
            return None
        n, total = len(self.missing), len(self.asked)
        return f"{n} of {total} image{'s' if total != 1 else ''} not found; looked in {self.where()}"
