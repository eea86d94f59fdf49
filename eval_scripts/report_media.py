"""Pictures for a self-contained report: which image files a run may show, and their thumbnails as ``data:`` URIs.

A samples file names its images, and a samples file may be hostile, so a picture is embedded only when it lies
inside the run's image root (symlinks resolved): :func:`image_roots` says which roots a run has, and
:func:`resolve_image` is the one place a recorded image path becomes a file. Everything else is refused and shown
as a placeholder; :class:`MediaLog` counts what was refused, so the report can say so in one warning per kind.

* A result file carrying ``image_root`` (``{"path": <relative to the folder of <task>.json>, "absolute": ...}``)
  names paths relative to that root: ``<run folder>/<path>/<p>``, else ``<absolute>/<p>``.
* An older result (no ``image_root``): the recorded ``--image_cache`` of a generating run, or the collection
  root in the manifest of a retrieving run's ``--image_index``, holds its pictures.

A root that is a filesystem root or holds the user's home folder is no root (it would let a file name anything).
A recorded root of kind ``cache`` shows only files named as the image cache names them (``xx/<sha256>.png``),
so a hostile ``<task>.json`` calling some folder its cache shows none of that folder's own pictures. A root of
kind ``index`` (an image collection: any file name) shows a file only when its sha256 is the one the run
recorded for that image (:func:`verified`; retrieval runs record the index's digest of each image), so a hostile
``<task>.json`` naming a folder of private pictures as its collection cannot show them without knowing their
bytes. An entry of an unknown kind names no root.
Images are opened with a pixel limit, checked from the header before anything is decoded: a decompression bomb
becomes a placeholder. Thumbnails are WebP (JPEG where Pillow lacks WebP) of at most ``size`` pixels a side.
"""
from __future__ import annotations

import base64
import io
import json
import warnings
from collections import Counter
from functools import lru_cache
from pathlib import Path

MAX_IMAGE_PIXELS = 40_000_000  # a picture larger than this (e.g. 20000 x 20000) is not decoded
MAX_IMAGE_BYTES = 64 * 2**20
MAX_MANIFEST_BYTES = 2**20
REASONS = {
    "outside": "named outside the run's image root (or through a link leaving it): not embedded",
    "missing": "not found (a cache moved or cleared since the run)",
    "too large": f"larger than {MAX_IMAGE_PIXELS // 1_000_000} million pixels or {MAX_IMAGE_BYTES // 2**20} MiB: "
                 "not decoded",
    "unreadable": "not a readable picture",
    "unverified": "in an image collection but not the file the run recorded (its sha256 differs or was not "
                  "recorded): not embedded",
}


class MediaLog(Counter):
    """How many pictures were not embedded, by reason (see :data:`REASONS`)."""

    looked: dict  # the image roots the report looked in, in order (for the line on missing images)

    def look(self, places) -> None:
        if not hasattr(self, "looked"):
            self.looked = {}
        self.looked.update(dict.fromkeys(str(p) for p in places))

    def warnings(self) -> list[str]:
        where = list(getattr(self, "looked", {}))
        return [f"warning: {n} image{'s' if n > 1 else ''} {REASONS[reason]}"
                + (f"; looked in {' and '.join(where)}" if reason == "missing" and where else "")
                + "; placeholders shown" for reason, n in self.items() if n]


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _usable_root(path: Path) -> Path | None:
    """``path`` resolved, when it is an existing folder narrower than a filesystem root or a home folder."""
    try:
        real = path.resolve()
    except (OSError, RuntimeError, ValueError):  # ValueError: a NUL in the name
        return None
    home = Path.home().resolve()
    if not real.is_dir() or real == Path(real.anchor) or home.is_relative_to(real):
        return None
    return real


def _manifest_root(index_dir) -> Path | None:
    try:
        with open(Path(index_dir) / "manifest.json", "rb") as f:
            manifest = json.loads(f.read(MAX_MANIFEST_BYTES + 1)[:MAX_MANIFEST_BYTES])
        root = manifest.get("image_root") if isinstance(manifest, dict) else None
    except (OSError, ValueError):
        return None
    return Path(root) if isinstance(root, str) else None


def image_roots(results_dir: Path, result: dict) -> tuple[list[Path], bool]:
    """The roots a run's pictures may come from, resolved, and whether its paths are relative to them
    (``image_root`` recorded) rather than as written (older results)."""
    declared = result.get("image_root")
    if isinstance(declared, dict):
        if root_kind(result) is None:  # a malformed entry names no root
            return [], True
        candidates = []
        if isinstance(declared.get("path"), str):
            candidates.append(Path(results_dir) / declared["path"])
        if isinstance(declared.get("absolute"), str):
            candidates.append(Path(declared["absolute"]))
        roots = [r for c in candidates if (r := _usable_root(c)) is not None]
        return roots[:1], True
    cfg = result.get("config") if isinstance(result.get("config"), dict) else {}
    candidates = []
    if cfg.get("image_source") == "retrieve" and isinstance(cfg.get("image_index"), str):
        candidates.append(_manifest_root(cfg["image_index"]))
    elif isinstance(cfg.get("image_cache"), str):
        candidates.append(Path(cfg["image_cache"]))
    return [r for c in candidates if c is not None and (r := _usable_root(c)) is not None], False


def root_kind(result: dict) -> str | None:
    """The recorded image root's kind (``cache`` or ``index``: :data:`eval_scripts.image_paths.ROOT_KINDS`), or None."""
    from eval_scripts.image_paths import ROOT_KINDS

    declared = result.get("image_root")
    kind = declared.get("kind") if isinstance(declared, dict) else None
    return kind if kind in ROOT_KINDS else None


def looked_in(results_dir: Path, result: dict) -> list[str]:
    """Where a run's pictures are looked for (the recorded image root's two spellings, else the recorded
    cache), as written: what the line on missing images names."""
    declared = result.get("image_root")
    if isinstance(declared, dict):
        return ([str(Path(results_dir) / declared["path"])] if isinstance(declared.get("path"), str) else []) + \
               ([declared["absolute"]] if isinstance(declared.get("absolute"), str) else [])
    cfg = result.get("config") if isinstance(result.get("config"), dict) else {}
    return [cfg["image_cache"]] if isinstance(cfg.get("image_cache"), str) else []


def _file_sha256(path: Path) -> str | None:
    import hashlib

    try:
        if path.stat().st_size > MAX_IMAGE_BYTES:
            return None
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def verified(path: Path, sha256) -> bool:
    """Whether the file at ``path`` holds the bytes whose sha256 a retrieval run recorded (``sha256``)."""
    return isinstance(sha256, str) and len(sha256) == 64 and _file_sha256(path) == sha256.lower()


def resolve_image(roots: list[Path], relative: bool, path, kind: str | None = None) -> tuple[Path | None, str | None]:
    """The file a recorded image path names, resolved, when it lies inside one of ``roots``: ``(path, None)``;
    else ``(None, reason)`` with a reason of :data:`REASONS`. A path relative to a recorded root must also pass
    that root's rule (:func:`eval_scripts.image_paths.safe_relative`: in an image cache, only the cache's own
    ``xx/<sha256>.png`` names), so a hostile ``<task>.json`` naming some folder as a cache shows nothing of it."""
    if not isinstance(path, str) or not path or "\x00" in path:
        return None, "missing"
    if relative and kind is not None:
        from eval_scripts.image_paths import safe_relative

        if safe_relative(path, kind) is None:
            return None, "outside"
    for root in roots:
        try:
            real = (root / path).resolve() if relative else Path(path).resolve()
        except (OSError, RuntimeError, ValueError):
            continue
        if real.is_relative_to(root) and real != root:
            return (real, None) if real.is_file() else (None, "missing")
    return None, "outside"


@lru_cache(maxsize=4096)
def _thumbnail(path: Path, size: int, quality: int) -> tuple[str | None, str | None]:
    from PIL import Image, UnidentifiedImageError, features

    try:
        if path.stat().st_size > MAX_IMAGE_BYTES:
            return None, "too large"
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            w, h = im.size  # read from the header: nothing is decoded yet
            if w * h > MAX_IMAGE_PIXELS:
                return None, "too large"
            im.draft("RGB", (size, size))
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            if features.check("webp"):
                im.save(buf, "WEBP", quality=quality, method=4)
                return _data_uri(buf.getvalue(), "image/webp"), None
            im.save(buf, "JPEG", quality=quality, optimize=True)
            return _data_uri(buf.getvalue(), "image/jpeg"), None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "too large"
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError):
        return None, "unreadable"


def thumbnail(path: Path, size: int = 128, quality: int = 60) -> tuple[str | None, str | None]:
    """``(data: URI, None)`` of the picture at ``path`` (already resolved by :func:`resolve_image`) scaled to fit
    ``size`` x ``size``, or ``(None, reason)``."""
    return _thumbnail(Path(path), size, quality)


def png_uri(fig, dpi: int = 100) -> str:
    """A matplotlib figure as a PNG ``data:`` URI (closed afterwards)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return _data_uri(buf.getvalue(), "image/png")
