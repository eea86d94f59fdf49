"""A CLIP index over a local image collection: retrieved images as an alternative to generated ones.

Build one (batched, resumable, sharded over processes under ``accelerate launch``)::

    python -m models.images.index build --images DIR --out INDEX_DIR --vision_encoder ViT-B-32-quickgelu/openai
    python -m models.images.index build --images captions_val2017.json --image_root val2017/ --out INDEX_DIR
    accelerate launch -m models.images.index build --images DIR --out INDEX_DIR     # one shard per process

``--images`` is a folder (every JPEG, PNG and WebP under it, recursively, in sorted path order; captions
are read from a ``captions.jsonl`` beside the images when there is one, rows ``{"image": relative path,
"caption": text}``) or a COCO-style captions JSON (``images`` with ``file_name``, ``annotations`` with
``image_id`` and ``caption``) whose files lie under ``--image_root``.

An index folder holds:

* ``embeddings.npy``: float32 ``[count, dim]``, the L2-normalised CLIP image embeddings, one row per image
  (``np.load(..., mmap_mode="r")`` maps it without reading it);
* ``paths.txt``: the image of each row, relative to the image root, one per line;
* ``digests.npy``: uint8 ``[count, 32]``, the SHA-256 of each row's image bytes;
* ``captions.jsonl`` (captioned collections): the captions of each row, one JSON list per line;
* ``skipped.txt`` (when some images could not be read): ``path<TAB>reason`` lines;
* ``manifest.json``, written last: the encoder's identity (spec and the embedding of a fixed probe
  image), the count and dimension, the image root, ``content_sha256`` (the images' relative paths and
  bytes, in row order), ``embeddings_sha256`` and ``captions_sha256``.

Trust (an index folder may have been edited by anyone): opening one checks the embeddings against their
checksum, ``paths.txt`` with ``digests.npy`` against ``content_sha256`` and the captions against theirs, so an
edited, reordered or swapped row is refused in one line; no row may be absolute or hold ``..``, and every path
served must resolve inside the image root (a symlink leaving it is refused); a retrieved image whose bytes
are not the ones the row was built from is refused too. At build time a captions JSON naming a file outside
``--image_root`` (absolute, ``..``) or a file that resolves outside the collection (a symlink) is refused.

Resuming: each batch of ``--batch_size`` images is embedded into its own file under ``INDEX_DIR/.partial``
(written atomically) with the SHA-256 of each of its images' bytes, so a killed build continues with the
batches still missing and, the batch layout being fixed, ends with a byte-identical ``embeddings.npy``. A
resumed build checks each finished batch first: one that cannot be read (truncated) or whose images' bytes
changed since (a replaced image) is named in one warning, dropped and embedded again. Unreadable images are
skipped, counted and reported once. A finished index is never overwritten without ``--overwrite``. An OS
error (a full disk) is one line naming the file, exit status 2, and leaves no temporary file.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import io
import json
import os
import shutil
import stat as _stat
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from models.distributed import agree_on, barrier, check_in, close, report, step, world
from models.options import Option, catalog
from models.options.dtypes import AUTO_HALF, AUTO_RULES
from models.write_behind import os_error_line, sha256_file, write_atomic

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
EMBEDDINGS, PATHS, DIGESTS, CAPTIONS, SKIPPED, MANIFEST, PARTIAL = (
    "embeddings.npy", "paths.txt", "digests.npy", "captions.jsonl", "skipped.txt", "manifest.json", ".partial")
INDEX_FILES = (EMBEDDINGS, PATHS, DIGESTS, CAPTIONS, SKIPPED, MANIFEST, PARTIAL)
FORMAT = 2
READABLE_FORMATS = (1, 2)  # format 1 has no digests.npy: its rows are checked by hashing the images on opening
MAX_IMAGE_BYTES = 256 * 2**20  # a larger file is no image this index reads
PROBE_MIN_COSINE = 0.99  # the same encoder in another dtype or on another device stays far above this


class ImageIndexError(ValueError):
    """Bad input or a missing, corrupt or mismatched index: reported as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------- the collection
@dataclass
class Collection:
    """The images to index: ``paths`` relative to ``root`` (POSIX separators, sorted), and the captions of each
    image when the collection has any (``None`` otherwise)."""

    root: Path
    paths: list[str]
    captions: list[list[str]] | None
    source: str


def unsafe_relative(rel: str) -> str | None:
    """Why ``rel`` cannot name a file under a root (absolute, ``..``, empty, line breaks), or None."""
    if not rel:
        return "is empty"
    if any(c in rel for c in "\0\n\r"):
        return "holds a NUL or line break"
    if rel.startswith("/"):
        return "is absolute"
    if ".." in rel.split("/"):
        return "holds '..'"
    return None


def resolve_inside(root_real: str, path: str) -> tuple[bool, str]:
    """Whether ``path`` (symlinks followed) lies inside the real folder ``root_real``, and its real path."""
    real = os.path.realpath(path)
    return real.startswith(root_real.rstrip(os.sep) + os.sep), real


def read_image_bytes(path, limit: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (never a device, a FIFO or a huge file);
    ``ValueError`` (or ``OSError``) otherwise."""
    from models.bounded_read import read_bounded

    return read_bounded(path, limit, lambda _size: f"larger than {limit >> 20} MiB")


def _read_bounded(path: Path, limit: int) -> bytes:
    """An index file's bytes, refused (``ValueError``) when it is not a regular file or exceeds ``limit``."""
    return read_image_bytes(path, limit)


def _caption_list(value) -> list[str]:
    values = value if isinstance(value, list) else [value]
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


def _folder_collection(folder: Path) -> Collection:
    paths = []
    for here, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d != PARTIAL)
        for name in files:
            if name.lower().endswith(IMAGE_SUFFIXES):
                rel = PurePosixPath(Path(here, name).relative_to(folder).as_posix())
                if "\n" not in str(rel) and "\r" not in str(rel):  # paths.txt holds one path per line
                    paths.append(str(rel))
    paths.sort()
    if not paths:
        raise ImageIndexError(f"--images {folder}: no JPEG, PNG or WebP images under it")
    captions = None
    caption_file = folder / "captions.jsonl"
    if caption_file.is_file():
        from data.benchmarks import read_jsonl

        by_path: dict[str, list[str]] = {p: [] for p in paths}
        for line_no, row in read_jsonl(caption_file):
            image = row.get("image", row.get("file_name"))
            if not isinstance(image, str) or image.strip() not in by_path:
                raise ImageIndexError(f"{caption_file}:{line_no}: 'image' must name an image under {folder} "
                                      f"(relative path), got {image!r}")
            by_path[image.strip()].extend(_caption_list(row.get("caption", row.get("captions"))))
        captions = [by_path[p] for p in paths]
    return Collection(folder, paths, captions, f"folder {folder}")


def _coco_collection(captions_json: Path, image_root) -> Collection:
    if image_root is None:
        raise ImageIndexError(f"--images {captions_json} is a captions JSON: give the folder of its images "
                              "with --image_root")
    root = Path(image_root)
    if not root.is_dir():
        raise ImageIndexError(f"--image_root {root} is not a directory")
    try:
        data = json.loads(captions_json.read_text(encoding="utf-8"))
        names = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
        notes = [(int(a["image_id"]), a["caption"]) for a in data.get("annotations", [])]
    except (ValueError, KeyError, TypeError) as err:
        raise ImageIndexError(f"--images {captions_json}: not a COCO-style captions JSON ('images' with 'id' and "
                              f"'file_name', 'annotations' with 'image_id' and 'caption'): {err!r}") from None
    by_name: dict[str, list[str]] = {}
    for image_id, name in names.items():
        rel = PurePosixPath(name.replace("\\", "/")).as_posix()
        why = unsafe_relative(rel)
        if why is not None:
            raise ImageIndexError(f"--images {captions_json}: image {image_id} has file_name {name!r}, which {why}; "
                                  "file names must be relative paths under --image_root")
        by_name.setdefault(rel, [])
    for image_id, caption in notes:
        if image_id in names:
            by_name[PurePosixPath(names[image_id].replace("\\", "/")).as_posix()].extend(_caption_list(caption))
    paths = sorted(p for p in by_name if "\n" not in p and "\r" not in p)
    if not paths:
        raise ImageIndexError(f"--images {captions_json}: lists no images")
    return Collection(root, paths, [by_name[p] for p in paths], f"captions {captions_json}")


def _check_inside(collection: Collection) -> Collection:
    """Refuse a collection with a file that resolves outside its root (a symlink leaving it)."""
    root_real = os.path.realpath(collection.root)
    for rel in collection.paths:
        inside, real = resolve_inside(root_real, os.path.join(root_real, rel))
        if not inside:
            raise ImageIndexError(f"--images {collection.source.split(' ', 1)[1]}: {rel} resolves outside the "
                                  f"collection root {collection.root} (to {real}); index only files inside it")
    return collection


def list_collection(images, image_root=None) -> Collection:
    """The collection named by ``--images`` (a folder, or a COCO-style captions JSON plus ``image_root``).
    Every file must lie inside the collection's root (see the module docstring)."""
    path = Path(images)
    if path.is_dir():
        if image_root is not None:
            raise ImageIndexError("--image_root goes with a captions JSON in --images, not with a folder")
        return _check_inside(_folder_collection(path))
    if path.is_file() and path.suffix.lower() == ".json":
        return _check_inside(_coco_collection(path, image_root))
    if path.is_file():
        raise ImageIndexError(f"--images {path}: expected a folder of images or a COCO-style captions .json")
    raise ImageIndexError(f"--images {path}: no such folder or file")


# ---------------------------------------------------------------------------------------------- encoder identity
def probe_image():
    """A fixed synthetic image (colour gradients plus seeded noise) whose embedding identifies an encoder."""
    from PIL import Image

    y, x = np.mgrid[0:64, 0:64].astype(np.float32) / 63
    rng = np.random.default_rng(20240617)
    rgb = np.stack([x, y, 1 - (x + y) / 2], -1) * 200 + rng.normal(0, 20, (64, 64, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def encoder_probe(encoder) -> list[float]:
    """The encoder's normalised embedding of :func:`probe_image`."""
    _, embeds = encoder.encode_images(encoder.pixels([probe_image()]))
    return [round(float(v), 6) for v in embeds[0].float().cpu()]


def same_encoder(probe_a, probe_b) -> bool:
    a, b = np.asarray(probe_a, dtype=np.float64), np.asarray(probe_b, dtype=np.float64)
    if a.shape != b.shape or not a.size:
        return False
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)) >= PROBE_MIN_COSINE


# ---------------------------------------------------------------------------------------------- the index
def content_sha256(paths, digests) -> str:
    """The collection's content hash: each row's relative path and the SHA-256 of its bytes, in row order."""
    content = hashlib.sha256()
    for rel, digest in zip(paths, digests):
        content.update(rel.encode("utf-8") + b"\0" + np.asarray(digest, np.uint8).tobytes())
    return content.hexdigest()


def _array_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_index(out: Path, blocks, count: int, dim: int, paths: list[str], captions: list[list[str]] | None,
                meta: dict, skipped: list[tuple[str, str]] = (), *, digests: np.ndarray) -> dict:
    """Write an index folder from row ``blocks`` (float32 arrays, ``count`` rows of ``dim`` in all).

    ``meta`` must give ``vision_encoder``, ``probe`` and ``image_root``; ``digests`` (uint8 ``[count, 32]``)
    are the SHA-256 of each row's image bytes, from which ``content_sha256`` is computed. Every file is
    written to a temporary name and renamed; the manifest comes last, so a folder without one is no index.
    Returns the manifest.
    """
    digests = np.asarray(digests, dtype=np.uint8).reshape(len(paths), 32)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # an old index stops being one before any of its files changes
    tmp = out / f".{EMBEDDINGS}.tmp"
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(count, dim))
        row = 0
        for block in blocks:
            array[row:row + len(block)] = block
            row += len(block)
        if row != count:
            raise RuntimeError(f"index rows: got {row}, expected {count}")
        array.flush()
        del array
        os.replace(tmp, out / EMBEDDINGS)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(err.filename or tmp)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    write_atomic(out / PATHS, "".join(p + "\n" for p in paths).encode("utf-8"))
    write_atomic(out / DIGESTS, _array_bytes(digests))
    captions_hash = None
    if captions is not None:
        data = "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in captions).encode()
        write_atomic(out / CAPTIONS, data)
        captions_hash = hashlib.sha256(data).hexdigest()
    else:
        (out / CAPTIONS).unlink(missing_ok=True)
    if skipped:
        write_atomic(out / SKIPPED, "".join(f"{p}\t{r}\n" for p, r in skipped).encode("utf-8"))
    else:
        (out / SKIPPED).unlink(missing_ok=True)
    manifest = {"format": FORMAT, **meta, "content_sha256": content_sha256(paths, digests), "count": count,
                "dim": dim, "captioned": captions is not None, "captions_sha256": captions_hash,
                "skipped": len(skipped), "embeddings_sha256": sha256_file(out / EMBEDDINGS),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    write_atomic(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


MAX_MANIFEST_BYTES = 1 << 20  # the probe embedding is the manifest's largest field (a few KiB)
MAX_PATH_BYTES = 4096  # per paths.txt line
MAX_CAPTION_BYTES = 1 << 16  # per captions.jsonl line


class ImageIndex:
    """An index folder, checked on opening (see the module docstring's Trust): manifest, embedding shape and
    checksum, the rows (paths and image digests) against the content hash, captions against theirs.

    ``embeddings`` is the memory-mapped float32 ``[count, dim]`` array, mapped on first use (and dropped
    when the object is pickled, e.g. into DataLoader workers, which only need the paths).
    """

    def __init__(self, directory, verify: bool = True):
        self.dir = Path(directory)
        where = f"image index {self.dir}"
        if not (self.dir / MANIFEST).is_file():
            hint = " (an unfinished build: rerun the same build command to complete it)" \
                if (self.dir / PARTIAL).is_dir() else ""
            raise ImageIndexError(f"{where}: no {MANIFEST}{hint}; build one with python -m models.images.index "
                                  "build --images DIR --out INDEX_DIR")
        try:
            manifest = json.loads(_read_bounded(self.dir / MANIFEST, MAX_MANIFEST_BYTES).decode("utf-8"))
            self.count, self.dim = int(manifest["count"]), int(manifest["dim"])
            self.vision_encoder, self.probe = str(manifest["vision_encoder"]), list(manifest["probe"])
            self.root = Path(manifest["image_root"])
            if manifest.get("format") not in READABLE_FORMATS:
                raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT}")
            if self.count < 0 or self.dim < 1 or not isinstance(manifest.get("content_sha256"), str):
                raise ValueError("count, dim or content_sha256 out of range")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ImageIndexError(f"{where}: corrupt {MANIFEST} ({err}); rebuild the index") from None
        self.manifest = manifest
        self._root_real = os.path.realpath(self.root)
        try:
            if not _stat.S_ISREG(os.stat(self.dir / EMBEDDINGS).st_mode):
                raise ValueError("not a regular file")
            header = np.load(self.dir / EMBEDDINGS, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise ImageIndexError(f"{where}: cannot read {EMBEDDINGS} ({str(err).splitlines()[0]}); "
                                  "rebuild the index") from None
        if header.dtype != np.float32 or header.shape != (self.count, self.dim):
            raise ImageIndexError(f"{where}: {EMBEDDINGS} holds {header.dtype} {tuple(header.shape)}, the manifest "
                                  f"says float32 ({self.count}, {self.dim}); rebuild the index")
        del header
        if verify and sha256_file(self.dir / EMBEDDINGS) != manifest.get("embeddings_sha256"):
            raise ImageIndexError(f"{where}: {EMBEDDINGS} does not match its manifest checksum (corrupt or "
                                  "changed); rebuild the index")
        from data.packed_strings import PackedStrings

        paths = self._lines(PATHS, MAX_PATH_BYTES)
        for i, rel in enumerate(paths):
            why = unsafe_relative(rel)
            if why is not None:
                raise ImageIndexError(f"{where}: {PATHS} line {i + 1} ({rel!r}) {why}: an index row names a file "
                                      "under the image root; rebuild the index")
        self.digests = self._digests(paths)
        if content_sha256(paths, self.digests) != manifest["content_sha256"]:
            raise ImageIndexError(f"{where}: {PATHS} does not match the manifest's content hash (rows edited, "
                                  "reordered or swapped); rebuild the index")
        self.paths = PackedStrings(paths)
        self.captions = None
        if manifest.get("captioned"):
            lines = self._lines(CAPTIONS, MAX_CAPTION_BYTES)
            want = manifest.get("captions_sha256")
            if want is not None and sha256_file(self.dir / CAPTIONS) != want:
                raise ImageIndexError(f"{where}: {CAPTIONS} does not match its manifest checksum (edited); rebuild "
                                      "the index")
            try:
                self.captions = [list(json.loads(line)) for line in lines]
                if not all(isinstance(c, str) for row in self.captions for c in row):
                    raise ValueError("a caption is not text")
            except (ValueError, TypeError) as err:
                raise ImageIndexError(f"{where}: corrupt {CAPTIONS} ({err}); rebuild the index") from None
        self._embeddings = None

    def _lines(self, name: str, per_line: int) -> list[str]:
        try:
            data = _read_bounded(self.dir / name, max(1, self.count) * per_line)
            lines = data.decode("utf-8").split("\n")
        except (OSError, ValueError) as err:
            raise ImageIndexError(f"image index {self.dir}: cannot read {name} ({err}); rebuild the index") from None
        if lines and lines[-1] == "":
            lines.pop()
        if len(lines) != self.count:
            raise ImageIndexError(f"image index {self.dir}: {name} has {len(lines)} lines, the manifest says "
                                  f"{self.count} images; rebuild the index")
        return lines

    def _digests(self, paths: list[str]) -> np.ndarray:
        """Each row's image digest: ``digests.npy`` (format 2), or the images' bytes hashed now (format 1)."""
        if self.manifest.get("format") == 1 and not (self.dir / DIGESTS).exists():
            out = np.zeros((len(paths), 32), np.uint8)
            for i, rel in enumerate(paths):
                try:
                    data = read_image_bytes(self._inside(i, rel))
                except (OSError, ValueError) as err:
                    raise ImageIndexError(f"image index {self.dir}: row {i} ({rel}) cannot be read "
                                          f"({getattr(err, 'strerror', None) or err}); rebuild the index") from None
                out[i] = np.frombuffer(hashlib.sha256(data).digest(), np.uint8)
            return out
        try:
            data = _read_bounded(self.dir / DIGESTS, 4096 + 32 * self.count)
            digests = np.load(io.BytesIO(data), allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise ImageIndexError(f"image index {self.dir}: cannot read {DIGESTS} ({err}); rebuild the "
                                  "index") from None
        if digests.dtype != np.uint8 or digests.shape != (self.count, 32):
            raise ImageIndexError(f"image index {self.dir}: {DIGESTS} holds {digests.dtype} {tuple(digests.shape)}, "
                                  f"expected uint8 ({self.count}, 32); rebuild the index")
        return digests

    def _inside(self, row: int, rel: str) -> str:
        """The path of a row's image, refused unless it resolves inside the image root."""
        path = str(self.root / rel)
        inside, real = resolve_inside(self._root_real, path)
        if not inside:
            raise ImageIndexError(f"image index {self.dir}: row {row} ({rel}) resolves outside the image root "
                                  f"{self.root} (to {real}); refusing to read it")
        return path

    def __len__(self) -> int:
        return self.count

    def __getstate__(self):
        return {**self.__dict__, "_embeddings": None}

    @property
    def embeddings(self) -> np.ndarray:
        if self._embeddings is None:
            self._embeddings = np.load(self.dir / EMBEDDINGS, mmap_mode="r")
        return self._embeddings

    def path(self, row: int) -> str:
        """The file of row ``row`` (inside the image root, symlinks followed; else ImageIndexError)."""
        return self._inside(row, self.paths[row])

    def read_image_bytes(self, row: int) -> bytes:
        """The bytes of row ``row``'s image, refused (one-line ImageIndexError) when it resolves outside the
        image root, is unreadable, or holds other bytes than the row was built from."""
        path = self.path(row)
        try:
            data = read_image_bytes(path)
        except (OSError, ValueError) as err:
            raise ImageIndexError(f"image index {self.dir}: row {row} ({path}) cannot be read "
                                  f"({getattr(err, 'strerror', None) or err}); rebuild the index") from None
        if hashlib.sha256(data).digest() != self.digests[row].tobytes():
            raise ImageIndexError(f"image index {self.dir}: row {row} ({path}) is not the image the index was built "
                                  "from (its bytes changed); rebuild the index")
        return data

    def check_encoder(self, encoder) -> None:
        """Refuse an encoder other than the one that built the index (compared by its probe embedding)."""
        if not same_encoder(self.probe, encoder_probe(encoder)):
            raise ImageIndexError(f"image index {self.dir} was built with vision encoder {self.vision_encoder!r}, "
                                  f"not {encoder.spec!r}: evaluate with that encoder or rebuild the index")

    def check_k(self, k: int) -> None:
        if k > self.count:
            raise ImageIndexError(f"--k {k} is larger than the image index {self.dir} ({self.count} images)")


# ---------------------------------------------------------------------------------------------- building
def unreadable_reason(err: Exception) -> str:
    """One line saying why an image could not be read."""
    from PIL import UnidentifiedImageError

    if isinstance(err, UnidentifiedImageError):
        return "not an image PIL can decode"
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


class _BatchImages:
    """Decodes and preprocesses batch ``b`` of the collection (picklable: runs in DataLoader workers).

    Returns the pixel tensor of the readable images, their positions in the collection, the SHA-256 of
    each one's bytes, ``(position, reason)`` for each unreadable one, and the SHA-256 of every image of
    the batch (zeros where the file could not be read), by which a resumed build checks the batch.
    """

    def __init__(self, collection: Collection, batch_size: int, preprocess):
        self.collection, self.batch_size, self.preprocess = collection, batch_size, preprocess

    def __call__(self, b: int) -> dict:
        import torch
        from PIL import Image

        start = b * self.batch_size
        pixels, kept, digests, skipped, every = [], [], [], [], []
        for pos in range(start, min(start + self.batch_size, len(self.collection.paths))):
            data = None
            try:
                data = read_image_bytes(self.collection.root / self.collection.paths[pos])
                every.append(np.frombuffer(hashlib.sha256(data).digest(), dtype=np.uint8))
                with Image.open(io.BytesIO(data)) as image:
                    pixels.append(self.preprocess(image.convert("RGB")))
            except Exception as err:  # PIL reports broken files with many exception types
                if data is None:
                    every.append(np.zeros(32, np.uint8))
                skipped.append((pos, unreadable_reason(err)))
                continue
            kept.append(pos)
            digests.append(np.frombuffer(hashlib.sha256(data).digest(), dtype=np.uint8))
        return {"batch": b, "pixels": torch.stack(pixels) if pixels else None, "kept": np.asarray(kept, np.int64),
                "digests": np.stack(digests) if digests else np.zeros((0, 32), np.uint8), "skipped": skipped,
                "all_digests": np.stack(every) if every else np.zeros((0, 32), np.uint8)}


class _Loader:
    """Map-style dataset over batch numbers (a DataLoader with ``batch_size=None`` yields them one by one)."""

    def __init__(self, batches: list[int], fn: _BatchImages):
        self.batches, self.fn = batches, fn

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.fn(self.batches[i])


def _as_is(item):
    return item


def _batch_file(partial: Path, b: int) -> Path:
    return partial / f"batch-{b:08d}.npz"


def _save_batch(partial: Path, item: dict, embeds: np.ndarray) -> None:
    path = _batch_file(partial, item["batch"])
    buf = io.BytesIO()
    skipped = item["skipped"]
    np.savez(buf, embeddings=embeds.astype(np.float32), kept=item["kept"], digests=item["digests"],
             all_digests=item["all_digests"],
             skipped_pos=np.asarray([p for p, _ in skipped], np.int64),
             skipped_reason=np.asarray([r for _, r in skipped] or [""])[:len(skipped)].astype(str))
    write_atomic(path, buf.getvalue())


BATCH_ARRAYS = ("embeddings", "kept", "digests", "all_digests", "skipped_pos", "skipped_reason")


def _load_batch(partial: Path, b: int) -> dict:
    with np.load(_batch_file(partial, b), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _digest_of(collection: Collection, pos: int) -> bytes:
    """The SHA-256 of an image's bytes now (32 zero bytes when it cannot be read)."""
    try:
        return hashlib.sha256(read_image_bytes(collection.root / collection.paths[pos])).digest()
    except (OSError, ValueError):
        return bytes(32)


def _batch_problem(partial: Path, b: int, collection: Collection, batch_size: int, dim: int) -> str | None:
    """Why finished batch ``b`` cannot be kept (unreadable, malformed, or made from images whose bytes
    have changed since), or None."""
    try:
        z = _load_batch(partial, b)
    except Exception as err:  # noqa: BLE001 - zipfile, numpy and the OS raise their own types
        return f"cannot be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    positions = list(range(b * batch_size, min((b + 1) * batch_size, len(collection.paths))))
    if set(z) != set(BATCH_ARRAYS):
        return "written by another version (no per-image digests)"
    emb, kept, every = z["embeddings"], z["kept"], z["all_digests"]
    if (every.shape != (len(positions), 32) or emb.dtype != np.float32 or emb.shape != (len(kept), dim)
            or not np.isfinite(emb).all() or not set(kept.tolist()) <= set(positions)):
        return "malformed"
    for pos, digest in zip(positions, every):
        if _digest_of(collection, pos) != digest.tobytes():
            return f"made from another version of {collection.paths[pos]} (the image changed since)"
    return None


def _drop_bad_batches(partial: Path, batches: list[int], collection: Collection, batch_size: int, dim: int) -> None:
    """Remove the finished batches among ``batches`` that cannot be kept, each named in one warning."""
    for b in batches:
        why = _batch_problem(partial, b, collection, batch_size, dim)
        if why is not None:
            print(f"warning: index build: {_batch_file(partial, b)} {why}; dropping it and embedding its images "
                  "again", file=sys.stderr)
            _batch_file(partial, b).unlink(missing_ok=True)


def _plan(collection: Collection, encoder, batch_size: int, probe: list[float]) -> dict:
    listing = hashlib.sha256("\n".join(collection.paths).encode("utf-8")).hexdigest()
    return {"format": FORMAT, "vision_encoder": encoder.spec, "probe": probe, "dtype": str(encoder.dtype),
            "batch_size": batch_size,
            "image_root": str(collection.root.resolve()), "count": len(collection.paths), "listing_sha256": listing}


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse to write into a folder that holds something other than an index, or a finished index
    without ``--overwrite``."""
    if out.exists() and not out.is_dir():
        raise ImageIndexError(f"--out {out} exists and is not a directory")
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in INDEX_FILES and not p.name.startswith("."))
    if foreign:
        raise ImageIndexError(f"--out {out} holds other files ({foreign[0]}, ...); choose a new or empty folder")
    if (out / MANIFEST).is_file() and not overwrite:
        raise ImageIndexError(f"--out {out} already holds an image index; pass --overwrite to rebuild it")


def _check_partial(partial: Path, plan: dict, overwrite: bool) -> bool:
    """Whether a partial build left by a killed run can be resumed (same settings and encoder weights).
    One started with other settings is refused, or discarded with ``--overwrite`` (returns False)."""
    plan_file = partial / "plan.json"
    if not plan_file.is_file():
        return False
    try:
        old = json.loads(plan_file.read_text())
    except ValueError:
        old = {}
    for key in ("vision_encoder", "dtype", "batch_size", "image_root", "count", "listing_sha256", "probe"):
        same = same_encoder(old.get(key, []), plan[key]) if key == "probe" else old.get(key) == plan[key]
        if same:
            continue
        if overwrite:
            return False
        what = {"count": "image listing", "listing_sha256": "image listing",
                "probe": f"weights of {plan['vision_encoder']!r}"}.get(key, f"--{key} ({old.get(key)!r})")
        raise ImageIndexError(f"an unfinished build in {partial.parent} was started with another {what}; "
                              "rerun it with the same settings, or pass --overwrite to start afresh")
    return True


def build(args, batch_callback=None, state=None) -> dict | None:
    """Embed the collection into ``args.out`` (see the module docstring); returns the manifest (main process).

    ``state``: the process layout (default: Accelerate's ``PartialState``). Process ``r`` of ``n`` embeds the
    batches ``r, r + n, ...`` not yet on disk; after a barrier the main process merges them.
    """
    import torch
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from models.images.generators import resolve_dtype  # the AUTO_HALF rule
    from models.vision import load_vision_encoder

    if args.batch_size < 1:
        raise ImageIndexError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.num_workers < 0:
        raise ImageIndexError(f"--num_workers must be >= 0, got {args.num_workers}")
    out = Path(args.out)
    collection = list_collection(args.images, args.image_root)
    _check_out(out, args.overwrite)
    state = state or PartialState(cpu=args.device == "cpu")
    device = torch.device(args.device) if args.device else state.device
    encoder = load_vision_encoder(args.vision_encoder, device=device, dtype=resolve_dtype(args.dtype, device))
    plan = _plan(collection, encoder, args.batch_size, encoder_probe(encoder))
    partial = out / PARTIAL
    resume = _check_partial(partial, plan, args.overwrite)
    barrier()  # every process has checked the old plan before the main one discards it (a check-in)
    with step((ImageIndexError,)):
        if state.is_main_process and not resume and partial.is_dir():
            shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    if not (partial / "plan.json").is_file():  # the same plan from every process: written atomically
        write_atomic(partial / "plan.json", json.dumps(plan, indent=2).encode())
    n_batches = -(-len(collection.paths) // args.batch_size)
    if resume:  # each process checks its share of the finished batches against the images' bytes now
        _drop_bad_batches(partial, [b for b in range(n_batches) if _batch_file(partial, b).is_file()
                                    and b % state.num_processes == state.process_index],
                          collection, args.batch_size, len(plan["probe"]))
        state.wait_for_everyone()
    todo = [b for b in range(n_batches) if not _batch_file(partial, b).is_file()]
    mine = [b for b in todo if b % state.num_processes == state.process_index]
    loader = torch.utils.data.DataLoader(_Loader(mine, _BatchImages(collection, args.batch_size, encoder.preprocess)),
                                         batch_size=None, num_workers=args.num_workers, collate_fn=_as_is)
    skipped = 0
    with tqdm(total=n_batches, initial=n_batches - len(todo), unit="batch", desc="index",
              disable=not state.is_local_main_process) as bar:
        items = iter(loader)
        # as many steps as the longest share, each a check-in of every process: a failure on one process (an
        # unreadable file, a full disk) stops all of them at that batch
        for _ in range(check_in(value=len(mine))):
            with step((ImageIndexError,)):
                item = next(items, None)
                if item is None:
                    continue
                if item["pixels"] is not None:
                    _, embeds = encoder.encode_images(item["pixels"].to(encoder.device, encoder.dtype))
                    embeds = torch.nn.functional.normalize(embeds.float(), dim=-1).cpu().numpy()
                else:
                    embeds = np.zeros((0, len(plan["probe"])), np.float32)
                _save_batch(partial, item, embeds)
                skipped += len(item["skipped"])
                bar.update(state.num_processes)
                bar.set_postfix(skipped=skipped)
                if batch_callback is not None:
                    batch_callback(item["batch"])
    barrier()
    manifest = None
    with step((ImageIndexError,)):  # a full disk while merging stops every process
        if state.is_main_process:
            manifest = _merge(out, partial, collection, plan, n_batches)
    return manifest


def _merge(out: Path, partial: Path, collection: Collection, plan: dict, n_batches: int) -> dict:
    missing = [b for b in range(n_batches) if not _batch_file(partial, b).is_file()]
    if missing:
        raise RuntimeError(f"index build: batch {missing[0]} was not embedded by any process")
    kept, skipped, digests = [], [], []
    for b in range(n_batches):
        try:
            z = _load_batch(partial, b)
        except Exception as err:  # noqa: BLE001 - zipfile, numpy and the OS raise their own types
            raise ImageIndexError(f"index build: {_batch_file(partial, b)} cannot be read ({type(err).__name__}); "
                                  "rerun the build command to embed it again") from None
        for pos, digest in zip(z["kept"].tolist(), z["digests"]):
            kept.append(pos)
            digests.append(digest)
        skipped += [(collection.paths[p], r) for p, r in zip(z["skipped_pos"].tolist(), z["skipped_reason"].tolist())]
    if not kept:
        shutil.rmtree(partial)
        if not any(out.iterdir()):
            out.rmdir()
        first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise ImageIndexError(f"none of the {len(collection.paths)} images of {collection.source} could be read{first}")
    blocks = (_load_batch(partial, b)["embeddings"] for b in range(n_batches))
    meta = {"vision_encoder": plan["vision_encoder"], "probe": plan["probe"], "image_root": plan["image_root"],
            "source": collection.source, "batch_size": plan["batch_size"]}
    captions = [collection.captions[p] for p in kept] if collection.captions is not None else None
    manifest = write_index(out, blocks, len(kept), len(plan["probe"]), [collection.paths[p] for p in kept],
                           captions, meta, skipped, digests=np.stack(digests))
    shutil.rmtree(partial)
    if skipped:  # reported once, with where to find the whole list
        print(f"skipped {len(skipped)} unreadable image(s) (first: {skipped[0][0]}: {skipped[0][1]}); "
              f"all listed in {out / SKIPPED}", file=sys.stderr)
    print(f"indexed {manifest['count']} images from {collection.source} with {plan['vision_encoder']} -> {out}")
    return manifest


# ---------------------------------------------------------------------------------------------- command line
BUILD_OPTIONS = (
    Option("images", required=True, path=True, group="build",
           help="a folder (searched recursively) or a COCO-style captions JSON"),
    Option("image_root", path=True, group="build", help="the folder of the images a captions JSON names"),
    Option("out", required=True, path=True, group="build", help="the index folder to write"),
    catalog.VISION_ENCODER.replace(default=catalog.DEFAULT_VISION_ENCODER, group="build",
                                   help="CLIP spec, as for the eval scripts"),
    catalog.BATCH_SIZE.replace(default=256, group="build", help="images per forward pass (fixed for a resume)"),
    catalog.NUM_WORKERS.replace(group="build", help="DataLoader workers decoding images"),
    catalog.DEVICE.replace(group="build", help="default: this process's accelerator device"),
    catalog.DTYPE.replace(group="build", help=f"encoder dtype ({AUTO_RULES[AUTO_HALF]}); embeddings are stored "
                                              "as float32"),
    Option("overwrite", kind="flag", default=False, record=False, group="build",
           help="replace a finished index in --out (and an unfinished build made with other settings)"),
)


def build_parser() -> argparse.ArgumentParser:
    from models.options import OptionsParser, build_parser as add_to

    p = OptionsParser(prog="python -m models.images.index", description="Build a CLIP index over a local image "
                                                                         "collection.")
    sub = p.add_subparsers(dest="command", required=True)
    add_to(BUILD_OPTIONS, parser=sub.add_parser("build", help="embed every image of a folder or captions JSON"))
    return p


def main(argv=None, *, batch_callback=None, state=None) -> dict | None:
    """``batch_callback(batch_number)`` runs after each batch is saved (tests use it to simulate a kill);
    ``state``: see :func:`build`."""
    from models.options import parse

    args = parse(BUILD_OPTIONS, argv, parser=build_parser())
    try:
        return build(args, batch_callback, state)
    except (ImageIndexError, OSError) as err:  # OSError: a full disk, an unwritable --out (named in one line)
        if world()[1] == 1:
            print(f"error: {err if isinstance(err, ImageIndexError) else os_error_line(err)}", file=sys.stderr)
            raise SystemExit(2) from None
        _stop_every_rank(err)
    except Exception as err:  # noqa: BLE001 - under torchrun, every rank must hear of it
        if world()[1] == 1:
            raise
        _stop_every_rank(err)


def _stop_every_rank(err: BaseException):
    """Under torchrun: the failure every rank agrees on (:mod:`models.distributed`), one line from rank 0."""
    failure = agree_on(err, (ImageIndexError,))
    report(failure)
    close()
    raise SystemExit(failure.status) from None


if __name__ == "__main__":
    main()
