"""The content-addressed PNG cache of generated images.

An image is a pure function of its key: (generator id, prompt, occurrence index of the prompt within an
item's prompt list, image size, steps, guidance scale, base seed, generation dtype). The key fixes the
seed of the image's own ``torch.Generator`` (:func:`models.images.provider.seed_for`), so images can be
cached on disk and shared across prompt templates, answer options, benchmarks and reruns.

The generation dtype is part of the key because fp16 and fp32 pipelines draw different images. ``fp16``
(what ``--dtype auto`` gives on CUDA, where caches are filled) is the default and is left out of the key,
so keys made before the dtype was added keep their meaning; ``fp32`` and ``bf16`` images get keys of
their own. Generators without a dtype (``toyworld``) leave it out too.

Trust: a cached PNG is used only if it is a regular file no larger than a PNG of the key's size can be
(never a device or a FIFO), its header gives the key's size (checked before any pixel is decoded, so a
decompression bomb is never expanded), it decodes and is RGB; anything else is logged and regenerated.
Writes are atomic (:mod:`models.write_behind`); a failed one (a full disk) is one warning naming the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import stat as _stat
import tempfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from models import write_behind

if TYPE_CHECKING:  # PIL loads on first use
    from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_KEY_DTYPE = "fp16"  # left out of image keys (see the module docstring)
_PROBE_NAME = re.compile(r"^\.probe-[0-9a-z_]{8}$")  # the writability probe's temporary file
MAX_PNG_BYTES = 256 * 2**20  # when the image size is not known


def max_png_bytes(image_size: "int | None") -> int:
    """The most bytes a cached RGB PNG of ``image_size`` square can hold (raw pixels, row filters, slack)."""
    if image_size is None:
        return MAX_PNG_BYTES
    return (3 * image_size + 1) * image_size * 11 // 10 + (1 << 16)


class ImageCache:
    """PNG files addressed by the sha256 of their key, under ``root/<first two hex digits>/``.

    On construction the temporary files that killed writers left behind (older than
    :data:`models.write_behind.STALE_TEMP_S`) are removed in the background.
    """

    def __init__(self, root: "str | os.PathLike"):
        self.root = Path(root).expanduser().absolute()  # absolute: the background writer outlives a chdir
        self._root = str(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.root, prefix=".probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise ValueError(f"image cache directory {self.root} is not writable: {err.strerror or err}") from None
        write_behind.submit(self.remove_stale_temps)

    def remove_stale_temps(self, older_than_s: float = write_behind.STALE_TEMP_S) -> int:
        """Remove this cache's old temporary files (``.<key>-*.tmp`` in the shard folders, ``.probe-*``)."""
        shards = [e.path for e in os.scandir(self.root) if e.is_dir() and len(e.name) == 2]
        return (write_behind.remove_stale_temps(shards, older_than_s)
                + write_behind.remove_stale_temps([self.root], older_than_s, _PROBE_NAME))

    @staticmethod
    def key(
        generator_id: str,
        prompt: str,
        index: int,
        image_size: int,
        num_inference_steps: int,
        guidance_scale: float,
        seed: int,
        dtype: "str | None" = None,
    ) -> str:
        fields = {
            "generator": str(generator_id),
            "prompt": str(prompt),
            "index": int(index),
            "image_size": int(image_size),
            "num_inference_steps": int(num_inference_steps),
            "guidance_scale": float(guidance_scale),
            "seed": int(seed),
        }
        if dtype not in (None, DEFAULT_KEY_DTYPE):
            fields["dtype"] = str(dtype)
        canonical = json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.png"

    def path_str(self, key: str) -> str:
        return os.path.join(self._root, key[:2], f"{key}.png")

    def read(self, key: str, image_size: "int | None" = None) -> "tuple[Image.Image, os.stat_result] | None":
        """The cached RGB image and its file's stat, or None when absent, unreadable, not RGB or not
        ``image_size`` square (a wrong file is logged and treated as missing, so it is regenerated)."""
        from PIL import Image

        path = self.path_str(key)
        try:
            stat = os.stat(path)
        except OSError:
            return None
        if not _stat.S_ISREG(stat.st_mode) or stat.st_size > max_png_bytes(image_size):
            why = "not a regular file" if not _stat.S_ISREG(stat.st_mode) else f"{stat.st_size} bytes, too large"
            logger.warning("image cache: cannot read %s (%s); treating it as missing", path, why)
            return None
        try:
            with Image.open(path) as image:
                if image.mode != "RGB" or (image_size is not None and image.size != (image_size, image_size)):
                    want = f"RGB {image_size}x{image_size}" if image_size is not None else "RGB"
                    logger.warning("image cache: %s is %s %dx%d, not %s; regenerating it",
                                   path, image.mode, *image.size, want)
                    return None
                image.verify()  # checksums; the image must be reopened afterwards
            with Image.open(path) as image:
                image.load()
                return image.copy(), stat
        except Exception as err:  # PIL signals broken files with OSError, SyntaxError, struct.error, ...
            logger.warning("image cache: cannot read %s (%s); treating it as missing", path, err)
            return None

    def get(self, key: str, image_size: "int | None" = None) -> "Image.Image | None":
        """The cached RGB image, or None (see :meth:`read`)."""
        found = self.read(key, image_size)
        return None if found is None else found[0]

    @staticmethod
    def encode(image: "Image.Image") -> bytes:
        """PNG bytes. zlib's run-length strategy on PNG-filtered rows: for 512 px images it encodes in about
        2/3 of the time of level 1's default strategy and the files are 5-10% smaller (level 6: 2-4x slower,
        2-4% smaller)."""
        buf = io.BytesIO()
        # save() keeps its settings on the image object while it runs: a copy lets writer threads encode an
        # image that is also being read elsewhere (or one object shared by several keys)
        image.copy().save(buf, format="PNG", compress_level=1, compress_type=zlib.Z_RLE)
        return buf.getvalue()

    def write(self, key: str, image: "Image.Image") -> os.stat_result:
        """Encode and store ``image`` atomically (runs in a writer thread); returns the file's stat."""
        return write_behind.write_atomic(self.path(key), self.encode(image))

    def put(self, key: str, image: "Image.Image") -> Path:
        """Store ``image`` now (synchronously); returns its path."""
        self.write(key, image)
        return self.path(key)
