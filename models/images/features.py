"""The vision-feature cache: what the frozen vision encoder made of each cached image, kept on disk.

For each image the encoder produces two things, both stored:

* the penultimate patch tokens (what the projector reads), ``[n_patches, width]``;
* the L2-normalised CLIP image embedding. Not the image-prompt cosine: an image's CLIP weight depends
  on the image AND the prompt it serves (a retrieved image can serve several prompts), so the cosine is
  computed per (image, prompt) pair from the stored embedding and the prompt's text embedding, which is
  memoised per prompt (and stored too, under ``text/``, keyed by the prompt's sha256).

A warm run therefore decodes no PNG and runs neither the vision tower nor the text tower.

Layout: ``<root>/<encoder slug>/<key[:2]>/<key>.safetensors`` and ``<root>/<encoder slug>/text/<sha[:2]>/
<sha>.safetensors`` (``root`` is ``<image cache>/features``).
The slug is a hash of the encoder's identity (:func:`encoder_identity`): the spec for an open_clip or
hub name, a hash of the weight and config files for a local folder, plus the dtype the features were
computed in (features are stored in that dtype, so a warm run gives bit-identical results). An encoder
never looks in another's folder, and each file names its key and encoder again.

Trust: an entry is used only if it is a regular file inside the store (a symlink leaving it, a device
such as ``/dev/zero`` or a file larger than an entry of its kind can be is never read: the size is checked
before reading, and reading stops at that bound), it parses, its checksum (CRC-32 of the tensor bytes)
matches, it names this key and encoder, its tensors have the expected names, dtype and shape (the shape of
what the reading encoder produces: ``[n_patches, width]`` and ``[embedding dim]``) and hold only finite
numbers, and (image entries) the PNG it was computed from is still the file on disk (same size and
modification time: a regenerated or replaced PNG makes it stale). A bad entry is named in one warning,
deleted and recomputed; it is never trusted. Files are safetensors (no pickle), written atomically by the
background writer, after the PNG they belong to.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from models import write_behind

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

FORMAT = "late-fusion-vision-features/1"
_HEX_KEY = re.compile(r"^[0-9a-f]{64}$")
HEADER_BYTES = 1 << 16  # a safetensors header of an entry: two tensors' offsets and a few metadata strings
MAX_ENTRY_BYTES = 256 * 2**20  # when the encoder's shapes are not known: far above any CLIP's patch tokens
_ITEM_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8}


def feature_shapes(encoder) -> dict[str, tuple]:
    """The shapes an encoder's entries have, ``None`` where the encoder does not say (learned from the first
    tensors of the run): ``patches`` ``(n_patches, width)``, ``embed`` ``(dim,)``."""
    model = getattr(encoder, "model", None)
    dim = (getattr(getattr(model, "visual", None), "output_dim", None)
           or getattr(getattr(model, "config", None), "projection_dim", None))
    as_int = lambda v: v if isinstance(v, int) and v > 0 else None  # noqa: E731
    return {"patches": (as_int(getattr(encoder, "n_patches", None)), as_int(getattr(encoder, "hidden_size", None))),
            "embed": (as_int(dim),)}


# ---------------------------------------------------------------------------------------------- identity
def _local_dir(spec: str) -> Path | None:
    """The folder a vision-encoder spec loads from, or None for hub and built-in names."""
    for prefix in ("local-dir:", "hf-clip:"):
        if spec.startswith(prefix):
            path = Path(spec[len(prefix):]).expanduser()
            return path if path.is_dir() else None
    path = Path(spec).expanduser()
    return path if path.is_dir() else None


def hash_files(folder: Path, memo_path: Path | None = None) -> str:
    """sha256 over the names and contents of the regular files directly in ``folder``.

    File hashes are remembered in ``memo_path`` (JSON) by path, size and modification time, so a large
    weights file is read once, not at every start."""
    memo: dict = {}
    if memo_path is not None and memo_path.is_file():
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, ValueError):
            memo = {}
    changed = False
    total = hashlib.sha256()
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_file():
            continue
        st = entry.stat()
        path = os.path.abspath(entry.path)
        known = memo.get(path)
        if isinstance(known, dict) and known.get("size") == st.st_size and known.get("mtime_ns") == st.st_mtime_ns:
            digest = known.get("sha256")
        else:
            digest = write_behind.sha256_file(entry.path)
            memo[path] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
            changed = True
        total.update(f"{entry.name}\0{digest}\n".encode())
    if changed and memo_path is not None:
        try:
            write_behind.write_atomic(memo_path, json.dumps(memo, indent=1).encode())
        except OSError:
            pass  # only a memo
    return total.hexdigest()


def encoder_identity(spec: str, dtype: str, memo_path: Path | None = None) -> dict:
    """What makes two encoders' features interchangeable: for a local folder a hash of its files
    (configs included), otherwise the spec string (an open_clip name/tag or a hub id); plus the dtype."""
    spec = spec.strip()
    folder = _local_dir(spec)
    ident = {"format": FORMAT, "dtype": dtype}
    if folder is not None:
        ident["files_sha256"] = hash_files(folder, memo_path)
    else:
        ident["spec"] = spec
    return ident


# ---------------------------------------------------------------------------------------------- store
class FeatureStore:
    """One encoder's folder of the feature cache (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, identity: dict):
        self.identity = identity
        self.slug = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
        self.dir = Path(root).expanduser().absolute() / self.slug  # absolute: writes outlive a chdir
        self._dir = str(self.dir)
        self.dtype = identity["dtype"]
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if not (self.dir / "encoder.json").is_file():  # for people looking at the folder; never read
                write_behind.write_atomic(self.dir / "encoder.json", json.dumps(identity, indent=2).encode())
        except OSError as err:
            raise ValueError(f"feature cache directory {self.dir} is not writable: {err.strerror or err}") from None
        write_behind.submit(self.remove_stale_temps)

    def remove_stale_temps(self, older_than_s: float = write_behind.STALE_TEMP_S) -> int:
        dirs = [self.dir]
        for parent in (self.dir, self.dir / "text"):
            if parent.is_dir():
                dirs += [e.path for e in os.scandir(parent) if e.is_dir() and len(e.name) == 2]
        return write_behind.remove_stale_temps(dirs, older_than_s)

    def path(self, key: str) -> str:
        return os.path.join(self._dir, key[:2], f"{key}.safetensors")

    def text_path(self, prompt: str) -> tuple[str, str]:
        """The file of a prompt's text embedding, and the prompt's hash (its key)."""
        key = hashlib.sha256(prompt.encode("utf-8")).hexdigest()
        return os.path.join(self._dir, "text", key[:2], f"{key}.safetensors"), key

    def read(self, key: str, png_path: str, shapes: dict | None = None) -> tuple["torch.Tensor", "torch.Tensor"] | None:
        """``(patches, embedding)`` of ``key`` if a valid entry for the current ``png_path`` exists;
        ``shapes``: the expected ones (:func:`feature_shapes`; ``None`` dims are not checked, and the
        dict's ``None`` dims are filled from the first entry read)."""
        shapes = shapes if shapes is not None else {"patches": (None, None), "embed": (None,)}
        found = self._read(self.path(key), key, shapes)
        if found is None:
            return None
        meta, tensors = found
        try:
            st = os.stat(png_path)
        except OSError:
            return None  # the image is gone: recompute from a regenerated one
        if (str(st.st_size), str(st.st_mtime_ns)) != (meta.get("png_size"), meta.get("png_mtime_ns")):
            return None  # computed from another version of the PNG
        return tensors["patches"], tensors["embed"]

    def write(self, key: str, patches: "torch.Tensor", embed: "torch.Tensor", png_stat: os.stat_result) -> None:
        """Store an image's entry (runs in a writer thread, after the PNG it belongs to is on disk)."""
        self._write(self.path(key), {"patches": patches, "embed": embed},
                    {"key": key, "png_size": str(png_stat.st_size), "png_mtime_ns": str(png_stat.st_mtime_ns)})

    def read_tensors(self, key: str, shapes: dict[str, tuple]) -> dict | None:
        """The tensors of a valid entry ``key`` with exactly the names and shapes of ``shapes`` (no PNG bound
        to it: for entries keyed by their own content, such as :mod:`models.fusion.prefix_store`'s)."""
        found = self._read(self.path(key), key, shapes)
        return None if found is None else found[1]

    def write_tensors(self, key: str, tensors: dict) -> None:
        self._write(self.path(key), tensors, {"key": key})

    def read_text(self, prompt: str, shapes: dict | None = None) -> "torch.Tensor | None":
        """The stored CLIP text embedding of ``prompt``, if valid (``shapes``: as for :meth:`read`)."""
        path, key = self.text_path(prompt)
        found = self._read(path, key, {"embed": (shapes or {}).get("embed", (None,))})
        return None if found is None else found[1]["embed"]

    def write_text(self, prompt: str, embed: "torch.Tensor") -> None:
        path, key = self.text_path(prompt)
        self._write(path, {"embed": embed}, {"key": key})

    def _limit(self, shapes: dict) -> int:
        """The most bytes an entry with these tensor shapes can hold."""
        item = _ITEM_BYTES.get(self.dtype, 8)
        sizes = []
        for dims in shapes.values():
            if any(d is None for d in dims):
                return MAX_ENTRY_BYTES
            n = item
            for d in dims:
                n *= d
            sizes.append(n)
        return 8 + HEADER_BYTES + sum(sizes)

    def _open_bounded(self, path: str, limit: int) -> bytes | None:
        """The bytes of an entry, None when there is none; ``ValueError`` when the file is no entry this
        store reads: a symlink leaving the store, not a regular file, or larger than ``limit``."""
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            real = os.path.realpath(path)
            if not real.startswith(os.path.realpath(self.dir) + os.sep):
                raise ValueError(f"a symlink leaving the feature cache (to {real})")
        from models.bounded_read import read_bounded

        return read_bounded(path, limit, lambda size: f"{size} bytes, more than an entry of this encoder can hold "
                            f"({limit})" if size is not None else f"more than an entry of this encoder can hold "
                            f"({limit} bytes)")

    def _bad(self, path: str, why) -> None:
        """Name a bad entry in one warning and delete it (it is recomputed and written again)."""
        try:
            os.unlink(path)  # a symlink is removed, never what it points to
            gone = "deleted it"
        except OSError as err:
            gone = f"could not delete it: {err.strerror or err}"
        logger.warning("feature cache: cannot use %s (%s); %s, recomputing it", path, why, gone)

    def _read(self, path: str, key: str, shapes: dict[str, tuple]) -> tuple[dict, dict] | None:
        """Metadata and tensors of a valid file for ``key`` (tensor name -> expected shape, ``None`` for a
        dim not known yet, which the first valid entry fills in), else None (a broken, foreign or
        oversized file is named in one warning and deleted)."""
        try:
            data = self._open_bounded(path, self._limit(shapes))
            if data is None:
                return None
            n = int.from_bytes(data[:8], "little")
            if len(data) < 8 or n > len(data) - 8:
                raise ValueError("truncated header")
            meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
            if meta.get("format") != FORMAT or meta.get("key") != key or meta.get("encoder") != self.slug:
                raise ValueError("written for another key or encoder")
            if meta.get("crc32") != str(zlib.crc32(memoryview(data)[8 + n:])):
                raise ValueError("checksum mismatch")
            from safetensors.torch import load

            from models.images.generators import dtype_name

            import torch

            tensors = load(data)
            if set(tensors) != set(shapes) or any(t.dim() != len(shapes[name]) or dtype_name(t.dtype) != self.dtype
                                                  for name, t in tensors.items()):
                raise ValueError("unexpected tensors")
            for name, t in tensors.items():
                if any(want is not None and got != want for got, want in zip(t.shape, shapes[name])):
                    raise ValueError(f"{name} has shape {tuple(t.shape)}, this encoder's are "
                                     f"{tuple('?' if d is None else d for d in shapes[name])}")
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{name} holds NaN or infinite values")
        except Exception as err:  # noqa: BLE001 - json, safetensors and int() raise their own types
            self._bad(path, err)
            return None
        for name, t in tensors.items():  # dims the encoder did not state: the first valid entry fixes them
            if isinstance(shapes.get(name), tuple) and None in shapes[name]:
                shapes[name] = tuple(t.shape)
        return meta, tensors

    def _write(self, path: str, tensors: dict, meta: dict) -> None:
        from safetensors.torch import save

        tensors = {k: t.detach().cpu().contiguous().clone() for k, t in tensors.items()}
        meta = {"format": FORMAT, "encoder": self.slug, **meta}
        # the checksum covers the tensor bytes, which adding it to the header does not move
        first = save(tensors, metadata={**meta, "crc32": "0"})
        n = int.from_bytes(first[:8], "little")
        data = save(tensors, metadata={**meta, "crc32": str(zlib.crc32(memoryview(first)[8 + n:]))})
        write_behind.write_atomic(path, data)


# ---------------------------------------------------------------------------------------------- features
def _store_key(key: str) -> str:
    return key if _HEX_KEY.match(key) else hashlib.sha256(key.encode()).hexdigest()


class VisionFeatures:
    """Patch tokens and image-prompt cosines of image slots, each image encoded at most once.

    Per distinct image (by key): the in-memory memo of this run, else the disk store, else the image
    itself (given by the slot, or from the image source: memory, file on disk or generated now) through
    the vision tower; new features go to the memo at once and to the store in the background.

    ``counts`` (cumulative): ``slots``; ``generated`` / ``from_cache`` / ``reused`` (each slot counted once,
    see :data:`models.images.source.SLOT_ORIGINS`); ``pngs_decoded``; ``features_computed`` and
    ``features_read`` (distinct images run through the tower / read from the store).
    """

    def __init__(self, encoder, source=None, store: FeatureStore | None = None, watch=None,
                 memo_bytes: int = 256 * 2**20, text_memo: int = 16384, chunk: int = 64):
        self.encoder, self.source, self.store, self.watch = encoder, source, store, watch
        self.memo: OrderedDict[str, tuple] = OrderedDict()  # image key -> (patches, embedding)
        self.memo_bytes, self._bytes = memo_bytes, 0
        self.text: OrderedDict[str, "torch.Tensor"] = OrderedDict()  # prompt -> text embedding
        self.text_memo, self.chunk = text_memo, chunk
        self._seen: set[str] = set()  # image keys this object has served
        self.shapes = feature_shapes(encoder)  # what every entry read must match (filled in as they come)
        self.counts = {"slots": 0, "generated": 0, "from_cache": 0, "reused": 0, "pngs_decoded": 0,
                       "features_computed": 0, "features_read": 0}

    def _phase(self, name):
        import contextlib

        return self.watch.phase(name) if self.watch is not None else contextlib.nullcontext()

    def _remember(self, key: str, feats: tuple) -> None:
        self.memo[key] = feats
        self._bytes += sum(t.numel() * t.element_size() for t in feats)

    def _evict(self, keep: int) -> None:
        while self._bytes > self.memo_bytes and len(self.memo) > keep:
            _, old = self.memo.popitem(last=False)
            self._bytes -= sum(t.numel() * t.element_size() for t in old)

    def __call__(self, images) -> tuple[list, list[float]]:
        """``(patches per slot, cosine per slot)`` for image slots (``ImageRef``-like: ``key`` (or ``path``),
        ``prompt``, ``path``, and optionally ``image``, a PIL image given by the caller)."""
        import torch

        from models.images.source import tally

        images = list(images)
        keys = [_store_key(getattr(im, "key", "") or im.path) for im in images]
        first: dict[str, object] = {}
        for key, im in zip(keys, images):
            first.setdefault(key, im)
        origin: dict[str, str] = {}
        todo = []
        for key, im in first.items():
            if key in self.memo:
                self.memo.move_to_end(key)
                origin[key] = "reused"
            else:
                todo.append((key, im))
        if todo and self.store is not None:
            with self._phase("clip"):
                rest = []
                for key, im in todo:
                    feats = self.store.read(key, im.path, self.shapes)
                    if feats is None:
                        rest.append((key, im))
                        continue
                    device = self.encoder.device
                    self._remember(key, (feats[0].to(device), feats[1].to(device)))
                    origin[key] = "from_cache"
                    self.counts["features_read"] += 1
                todo = rest
        if todo:
            self._compute(todo, origin)
        tally(self.counts, keys, origin, self._seen)
        self._evict(keep=len(first))

        with self._phase("clip"):
            prompts = [im.prompt for im in images]
            self._text_embeddings(prompts)
            embeds = torch.stack([self.memo[k][1] for k in keys])
            texts = torch.stack([self.text[p] for p in prompts]).to(embeds.dtype)
            cos = (embeds * texts).sum(-1).float().tolist()
            for p in prompts:
                self.text.move_to_end(p)
            while len(self.text) > self.text_memo:
                self.text.popitem(last=False)
        return [self.memo[k][0] for k in keys], cos

    def _text_embeddings(self, prompts: list[str]) -> None:
        """Put the CLIP text embedding of each prompt in the text memo: from the store, else the text tower
        (all new prompts in one batch; stored behind the work)."""
        new = [p for p in dict.fromkeys(prompts) if p not in self.text]
        if self.store is not None:
            missing = []
            for p in new:
                e = self.store.read_text(p, self.shapes)
                if e is None:
                    missing.append(p)
                else:
                    self.text[p] = e.to(self.encoder.device)
            new = missing
        if new:
            for p, e in zip(new, self.encoder.encode_texts(new)):
                self.text[p] = e
                if self.store is not None:
                    write_behind.submit(self.store.write_text, p, e)

    def _compute(self, todo: list, origin: dict) -> None:
        """Features of images not in the memo or the store: get each image, run the tower, store."""
        given = {key: im.image for key, im in todo if getattr(im, "image", None) is not None}
        with self._phase("generation"):
            from models.images.source import ImageRef

            found = self.source.images([ImageRef(key, im.prompt, im.path) for key, im in todo
                                          if key not in given], write=False) if len(given) < len(todo) else {}
        pil = []
        for key, im in todo:
            if key in given:
                pil.append(given[key])
                origin[key] = "from_cache"
                continue
            image, where, _ = found[key]
            pil.append(image)
            origin[key] = {"memory": "reused", "disk": "from_cache", "generated": "generated"}[where]
            self.counts["pngs_decoded"] += where == "disk"
        with self._phase("clip"):
            for start in range(0, len(todo), self.chunk):
                part = todo[start:start + self.chunk]
                patches, embeds = self.encoder.encode_images(self.encoder.pixels(pil[start:start + self.chunk]))
                self._learn_shapes(patches[0], embeds[0])
                for (key, _), p, e in zip(part, patches, embeds):
                    self._remember(key, (p, e))
        self.counts["features_computed"] += len(todo)
        for key, im in todo:
            self._store_later(key, im, given.get(key), found.get(key))

    def _learn_shapes(self, patches, embed) -> None:
        """Fill the dims the encoder did not state from what its tower produced."""
        for name, t in (("patches", patches), ("embed", embed)):
            if None in self.shapes[name]:
                self.shapes[name] = tuple(t.shape)

    def _store_later(self, key: str, im, given, found) -> None:
        """Write a new entry behind the work, bound to the PNG on disk (written first if it is new)."""
        store, feats = self.store, self.memo[key]
        if found is not None and found[1] == "generated":
            then = (lambda stat: store.write(key, *feats, stat)) if store is not None else None
            self.source.write_later(key, found[0], then=then)
        elif store is None:
            return
        elif found is not None and found[1] == "disk":
            write_behind.submit(store.write, key, *feats, found[2])
        elif given is not None and os.path.isfile(im.path):
            write_behind.submit(store.write, key, *feats, os.stat(im.path))
