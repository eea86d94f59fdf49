"""Training data: (image, text) pairs from every training source, and the batch collator.

Sources (docs/method.md, "Training"), selected by substrings of ``--dataset_name`` (:func:`select_sources`):

``cropped_vg``       Visual Genome region phrases, each paired with the crop of its box (:class:`VGRegions`).
``wiki``             WikiText chunks of ``wiki_chunk_tokens`` LM tokens, each with one image generated from a
                     random sentence of the chunk (:class:`WikiChunks`).
``laion_220``        LAION-220K GPT-4V captions of COCO/LVIS images (:class:`LaionCaptions`), long captions.
``laion_220_short``  the same rows with the short-caption column instead.
``--train_file``     a generic JSONL/CSV file of image paths and captions (:class:`CaptionFile`).

Every dataset yields ``{"image": PIL.Image (RGB), "text": str}``. Construction only reads metadata and
checks paths; image decoding, cropping and generation run in ``__getitem__``, i.e. in DataLoader workers.
An image that cannot be decoded or cropped there raises :class:`BadImage`; :class:`SkipBadImages` replaces
such an item by the next readable one and reports what it skipped, and :class:`BadImageBudget` counts the
skipped images and says when too many of them were bad. A file that is not UTF-8 or has the wrong shape is
one ``ValueError`` naming it.
Texts are kept as flat byte blobs and numpy arrays (not lists of Python objects), so forked workers
do not copy them page by page through reference counting.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import re
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

from data.packed_strings import PackedStrings

logger = logging.getLogger(__name__)

LAION_HUB_ID = "laion/220k-GPT4Vision-captions-from-LIVIS"
WIKI_HUB_ID = "Salesforce/wikitext"
WIKI_HUB_CONFIG = "wikitext-103-raw-v1"
KNOWN_SOURCES = ("cropped_vg", "wiki", "laion_220", "laion_220_short")

# Column names: the hub parquet has `url`, `caption` and `short_caption`; `short_captions` is accepted too.
LAION_CAPTION_COLUMNS = {False: ("caption",), True: ("short_caption", "short_captions")}
_LOCAL_SUFFIXES = {".parquet", ".jsonl", ".json", ".csv", ".txt", ".tokens", ".raw"}


# ----------------------------------------------------------------------------- helpers

def select_sources(dataset_name: str | None) -> list[str]:
    """Sources named by substrings of ``dataset_name``, in the order vg, wiki, laion.

    ``laion_220_short`` selects LAION with short captions; ``laion_220`` selects long captions only where it
    occurs outside every ``laion_220_short`` (so ``laion_220_short`` alone never also loads long captions).
    Other text is ignored, so the released names work: ``ft_wiki_laion_220_2`` -> ``["wiki", "laion_220"]``.
    """
    name = dataset_name or ""
    sources = [s for s in ("cropped_vg", "wiki", "laion_220_short") if s in name]
    if "laion_220" in name.replace("laion_220_short", ""):
        sources.append("laion_220")
    return sources


def clamp_box(x: float, y: float, w: float, h: float, width: int, height: int) -> tuple[int, int, int, int] | None:
    """Clamp box ``(x, y, w, h)`` to a ``width`` x ``height`` image.

    Returns the PIL crop box ``(left, upper, right, lower)`` in whole pixels, or None when no pixel is left.
    """
    left, upper = max(0, round(x)), max(0, round(y))
    right, lower = min(width, round(x + w)), min(height, round(y + h))
    if right <= left or lower <= upper:
        return None
    return left, upper, right, lower


class BadImage(ValueError):
    """A training image that cannot be decoded (missing, corrupt, truncated) or whose crop box lies outside it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


def _open_rgb(path: str, xywh=None, what: str = "") -> Image.Image:
    """Decode ``path`` to RGB, cropped to the clamped box ``xywh`` when given; :class:`BadImage` if it cannot be."""
    try:
        with Image.open(path) as image:
            if xywh is None:
                return image.convert("RGB")
            box = clamp_box(*xywh, *image.size)
            if box is None:
                raise BadImage(path, f"{what}: box {tuple(float(v) for v in xywh)} lies outside its "
                                     f"{image.size[0]}x{image.size[1]} image")
            return image.crop(box).convert("RGB")
    except BadImage:
        raise
    except Exception as err:  # noqa: BLE001 - PIL reports broken files as OSError, SyntaxError, struct.error, ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise BadImage(path, f"unreadable image ({type(err).__name__}{': ' + reason if reason else ''})") from None


def _not_utf8(path, err: UnicodeDecodeError) -> ValueError:
    return ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start} of a read block)")


def _read_json(path: Path):
    """A whole JSON file, or one ValueError naming it (not UTF-8, not JSON)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None


_HINTS = {
    "Visual Genome directory (--vg_dir)": " (a folder with region_descriptions.json, image_data.json and the "
                                          "VG_100K/ and VG_100K_2/ images from the Visual Genome site; no hub "
                                          "copy loads with current `datasets`)",
}


def _require_dir(path, what: str) -> Path:
    if path is None:
        raise ValueError(f"{what} is required for this dataset{_HINTS.get(what, '')}")
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{what} {path} is not a directory")
    return Path(path)


def _local_or_hub(source, what: str) -> Path | str:
    """A local path when ``source`` exists; a hub id when it looks like ``owner/name``; else FileNotFoundError."""
    path = Path(source)
    if path.exists():
        return path
    if path.suffix.lower() in _LOCAL_SUFFIXES or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
        raise FileNotFoundError(f"{what} {source} not found")
    return str(source)


def _cap(*limits):
    """The smallest of the limits that are not None (None when all are)."""
    given = [int(n) for n in limits if n is not None]
    return min(given) if given else None


# ----------------------------------------------------------------------------- Visual Genome

class VGRegions(Dataset):
    """Visual Genome region descriptions: one item per region, the crop of its box paired with its phrase.

    ``vg_dir`` holds ``region_descriptions.json`` (v1.2 fields ``region_id``/``image_id`` or v1.0 ``id``/``image``),
    ``image_data.json`` (sizes and urls) and the images, found as ``VG_100K*/<url basename>``,
    ``VG_100K/<image_id>.jpg``, ``VG_100K_2/<image_id>.jpg`` or ``<url basename>`` directly in ``vg_dir``.
    Boxes are clamped to the image; a box with nothing inside its image (checked against ``image_data.json``
    here, and against the decoded image in ``__getitem__``) raises ValueError naming the region, or is
    skipped with a warning when ``skip_invalid_boxes``. Regions whose image file is absent are skipped with
    a one-line warning. ``max_samples`` keeps the first regions in file order.
    """

    def __init__(self, vg_dir, *, max_samples: int | None = None, skip_invalid_boxes: bool = False):
        vg_dir = _require_dir(vg_dir, "Visual Genome directory (--vg_dir)")
        regions_file, images_file = vg_dir / "region_descriptions.json", vg_dir / "image_data.json"
        for f in (regions_file, images_file):
            if not f.is_file():
                raise FileNotFoundError(f"Visual Genome: {f} not found")
        images = self._read_images(images_file, vg_dir)
        records = _read_json(regions_file)
        if not isinstance(records, list):
            raise ValueError(f"{regions_file}: expected a JSON list of {{'id', 'regions'}} records, "
                             f"found a {type(records).__name__}")

        paths, path_index = [], {}
        owners, boxes, phrases = [], [], []
        missing, invalid = 0, 0
        for rec_no, record in enumerate(records):
            if not isinstance(record, dict) or not isinstance(record.get("regions"), list):
                raise ValueError(f"{regions_file}: record {rec_no}: expected an object with a 'regions' list")
            for region in record["regions"]:
                if max_samples is not None and len(owners) >= max_samples:
                    break
                try:
                    region_id = region["region_id"] if "region_id" in region else region["id"]
                    image_id = region.get("image_id", region.get("image", record.get("id")))
                    xywh = tuple(float(region[k]) for k in ("x", "y", "width", "height"))
                    phrase = region["phrase"].strip()
                except (KeyError, TypeError, ValueError, AttributeError) as err:
                    raise ValueError(f"{regions_file}: record {rec_no}: malformed region ({err!r})") from None
                if image_id not in images:
                    raise ValueError(f"{regions_file}: region {region_id}: image {image_id} not in {images_file}")
                path, width, height = images[image_id]
                if clamp_box(*xywh, width, height) is None:
                    if not skip_invalid_boxes:
                        raise ValueError(f"{regions_file}: region {region_id} box {xywh} lies outside "
                                         f"its {width}x{height} image {image_id}")
                    invalid += 1
                    continue
                if path is None:
                    missing += 1
                    continue
                if path not in path_index:
                    path_index[path] = len(paths)
                    paths.append(path)
                owners.append(path_index[path])
                boxes.append(xywh)
                phrases.append(phrase)
        if invalid:
            logger.warning("Visual Genome %s: skipped %d regions whose box lies outside the image", vg_dir, invalid)
        if missing:
            logger.warning("Visual Genome %s: skipped %d regions whose image file is missing", vg_dir, missing)
        if not owners:
            raise ValueError(f"Visual Genome {vg_dir}: no usable region (missing images: {missing}, "
                             f"boxes outside: {invalid})")
        self._paths = PackedStrings(paths)
        self._owner = np.asarray(owners, dtype=np.int32)
        self._boxes = np.asarray(boxes, dtype=np.float64)
        self._phrases = PackedStrings(phrases)

    @staticmethod
    def _read_images(images_file: Path, vg_dir: Path) -> dict:
        """``{image_id: (path or None, width, height)}`` from ``image_data.json``."""
        listings = {}

        def present(rel: PurePosixPath) -> bool:
            folder = vg_dir / rel.parent
            if folder not in listings:
                listings[folder] = set(os.listdir(folder)) if folder.is_dir() else set()
            return rel.name in listings[folder]

        entries = _read_json(images_file)
        if not isinstance(entries, list):
            raise ValueError(f"{images_file}: expected a JSON list of image records, found a {type(entries).__name__}")
        images = {}
        for no, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise ValueError(f"{images_file}: entry {no}: expected an object")
            try:
                image_id = entry["image_id"] if "image_id" in entry else entry["id"]
                width, height = int(entry["width"]), int(entry["height"])
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{images_file}: entry {no}: malformed image record ({err!r})") from None
            url_path = PurePosixPath(urlparse(entry.get("url") or "").path)
            candidates = [PurePosixPath("VG_100K", f"{image_id}.jpg"), PurePosixPath("VG_100K_2", f"{image_id}.jpg")]
            if url_path.name:
                candidates = [PurePosixPath(url_path.parent.name, url_path.name), *candidates,
                              PurePosixPath(url_path.name)]
            for rel in candidates:  # the JSON names these files: none may leave the folder
                if rel.is_absolute() or any(part in ("..", ".") for part in rel.parts) or "\0" in str(rel):
                    raise ValueError(f"{images_file}: entry {no}: its image_id or url names {str(rel)!r}, a path "
                                     f"outside {vg_dir}; image files must lie in its VG_100K folders")
            found = next((c for c in candidates if present(c)), None)
            images[image_id] = (None if found is None else str(vg_dir / found), width, height)
        return images

    def __len__(self) -> int:
        return len(self._owner)

    def __getitem__(self, i: int) -> dict:
        image = _open_rgb(self._paths[int(self._owner[i])], self._boxes[i], f"Visual Genome region #{i}")
        return {"image": image, "text": self._phrases[i]}


# ----------------------------------------------------------------------------- LAION-220

def _read_table(path: Path, columns: list[str]):
    """Read the needed columns of a parquet, JSONL, JSON or CSV file into a pandas DataFrame."""
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".jsonl", ".json", ".csv"):
        raise ValueError(f"{path}: unsupported file type {suffix!r} (use .parquet, .jsonl, .json or .csv)")
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            present = pq.read_schema(path).names
            return pd.read_parquet(path, columns=[c for c in columns if c in present])
        if suffix == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        return pd.read_json(path, lines=suffix == ".jsonl", dtype=False, encoding="utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from None
    except (ValueError, OSError) as err:  # pandas/pyarrow parse errors
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: cannot be read as {suffix[1:]} ({reason})") from None


def _index_images(root: Path) -> dict[str, str]:
    """``{file name: path}`` for every file under ``root`` (first in sorted walk order wins)."""
    index = {}
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            index.setdefault(name, os.path.join(folder, name))
    return index


class LaionCaptions(Dataset):
    """LAION-220K GPT-4V captions (``laion/220k-GPT4Vision-captions-from-LIVIS``) with local COCO/LVIS images.

    ``laion_file`` is a local parquet/JSONL/JSON/CSV file or a hub id (default: the hub dataset); it needs
    a ``url`` column and ``caption`` (``short=False``) or ``short_caption``/``short_captions`` (``short=True``).
    A row's image is the file named like the url's basename (``000000123456.jpg``) anywhere under
    ``image_root`` (indexed once, recursively). Rows whose image or caption is missing are skipped with one
    warning line; ``max_samples`` keeps the first usable rows.
    """

    def __init__(self, image_root, laion_file=None, *, short: bool = False, max_samples: int | None = None):
        image_root = _require_dir(image_root, "LAION-220 image root (--laion_image_root)")
        source = _local_or_hub(laion_file or LAION_HUB_ID, "LAION-220 caption file")
        wanted = ["url", *LAION_CAPTION_COLUMNS[short]]
        if isinstance(source, Path):
            table = _read_table(source, wanted)
            columns = list(table.columns)
        else:
            import datasets

            table = datasets.load_dataset(source, split="train")
            columns = table.column_names
        caption_column = next((c for c in LAION_CAPTION_COLUMNS[short] if c in columns), None)
        if "url" not in columns or caption_column is None:
            raise ValueError(f"LAION-220 {source}: needs columns 'url' and "
                             f"{' or '.join(map(repr, LAION_CAPTION_COLUMNS[short]))}; found {columns}")
        index = _index_images(image_root)
        paths, captions, no_image, no_caption = [], [], 0, 0
        for url, caption in zip(table["url"], table[caption_column]):
            if max_samples is not None and len(paths) >= max_samples:
                break
            path = index.get(PurePosixPath(urlparse(str(url or "")).path).name)
            caption = caption.strip() if isinstance(caption, str) else ""
            if path is None:
                no_image += 1
            elif not caption:
                no_caption += 1
            else:
                paths.append(path)
                captions.append(caption)
        if no_image or no_caption:
            logger.warning("LAION-220 %s: skipped %d rows whose image is not under %s and %d rows without %s",
                           source, no_image, image_root, no_caption, caption_column)
        if not paths:
            raise ValueError(f"LAION-220 {source}: no row has both a {caption_column} and an image under {image_root}")
        self._paths, self._captions = PackedStrings(paths), PackedStrings(captions)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, i: int) -> dict:
        return {"image": _open_rgb(self._paths[i]), "text": self._captions[i]}


# ----------------------------------------------------------------------------- generic caption file

def _parse_crop(value, where: str):
    """``[x, y, w, h]`` or ``"x,y,w,h"`` -> 4 floats (None for an empty value)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    parts = value.replace("[", "").replace("]", "").split(",") if isinstance(value, str) else value
    try:
        crop = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        crop = ()
    if len(crop) != 4 or crop[2] <= 0 or crop[3] <= 0:
        raise ValueError(f"{where}: crop must be [x, y, w, h] with w, h > 0, got {value!r}")
    return crop


def _caption_rows(path: Path):
    """``(line number, row dict)`` for each record of a JSONL or CSV file."""
    from data.benchmarks import read_jsonl

    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            yield from read_jsonl(path)
        elif suffix == ".csv":
            with open(path, encoding="utf-8-sig", newline="") as f:  # a BOM is not part of the first column name
                reader = csv.DictReader(f)
                for row in reader:
                    yield reader.line_num, row
        else:
            raise ValueError(f"{path}: unsupported file type {suffix!r} (use .jsonl or .csv)")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from None


class CaptionFile(Dataset):
    """A generic JSONL or CSV file: ``image`` (path, absolute or relative to the file's folder), ``caption``,
    optional ``crop`` (``[x, y, w, h]`` or ``"x,y,w,h"``, clamped to the image) and optional ``prompt``
    (text put before the caption as context only: no loss on its tokens, as in prompt/completion
    fine-tuning). Every row is checked here: a missing column or image file raises an error naming the
    file and line. ``max_samples`` keeps the first rows. ``flag`` names the file in errors (train.py reads
    its ``--validation_file`` with this class too).
    """

    def __init__(self, train_file, *, max_samples: int | None = None, flag: str = "--train_file"):
        path = Path(train_file)
        if not path.is_file():
            raise FileNotFoundError(f"{flag} {path} not found")
        images, captions, crops, where, prompts = [], [], [], [], []
        for line_no, row in _caption_rows(path):
            if max_samples is not None and len(images) >= max_samples:
                break
            here = f"{path}:{line_no}"
            for column in ("image", "caption"):
                if not isinstance(row.get(column), str) or not row[column].strip():
                    raise ValueError(f"{here}: missing or empty column {column!r}")
            image = path.parent / row["image"].strip()
            if not image.is_file():
                raise FileNotFoundError(f"{here}: image {image} not found")
            images.append(str(image))
            captions.append(row["caption"].strip())
            prompt = row.get("prompt")
            if prompt is not None and not isinstance(prompt, str):
                raise ValueError(f"{here}: column 'prompt' must be text")
            prompts.append(prompt.strip() + " " if prompt and prompt.strip() else "")  # joined by one space
            crop = _parse_crop(row.get("crop"), here)
            crops.append((np.nan,) * 4 if crop is None else crop)
            where.append(here)
        if not images:
            raise ValueError(f"{flag} {path} holds no rows")
        self._images, self._captions, self._where = PackedStrings(images), PackedStrings(captions), PackedStrings(where)
        self._prompts = PackedStrings(prompts) if any(prompts) else None
        self._crops = np.asarray(crops, dtype=np.float64)

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, i: int) -> dict:
        crop = None if np.isnan(self._crops[i, 0]) else self._crops[i]
        item = {"image": _open_rgb(self._images[i], crop, self._where[i]), "text": self._captions[i]}
        if self._prompts is not None and self._prompts[i]:
            item["prompt"] = self._prompts[i]
        return item


# ----------------------------------------------------------------------------- WikiText

def _wiki_lines(source, hub_config: str):
    """The text lines of a WikiText source: a text file (kept verbatim, newlines included), a parquet file
    with a ``text`` column (the hub layout), or a hub id loaded with ``datasets`` in config ``hub_config``."""
    if isinstance(source, Path):
        if source.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            yield from pq.read_table(source, columns=["text"]).column("text").to_pylist()
        else:
            with open(source, encoding="utf-8") as f:
                yield from f
    else:
        import datasets

        yield from datasets.load_dataset(source, hub_config, split="train")["text"]


_HEADING = re.compile(r"^\s*=.*=\s*$")
_WIKI_JOINER = re.compile(r" @(.)@ ")  # WikiText's " @-@ ", " @,@ ", " @.@ "


def wiki_sentences(text: str) -> list[str]:
    """Candidate image prompts of a WikiText chunk: the sentences of its non-heading lines, with WikiText's
    ``@-@`` style joiners undone. Sentence splitting is ``data.prompts.split_sentences``."""
    from data.prompts import split_sentences

    sentences = []
    for line in text.split("\n"):
        if line.strip() and not _HEADING.match(line):
            sentences += [" ".join(s.split()) for s in split_sentences(_WIKI_JOINER.sub(r"\1", line))]
    return [s for s in sentences if s]


class WikiChunks(Dataset):
    """WikiText as consecutive chunks of exactly ``chunk_tokens`` LM tokens, each with one generated image.

    All lines (headings included, in file order) are tokenized without special tokens and concatenated;
    the stream is cut into chunks and the last partial chunk is dropped (as the released code did), so every
    chunk has exactly ``chunk_tokens`` ids. ``max_chunks`` keeps the first chunks (and stops tokenizing early).
    An item's text is its ids decoded; its image is ``image_provider.get([[prompt]])[0][0].image`` for
    ``prompt = self.prompt(i)``, a sentence of the chunk drawn with ``random.Random(f"{seed}:{i}")``.
    Decoded text re-tokenizes to about (not always exactly) ``chunk_tokens`` tokens.

    ``source``: a text file (WikiText's ``wiki.*.tokens`` / ``wiki.*.raw`` layout), a parquet file with a
    ``text`` column, or a hub id (default ``Salesforce/wikitext`` in config ``hub_config``).
    """

    def __init__(self, source=None, *, tokenizer, chunk_tokens: int = 447, max_chunks: int | None = None,
                 image_provider=None, seed: int = 0, hub_config: str = WIKI_HUB_CONFIG):
        if tokenizer is None:
            raise ValueError("WikiText chunks need the LM tokenizer")
        if chunk_tokens < 1:
            raise ValueError(f"wiki_chunk_tokens must be positive, got {chunk_tokens}")
        source = _local_or_hub(source or WIKI_HUB_ID, "WikiText file")
        self.tokenizer, self.image_provider, self.seed = tokenizer, image_provider, seed
        needed = None if max_chunks is None else max_chunks * chunk_tokens
        pieces, total, batch = [], 0, []
        try:
            for line in _wiki_lines(source, hub_config):
                batch.append(line)
                if len(batch) == 1000:
                    total += self._tokenize(batch, pieces)
                    batch = []
                    if needed is not None and total >= needed:
                        break
        except UnicodeDecodeError as err:
            raise _not_utf8(source, err) from None
        if batch:
            self._tokenize(batch, pieces)
        ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
        count = _cap(len(ids) // chunk_tokens, max_chunks)
        if count == 0:
            raise ValueError(f"WikiText {source}: {len(ids)} tokens, fewer than one chunk of {chunk_tokens}")
        self._ids = ids[:count * chunk_tokens].reshape(count, chunk_tokens)

    def _tokenize(self, lines: list[str], pieces: list) -> int:
        encoded = self.tokenizer(lines, add_special_tokens=False, verbose=False)["input_ids"]
        pieces.extend(np.asarray(ids, dtype=np.int32) for ids in encoded if ids)
        return sum(len(ids) for ids in encoded)

    def __len__(self) -> int:
        return len(self._ids)

    def chunk_ids(self, i: int) -> list[int]:
        """The LM token ids of chunk ``i``."""
        return self._ids[i].tolist()

    def text(self, i: int) -> str:
        return self.tokenizer.decode(self.chunk_ids(i), clean_up_tokenization_spaces=False)

    def prompt(self, i: int, text: str | None = None) -> str:
        """The image prompt of chunk ``i``: a seeded random sentence (the whole chunk if it has none)."""
        text = self.text(i) if text is None else text
        sentences = wiki_sentences(text) or [" ".join(text.split())]
        return random.Random(f"{self.seed}:{i}").choice(sentences)

    def __getitem__(self, i: int) -> dict:
        if self.image_provider is None:
            raise ValueError("WikiChunks items need an image_provider")
        text = self.text(i)
        image = self.image_provider.get([[self.prompt(i, text)]])[0][0].image
        return {"image": image.convert("RGB"), "text": text}


def wiki_image_prompts(wiki_file=None, *, tokenizer, max_elements: int | None = None,
                       max_train_samples: int | None = None, wiki_chunk_tokens: int = 447, seed: int = 0,
                       wiki_config: str = WIKI_HUB_CONFIG) -> list[str]:
    """The image prompt of every WikiText chunk that :func:`build_train_dataset` would build with the same
    arguments, in chunk order, so a pre-generation pass can fill the image cache before training."""
    chunks = WikiChunks(wiki_file, tokenizer=tokenizer, chunk_tokens=wiki_chunk_tokens, seed=seed,
                        max_chunks=_cap(max_elements, max_train_samples), hub_config=wiki_config)
    return [chunks.prompt(i) for i in range(len(chunks))]


# ----------------------------------------------------------------------------- entry point

def build_train_dataset(dataset_name: str | None, *, vg_dir=None, laion_file=None, laion_image_root=None,
                        wiki_file=None, wiki_config: str = WIKI_HUB_CONFIG, train_file=None, tokenizer=None,
                        max_elements: int | None = None, max_train_samples: int | None = None,
                        wiki_chunk_tokens: int = 447, image_provider=None, seed: int = 0,
                        skip_invalid_boxes: bool = False) -> Dataset:
    """The training set named by ``dataset_name`` (see :func:`select_sources`), as one dataset or a
    ConcatDataset in the order Visual Genome, WikiText, LAION, ``train_file``.

    ``train_file`` is always added as one more source, whatever the name says; the name may then match
    nothing. ``max_train_samples`` caps every source (first items); ``max_elements`` caps the WikiText chunks.
    Paths and required arguments are all checked before any source is read.
    """
    sources = select_sources(dataset_name)
    if not sources and train_file is None:
        raise ValueError(f"dataset name {dataset_name!r} names no source: use one or more of "
                         f"{', '.join(KNOWN_SOURCES)} (e.g. wiki_laion_220), or give a train_file")
    laion_short = "laion_220_short" in sources
    laion_long = "laion_220" in sources
    if "cropped_vg" in sources:
        _require_dir(vg_dir, "Visual Genome directory (--vg_dir)")
    if "wiki" in sources:
        if tokenizer is None or image_provider is None:
            raise ValueError("the wiki source needs the LM tokenizer and an image_provider")
        _local_or_hub(wiki_file or WIKI_HUB_ID, "WikiText file")
    if laion_short or laion_long:
        _require_dir(laion_image_root, "LAION-220 image root (--laion_image_root)")
        _local_or_hub(laion_file or LAION_HUB_ID, "LAION-220 caption file")
    if train_file is not None and not Path(train_file).is_file():
        raise FileNotFoundError(f"--train_file {train_file} not found")

    parts = []
    if "cropped_vg" in sources:
        parts.append(VGRegions(vg_dir, max_samples=max_train_samples, skip_invalid_boxes=skip_invalid_boxes))
    if "wiki" in sources:
        parts.append(WikiChunks(wiki_file, tokenizer=tokenizer, chunk_tokens=wiki_chunk_tokens, seed=seed,
                                max_chunks=_cap(max_elements, max_train_samples), image_provider=image_provider,
                                hub_config=wiki_config))
    for short in [s for s, on in ((False, laion_long), (True, laion_short)) if on]:
        parts.append(LaionCaptions(laion_image_root, laion_file, short=short, max_samples=max_train_samples))
    if train_file is not None:
        parts.append(CaptionFile(train_file, max_samples=max_train_samples))
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


# ----------------------------------------------------------------------------- unreadable images

class NoReadableImage(RuntimeError):
    """Many consecutive items of a training set have unreadable images."""

    @staticmethod
    def message_of(err: BaseException) -> str:
        """The one-line message, also when a DataLoader worker re-raised it with the worker's traceback."""
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        last = lines[-1] if lines else type(err).__name__
        return last.split("NoReadableImage: ", 1)[-1]


class SkipBadImages(Dataset):
    """A training set whose unreadable items are replaced by the next readable one (index order, wrapping).

    An item whose image cannot be decoded or cropped (:class:`BadImage`) is skipped; the item returned in its
    place lists the skipped ``(path, reason)`` pairs under ``"bad_images"`` so the training loop can count them
    (the collator gathers them per batch). Batches keep their size, every process of a distributed run keeps
    the same number of batches, and an index always gives the same item, so resuming stays exact.
    More than ``max_consecutive`` unreadable items in a row raise :class:`NoReadableImage`.
    """

    def __init__(self, dataset: Dataset, max_consecutive: int = 100):
        self.dataset, self.max_consecutive = dataset, max_consecutive

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        n, bad = len(self.dataset), []
        for offset in range(min(n, self.max_consecutive)):
            try:
                item = self.dataset[(int(i) + offset) % n]
            except BadImage as err:
                bad.append((err.path, err.reason))
                continue
            return {**item, "bad_images": bad}
        raise NoReadableImage(f"{len(bad)} consecutive training images cannot be read, e.g. {bad[0][0]}: "
                              f"{bad[0][1]}")


class BadImageBudget:
    """Counts the training images seen and the unreadable ones skipped; logs each bad path once.

    :meth:`exceeded` is true when more than ``max_fraction`` of the images seen were bad. The fraction is
    taken over at least ``min(dataset_size, floor)`` images, so one bad image among the first few does not
    stop a large run, while a small training set is judged on its own size from the start.
    """

    floor = 1000

    def __init__(self, max_fraction: float, dataset_size: int, seen: int = 0, bad: int = 0):
        self.max_fraction, self.dataset_size = max_fraction, dataset_size
        self.seen, self.bad = seen, bad
        self.example: tuple[str, str] | None = None
        self._logged: set[str] = set()

    def log(self, bad_images) -> None:
        """Log the paths of this process's skipped images not logged before."""
        for path, reason in bad_images:
            self.example = self.example or (path, reason)
            if path not in self._logged:
                self._logged.add(path)
                logging.getLogger("train.bad_images").warning("skipping an unreadable training image: %s: %s",
                                                              path, reason)

    def add(self, seen: int, bad: int) -> None:
        self.seen, self.bad = self.seen + seen, self.bad + bad

    def exceeded(self) -> bool:
        return self.bad > self.max_fraction * max(self.seen, min(self.dataset_size, self.floor))

    def message(self) -> str:
        example = f"; e.g. {self.example[0]}: {self.example[1]}" if self.example else "; see the warnings above"
        return (f"{self.bad} of the {self.seen} training images seen so far cannot be read (more than "
                f"--max_bad_images {self.max_fraction:g} of them){example}")


# ----------------------------------------------------------------------------- collator

class CaptionCollator:
    """Batch ``{"image", "text"}`` items for the LM (picklable, so it runs in DataLoader workers).

    Texts are tokenized with the tokenizer's own special tokens, truncated to ``max_length`` tokens
    (the EOS included: with ``add_eos`` the text keeps ``max_length - 1``), and right-padded to the longest
    row of the batch. The pad id is the tokenizer's pad token, else its EOS; only ``attention_mask`` says
    which positions are real, so an EOS used as padding never hides a real EOS. WikiText chunks need
    ``max_length`` of at least the chunk length plus the special tokens, or they are cut.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (``input_ids`` with -100 on padding, and on
    the tokens of an item's optional ``"prompt"``, which is put before its text as context), all
    ``[B, T]`` long, ``pixel_values`` ``[B, 3, H, W]`` from ``image_transform`` (PIL -> tensor), and
    ``bad_images``: the ``(path, reason)`` pairs :class:`SkipBadImages` skipped to fill the batch.
    """

    def __init__(self, tokenizer, image_transform, max_length: int = 128, add_eos: bool = True):
        self.tokenizer, self.image_transform = tokenizer, image_transform
        self.max_length, self.add_eos = max_length, add_eos
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        if add_eos and self.eos_id is None:
            raise ValueError("add_eos needs a tokenizer with an EOS token")
        if self.pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token to pad with")
        if max_length < 1 + add_eos:
            raise ValueError(f"max_length {max_length} leaves no room for text")

    def _context_length(self, prompt: str) -> int:
        """How many tokens a context prompt takes at the start of its row: its own and the tokenizer's
        leading special tokens, not the ones a tokenizer appends to every text ([SEP], </s>)."""
        ids = self.tokenizer(prompt.rstrip(), verbose=False)["input_ids"]
        special = set(self.tokenizer.all_special_ids)
        n = len(ids)
        while n and ids[n - 1] in special:
            n -= 1
        return n

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        texts = [item.get("prompt", "") + item["text"] for item in batch]
        rows = self.tokenizer(texts, truncation=True, max_length=self.max_length - self.add_eos,
                              verbose=False)["input_ids"]
        context = [self._context_length(item["prompt"]) if item.get("prompt") else 0 for item in batch]
        if self.add_eos:
            rows = [ids if ids and ids[-1] == self.eos_id else ids + [self.eos_id] for ids in rows]
        length = max(len(ids) for ids in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for r, ids in enumerate(rows):
            input_ids[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[r, :len(ids)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        for r, n in enumerate(context):
            labels[r, :n] = -100
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": torch.stack([self.image_transform(item["image"]) for item in batch]),
            "bad_images": [bad for item in batch for bad in item.get("bad_images", ())],
        }
