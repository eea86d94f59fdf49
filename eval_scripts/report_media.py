"""Pictures for a self-contained report: the reasons a picture is not shown, the check of an indexed picture's
bytes, and thumbnails as ``data:`` URIs.

A samples file names its images, and a samples file may be hostile. Which file a recorded path names, if any, is
decided by the one resolver of sample image paths, :class:`eval_scripts.image_paths.SampleImages` (inside the
run's image root, symlinks resolved, or refused); this module adds what embedding needs on top:

* a root of kind ``index`` (an image collection: any file name) shows a file only when its sha256 is the one the
  run recorded for that image (:func:`verified`; retrieval runs record the index's digest of each image), so a
  hostile ``<task>.json`` naming a folder of private pictures as its collection cannot show them without knowing
  their bytes;
* images are opened with a pixel limit, checked from the header before anything is decoded: a decompression bomb
  becomes a placeholder. Thumbnails are WebP (JPEG where Pillow lacks WebP) of at most ``size`` pixels a side;
* :class:`MediaLog` counts what was not shown, so the report can say so in one warning per kind.
"""
from __future__ import annotations

import base64
import io
import warnings
from collections import Counter
from functools import lru_cache
from pathlib import Path

MAX_IMAGE_PIXELS = 40_000_000  # a picture larger than this (e.g. 20000 x 20000) is not decoded
MAX_IMAGE_BYTES = 64 * 2**20
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
    """``(data: URI, None)`` of the picture at ``path`` (already resolved by ``SampleImages.find``) scaled to fit
    ``size`` x ``size``, or ``(None, reason)``."""
    return _thumbnail(Path(path), size, quality)


def png_uri(fig, dpi: int = 100) -> str:
    """A matplotlib figure as a PNG ``data:`` URI (closed afterwards)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return _data_uri(buf.getvalue(), "image/png")
